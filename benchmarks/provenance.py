"""What every benchmark run records about where it ran: the commit (with "-dirty" when the code differs from it), the
library versions and the host. Taken once per process, when first asked: the code a process runs is the code it
imported, whatever is committed later."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


@functools.lru_cache(maxsize=1)
def provenance() -> dict:
    from lamda_peft.cli.run_record import versions

    commit = _git("rev-parse", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--", "src", "benchmarks"):
        commit += "-dirty"
    return {"commit": commit, **versions(), "host": platform.node(), "threads": os.environ.get("OMP_NUM_THREADS")}
