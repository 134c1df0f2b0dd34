"""Helpers shared by the CLI, the benchmarks and the examples: data tables, tokenization, task metrics and the offline
demo models. Not the library API (that is :mod:`lamda_peft`).

- :mod:`.tables`        ``Table`` and ``DataError``, the one home of what reading and preparing data share
- :mod:`.data_loading`  reading tables (``read_table``: local files; ``load_hub_table``: Hub data sets)
- :mod:`.data`          column checks, task inference, tokenization into torch Datasets; the BBC News demo data
- :mod:`.metrics`       task metrics in plain numpy
- :mod:`.models`        the offline demo models by alias (``minilm``, ``smollm2``)
"""

from __future__ import annotations

import importlib
import warnings


def _moved_here(namespace: dict, **elsewhere: str) -> None:
    """Fill an old module's namespace (``lamda_peft.models``, ...) with the names of the module of the same name in
    this package (the same objects), plus ``elsewhere``: names that moved to another module here (``read_table``:
    ``data_loading``), and warn with a DeprecationWarning that points at the line importing the old path. The four
    old modules do this and nothing else."""
    old = namespace["__name__"]
    new = f"{__name__}.{old.rpartition('.')[2]}"
    warnings.warn(f"{old} moved to {new}; import it from there ({old} will be removed in a future release)",
                  DeprecationWarning, stacklevel=3)  # 1: here, 2: the old module, 3: its importer (import frames skipped)
    namespace.update({k: v for k, v in vars(importlib.import_module(new)).items() if not k.startswith("__")})
    for name, module in elsewhere.items():
        namespace[name] = getattr(importlib.import_module(f"{__name__}.{module}"), name)
