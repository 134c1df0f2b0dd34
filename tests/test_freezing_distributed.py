"""Freezing under 2-process DDP (default settings and find_unused_parameters=True), FSDP2 and accelerate (which
prepares DDP on a CPU): torchrun, gloo, CPU. The worker (freezing_dist_worker.py) checks after every step that the
replicas hold identical adapter weights and that frozen columns did not move; here we check how it ended."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_two_ranks

WORKER = Path(__file__).resolve().parent / "freezing_dist_worker.py"
PORTS = {"ddp": 29631, "ddp_unused": 29632, "fsdp2": 29633, "accelerate": 29634}


def run_worker(mode: str) -> dict:
    return run_two_ranks(WORKER, mode, port=PORTS[mode], timeout=240)


@pytest.mark.distributed
@pytest.mark.parametrize("mode, released", [("ddp", False), ("accelerate", False), ("ddp_unused", True), ("fsdp2", True)])
def test_freezing_across_transitions(mode, released):
    result = run_worker(mode)
    state = result["state"]
    assert result["world"] == 2 and result["b_moved_in_step_1"]
    assert state["step"] == 10 and state["frozen_fraction"] == 1.0
    assert state["released"] is released and result["b_requires_grad"] is not released
    if not released:  # DDP with default settings: B stays masked, and the log says so once (rank 0 only)
        assert "DDP built its gradient buckets" in state["release_blocked"]
        assert result["stderr"].count("stays allocated and masked") == 1
