"""Plot the PMB freezing schedule k(t) = min(r, floor(r t / (freeze_ratio T))) (docs/freezing.md).

    python benchmarks/plot_freezing_schedule.py [--out docs/figures/freezing_schedule.png]

Left: fraction of B's columns frozen over training for several freeze_ratio values (r = 8), with the schedule of
the authors' public code for contrast (t = int(step / (0.3 T)) columns: at most 3, B never fully frozen).
Right: what that means for the parameters one layer trains (r^2 for S plus the free columns of B), for a
576 -> 576 projection (SmolLM2-135M's q_proj) at r = 16.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lamda_peft.schedule import freeze_count  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs/figures/freezing_schedule.png"))
    out = Path(parser.parse_args().out)
    T = 1000
    steps = range(T + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))

    r = 8
    for ratio in (0.1, 0.2, 0.3, 0.5, 1.0):
        label = f"freeze_ratio={ratio}" + (" (default)" if ratio == 0.3 else "")
        left.step(steps, [freeze_count(t, T, r, ratio) / r for t in steps], where="post", label=label,
                  linewidth=2.2 if ratio == 0.3 else 1.3)
    authors = [min(r, int(t / (0.3 * T))) / r for t in steps]
    left.step(steps, authors, where="post", linestyle="--", color="gray", label="authors' code (0.3)")
    left.set(xlabel="optimizer step t (T = 1000)", ylabel="fraction of B's columns frozen, k(t) / r",
             title=f"k(t) = min(r, floor(r t / (freeze_ratio T))), r = {r}")
    left.legend(fontsize=8, loc="lower right")
    left.grid(alpha=0.3)

    r, d_out = 16, 576
    for ratio in (0.1, 0.3, 1.0):
        trainable = [r * r + (r - freeze_count(t, T, r, ratio)) * d_out for t in steps]
        right.step(steps, trainable, where="post", label=f"freeze_ratio={ratio}")
    right.axhline(r * (576 + d_out), color="gray", linestyle=":", label="LoRA, same r")
    right.set(xlabel="optimizer step t (T = 1000)", ylabel="trainable parameters in one layer",
              title=f"one {576}->{d_out} layer, r = {r}: r^2 + (r - k) d_out", yscale="log")
    right.set_ylim(top=8e4)  # room for the legend above the LoRA line
    right.legend(fontsize=8, ncol=2)
    right.grid(alpha=0.3, which="both")

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
