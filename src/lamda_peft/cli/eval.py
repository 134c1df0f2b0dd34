"""``lamda-peft eval``: load a trained adapter (or a fully fine-tuned model) and report its metrics on a file.

Also the evaluation helpers that ``lamda-peft train`` uses for its final metrics, so that both commands report
exactly the same numbers: ``load_base`` (model class by task), ``evaluate`` (metrics from one pass over a dataset),
``generate`` (greedy answers for causal-lm, with GSM8K final-number exact match).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..apps import metrics as M
from ..apps.data import BBC_NEWS, CausalLMCollator, DataSpec, bbc_news, dropped_rows_notice, prompt_text
from ..apps.data_loading import read_table
from ..apps.tables import DataError, Table
from . import UsageError
from .eval_args import RUN_FILE, check_args
from .eval_args import add_parser as _add_parser
from .predictions import prediction_rows, write_predictions


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """The ``eval`` subcommand (its options and checks are in ``eval_args``, which ``lamda-peft`` imports)."""
    _add_parser(subparsers)


# ------------------------------------------------------------------------------------------------------- helpers


def load_base(path: str, task: str, num_labels: int = 2, dtype: torch.dtype = torch.float32,
              head_from_adapter: bool = False, tokenizer_optional: bool = False, **load_kwargs):
    """The base model and tokenizer for ``task``; a pad token is set where the tokenizer has none.
    ``head_from_adapter``: an adapter will replace the new classification head (no line about a random head).
    ``tokenizer_optional``: a folder without a tokenizer gives ``None`` for it (export and merge need none).
    ``load_kwargs`` go to ``from_pretrained`` (e.g. ``quantization_config``)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        if not tokenizer_optional:
            raise
        tokenizer = None
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **load_kwargs)
    else:
        problem = "regression" if task == "regression" else "single_label_classification"
        with _quiet_load_report():  # its "MISSING" lines for the new head alarm for nothing: one line below instead
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1 if task == "regression" else num_labels, problem_type=problem, dtype=dtype,
                output_loading_info=True, **load_kwargs)
        _explain_new_head(model, info, head_from_adapter)
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@contextmanager
def _quiet_load_report():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _explain_new_head(model, info: dict, head_from_adapter: bool = False) -> None:
    """One line for the classification head that the checkpoint lacks (expected); other missing weights are listed."""
    missing = list(info.get("missing_keys") or [])
    head = [k for k in missing if k.split(".")[0] in ("classifier", "score", "pre_classifier")]
    other = [k for k in missing if k not in head]
    if head and not head_from_adapter:
        print(f"new classification head ({', '.join(sorted(head))}): not in the pretrained checkpoint, initialised "
              "at random and trained with the adapter (expected)")
    if other:
        print(f"warning: {len(other)} weights of {type(model).__name__} were not in the checkpoint and are random: "
              f"{', '.join(other[:5])}{' ...' if len(other) > 5 else ''}", file=sys.stderr)


def collator_for(spec: DataSpec, tokenizer):
    from transformers import DataCollatorWithPadding

    if spec.task == "causal-lm":
        return CausalLMCollator(tokenizer.pad_token_id)
    return DataCollatorWithPadding(tokenizer)


@torch.no_grad()
def evaluate(model, tokenizer, spec: DataSpec, dataset, batch_size: int = 32) -> dict[str, float]:
    """Task metrics from one pass: accuracy/F1/MCC, Pearson/Spearman, or the response-token loss and perplexity.

    The loss is averaged over examples (classification, regression) or over response tokens (causal-lm).
    """
    model.eval()
    device = next(model.parameters()).device
    collate = collator_for(spec, tokenizer)
    loss_sum, count, outputs, labels = 0.0, 0, [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc="evaluating", unit="batch", leave=False):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        target = batch.pop("labels")
        logits = model(**batch).logits.float()
        if spec.task == "causal-lm":  # next-token loss on response tokens only (prompt and padding are -100)
            shifted = target[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100, reduction="sum")
            loss_sum, count = loss_sum + loss.item(), count + int((shifted != -100).sum())
        elif spec.task == "regression":
            pred = logits.squeeze(-1)
            loss_sum, count = loss_sum + ((pred - target) ** 2).sum().item(), count + len(target)
            outputs.append(pred.cpu().numpy()), labels.append(target.cpu().numpy())
        else:
            loss = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
            loss_sum, count = loss_sum + loss.item(), count + len(target)
            outputs.append(logits.argmax(-1).cpu().numpy()), labels.append(target.cpu().numpy())
    loss = loss_sum / max(count, 1)
    rows = {"eval_rows": len(dataset), **({"eval_rows_left_out": dataset.dropped} if getattr(dataset, "dropped", 0)
                                          else {})}
    if spec.task == "causal-lm":
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "response_tokens": count, **rows}
    pred, true = np.concatenate(outputs), np.concatenate(labels)
    if spec.task == "regression":
        return {"loss": loss, **M.regression_metrics(pred, true), **rows}
    return {"loss": loss, **M.classification_metrics(pred, true, len(spec.classes)), **rows}


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy continuations of ``prompts`` (formatted as in training), left-padded in batches."""
    model.eval()
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="generating", unit="batch", leave=False):
            texts = [prompt_text(tokenizer, p) for p in prompts[start:start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def generation_report(model, tokenizer, spec: DataSpec, table: Table, n: int, max_new_tokens: int,
                      batch_size: int = 8) -> dict[str, Any]:
    """Greedy answers for the first ``n`` rows; GSM8K-style references (``#### N``) add the exact-match rate.
    On a CPU a larger ``batch_size`` is much faster per answer (each new token reads every weight once per batch)."""
    rows = table.rows[:n]
    if spec.messages_column:  # the conversation before its last assistant turn; that turn is the reference
        from ..apps.data import _conversation
        conversations = [_conversation(r[spec.messages_column], table.source) for r in rows]
        last = [max(i for i, m in enumerate(c) if m["role"] == "assistant") for c in conversations]
        prompts = [c[:i] for c, i in zip(conversations, last)]
        references = [str(c[i]["content"]) for c, i in zip(conversations, last)]
    else:
        prompts = [str(r[spec.prompt_column]) for r in rows]
        references = [str(r[spec.response_column]) for r in rows]
    answers = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    report: dict[str, Any] = {"generated": len(answers)}
    if M.has_final_answers(references):
        report["final_answer_exact_match"] = M.exact_match(answers, references)
    report["samples"] = [{"prompt": p, "reference": r, "generated": a} for p, r, a in zip(prompts, references, answers)]
    return report


def print_metrics(values: dict[str, Any], prefix: str = "") -> None:
    """``accuracy=0.9230  loss=0.5440``: plain numbers (numpy scalars too, never ``np.float64(...)``)."""
    shown = {k: v.item() if isinstance(v, np.generic) else v for k, v in values.items()}
    shown = {k: v for k, v in shown.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print(prefix + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))


# ------------------------------------------------------------------------------------------------------- command


def _load_model(adapter: Path, base: Optional[str], spec: DataSpec, bits: Optional[int]):
    """The trained model: the base (``base``, else the one the adapter names; quantized to ``bits`` (4 or 8) when
    given) with the adapter, or a fully fine-tuned model folder."""
    from peft import PeftConfig, PeftModel

    from .model_path import resolve_model_path
    from .quantized_base import load_quantized, require_bitsandbytes

    num_labels = len(spec.classes or []) or 2
    is_adapter = (adapter / "adapter_config.json").is_file()
    if not is_adapter and not (adapter / "config.json").is_file():
        raise UsageError(f"--adapter {adapter}: no adapter_config.json or config.json there; "
                         "give a folder written by 'lamda-peft train'")
    if bits and not is_adapter:
        raise UsageError(f"--load-in-{bits}bit: {adapter} is a fully fine-tuned model (--method full), trained in full "
                         f"precision; evaluate it without --load-in-{bits}bit")
    if bits:
        require_bitsandbytes(f"--load-in-{bits}bit")
    try:
        if not is_adapter:  # a fully fine-tuned model (method "full"): its head is in its own weights
            return load_base(str(adapter), spec.task, num_labels)
        if base is None:  # no --model and no run file: the base the adapter names
            base = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
        if bits:
            model, tokenizer = load_quantized(resolve_model_path(base), spec.task, num_labels, bits,
                                              head_from_adapter=True)
        else:
            model, tokenizer = load_base(resolve_model_path(base), spec.task, num_labels, head_from_adapter=True)
        model = PeftModel.from_pretrained(model, str(adapter))
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # missing or mismatched weights
        raise UsageError(f"cannot load the model for {adapter} (base {base!r}): {err}") from None
    if spec.task != "causal-lm":
        _explain_adapter_head(model)
    return model, tokenizer


def _explain_adapter_head(model) -> None:
    """Where the classification head comes from: the adapter (trained), or nowhere (the base's random one)."""
    from peft.utils.other import ModulesToSaveWrapper

    if any(isinstance(m, ModulesToSaveWrapper) for m in model.modules()):
        print("classification head: from the adapter")
    else:
        print("warning: the adapter holds no classification head, so the head is the base's new random one and the "
              "metrics are near chance; use an adapter trained with its head (PEFT task_type SEQ_CLS)", file=sys.stderr)


def _saved_config(adapter: Path) -> dict:
    """The run's config: from ``metrics.json`` of a finished run, or ``lamda_peft_run.json`` of a checkpoint."""
    from .checkpoints import RUN_CONFIG

    for name in (RUN_FILE, RUN_CONFIG):
        if (adapter / name).is_file():
            try:
                return json.loads((adapter / name).read_text()).get("config") or {}
            except (OSError, ValueError) as err:
                raise UsageError(f"{adapter / name}: cannot read it ({err}); pass --task and the data options") \
                    from None
    return {}


def _given(value: Any, saved: Any) -> Any:
    """The option's value when given on the command line, else the run's (an explicit value is never replaced)."""
    return saved if value is None else value


def run(args: argparse.Namespace) -> int:
    from .._peft_hook import register_methods
    from .quantized_base import DESCRIPTION, quantized_bits

    register_methods()  # LaMDA and LoRA-FA with PEFT (``import lamda_peft`` does it once peft is imported)

    check_args(args)  # the options alone, before the adapter or any data is read (``lamda-peft`` did already)
    adapter = Path(args.adapter)
    if not adapter.is_dir():
        raise UsageError(f"--adapter {adapter}: no such folder; give the --output-dir of a 'lamda-peft train' run")
    saved = _saved_config(adapter)
    task = _given(args.task, saved.get("task"))
    if task is None:
        raise UsageError(f"{adapter} has no {RUN_FILE} from 'lamda-peft train' to read the task from; pass --task "
                         "(classification, regression or causal-lm); the base model is the one the adapter names")
    try:
        table = _validation_table(args, saved)
        spec = _data_spec(args, saved, task, table)
    except DataError as err:
        raise UsageError(str(err)) from None
    bits = quantized_bits(args) or (4 if saved.get("load_in_4bit") else 8 if saved.get("load_in_8bit") else None)
    model, tokenizer = _load_model(adapter, _given(args.model, saved.get("model")), spec, bits)  # as trained
    try:
        dataset = spec.encode(table, tokenizer)
    except DataError as err:
        raise UsageError(str(err)) from None
    notice = dropped_rows_notice(dataset, "validation", spec.max_length)
    if notice:
        print(notice)
    print(f"evaluating {adapter} on {table.source} ({len(dataset)} rows, task {spec.task}"
          f"{', base in ' + DESCRIPTION[bits] if bits else ''})")
    result: dict[str, Any] = {"adapter": str(adapter), "validation": table.source,
                              **({f"load_in_{bits}bit": True} if bits else {}),
                              **evaluate(model, tokenizer, spec, dataset, args.batch_size)}
    if spec.task == "causal-lm" and args.num_generate > 0:
        result["generation"] = generation_report(model, tokenizer, spec, table, args.num_generate, args.max_new_tokens)
        for sample in result["generation"]["samples"][:2]:
            print(f"--- prompt: {sample['prompt'][:200]}\n--- generated: {sample['generated'][:300]}")
        if "final_answer_exact_match" in result["generation"]:
            print(f"final-answer exact match: {result['generation']['final_answer_exact_match']:.4f} "
                  f"on {result['generation']['generated']} rows")
    print_metrics(result)
    if args.output is not None:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    if args.predictions is not None:
        rows = prediction_rows(model, tokenizer, spec, table, dataset, result, args.batch_size)
        write_predictions(args.predictions, rows)
        print(f"wrote {len(rows)} predictions to {args.predictions}")
    return 0


def _data_spec(args: argparse.Namespace, saved: dict, task: str, table: Table) -> DataSpec:
    """What to read from ``table``: each option given, else the run's; with no run file, the columns ``train`` would
    pick (``text``, ``label``, ``question``, ...) and the classes of ``table``."""
    from ..apps.data import TASKS, infer_spec, label_names

    max_length = _given(args.max_length, saved.get("max_length") or 128)
    if not saved:
        return infer_spec(table, table, task, args.text_column, args.label_column, args.prompt_column,
                          args.response_column, max_length)
    if task not in TASKS:
        raise DataError(f"unknown --task {task!r}; choose one of {', '.join(TASKS)}")
    spec = DataSpec(
        task=task,
        text_columns=_given(args.text_column, saved.get("text_columns") or []),
        label_column=_given(args.label_column, saved.get("label_column")),
        prompt_column=_given(args.prompt_column, saved.get("prompt_column")),
        response_column=_given(args.response_column, saved.get("response_column")),
        messages_column=None if args.prompt_column or args.response_column else saved.get("messages_column"),
        classes=saved.get("classes"),
        max_length=max_length,
    )
    if spec.task == "classification" and not spec.classes:
        spec.classes = label_names(table.column(spec.label_column))
    spec.check(table)
    return spec


def _validation_table(args: argparse.Namespace, saved: dict) -> Table:
    """The rows to evaluate: --validation-file, else the run's validation data, the first --max-eval-samples of them
    (else the run's limit on its own data)."""
    table = _all_validation_rows(args, saved)
    limit = _given(args.max_eval_samples, None if args.validation_file else saved.get("max_eval_samples"))
    return table if limit is None else Table(table.columns, table.rows[:limit], table.source)


def _all_validation_rows(args: argparse.Namespace, saved: dict) -> Table:
    if args.validation_file:
        return read_table(args.validation_file, header=not args.no_header)
    if saved.get("dataset") == BBC_NEWS:
        return bbc_news()[1]
    if saved.get("hub_dataset"):
        from ..apps.data_loading import load_hub_table

        return load_hub_table(saved["hub_dataset"], saved.get("dataset_config"), saved["validation_split"])
    if saved.get("validation_file"):
        return read_table(saved["validation_file"], header=not saved.get("no_header", False))
    if saved.get("validation_split_percentage") and saved.get("train_file"):  # the rows train held out
        from .holdout import split_rows

        rows = read_table(saved["train_file"], header=not saved.get("no_header", False))
        return split_rows(rows, saved["validation_split_percentage"], saved.get("seed", 0))[1]
    raise UsageError("pass --validation-file (the adapter folder does not name its validation data)")
