"""Checkpoints, resume and clean stops for ``lamda-peft train``.

The run trains in a temporary folder beside the output folder. Every checkpoint the ``Trainer`` writes there
(``checkpoint-N``: adapter, optimizer, scheduler, RNG and trainer state) is, once complete, renamed into the output
folder and the previous one removed, so the output folder only ever holds complete checkpoints. Ctrl-C (SIGINT)
anywhere raises ``KeyboardInterrupt``, except inside the few renames that publish files (``sigint_deferred``); the
temporary folder is removed and the command exits with code 130 and one line naming the last checkpoint. The SIGINT
handling itself is in ``interrupts`` (imported by ``main`` before anything heavy).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from transformers import TrainerCallback

from . import UsageError
from .interrupts import check_interrupt, sigint_deferred, sigint_handled  # noqa: F401 (their home before)
from .train_args import PAPER_FREEZE_RATIO

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
RUN_CONFIG = "lamda_peft_run.json"  # in each checkpoint: the run's config, to refuse resuming a different run


def private_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give ``root`` and everything under it the modes the umask allows (safetensors and mkdtemp write 0600/0700, so
    other users could not read a shared run)."""
    mask = private_umask()
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def make_workdir(out: Path) -> Path:
    """A temporary folder beside ``out`` (same file system, so it can be renamed into place), with the umask's mode
    rather than mkdtemp's 0700: a shared run stays readable by whom the user's umask allows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(workdir, 0o777 & ~private_umask())
    return workdir


def checkpoints(folder: Path) -> list[Path]:
    """The ``checkpoint-N`` folders in ``folder``, by step."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_config(checkpoint: Path) -> Optional[dict]:
    try:
        return json.loads((checkpoint / RUN_CONFIG).read_text()).get("config")
    except (OSError, ValueError):
        return None


def resolve_resume(value: Optional[str], out: Path, config: dict) -> Optional[Path]:
    """The checkpoint to resume from: ``latest`` is the newest in ``out``; a path must be a checkpoint of this run."""
    if value is None:
        return None
    if value == "latest":
        found = checkpoints(out)
        if not found:
            raise UsageError(f"--resume-from-checkpoint: {out} holds no checkpoint-N folder; give a checkpoint path, "
                             "or run without --resume-from-checkpoint")
        path = found[-1]
    else:
        path = Path(value)
        if not (path / "trainer_state.json").is_file():
            raise UsageError(f"--resume-from-checkpoint {value}: not a checkpoint folder (no trainer_state.json); "
                             "give a checkpoint-N folder written with --save-steps")
    saved = checkpoint_config(path)
    changed = differing_options(saved, config) if saved is not None else []
    if changed:
        raise UsageError(f"--resume-from-checkpoint {path} belongs to a different run (options that differ: "
                         f"{', '.join(changed)}); resume with the options it was trained with")
    return path


def differing_options(saved: dict, config: dict) -> list[str]:
    """The run-config keys whose values differ (``config`` as it would read back from JSON)."""
    current = json.loads(json.dumps(config))
    saved = with_defaults_written_out(saved)
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


def with_defaults_written_out(saved: dict) -> dict:
    """A LaMDA run recorded before session 12 left its init and freeze ratio out when they were the defaults of then
    (the spectral init, 0.3); written out, it compares equal to the same run given today with ``--init spectral``."""
    if saved.get("method") not in ("lamda", "lamda++"):
        return saved
    freeze_ratio = saved.get("freeze_ratio")
    return {**saved, "init": saved.get("init", "spectral"), "freeze_ratio": PAPER_FREEZE_RATIO if freeze_ratio is None
            else freeze_ratio}


class PublishCheckpoints(TrainerCallback):
    """After the Trainer saved ``checkpoint-N`` (complete), move it into ``out`` and drop the older ones."""

    def __init__(self, out: Path, config: dict[str, Any], keep: int = 1) -> None:
        self.out = out
        self.config = config
        self.keep = keep  # how many of the newest checkpoints stay (--save-total-limit)
        self.last: Optional[Path] = None  # the checkpoint this run published last
        self.step = 0  # the last optimizer step completed

    def on_step_end(self, args, state, control, **kwargs: Any):
        self.step = state.global_step
        check_interrupt()

    def on_substep_end(self, args, state, control, **kwargs: Any):
        check_interrupt()

    def on_prediction_step(self, args, state, control, **kwargs: Any):
        check_interrupt()

    def on_save(self, args, state, control, **kwargs: Any):
        source = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not state.is_world_process_zero or not source.is_dir():  # under torchrun, rank 0 publishes
            return
        (source / RUN_CONFIG).write_text(json.dumps({"config": self.config}, indent=2) + "\n")
        apply_umask(source)
        target = self.out / source.name
        with sigint_deferred():
            self.out.mkdir(parents=True, exist_ok=True)
            os.chmod(self.out, 0o777 & ~private_umask())
            if target.exists():  # the same step of an earlier attempt of this run
                shutil.rmtree(target)
            os.replace(source, target)
            self.last = target
            others = [p for p in checkpoints(self.out) if p != target]
            for old in others[:len(others) - (self.keep - 1)]:  # the oldest; this one and keep - 1 others stay
                shutil.rmtree(old, ignore_errors=True)


def publish(workdir: Path, out: Path, keep: Sequence[Path] = ()) -> None:
    """Put the finished run in place of ``out``, keeping what this run wrote there as it went (``keep``: its latest
    checkpoint, its logs); Ctrl-C waits until it is done."""
    apply_umask(workdir)
    with sigint_deferred():
        for path in keep:
            if path.exists():
                os.replace(path, workdir / path.name)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(workdir, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(workdir, out)


def interrupted_message(out: Path, step: Optional[int], save_steps: Optional[int] = None) -> str:
    """What Ctrl-C kept, worded by what was passed: the last checkpoint, the step of the first one, or the option."""
    where = f" at step {step}" if step else ""
    found = checkpoints(out)
    if found:
        return (f"interrupted{where}; the last checkpoint is {found[-1]} (continue with the same command and "
                "--resume-from-checkpoint)")
    if save_steps:
        upcoming = (step or 0) // save_steps * save_steps + save_steps
        return (f"interrupted{where}, before the checkpoint of step {upcoming} (--save-steps {save_steps}); nothing "
                "was written")
    return f"interrupted{where}; nothing was written (pass --save-steps N to keep checkpoints)"
