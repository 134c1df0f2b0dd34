"""Chat data (a ``messages`` column, as TRL's SFTTrainer takes) for causal-lm: the loss covers the assistant turns
only, on a tiny random LLaMA with SmolLM2's tokenizer and chat template."""

from __future__ import annotations

import json

import pytest

from lamda_peft.apps.data import IGNORE_INDEX, DataSpec, infer_spec
from lamda_peft.apps.data_loading import read_table
from lamda_peft.cli import main

CONVERSATIONS = [
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": f"What is {i} plus {i}?"},
     {"role": "assistant", "content": f"It is {2 * i}."},
     {"role": "user", "content": "And times two?"},
     {"role": "assistant", "content": f"{4 * i}, of course."}]
    for i in range(6)
] + [[{"role": "user", "content": "Say hi " + "and more " * 40}, {"role": "assistant", "content": "hi"}]]


@pytest.fixture
def chat_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps({"messages": m}) for m in CONVERSATIONS) + "\n")
    return path


def test_labels_are_the_assistant_turns_only(smollm2_path, chat_file):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    table = read_table(chat_file)
    spec = infer_spec(table, table, max_length=64)
    assert spec.task == "causal-lm" and spec.messages_column == "messages"
    dataset = spec.encode(table, tokenizer)
    assert dataset.dropped == 1 and len(dataset) == 6  # the last row's user turn alone fills 64 tokens
    for example, messages in zip(dataset, CONVERSATIONS):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert example["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
        spans, span = [], []
        for token, label in zip(example["input_ids"], example["labels"]):
            assert label in (token, IGNORE_INDEX)
            if label == IGNORE_INDEX and span:
                spans.append(tokenizer.decode(span))
                span = []
            elif label != IGNORE_INDEX:
                span.append(token)
        spans += [tokenizer.decode(span)] if span else []
        expected = [m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"]
        assert spans == expected  # each assistant content and its end of turn; no role header, no user turn
        assert all(f"<|im_start|>assistant\n{span}" in text for span in spans)


def test_a_tokenizer_without_a_chat_template_is_refused(smollm2_path, chat_file):
    from transformers import AutoTokenizer

    from lamda_peft.apps.tables import DataError

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    tokenizer.chat_template = None
    table = read_table(chat_file)
    with pytest.raises(DataError, match="needs a tokenizer with a chat template.*give prompt/response columns"):
        DataSpec("causal-lm", messages_column="messages").encode(table, tokenizer)


def test_train_two_steps_then_eval_the_same_file(tiny_chat_model, chat_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--train-file", str(chat_file), "--validation-file", str(chat_file), "--model",
                 tiny_chat_model, "--task", "causal-lm", "--target-modules", "q_proj", "--max-steps", "2",
                 "--max-length", "64", "--batch-size", "4", "--num-generate", "1", "--max-new-tokens", "2",
                 "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "note: 1 of 7 training rows left out" in printed
    run = json.loads((out / "metrics.json").read_text())
    assert run["train_rows"] == 6 and run["validation"]["eval_rows"] == 6
    sample = run["validation"]["generation"]["samples"][0]
    assert sample["reference"] == "0, of course." and sample["prompt"][-1]["content"] == "And times two?"
    result = tmp_path / "eval.json"
    assert main(["eval", "--adapter", str(out), "--num-generate", "0", "--output", str(result)]) == 0
    scored = json.loads(result.read_text())
    assert scored["eval_rows"] == 6 and scored["loss"] == pytest.approx(run["validation"]["loss"], rel=1e-4)
