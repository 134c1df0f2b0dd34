"""FSDP2 through accelerate (the Trainer's ``fsdp`` settings build the same plugin), with the base built on the meta
device and loaded afterwards: the deferred init must read the loaded weights, not the meta placeholders; LaMDA's
freezing schedule keeps frozen columns exact and releases B; the adapter saved from the full state dict reloads
without FSDP to rank 0's outputs.

accelerate enables FSDP only on accelerator devices and silently uses DDP on CPU; the worker marks its state as FSDP
so that ``prepare`` runs accelerate's own FSDP2 code (``fsdp2_prepare_model``), and checks it did."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import assert_reload_reproduces, run_two_ranks

WORKER = Path(__file__).resolve().parent / "fsdp2_accelerate_worker.py"
PORTS = {"lamda": 29651, "lorafa": 29652}


@pytest.mark.distributed
@pytest.mark.parametrize("method", ["lamda", "lorafa"])
def test_meta_base_loaded_then_sharded_by_accelerate(method, tmp_path):
    result = run_two_ranks(WORKER, method, str(tmp_path), port=PORTS[method], timeout=240)
    assert result["layers"] == 14
    assert result["frozen_factors_equal"] and result["loss_finite"], result
    if method == "lamda":  # every column froze on schedule and held its value; B released (FSDP2 allows it)
        assert result["frozen_exact"] and result["freezer"]["released"], result
        assert result["freezer"]["frozen_columns"] == result["freezer"]["total_columns"] == 56
    assert_reload_reproduces(tmp_path)
