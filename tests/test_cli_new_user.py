"""The command line tried as a new user would (issue 27): each defect found, checked on a tiny random BERT (MiniLM's
tokenizer, no dropout) or LLaMA (SmolLM2's tokenizer) saved to a temporary folder, so that every run takes seconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lamda_peft.cli import main


@pytest.fixture(scope="module")
def tiny_bert(minilm_path, tmp_path_factory) -> str:
    """A 2-layer BERT (hidden 32) with MiniLM's tokenizer and no dropout: a training step's loss is the loss a plain
    forward pass gives."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def reviews(tmp_path_factory) -> tuple[Path, Path]:
    """32 training and 4 validation rows of a two-class csv."""
    folder = tmp_path_factory.mktemp("reviews")
    words = ["good", "bad", "fine", "awful", "great", "dull", "nice", "poor"]
    for name, count in (("train.csv", 32), ("dev.csv", 4)):
        lines = ["text,label"] + [f"{words[i % 8]} film number {i} {'really ' * (i % 3)},{i % 2}" for i in range(count)]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder / "train.csv", folder / "dev.csv"


def train_argv(model: str, data: tuple[Path, Path], out: Path, *options: str) -> list[str]:
    return ["train", "--train-file", str(data[0]), "--validation-file", str(data[1]), "--model", model,
            "--output-dir", str(out), "--batch-size", "2", "--max-length", "32", *options]


def read_run(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


# ---------------------------------------------------------------------------------------------------------- training


def test_resuming_a_finished_run_trains_nothing_and_the_final_evaluation_runs_once(tiny_bert, reviews, tmp_path,
                                                                                    capsys, monkeypatch):
    from transformers import Trainer

    evaluations = []
    trainer_evaluate = Trainer.evaluate
    monkeypatch.setattr(Trainer, "evaluate", lambda self, *a, **k: evaluations.append(self.state.global_step)
                        or trainer_evaluate(self, *a, **k))
    out = tmp_path / "out_rs"
    argv = train_argv(tiny_bert, reviews, out, "--max-steps", "4", "--save-steps", "2", "--eval-steps", "2",
                      "--logging-steps", "1")
    assert main(argv) == 0
    first = read_run(out)
    # item 8: the Trainer evaluates at step 2 only; the last step's evaluation is the command's own, once
    assert evaluations == [2]
    final = [h for h in first["log_history"] if "eval_loss" in h and h["step"] == 4]
    assert len(final) == 1 and final[0]["eval_accuracy"] == first["validation"]["accuracy"]
    assert final[0]["eval_loss"] == first["validation"]["loss"]

    # item 1: the same command with --resume-from-checkpoint: nothing left to train, said in one line
    capsys.readouterr()
    assert main([*argv, "--resume-from-checkpoint"]) == 0
    printed = capsys.readouterr().out
    assert f"{out / 'checkpoint-4'} is at step 4 of 4: nothing left to train" in printed
    again = read_run(out)
    assert again["steps"] == 4 and max(h["step"] for h in again["log_history"]) == 4
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]  # kept, and no checkpoint-5
    assert again["trainable_params"] == first["trainable_params"]  # B frozen as at the end of the run
    assert again["validation"] == pytest.approx(first["validation"])
    assert evaluations == [2]
    # eval reads the run's config from the checkpoint too (its lamda_peft_run.json): the same metrics
    assert main(["eval", "--adapter", str(out / "checkpoint-4"), "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["loss"] == pytest.approx(first["validation"]["loss"])

    # item 6: a changed option in the same folder names the options that differ
    assert main([*argv, "--lr", "0.01", "--resume-from-checkpoint"]) == 2
    assert "already holds a different run (options that differ: lr); pass --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("method, accumulation", [("lamda", 4), ("lora", 2), ("full", 2)])
def test_the_logged_training_loss_is_the_mean_loss_under_gradient_accumulation(method, accumulation, tiny_bert,
                                                                                 reviews, tmp_path, capsys):
    """Item 2: with GA = k the log said k times the loss. One optimizer step over 8 rows at a negligible lr: the
    logged loss is the mean loss of a plain loop over those rows (the model's batches take them in another order)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = tmp_path / "rows.csv"
    rows.write_text("\n".join(reviews[0].read_text().splitlines()[:9]) + "\n")
    out = tmp_path / "run"
    assert main(train_argv(tiny_bert, (rows, reviews[1]), out, "--method", method, "--max-steps", "1",
                           "--batch-size", str(8 // accumulation), "--gradient-accumulation-steps", str(accumulation),
                           "--lr", "1e-9", "--logging-steps", "1", "--eval-steps", "0")) == 0
    logged = [h["loss"] for h in read_run(out)["log_history"] if "loss" in h]
    assert f"step 1: loss={logged[0]:.4g}" in capsys.readouterr().out  # the console shows the same number

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    if method == "full":
        model = AutoModelForSequenceClassification.from_pretrained(out)
    else:
        model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2),
                                          out)
    losses = []
    with torch.no_grad():
        for line in rows.read_text().splitlines()[1:]:
            text, label = line.rsplit(",", 1)
            enc = tokenizer(text, truncation=True, max_length=32, return_tensors="pt")
            losses.append(model.eval()(**enc, labels=torch.tensor([int(label)])).loss.item())
    assert logged == [pytest.approx(sum(losses) / len(losses), rel=1e-4)]


def test_causal_lm_rows_left_out_are_counted_and_the_metrics_say_how_many_rows_they_cover(tiny_chat_model, tmp_path,
                                                                                          capsys):
    """Item 5: rows whose prompt alone fills --max-length were left out silently (50 rows -> 47)."""
    rows = [{"question": f"What is {i} plus {i}?" + " Think hard." * (6 * (i % 2)), "answer": f"#### {2 * i}"}
            for i in range(8)]
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--train-file", str(data), "--validation-file", str(data), "--model", tiny_chat_model,
                 "--target-modules", "q_proj", "--max-steps", "1", "--max-length", "48", "--batch-size", "4",
                 "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    run = read_run(out)
    assert run["train_rows"] == 4 and run["train_rows_left_out"] == 4
    assert "note: 4 of 8 training rows left out: their prompt alone fills --max-length 48" in printed
    assert "note: 4 of 8 validation rows left out" in printed
    assert run["validation"]["eval_rows"] == 4 and run["validation"]["eval_rows_left_out"] == 4
    assert "eval_rows=4  eval_rows_left_out=4" in printed.splitlines()[-2]  # the "validation: ..." line
    assert main(["eval", "--adapter", str(out), "--num-generate", "0", "--output", str(tmp_path / "e.json")]) == 0
    assert "note: 4 of 8 validation rows left out" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["eval_rows"] == 4


def test_console_lines_after_a_resume_show_the_frozen_columns(tiny_bert, reviews, tmp_path, capsys, monkeypatch):
    """Item 9: the resumed LamdaCallback is re-added after the progress bar, which printed the line without it."""
    from lamda_peft.cli.checkpoints import PublishCheckpoints

    early = tmp_path / "checkpoint-2"
    publish = PublishCheckpoints.on_save

    def keep_a_copy(self, args, state, control, **kwargs):  # the run removes checkpoint-2 once checkpoint-4 is in
        publish(self, args, state, control, **kwargs)
        if state.global_step == 2:
            shutil.copytree(self.out / "checkpoint-2", early)

    monkeypatch.setattr(PublishCheckpoints, "on_save", keep_a_copy)
    options = ("--max-steps", "4", "--save-steps", "2", "--logging-steps", "1", "--eval-steps", "0")
    assert main(train_argv(tiny_bert, reviews, tmp_path / "a", *options)) == 0
    capsys.readouterr()
    assert main([*train_argv(tiny_bert, reviews, tmp_path / "b", *options), "--resume-from-checkpoint",
                 str(early)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if re.search(r"step \d+: loss=", line)]
    steps = [re.search(r"step (\d+): loss=", line).group(1) for line in lines]
    assert steps == ["3", "4"] and all("lamda_frozen_columns=" in line for line in lines), lines


def test_full_fine_tuning_says_what_it_wrote(tiny_bert, reviews, tmp_path, capsys):
    out = tmp_path / "full"
    assert main(train_argv(tiny_bert, reviews, out, "--method", "full", "--max-steps", "1")) == 0
    assert f"wrote {out}/ (model, tokenizer, metrics.json, loss_curve.png)" in capsys.readouterr().out


def test_the_options_run_glue_users_expect(tiny_bert, reviews, tmp_path, capsys):
    """--max-train-samples, --max-eval-samples, --warmup-steps, --max-grad-norm, --lora-dropout, --save-total-limit."""
    lr, out = 1e-3, tmp_path / "run"
    assert main(train_argv(tiny_bert, reviews, out, "--max-train-samples", "8", "--max-eval-samples", "2",
                           "--max-steps", "3", "--warmup-steps", "1", "--lr", str(lr), "--max-grad-norm", "0.5",
                           "--lora-dropout", "0.1", "--save-steps", "1", "--save-total-limit", "2",
                           "--logging-steps", "1", "--eval-steps", "0")) == 0
    run = read_run(out)
    assert run["train_rows"] == 8 and run["validation"]["eval_rows"] == 2
    logged = [h["learning_rate"] for h in run["log_history"] if "loss" in h]
    assert logged == pytest.approx([0, lr, lr / 2])  # 1 warmup step, then linear decay to 0 at step 3
    assert {k: run["config"][k] for k in ("max_train_samples", "max_eval_samples", "warmup_steps", "max_grad_norm",
                                          "lora_dropout")} == {"max_train_samples": 8, "max_eval_samples": 2,
                                                               "warmup_steps": 1, "max_grad_norm": 0.5,
                                                               "lora_dropout": 0.1}
    assert run["config"]["warmup_ratio"] is None
    assert json.loads((out / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    # eval keeps the run's limit on the run's own data, and takes its own on another file
    assert main(["eval", "--adapter", str(out), "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["eval_rows"] == 2
    assert main(["eval", "--adapter", str(out), "--validation-file", str(reviews[0]), "--max-eval-samples", "5",
                 "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["eval_rows"] == 5


def test_max_grad_norm_reaches_the_trainer(tiny_bert, reviews, tmp_path, monkeypatch):
    from transformers import Trainer

    seen = []
    clip = Trainer._clip_grad_norm
    monkeypatch.setattr(Trainer, "_clip_grad_norm", lambda self, model: seen.append(self.args.max_grad_norm)
                        or clip(self, model))
    assert main(train_argv(tiny_bert, reviews, tmp_path / "a", "--max-steps", "1", "--max-grad-norm", "0.25")) == 0
    assert main(train_argv(tiny_bert, reviews, tmp_path / "b", "--max-steps", "1", "--max-grad-norm", "0")) == 0
    assert seen == [0.25]  # 0: no clipping at all


def test_gradient_checkpointing_changes_memory_not_the_math(tiny_bert, reviews, tmp_path, monkeypatch):
    """--gradient-checkpointing turns the base model's checkpointing on and trains to the same loss as without."""
    from transformers import PreTrainedModel

    enabled = []
    enable = PreTrainedModel.activation_checkpointing_enable
    monkeypatch.setattr(PreTrainedModel, "activation_checkpointing_enable",
                        lambda self, *a, **k: enabled.append(k) or enable(self, *a, **k))
    assert main(train_argv(tiny_bert, reviews, tmp_path / "a", "--max-steps", "3", "--logging-steps", "1")) == 0
    assert not enabled
    assert main(train_argv(tiny_bert, reviews, tmp_path / "b", "--max-steps", "3", "--logging-steps", "1",
                           "--gradient-checkpointing")) == 0
    assert enabled and read_run(tmp_path / "b")["config"]["gradient_checkpointing"] is True
    losses = [[e["loss"] for e in read_run(tmp_path / name)["log_history"] if "loss" in e] for name in ("a", "b")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-5)


# -------------------------------------------------------------------------------------------------------------- eval


def test_eval_messages_name_what_is_needed_and_where_the_head_comes_from(tiny_bert, reviews, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(tiny_bert, reviews, out, "--max-steps", "1")) == 0
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "classification head: from the adapter" in printed and "initialised at random" not in printed
    foreign = tmp_path / "foreign"  # an adapter without the run's metrics.json: --task alone is enough
    foreign.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(out / name, foreign / name)
    assert main(["eval", "--adapter", str(foreign), "--validation-file", str(reviews[1])]) == 2
    err = capsys.readouterr().err
    assert "pass --task" in err and "--task and --model" not in err
    assert main(["eval", "--adapter", str(foreign), "--validation-file", str(reviews[1]), "--task",
                 "classification"]) == 0


def qa_file(folder: Path) -> Path:
    """4 question-answer rows (GSM8K's answer format) as jsonl."""
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i} plus {i} is {2 * i}. #### {2 * i}"} for i in range(4)]
    data = folder / "qa.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return data


def qa_train_argv(model: str, data: Path, out: Path) -> list[str]:
    return ["train", "--train-file", str(data), "--validation-file", str(data), "--model", model, "--target-modules",
            "q_proj", "v_proj", "--max-steps", "1", "--batch-size", "2", "--max-length", "64", "--output-dir", str(out)]


def eval_reproduces_the_run(out: Path, result: Path, capsys, bits: int, description: str) -> float:
    """``eval`` of the run in ``out`` loads the base as trained (``bits``) and gives the run's validation loss."""
    trained = read_run(out)["validation"]["loss"]
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--num-generate", "0", "--output", str(result)]) == 0
    assert f"base in {description}" in capsys.readouterr().out
    scored = json.loads(result.read_text())
    assert scored[f"load_in_{bits}bit"] is True and scored["loss"] == pytest.approx(trained, rel=1e-5)
    return trained


def test_eval_scores_a_4bit_adapter_on_its_4bit_base(tiny_chat_model, tmp_path, capsys):
    """Item 10: eval loaded the full-precision base under an adapter trained on a 4-bit one."""
    pytest.importorskip("bitsandbytes", reason="needs pip install 'lamda-peft[quant]'")
    data, out = qa_file(tmp_path), tmp_path / "run"
    assert main([*qa_train_argv(tiny_chat_model, data, out), "--load-in-4bit"]) == 0
    trained = eval_reproduces_the_run(out, tmp_path / "e.json", capsys, 4, "4-bit NF4")
    # an adapter folder without the run's metrics.json: --load-in-4bit says how to load its base
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(out / name, bare / name)
    common = ["eval", "--adapter", str(bare), "--task", "causal-lm", "--model", tiny_chat_model, "--validation-file",
              str(data), "--max-length", "64", "--num-generate", "0", "--output", str(tmp_path / "bare.json")]
    assert main([*common, "--load-in-4bit"]) == 0
    assert json.loads((tmp_path / "bare.json").read_text())["loss"] == pytest.approx(trained, rel=1e-5)
    assert main(common) == 0  # without it, the full-precision base: another model, another loss
    assert json.loads((tmp_path / "bare.json").read_text())["loss"] != pytest.approx(trained, rel=1e-5)


def test_an_8bit_base_trains_and_eval_scores_it_on_the_8bit_base(tiny_chat_model, tmp_path, capsys):
    """--load-in-8bit: bitsandbytes' LLM.int8 base under the adapter; eval reloads it as trained; the flags exclude
    each other."""
    pytest.importorskip("bitsandbytes", reason="needs pip install 'lamda-peft[quant]'")
    out = tmp_path / "run"
    argv = qa_train_argv(tiny_chat_model, qa_file(tmp_path), out)
    with pytest.raises(SystemExit) as both:
        main([*argv, "--load-in-8bit", "--load-in-4bit"])
    assert both.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert not out.exists()
    assert main([*argv, "--load-in-8bit"]) == 0
    assert read_run(out)["config"]["load_in_8bit"] is True
    eval_reproduces_the_run(out, tmp_path / "e.json", capsys, 8, "8-bit (LLM.int8)")


# ------------------------------------------------------------------------------------------------------------ report


def test_report_accepts_the_model_aliases(capsys):
    """Item 7: `report minilm` failed after ~40 s of Hub retries, while train, eval and spectrum took the alias."""
    assert main(["report", "minilm", "--r", "4", "--batch", "1", "--seq", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["method"] == "LoRA" and rows[0]["start"] > 0


def test_report_smollm2_in_4bit(smollm2_path, capsys):
    pytest.importorskip("bitsandbytes", reason="needs pip install 'lamda-peft[quant]'")
    assert main(["report", "smollm2", "--load-in-4bit", "--r", "4", "--batch", "1", "--seq", "8"]) == 0
    assert "smollm2: r=4" in capsys.readouterr().out


def test_report_help_is_plain_text_with_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "minilm" in text
    assert "examples per forward pass (default 8)" in text and "tokens per example (default 1024)" in text


# ------------------------------------------------------------------------------------------------------------ Ctrl-C


def start(argv: list[str], cwd: Path, preamble: str = "") -> subprocess.Popen:
    """``lamda-peft ARGV`` in a fresh interpreter (``preamble`` runs first), stdout unbuffered."""
    code = f"{preamble}\nimport sys\nfrom lamda_peft.cli import main\nsys.exit(main({argv!r}))"
    return subprocess.Popen([sys.executable, "-c", code], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def interrupted(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


def test_ctrl_c_before_the_first_checkpoint_names_the_save_steps_given(tiny_bert, reviews, tmp_path):
    """Item 4: the message said "pass --save-steps N to keep checkpoints" although it was passed."""
    argv = train_argv(tiny_bert, reviews, tmp_path / "out", "--max-steps", "100000", "--save-steps", "50000",
                      "--logging-steps", "1", "--eval-steps", "0")
    proc = start(argv, tmp_path)
    deadline = time.time() + 300
    while "loss=" not in proc.stdout.readline():  # training has begun
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
    line = interrupted(proc)
    assert line.startswith("lamda-peft: interrupted at step ") and "pass --save-steps" not in line, line
    assert line.endswith("before the checkpoint of step 50000 (--save-steps 50000); nothing was written"), line
    assert not (tmp_path / "out").exists()


def test_ctrl_c_while_the_command_imports_its_subcommands_is_one_line(tmp_path):
    """Item 4: ``main`` installs its handler before importing anything heavy (the subcommand's module imports torch,
    transformers and peft for seconds after the options passed), so a Ctrl-C there is one line, exit code 130."""
    proc = start(["train", "--method", "lamda"], tmp_path)
    time.sleep(1.5)
    assert proc.poll() is None  # still importing
    assert interrupted(proc) == "lamda-peft: interrupted"


def test_ctrl_c_during_the_first_seconds_of_the_console_command_is_one_line(tmp_path):
    """Item 4: the console script imports ``lamda_peft`` (light: no torch, transformers or peft) before ``main``, so
    the handler is in place at once."""
    proc = subprocess.Popen([str(Path(sys.executable).parent / "lamda-peft"), "train"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    time.sleep(1.5)
    assert interrupted(proc) == "lamda-peft: interrupted"
