"""FSDP2 through accelerate (the Trainer's ``fsdp`` settings build the same plugin), with the base built on the meta
device and loaded afterwards: the deferred init must read the loaded weights, not the meta placeholders; LaMDA's
freezing schedule keeps frozen columns exact and releases B; the adapter saved from the full state dict reloads
without FSDP to rank 0's outputs.

accelerate enables FSDP only on accelerator devices and silently uses DDP on CPU; the worker marks its state as FSDP
so that ``prepare`` runs accelerate's own FSDP2 code (``fsdp2_prepare_model``), and checks it did."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from conftest import make_tiny_llama

WORKER = Path(__file__).resolve().parent / "fsdp2_accelerate_worker.py"
PORTS = {"lamda": 29651, "lorafa": 29652}


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["lamda", "lorafa"])
def test_meta_base_loaded_then_sharded_by_accelerate(method, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={PORTS[method]}",
               str(WORKER), method, str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{\"")]
    assert len(lines) == 1, proc.stdout[-3000:]
    result = json.loads(lines[0])
    assert result["layers"] == 14
    assert result["frozen_factors_equal"] and result["loss_finite"], result
    if method == "lamda":  # every column froze on schedule and held its value; B released (FSDP2 allows it)
        assert result["frozen_exact"] and result["freezer"]["released"], result
        assert result["freezer"]["frozen_columns"] == result["freezer"]["total_columns"] == 56
    saved = torch.load(tmp_path / "logits.pt")
    reloaded = PeftModel.from_pretrained(make_tiny_llama(seed=0), tmp_path / "adapter").eval()
    with torch.no_grad():
        logits = reloaded(input_ids=saved["ids"]).logits
    assert not torch.equal(logits, make_tiny_llama(seed=0)(input_ids=saved["ids"]).logits)  # it trained
    assert torch.allclose(logits, saved["logits"], rtol=1e-5, atol=1e-6)
