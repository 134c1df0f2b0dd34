"""FSDP2 through accelerate (the Trainer's ``fsdp`` settings build the same plugin), with the base built on the meta
device and loaded afterwards: the deferred init must read the loaded weights, not the meta placeholders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parent / "fsdp2_accelerate_worker.py"
PORTS = {"lamda": 29651, "lorafa": 29652}


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["lamda", "lorafa"])
def test_meta_base_loaded_then_sharded_by_accelerate(method):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={PORTS[method]}",
               str(WORKER), method]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout[-3000:]
    result = json.loads(lines[0])
    assert result["layers"] == 14
    assert result["frozen_factors_equal"] and result["loss_finite"], result
