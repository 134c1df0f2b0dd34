"""The package layout (issue 26): the CLI's helpers live in ``lamda_peft.apps``; their old paths still import, with a
DeprecationWarning and the same objects, and nothing in the repository imports the old paths any more."""

from __future__ import annotations

import importlib
import re
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MOVED = ("models", "data", "data_loading", "metrics")
NAMES = "(?:" + "|".join(MOVED) + r")\b"
# an import statement of an old path, or an old path in quotes (a monkeypatch target, importlib.import_module)
OLD_ABSOLUTE = re.compile(rf"^\s*(?:from|import)\s+lamda_peft\.{NAMES}|^\s*from\s+lamda_peft\s+import\s+.*\b{NAMES}"
                          rf"|[\"']lamda_peft\.{NAMES}")


@pytest.mark.parametrize("name", MOVED)
def test_old_path_warns_and_gives_the_same_objects(name, monkeypatch):
    monkeypatch.delitem(sys.modules, f"lamda_peft.{name}", raising=False)
    new = importlib.import_module(f"lamda_peft.apps.{name}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        __import__(f"lamda_peft.{name}")  # an import statement's frame (importlib.import_module would be the importer)
    old = sys.modules[f"lamda_peft.{name}"]
    [warning] = [w for w in caught if issubclass(w.category, DeprecationWarning) and "lamda_peft.apps" in str(w.message)]
    assert f"lamda_peft.apps.{name}" in str(warning.message)
    assert warning.filename == __file__  # stacklevel: the warning points at the importer, not at the shim
    public = {k: v for k, v in vars(new).items() if not k.startswith("__")}
    assert public and all(getattr(old, k) is v for k, v in public.items())
    if name == "data":  # read_table now lives in data_loading only
        from lamda_peft.apps.data_loading import read_table

        assert old.read_table is read_table


def test_old_smollm2_path_import_still_works(monkeypatch):
    monkeypatch.delitem(sys.modules, "lamda_peft.models", raising=False)
    with pytest.warns(DeprecationWarning, match="lamda_peft.apps.models"):
        from lamda_peft.models import smollm2_path
    from lamda_peft.apps.models import smollm2_path as new

    assert smollm2_path is new


def test_nothing_imports_the_old_paths():
    shims = {ROOT / "src" / "lamda_peft" / f"{name}.py" for name in MOVED}
    found = []
    for folder in ("src", "tests", "benchmarks", "examples"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path in shims or path == Path(__file__).resolve():
                continue
            old = [OLD_ABSOLUTE]
            inside = path.relative_to(ROOT / "src" / "lamda_peft").parts if path.is_relative_to(ROOT / "src") else ()
            if inside and inside[0] != "apps":  # relative imports of the old modules from inside the package
                dots = re.escape("." * len(inside))
                old.append(re.compile(rf"^\s*from\s+{dots}(?:{NAMES}|\s+import\s+.*\b{NAMES})"))
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if any(pattern.search(line) for pattern in old):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "old import paths (use lamda_peft.apps.*):\n" + "\n".join(found)


def test_the_library_imports_no_shim():
    code = "import lamda_peft, lamda_peft.cli, lamda_peft.cli.train, lamda_peft.cli.eval; import sys; " \
           f"print(sorted(m for m in sys.modules if m in {[f'lamda_peft.{n}' for n in MOVED]}))"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
