"""``lamda-peft train`` as a fine-tuning tool, through the console command in a subprocess on real MiniLM and GLUE
data: Ctrl-C, checkpoints and resume (LaMDA's freezing continues at the right step), default output names, the
training options (precision, accumulation, warmup and schedule, evaluation and logging steps, TensorBoard) and Hub
data sets through ``datasets``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from lamda_peft.schedule import freeze_count

pytestmark = pytest.mark.slow
SST2_SMALL = ["--target-modules", "query", "value", "--batch-size", "4", "--max-length", "32"]
MODULES = 12  # query and value in MiniLM's 6 layers


def command(*argv: str) -> list[str]:
    return [str(Path(sys.executable).parent / "lamda-peft"), "train", *argv]


def start(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.umask(0o022))


def steps_saved(folder: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*")) if folder.is_dir() else []


def wait_for_checkpoint(proc: subprocess.Popen, folder: Path, at_least: int, copy_first_to: Path = None) -> None:
    """Poll until ``folder`` holds checkpoint-N with N >= at_least (copying the first one seen, if asked)."""
    deadline = time.time() + 600
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        saved = steps_saved(folder)
        if saved and copy_first_to is not None and not copy_first_to.exists():
            try:
                shutil.copytree(folder / f"checkpoint-{saved[0]}", copy_first_to)
            except (FileNotFoundError, shutil.Error):  # replaced by the next one meanwhile: take that one
                shutil.rmtree(copy_first_to, ignore_errors=True)
        if saved and saved[-1] >= at_least and (copy_first_to is None or copy_first_to.exists()):
            return
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint >= {at_least} in {folder}")


def interrupt(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def history(checkpoint: Path) -> dict[int, dict]:
    return {h["step"]: h for h in json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
            if "loss" in h}


@pytest.fixture
def sst2_folder(glue_dir, tmp_path) -> Path:
    """GLUE's layout (SST-2/train.tsv, SST-2/dev.tsv), 64 and 16 rows."""
    folder = tmp_path / "glue" / "SST-2"
    folder.mkdir(parents=True)
    for name, rows in (("train.tsv", 64), ("dev.tsv", 16)):
        lines = (glue_dir / "SST-2" / name).read_text(encoding="utf-8").splitlines()
        (folder / name).write_text("\n".join(lines[: rows + 1]) + "\n", encoding="utf-8")
    return folder


def test_ctrl_c_keeps_the_last_checkpoint_and_resume_continues_the_freezing(sst2_folder, tmp_path, capsys):
    # T = 1000 steps, so that the run is still going when we interrupt it; B freezes over the first 20 steps
    # (freeze_ratio 0.02), one or two columns at a time, so a resume at the wrong step shows in the counts.
    T, ratio, r = 1000, 0.02, 8
    data = ["--train-file", str(sst2_folder / "train.tsv"), "--validation-file", str(sst2_folder / "dev.tsv")]
    argv = command(*data, *SST2_SMALL, "--max-steps", str(T), "--freeze-ratio", str(ratio), "--save-steps", "4",
                   "--logging-steps", "1", "--eval-steps", "0")
    work = tmp_path / "work"
    work.mkdir()
    out = work / "runs" / "lamda-minilm-SST-2"  # default name: the data set's folder, not "train"
    early = tmp_path / "early-checkpoint"

    # 1. Uninterrupted up to step >= 24 (past the freezing window, and 8 past the early checkpoint), keeping a copy of
    #    its first checkpoint; then Ctrl-C.
    proc = start(argv, work)
    wait_for_checkpoint(proc, out, 4, copy_first_to=early)
    resumed_at = json.loads((early / "trainer_state.json").read_text())["global_step"]
    wait_for_checkpoint(proc, out, max(24, resumed_at + 8))
    line = interrupt(proc)
    saved = steps_saved(out)
    assert len(saved) == 1 and saved[0] >= 24, saved  # the last complete checkpoint, and only it
    assert line.startswith("lamda-peft: interrupted at step") and f"checkpoint-{saved[0]}" in line, line
    assert sorted(p.name for p in (work / "runs").iterdir()) == [out.name]  # no temporary folder left behind
    assert sorted(p.name for p in out.iterdir()) == [f"checkpoint-{saved[0]}"]  # no half-written run files
    weights = out / f"checkpoint-{saved[0]}" / "adapter_model.safetensors"
    assert weights.stat().st_mode & 0o777 == 0o644  # the umask (022), not safetensors' 0600
    reference = history(out / f"checkpoint-{saved[0]}")
    for step, entry in reference.items():  # the spec's schedule: k(t) = min(r, floor(r t / (ratio T))) per module
        assert entry["lamda_frozen_columns"] == MODULES * freeze_count(step, T, r, ratio), step
    # the stall check, once, when B is fully frozen (step 20): losses over steps 14-20 over those over steps 1-6
    assert [step for step, entry in reference.items() if "lamda_loss_ratio" in entry] == [20]
    start_loss = sum(reference[s]["loss"] for s in range(1, 7)) / 6
    end_loss = sum(reference[s]["loss"] for s in range(14, 21)) / 7
    assert reference[20]["lamda_loss_ratio"] == pytest.approx(end_loss / start_loss, abs=1e-4)

    # 2. Resume from the early checkpoint into another folder; Ctrl-C again after 8 more steps.
    resumed_out = tmp_path / "resumed"
    proc = start([*argv, "--output-dir", str(resumed_out), "--resume-from-checkpoint", str(early)], work)
    wait_for_checkpoint(proc, resumed_out, resumed_at + 8)
    interrupt(proc)
    after = history(resumed_out / f"checkpoint-{steps_saved(resumed_out)[-1]}")
    compared = list(range(resumed_at + 1, resumed_at + 9))
    assert 0 < reference[compared[0]]["lamda_frozen_columns"] < MODULES * r  # mid-freeze: a real check
    for step in compared:  # the same frozen columns and the same losses as the uninterrupted run, step by step
        assert after[step]["lamda_frozen_columns"] == reference[step]["lamda_frozen_columns"], step
        assert after[step]["loss"] == reference[step]["loss"], step

    # 3. A run with other options refuses that checkpoint (nothing written).
    from lamda_peft.cli import main

    capsys.readouterr()
    assert main([*argv[1:], "--lr", "0.5", "--output-dir", str(tmp_path / "x"), "--resume-from-checkpoint",
                 str(early)]) == 2
    assert "belongs to a different run (options that differ: lr)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_training_options_hub_dataset_and_tensorboard(sst2_folder, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import datasets

    # a local data set folder goes through the same load_dataset(name, config, split) call as a Hub id
    hub = tmp_path / "sst2-parquet"
    hub.mkdir()
    for split, name in (("train", "train.tsv"), ("validation", "dev.tsv")):
        rows = [line.split("\t") for line in (sst2_folder / name).read_text().splitlines()[1:]]
        datasets.Dataset.from_dict({"sentence": [s for s, _ in rows], "label": [int(y) for _, y in rows]}) \
            .to_parquet(str(hub / f"{split}.parquet"))
    lr, steps = 1e-3, 4
    result = subprocess.run(
        command("--dataset", str(hub), *SST2_SMALL, "--max-length", "24", "--max-steps", str(steps), "--bf16",
                "--gradient-accumulation-steps", "2", "--weight-decay", "0.01", "--warmup-ratio", "0.5",
                "--lr-scheduler", "constant_with_warmup", "--lr", str(lr), "--eval-steps", "2", "--logging-steps", "1",
                "--report-to", "tensorboard"),
        cwd=tmp_path, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "runs" / "lamda-minilm-sst2-parquet"
    run = json.loads((out / "metrics.json").read_text())
    logged = {h["step"]: h for h in run["log_history"] if "loss" in h}
    assert sorted(h["step"] for h in run["log_history"] if "eval_loss" in h) == [2, 4]  # --eval-steps 2 of 4
    assert sorted(logged) == [1, 2, 3, 4]  # --logging-steps 1
    # 2 warmup steps (0.5 of 4) then constant: step s (from 1) ran at lr * min(1, (s - 1) / 2)
    assert [logged[s]["learning_rate"] for s in range(1, 5)] == pytest.approx([0, lr / 2, lr, lr])
    # 2 batches of 4 per optimizer step: 4 steps see 32 of the 64 rows, half an epoch
    assert logged[4]["epoch"] == pytest.approx(steps * 4 * 2 / 64)
    assert run["config"]["weight_decay"] == 0.01 and run["config"]["bf16"] is True
    assert run["config"]["init"] == "gradient"  # the default: calibrated under the bf16 autocast the steps use
    # bf16: the frozen base is stored in bf16 (2 bytes per weight), and so is the frozen A (our dtype policy); every
    # trainable factor (B, S) and the head stay float32
    assert run["accounted_memory_bytes"]["parameters"] < 0.6 * 4 * run["total_params"]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in dtypes.items() if k.endswith("lamda_A")} == {"BF16"}
    assert {d for k, d in dtypes.items() if not k.endswith("lamda_A")} == {"F32"}
    assert any(k.endswith("lamda_B") for k in dtypes) and any("classifier" in k for k in dtypes)
    # TensorBoard got the same train losses as metrics.json
    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(
        {s: h["loss"] for s, h in logged.items()})
    # feedback: numbers, not strings; one line for the new head instead of transformers' load report
    both = result.stdout + result.stderr
    assert "step 1: loss=" in both and "step 2: eval_loss=" in both and "'loss': '" not in both
    assert "new classification head (classifier.bias, classifier.weight)" in result.stdout
    assert "LOAD REPORT" not in both
    assert float(result.stdout.split("validation: loss=")[1].split()[0]) == pytest.approx(run["validation"]["loss"],
                                                                                         abs=1e-4)
