"""Loading tables through Hugging Face ``datasets``: local csv, tsv, json, jsonl and parquet files, or Hub data sets.

``datasets`` parses the files (and caches them as Arrow under ``~/.cache/huggingface/datasets``); what it does not do
is left here: GLUE's tsv files are read without quoting (their sentences hold bare quotes), a byte-order mark is
dropped (MRPC), a file without a header gets columns ``"0"``, ``"1"``, ... (CoLA), and every problem becomes a
``DataError`` naming the problem and the fix.

Local files never contact the Hub. ``--dataset NAME`` does (the ``datasets`` Hub code path); offline, set
``HF_DATASETS_OFFLINE=1`` to use what ``datasets`` cached before.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

from .tables import DataError, Table

FILE_TYPES = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# File stems that say nothing about the data (GLUE: every task has train.tsv and dev.tsv): the folder names it.
GENERIC_STEMS = {"train", "training", "dev", "valid", "validation", "val", "test", "data", "eval"}


def read_table(path: str | Path, header: bool = True) -> Table:
    """Read a csv, tsv (no quoting, as GLUE needs), json (a list of objects), jsonl or parquet file into a Table."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path} (give an existing .csv, .tsv, .json, .jsonl or .parquet file)")
    builder = FILE_TYPES.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .csv, .tsv, .json, .jsonl or .parquet")
    options: dict = {}
    if builder == "csv":
        options = {"encoding": "utf-8-sig"}  # drops a byte-order mark (MRPC's header starts with one)
        if path.suffix.lower() != ".csv":
            options |= {"sep": "\t", "quoting": csv.QUOTE_NONE}
        if not header:
            options["header"] = None
    empty = _empty_file_message(path, header and builder == "csv")
    if empty:
        raise DataError(empty)
    try:
        dataset = _load(builder, data_files={"train": str(path.resolve())}, split="train", **options)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001  (pandas, pyarrow and json parsers raise many kinds)
        hint = "; if the file has no header, pass --no-header" if builder == "csv" and header else ""
        raise DataError(f"{path}: cannot parse it as {path.suffix} ({_first_line(err)}){hint}") from None
    table = to_table(dataset, str(path))
    if not header:
        table = Table([str(c) for c in table.columns],
                      [{str(k): v for k, v in row.items()} for row in table.rows], table.source)
    return table


def _empty_file_message(path: Path, header: bool) -> Optional[str]:
    """The message for a text file with no data rows (empty, blank, or a header row alone); None otherwise. Only the
    first lines are read (the parsers' own messages for these cases name no problem a user would recognise)."""
    if path.suffix.lower() == ".parquet":
        return None
    lines = 0
    with path.open(encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            lines += bool(line.strip())
            if lines > int(header):
                return None
    if lines == 0:
        return f"{path} is empty; give a file with {'a header row and ' if header else ''}data rows"
    return f"{path} holds a header row but no data rows; give a file with data rows (or --no-header if it has none)"


def load_hub_table(name: str, config: Optional[str], split: str) -> Table:
    """One split of a data set on the Hub (or a local data set folder) as a Table."""
    source = f"{name}{'/' + config if config else ''}:{split}"
    try:
        dataset = _load(name, config, split=split)
    except DataError:
        raise
    except ValueError as err:
        if "split" in str(err).lower():
            raise DataError(f"--dataset {name}: {_first_line(err)}; pass --train-split/--validation-split") from None
        raise DataError(f"--dataset {name}: {_first_line(err)}") from None
    except Exception as err:  # noqa: BLE001  (network, missing config, ...)
        raise DataError(f"cannot load --dataset {name!r} ({_first_line(err)}); check the name and --dataset-config, "
                        "or, offline, set HF_DATASETS_OFFLINE=1 to use the datasets cache") from None
    return to_table(dataset, source)


def to_table(dataset, source: str) -> Table:
    if len(dataset) == 0:
        raise DataError(f"{source} holds no data rows")
    return Table(list(dataset.column_names), dataset.to_list(), source)


def data_name(path: Optional[str] = None, dataset: Optional[str] = None, config: Optional[str] = None) -> str:
    """A short name for the data, used in the default output folder: ``SST-2`` for ``glue/SST-2/train.tsv`` (a generic
    file stem takes its folder's name), ``reviews`` for ``reviews.csv``, ``glue-sst2`` for ``--dataset nyu-mll/glue
    --dataset-config sst2``."""
    if dataset is not None:
        name = Path(dataset.rstrip("/")).name
        return f"{name}-{config}" if config else name
    assert path is not None
    file = Path(path).resolve()
    if file.stem.lower() in GENERIC_STEMS and file.parent.name:
        return file.parent.name
    return file.stem


def _load(*args, **kwargs):
    import datasets

    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()  # a small file's "Generating train split" bar is noise
    try:
        return datasets.load_dataset(*args, **kwargs)
    finally:
        datasets.enable_progress_bars()


def _first_line(err: Exception) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
