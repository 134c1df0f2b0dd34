"""``import lamda_peft`` registers LAMDA and LORAFA with PEFT without importing PEFT itself.

Why: importing peft imports torch and transformers (seconds, a minute on a busy machine), and the ``lamda-peft``
command must print ``--help``, option errors and a Ctrl-C as one line before any of that. Yet users rely on
``import lamda_peft`` alone making ``PeftModel.from_pretrained`` / ``PeftConfig.from_pretrained`` understand a LaMDA
adapter, whenever they import peft. So:

- peft already imported: register now (importing the tuners registers them);
- else a finder on ``sys.meta_path`` takes peft's real spec from the other finders and wraps its loader, so that
  right after peft's module code has run, the tuners are imported; then the finder removes itself and peft gets its
  own loader back. When peft was imported by a lamda_peft module (``import lamda_peft.cli.spectrum``), the tuners
  could meet that module half-built: the finder also wraps the loaders of lamda_peft's modules and registers once the
  outermost of them has finished.

Whatever fails here, registration still happens on the other paths: ``lamda_peft/tuners/lamda/__init__.py`` and
``lora_fa/__init__.py`` register when they are imported, and ``lamda_peft.LamdaConfig`` (any public name) imports
them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import Any, Optional, Sequence

TUNERS = ("lamda_peft.tuners.lamda", "lamda_peft.tuners.lora_fa")  # each registers its method when imported
# The deprecated old paths (issue 26) warn at import with a stacklevel that must reach their importer: our loader's
# frame would come between, so they keep their own loader (they import no peft).
SHIMS = frozenset(f"lamda_peft.{name}" for name in ("data", "data_loading", "metrics", "models"))
_lock = threading.Lock()  # guards sys.meta_path only: never held while importing (import locks would deadlock on it)


def _initializing(name: str) -> bool:
    """``name`` is being imported right now (in sys.modules, its code not finished): importlib's own flag."""
    module = sys.modules.get(name)
    return module is not None and bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _ours(name: str) -> bool:
    return name == "lamda_peft" or name.startswith("lamda_peft.")


def _busy(finished: str = "") -> bool:
    """A lamda_peft module (other than ``finished``, whose code has just run) is being imported."""
    return any(_initializing(name) for name in list(sys.modules) if _ours(name) and name != finished)


def register_methods(finished: str = "") -> bool:
    """Import the tuners, which registers LAMDA and LORAFA with PEFT (idempotent, cheap once done); False when a
    lamda_peft module is being imported (``finished`` aside), which the finder then waits for.

    Imports are thread-safe on their own (a module's code runs once, under its import lock), so no lock of ours is
    held here."""
    if _busy(finished):
        return False
    for name in TUNERS:
        if name != finished:
            importlib.import_module(name)
    return True


class _RegisteringLoader(importlib.abc.Loader):
    """A module's own loader, plus the registration (when peft is there) once the module's code has run."""

    def __init__(self, loader: Any, finder: "PeftImportHook") -> None:
        self._loader, self._finder = loader, finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[ModuleType]:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        # the module keeps the loader it was found with (inspect, importlib.resources use it)
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._finder.imported(module.__name__)

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, get_resource_reader, ...
        return getattr(self._loader, name)


class PeftImportHook(importlib.abc.MetaPathFinder):
    """Finds ``peft`` and lamda_peft's modules like the other finders do, with a loader that registers our methods
    after the import once peft is there."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None,
                  target: Optional[ModuleType] = None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != "peft" and (not fullname.startswith("lamda_peft.") or fullname in SHIMS):
            return None
        for finder in list(sys.meta_path):
            if isinstance(finder, PeftImportHook) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader, self)
                return spec
        return None

    def imported(self, name: str) -> None:
        """``name``'s code has run: register if peft is there and no lamda_peft import is under way."""
        if "peft" not in sys.modules or (name != "peft" and _initializing("peft")):
            return
        try:
            if not register_methods(finished=name):
                return  # the outermost lamda_peft import under way calls again when it has finished
        except Exception:  # noqa: BLE001  the tuners' own import (or lamda_peft.LamdaConfig) registers them then
            pass
        self.remove()

    def remove(self) -> None:
        with _lock:
            while self in sys.meta_path:
                sys.meta_path.remove(self)


def install() -> None:
    """Register now if peft is imported, else when it is (called at the end of ``lamda_peft/__init__.py``)."""
    if "peft" in sys.modules and not _initializing("peft"):
        register_methods(finished="lamda_peft")
        return
    with _lock:
        if not any(isinstance(finder, PeftImportHook) for finder in sys.meta_path):
            sys.meta_path.insert(0, PeftImportHook())
