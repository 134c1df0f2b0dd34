"""The command line under ``accelerate launch`` (issue 27: a documented launch, now tested): two processes train one
DDP run, rank 0 writes it once.

On a machine without GPUs, accelerate starts several processes only through its multi-GPU launcher (``--multi_gpu``;
the processes then use gloo on the CPU): ``--cpu --num_processes 2`` runs a single process (accelerate's multi-CPU
launch goes through MPI). docs/cli.md says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from test_cli_new_user import read_run, reviews, tiny_bert, train_argv  # noqa: F401 (fixtures)


@pytest.mark.skipif(shutil.which("accelerate") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "accelerate")), reason="the accelerate command is not installed")
def test_the_cli_under_accelerate_launch_trains_with_ddp_and_rank_0_writes_the_run_once(tiny_bert, reviews,  # noqa: F811
                                                                                        tmp_path):
    out = tmp_path / "ddp"
    launcher = shutil.which("accelerate") or os.path.join(os.path.dirname(sys.executable), "accelerate")
    command = [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29687",
               "-m", "lamda_peft.cli", *train_argv(tiny_bert, reviews, out, "--max-steps", "2", "--save-steps", "1")]
    proc = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trainable parameters at start") == 2  # each process builds the model
    assert proc.stdout.count(f"wrote {out}/") == 1  # rank 0 alone evaluates and writes
    run = read_run(out)
    assert run["steps"] == 2 and run["validation"]["eval_rows"] == 4
    # each optimizer step takes --batch-size rows on each of the 2 processes: 2 steps x 2 x 2 rows of 32
    assert [e["epoch"] for e in run["log_history"] if e.get("step") == 2][0] == pytest.approx(8 / 32)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-2"]
