"""PEFT's test modules, taken at test time from the source release (sdist) of the installed PEFT version.

Nothing of PEFT's tests is copied into this repository: the sdist is downloaded once with pip (or read from
``LAMDA_PEFT_SDIST``), its ``tests/`` folder is extracted into the lamda_peft cache, and the modules are imported as
the package ``peft_upstream_tests`` (they use relative imports). ``Unavailable`` says why when that is impossible.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

from lamda_peft.apps.models import cache_dir

PACKAGE = "peft_upstream_tests"


class Unavailable(RuntimeError):
    """PEFT's test sources cannot be obtained (no network to PyPI and no LAMDA_PEFT_SDIST)."""


def peft_version() -> str:
    return importlib.metadata.version("peft")


def tests_dir(version: str | None = None) -> Path:
    """The folder holding PEFT ``version``'s tests, extracted into the cache on first use."""
    version = version or peft_version()
    target = cache_dir() / "peft-tests" / f"peft-{version}"
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            _extract_tests(_sdist(version, Path(work)), version, Path(work) / "extracted")
            try:  # atomic: the cache never holds a half-extracted copy
                os.replace(Path(work) / "extracted" / f"peft-{version}", target)
            except OSError:
                pass  # another process has just put it there
    return target / "tests"


def _sdist(version: str, work: Path) -> Path:
    local = os.environ.get("LAMDA_PEFT_SDIST")
    if local:
        if not Path(local).is_file():
            raise Unavailable(f"LAMDA_PEFT_SDIST={local} is not a file")
        return Path(local)
    command = [sys.executable, "-m", "pip", "download", f"peft=={version}", "--no-binary", ":all:", "--no-deps",
               "--timeout", "20", "--retries", "1", "-d", str(work)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
        said = proc.stderr.strip()[-500:]
    except subprocess.TimeoutExpired:
        said = "(no answer in 300 s)"
    found = sorted(work.glob(f"peft-{version}.tar.gz"))
    if not found:
        raise Unavailable(f"`pip download peft=={version} --no-binary :all:` failed (no PyPI?); set LAMDA_PEFT_SDIST "
                          f"to a local peft-{version}.tar.gz. pip said: {said}")
    return found[0]


def _extract_tests(sdist: Path, version: str, dest: Path) -> None:
    prefix = f"peft-{version}/tests/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
        if not any(m.name == prefix + "testing_common.py" for m in members):
            raise Unavailable(f"{sdist} holds no {prefix}testing_common.py: not PEFT's source release")
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # refuse links and absolute paths
        tar.extractall(dest, members=members, **safe)


def import_module(name: str, version: str | None = None) -> types.ModuleType:
    """``peft_upstream_tests.<name>``, e.g. ``test_custom_models``, with pytest's assertion rewriting."""
    if PACKAGE not in sys.modules:
        import pytest

        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(tests_dir(version))]
        pytest.register_assert_rewrite(PACKAGE)  # PEFT's plain asserts report their values, as in PEFT's own runs
        sys.modules[PACKAGE] = package
        _import_testing_common()
    return importlib.import_module(f"{PACKAGE}.{name}")


def _import_testing_common() -> None:
    """testing_common imports diffusers' StableDiffusionPipeline for its Stable Diffusion tests, which never run on
    our tuners: without diffusers installed, a stand-in module serves that one import and is removed afterwards (so
    nothing else sees a fake diffusers)."""
    try:
        importlib.import_module("diffusers")
        importlib.import_module(f"{PACKAGE}.testing_common")
        return
    except ImportError:
        pass
    stub = types.ModuleType("diffusers")
    stub.StableDiffusionPipeline = type("StableDiffusionPipeline", (), {})  # isinstance(model, it) is then False
    sys.modules["diffusers"] = stub
    try:
        importlib.import_module(f"{PACKAGE}.testing_common")
    finally:
        sys.modules.pop("diffusers", None)
