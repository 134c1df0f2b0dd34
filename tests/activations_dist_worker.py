"""One rank of the data-parallel tests of the data-driven inits (tests/test_activations.py,
tests/test_gradient_init.py), under torchrun (gloo, CPU).

    torchrun --nproc_per_node=2 tests/activations_dist_worker.py [activations|gradient]

Each rank calibrates on its own batches. Rank 0 prints one JSON line: whether A and B0S0 are bit-identical on both
ranks, and how far s B0S0 A (sign-free) is from the single-process init on both ranks' batches together.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_tiny_llama  # noqa: E402
from test_activations import ALPHA, R, _batches, _layers, _model  # noqa: E402


def main(init: str) -> None:
    import torch.distributed as dist

    from lamda_peft import initialize

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    everyone = [_batches(n=2, seed=10 + r) for r in range(world)]
    model = _model(init=init)
    initialize(model, everyone[rank], num_batches=2)
    ours = {n: (m.lamda_A["default"], m.lamda_B0S0["default"]) for n, m in _layers(model).items()}
    flat = torch.cat([t.flatten() for pair in ours.values() for t in pair])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    dist.destroy_process_group()  # the reference below runs in one process, over every rank's batches
    reference = _model(init=init)
    initialize(reference, [b for batches in everyone for b in batches], num_batches=2 * world)
    scaling = ALPHA / R
    worst = max(float((scaling * B0S0 @ A - scaling * m.lamda_B0S0["default"] @ m.lamda_A["default"]).abs().max())
                for (A, B0S0), m in zip(ours.values(), _layers(reference).values()))
    if rank == 0:
        print(json.dumps({"ranks_equal": all(torch.equal(gathered[0], g) for g in gathered[1:]),
                          "max_diff_to_single_process": worst, "layers": len(ours)}), flush=True)
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    main(sys.argv[1] if len(sys.argv) > 1 else "activations")
