"""LaMDA and LaMDA++ under DeepSpeed ZeRO-2 and ZeRO-3 (2 processes, gloo on CPU): the spectral init (and LaMDA++'s
rank allocation) reads each partitioned weight gathered and gives the single-process factors on every rank; the
freezing schedule, attached to ZeRO's optimizer, keeps every frozen column of B exact in the working and the master
copy while training matches a single-process run on the same data; save_pretrained writes the full adapter, which
reloads without DeepSpeed to the same outputs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import make_tiny_llama

pytest.importorskip("deepspeed", reason="needs pip install 'lamda-peft[deepspeed]'")
WORKER = Path(__file__).resolve().parent / "deepspeed_worker.py"
PORTS = {"zero2": 29641, "zero3": 29642, "zero3-energy": 29643, "zero3-trainer": 29644}


@pytest.mark.distributed
@pytest.mark.parametrize("mode", PORTS)
def test_zero_init_freeze_train_save_reload(mode, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={PORTS[mode]}",
               str(WORKER), mode, str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{\"")]
    assert len(lines) == 1, proc.stdout[-3000:]
    result = json.loads(lines[0])
    trainer = mode == "zero3-trainer"  # the Trainer with a ZeRO-3 config and LamdaCallback, saved by save_model
    if not trainer:
        assert result["partitioned"] is mode.startswith("zero3")  # ZeRO-3 really partitioned the base while loading
        assert result["init_equal_reference"] and result["ranks_equal"]
        assert result["ranks"] == ([3, 4, 5] if mode == "zero3-energy" else [4])  # LaMDA++: unequal ranks
    # Freezing: every column froze on schedule, had trained until then, and held its value from then on (working
    # and master copy); B was not released (ZeRO keeps it), and the run matches a single process on the same data.
    freezer = result["freezer"]
    assert freezer["step"] == 6 and freezer["frozen_columns"] == freezer["total_columns"] == 56
    assert not freezer["released"] and "DeepSpeed ZeRO" in freezer["release_blocked"]
    assert result["frozen_exact"] and result["moved_before_freezing"]
    if not trainer:
        assert result["b_max_abs_diff_to_reference"] < 1e-5
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    b = [t for k, t in tensors.items() if k.endswith(".lamda_B")]
    assert len(b) == 14 and all(t.shape[0] in (16, 32, 64) for t in b)  # whole, not partitions
    assert sorted({t.shape[1] for t in b}) == result.get("ranks", [4])
    saved = torch.load(tmp_path / "logits.pt")
    reloaded = PeftModel.from_pretrained(make_tiny_llama(seed=0), tmp_path / "adapter").eval()
    with torch.no_grad():
        logits = reloaded(input_ids=saved["ids"]).logits
    assert not torch.equal(logits, make_tiny_llama(seed=0)(input_ids=saved["ids"]).logits)  # it trained
    assert torch.allclose(logits, saved["logits"], rtol=1e-5, atol=1e-6)
