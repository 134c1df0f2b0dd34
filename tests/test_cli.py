"""``lamda-peft train`` and ``lamda-peft eval`` end to end on small slices of real data, and every bad input.

Bad input must give exit code 2, a message naming the problem, and no output folder.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lamda_peft.cli import main

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FAST = ["--max-steps", "3", "--batch-size", "8", "--max-length", "64", "--eval-steps", "3"]


def slice_tsv(src: Path, dst: Path, rows: int, header: bool = True) -> Path:
    lines = src.read_text(encoding="utf-8-sig").splitlines()
    dst.write_text("\n".join(lines[: rows + int(header)]) + "\n", encoding="utf-8")
    return dst


def slice_jsonl(src: Path, dst: Path, rows: int) -> Path:
    dst.write_text("\n".join(src.read_text().splitlines()[:rows]) + "\n")
    return dst


@pytest.fixture
def sst2(glue_dir, tmp_path):
    return (slice_tsv(glue_dir / "SST-2" / "train.tsv", tmp_path / "train.tsv", 64),
            slice_tsv(glue_dir / "SST-2" / "dev.tsv", tmp_path / "dev.tsv", 32))


def read_run(out: Path) -> dict:
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow
def test_classification_train_then_eval(sst2, minilm_path, tmp_path, capsys):
    out = tmp_path / "run"
    train, dev = sst2
    rc = main(["train", "--train-file", str(train), "--validation-file", str(dev), "--model", minilm_path,
               "--method", "lamda", "--target-modules", "query", "value", "--output-dir", str(out), *FAST])
    assert rc == 0
    run = read_run(out)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert run["config"]["task"] == "classification" and run["config"]["classes"] == ["0", "1"]
    assert set(run["validation"]) >= {"accuracy", "f1", "matthews_corr", "loss"}
    assert run["steps"] == 3 and run["validation_rows"] == 32
    # LaMDA: B frozen by the end (the callback), so r^2 per module plus the head (384*2+2) remain trainable.
    modules = 2 * 6  # query and value in 6 layers
    start, end = run["trainable_params"]["start"], run["trainable_params"]["end"]
    assert start == modules * (8 * 8 + 8 * 384) + 770
    from lamda_peft.cli import train as train_cli
    if train_cli.lamda_callbacks("lamda"):
        assert end == modules * 8 * 8 + 770
    assert run["accounted_memory_bytes"]["parameters"] > 4 * 22_000_000
    # eval reloads the adapter and reproduces the metrics that train wrote
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out), "--output", str(tmp_path / "eval.json")]) == 0
    assert "evaluating" in capsys.readouterr().err  # the progress bar of one pass over the data
    again = json.loads((tmp_path / "eval.json").read_text())
    for key in ("accuracy", "f1", "matthews_corr", "loss"):
        assert again[key] == pytest.approx(run["validation"][key], abs=1e-5)
    # the same run again may replace this folder; a different one is refused (test below)
    train_cli.check_output_dir(out, run["config"], overwrite=False)


@pytest.mark.slow
@pytest.mark.parametrize("init", ["activations", "gradient"])
def test_data_driven_init_from_the_command_line(init, sst2, minilm_path, tmp_path, capsys):
    """``--init activations`` / ``gradient`` calibrate on training batches before training: recorded in the run and
    the adapter's config, A is not the spectral A, and eval reloads the adapter to the same metrics."""
    from peft import get_peft_model
    from safetensors.torch import load_file

    from lamda_peft import LamdaConfig
    from lamda_peft.cli.eval import load_base

    out = tmp_path / "run"
    train, dev = sst2
    assert main(["train", "--train-file", str(train), "--validation-file", str(dev), "--model", minilm_path,
                 "--method", "lamda", "--init", init, "--target-modules", "query", "value",
                 "--output-dir", str(out), *FAST]) == 0
    source = "the inputs" if init == "activations" else "the loss gradient"
    assert f"{init} init: A and B0 from {source} of 8 training batches" in capsys.readouterr().out
    run = read_run(out)
    assert run["config"]["init"] == init
    assert json.loads((out / "adapter_config.json").read_text())["init"] == init
    saved = {k: v for k, v in load_file(out / "adapter_model.safetensors").items() if k.endswith("lamda_A")}
    base, _ = load_base(minilm_path, "classification", 2)
    spectral = get_peft_model(base, LamdaConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    spectral_a = {k: v for k, v in spectral.state_dict().items() if k.endswith("lamda_A.default")}
    assert len(saved) == len(spectral_a) == 12
    for (_, a), (_, b) in zip(sorted(saved.items()), sorted(spectral_a.items())):
        overlap = torch.linalg.svdvals(torch.linalg.qr(a.T.double())[0].T @ torch.linalg.qr(b.T.double())[0])
        assert overlap.max() < 0.999  # another subspace, not the top-r singular directions of W
    assert main(["eval", "--adapter", str(out), "--output", str(tmp_path / "eval.json")]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["accuracy"] == pytest.approx(run["validation"]["accuracy"], abs=1e-6)
    assert again["loss"] == pytest.approx(run["validation"]["loss"], abs=1e-5)


@pytest.mark.slow
def test_lamda_plus_plus_by_default_calibrates_each_module_at_its_energy_rank(sst2, minilm_path, tmp_path, capsys):
    """The command line's default for LaMDA++ (session 12): the gradient init at each module's own rank, B's window at
    0.7; the saved A of every module has its allocated rank's rows and spans the gradient's subspace, not the
    weight's; eval reloads it to the same metrics."""
    from safetensors.torch import load_file

    from lamda_peft.cli.eval import load_base
    from lamda_peft.spectral import top_svd

    out = tmp_path / "run"
    train, dev = sst2
    assert main(["train", "--train-file", str(train), "--validation-file", str(dev), "--model", minilm_path,
                 "--method", "lamda++", "--target-modules", "query", "value", "--output-dir", str(out), *FAST]) == 0
    assert "gradient init: A and B0 from the loss gradient of 8 training batches" in capsys.readouterr().out
    run = read_run(out)
    assert (run["config"]["init"], run["config"]["freeze_ratio"]) == ("gradient", 0.7)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert (adapter["init"], adapter["freeze_ratio"], adapter["rank_allocation"]) == ("gradient", 0.7, "energy")
    ranks = adapter["rank_pattern"]  # anchored patterns, one per module: ^name$
    assert len(set(ranks.values())) > 1  # the energy allocation gave the modules different ranks
    saved = {k: v for k, v in load_file(out / "adapter_model.safetensors").items() if k.endswith("lamda_A")}
    base, _ = load_base(minilm_path, "classification", 2)
    assert len(saved) == 12
    for key, a in saved.items():
        module = key.split("base_model.model.")[-1].rsplit(".lamda_A", 1)[0]
        assert a.shape[0] == ranks[f"^{re.escape(module)}$"], module
        top = top_svd(base.get_submodule(module).weight.detach(), a.shape[0]).Vh  # the spectral A's row space
        overlap = torch.linalg.svdvals(torch.linalg.qr(a.T.double())[0].T @ torch.linalg.qr(top.T.double())[0])
        assert overlap.max() < 0.999, module
    assert main(["eval", "--adapter", str(out), "--output", str(tmp_path / "eval.json")]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["loss"] == pytest.approx(run["validation"]["loss"], abs=1e-5)


@pytest.mark.slow
def test_regression_with_lora(glue_dir, minilm_path, tmp_path):
    train = slice_tsv(glue_dir / "STS-B" / "train.tsv", tmp_path / "train.tsv", 64)
    dev = slice_tsv(glue_dir / "STS-B" / "dev.tsv", tmp_path / "dev.tsv", 32)
    out = tmp_path / "run"
    assert main(["train", "--train-file", str(train), "--validation-file", str(dev), "--model", minilm_path,
                 "--method", "lora", "--output-dir", str(out), *FAST]) == 0
    run = read_run(out)
    assert run["config"]["task"] == "regression" and run["config"]["text_columns"] == ["sentence1", "sentence2"]
    assert set(run["validation"]) >= {"pearson", "spearman", "mse"}
    assert run["trainable_params"]["start"] == run["trainable_params"]["end"]  # LoRA trains A and B throughout
    # the head's bias started at the training labels' mean (3 steps at lr 1e-3 move it by at most 3e-3)
    from safetensors.torch import load_file

    from lamda_peft.apps.data_loading import read_table

    labels = [float(v) for v in read_table(train).column("score")]
    bias = [v for k, v in load_file(out / "adapter_model.safetensors").items() if k.endswith("classifier.bias")]
    assert len(bias) == 1 and abs(float(bias[0]) - sum(labels) / len(labels)) < 5e-3


@pytest.mark.slow
def test_causal_lm_gsm8k(smollm2_path, tmp_path, capsys):
    gsm8k = SHARED / "gsm8k"
    if not gsm8k.is_dir():
        pytest.skip(f"GSM8K not found at {gsm8k}")
    train = slice_jsonl(gsm8k / "train.jsonl", tmp_path / "train.jsonl", 8)
    test = slice_jsonl(gsm8k / "test.jsonl", tmp_path / "test.jsonl", 4)
    out = tmp_path / "run"
    assert main(["train", "--train-file", str(train), "--validation-file", str(test), "--model", smollm2_path,
                 "--method", "lora-fa", "--target-modules", "q_proj", "v_proj", "--lr", "1e-4",
                 "--output-dir", str(out), "--max-steps", "2", "--eval-steps", "2", "--batch-size", "2",
                 "--max-length", "160"]) == 0
    run = read_run(out)
    assert run["config"]["task"] == "causal-lm" and run["config"]["prompt_column"] == "question"
    assert run["validation"]["response_tokens"] > 4 * 20  # every answer is tens of tokens
    assert main(["eval", "--adapter", str(out), "--num-generate", "2", "--max-new-tokens", "8",
                 "--output", str(tmp_path / "eval.json")]) == 0
    assert "generating" in capsys.readouterr().err  # the progress bar of generation
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["loss"] == pytest.approx(run["validation"]["loss"], rel=1e-4)
    assert result["generation"]["generated"] == 2 and "final_answer_exact_match" in result["generation"]


# ------------------------------------------------------------------------------------------------ bad input


def bad(argv: list[str], capsys, *fragments: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_bad_inputs_exit_2_and_write_nothing(sst2, glue_dir, tmp_path, capsys):
    train, dev = sst2
    out = tmp_path / "out"
    data = ["--train-file", str(train), "--validation-file", str(dev), "--output-dir", str(out)]
    bad(["train", "--train-file", str(tmp_path / "nope.csv"), "--validation-file", str(dev)], capsys,
        "file not found", "nope.csv")
    bad(["train", *data, "--text-column", "review"], capsys, "'review'", "columns are: 'sentence', 'label'")
    bad(["train", *data, "--label-column", "stars"], capsys, "'stars'", "columns are")
    rte = slice_tsv(glue_dir / "RTE" / "train.tsv", tmp_path / "rte.tsv", 16)
    bad(["train", "--train-file", str(rte), "--validation-file", str(rte), "--task", "regression",
         "--output-dir", str(out)], capsys, "numeric labels", "entailment")
    bad(["train", *data, "--task", "causal-lm"], capsys, "--prompt-column")
    bad(["train", *data, "--method", "dora"], capsys, "unknown --method 'dora'", "lamda, lamda++, lora-fa")
    bad(["train", *data, "--model", "./no-such-model"], capsys, "no such folder", "minilm, smollm2")
    bad(["train", *data, "--epochs", "1", "--max-steps", "2"], capsys, "not both")
    bad(["train", *data, "--method", "lora", "--lr-S", "1e-2"], capsys, "--lr-S apply to --method lamda")
    bad(["train", *data, "--lr-head", "-1"], capsys, "--lr-head must be a positive")
    bad(["train", *data, "--method", "lora", "--init", "activations"], capsys, "--init apply to --method lamda")
    bad(["train", *data, "--method", "lora-fa", "--freeze-ratio", "0.5"], capsys, "--freeze-ratio apply to")
    bad(["train", "--validation-file", str(dev)], capsys, "needs --train-file")
    bad(["train", *data, "--dataset", "glue"], capsys, "not both")
    if not torch.cuda.is_available():
        bad(["train", *data, "--fp16"], capsys, "--fp16 needs a GPU", "--bf16")
    bad(["train", *data, "--gradient-accumulation-steps", "0"], capsys, "positive integer")
    bad(["train", *data, "--warmup-ratio", "2"], capsys, "--warmup-ratio", "[0, 1)")
    if importlib.util.find_spec("wandb") is None:
        bad(["train", *data, "--report-to", "wandb"], capsys, "--report-to wandb needs the wandb package")
    bad(["train", *data, "--resume-from-checkpoint"], capsys, "holds no checkpoint-N")
    bad(["train", *data, "--resume-from-checkpoint", str(tmp_path)], capsys, "not a checkpoint folder")
    assert not out.exists()
    # a rank no module allows: the fix the command line can apply (MiniLM's query is 384 x 384)
    assert main(["train", *data, "--r", "1000", "--target-modules", "query"]) == 2
    err = capsys.readouterr().err
    assert "--r 1000 exceeds min(d_in, d_out) = 384" in err and "pass --r 384 or smaller" in err
    assert "rank_pattern" not in err and not out.exists()


def test_output_dir_holding_another_run_is_refused(sst2, tmp_path, capsys):
    train, dev = sst2
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"config": {"method": "lora"}}))
    bad(["train", "--train-file", str(train), "--validation-file", str(dev), "--output-dir", str(out)], capsys,
        "already holds a different run", "--overwrite")
    (out / "metrics.json").unlink()
    (out / "notes.txt").write_text("mine")
    bad(["train", "--train-file", str(train), "--validation-file", str(dev), "--output-dir", str(out)], capsys,
        "not a 'lamda-peft train' run")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    from lamda_peft.cli.train import check_output_dir

    check_output_dir(out, {"method": "lamda"}, overwrite=True)  # --overwrite lets the run replace the folder
    bad(["eval", "--adapter", str(tmp_path / "missing")], capsys, "no such folder")
    bad(["eval", "--adapter", str(out)], capsys, "pass --task")


def test_console_script_is_installed(tmp_path):
    result = subprocess.run([Path(sys.executable).parent / "lamda-peft", "train", "--method", "bogus"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2 and "unknown --method 'bogus'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()


def test_spectral_init_reports_module_i_of_n(tiny_llama, monkeypatch):
    """The init of a large model shows "spectral init: i/N modules": N is what the injection wraps, counted once each."""
    from peft import get_peft_model

    from lamda_peft import LamdaConfig, eigensolver
    from lamda_peft.tuners import base_model

    bars = []

    class Recorder:
        def __init__(self, total=None, **kwargs):
            self.total, self.count, self.closed = total, 0, False
            bars.append(self)

        def update(self, n=1):
            self.count += n

        def close(self):
            self.closed = True

    monkeypatch.setattr(eigensolver, "tqdm", Recorder)
    model = get_peft_model(tiny_llama(), LamdaConfig(r=2, target_modules="all-linear"))
    wrapped = sum(1 for m in model.modules() if isinstance(m, base_model.LowRankDeltaLayer))
    assert wrapped > 1 and [(b.total, b.count, b.closed) for b in bars] == [(wrapped, wrapped, True)]
