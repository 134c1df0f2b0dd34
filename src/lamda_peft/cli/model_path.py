"""The one model resolver of every subcommand (``train``, ``eval``, ``spectrum``, ``report``): an alias of a model
that installs offline (``minilm``, ``smollm2``; ``lamda_peft.apps.models``), a local folder or a Hub id, checked by
reading its config, so that a bad name is one line (exit code 2) before anything else is loaded."""

from __future__ import annotations

from pathlib import Path

from . import UsageError


def resolve_model_path(name: str, option: str = "--model") -> str:
    """The folder (or Hub id) of ``name``, whose config transformers can read; else a UsageError naming ``option``."""
    from transformers import AutoConfig

    from ..apps.models import ALIASES, ModelNotAvailable, resolve_model

    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():  # a path, not a Hub id
        raise UsageError(f"{option} {name}: no such folder; give a model folder, a Hub id or an alias "
                         f"({', '.join(ALIASES)})")
    try:
        path = resolve_model(name)
        AutoConfig.from_pretrained(path)
    except ModelNotAvailable as err:
        raise UsageError(str(err)) from None
    except (OSError, ValueError) as err:
        raise UsageError(f"{option} {name!r} is not an alias ({', '.join(ALIASES)}), a model folder or a reachable "
                         f"Hub id ({str(err).splitlines()[0]})") from None
    return path
