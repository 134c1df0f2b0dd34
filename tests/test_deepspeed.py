"""LaMDA and LaMDA++ under DeepSpeed ZeRO-2 and ZeRO-3 (2 processes, gloo on CPU): the spectral init (and LaMDA++'s
rank allocation) reads each partitioned weight gathered and gives the single-process factors on every rank; the
freezing schedule, attached to ZeRO's optimizer, keeps every frozen column of B exact in the working and the master
copy while training matches a single-process run on the same data; save_pretrained writes the full adapter, which
reloads without DeepSpeed to the same outputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import assert_reload_reproduces, run_two_ranks

pytest.importorskip("deepspeed", reason="needs pip install 'lamda-peft[deepspeed]'")
WORKER = Path(__file__).resolve().parent / "deepspeed_worker.py"
PORTS = {"zero2": 29641, "zero3": 29642, "zero3-energy": 29643, "zero3-trainer": 29644}


@pytest.mark.distributed
@pytest.mark.parametrize("mode", PORTS)
def test_zero_init_freeze_train_save_reload(mode, tmp_path):
    result = run_two_ranks(WORKER, mode, str(tmp_path), port=PORTS[mode])
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
    assert_reload_reproduces(tmp_path)
