"""Helpers shared by the CLI, the benchmarks and the examples: data tables, tokenization, task metrics and the offline
demo models. Not the library API (that is :mod:`lamda_peft`).

- :mod:`.tables`        ``Table`` and ``DataError``, the one home of what reading and preparing data share
- :mod:`.data_loading`  reading tables (``read_table``: local files; ``load_hub_table``: Hub data sets)
- :mod:`.data`          column checks, task inference, tokenization into torch Datasets; the BBC News demo data
- :mod:`.metrics`       task metrics in plain numpy
- :mod:`.models`        the offline demo models by alias (``minilm``, ``smollm2``)
"""
