"""``lamda-peft eval --predictions FILE``: one row per validation example, as jsonl or csv by the file's extension
(issue 27). Classification: the input text column(s), the label, the predicted label and its probability;
regression: the text, the label and the prediction; causal-lm: the generated rows (``--num-generate``) with their
prompt, reference and answer. Written to a temporary file beside FILE and renamed into place."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from ..apps.data import DataSpec
from ..apps.tables import Table
from .eval_args import FORMATS, check_predictions_file  # noqa: F401 (their home before)

@torch.no_grad()
def predict(model, tokenizer, spec: DataSpec, dataset, batch_size: int = 32) -> list[tuple[float, float]]:
    """(prediction, probability) per row: the argmax class and its softmax probability, or the regression output
    (probability NaN)."""
    from .eval import collator_for

    model.eval()
    device = next(model.parameters()).device
    collate = collator_for(spec, tokenizer)
    found = []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        logits = model(**batch).logits.float()
        if spec.task == "regression":
            found += [(v, float("nan")) for v in logits.squeeze(-1).tolist()]
        else:
            prob, pred = logits.softmax(-1).max(-1)
            found += list(zip(pred.tolist(), prob.tolist()))
    return found


def prediction_rows(model, tokenizer, spec: DataSpec, table: Table, dataset, result: dict[str, Any],
                    batch_size: int) -> list[dict[str, Any]]:
    if spec.task == "causal-lm":
        return list((result.get("generation") or {}).get("samples", []))
    rows = []
    for row, (pred, prob) in zip(table.rows, predict(model, tokenizer, spec, dataset, batch_size)):
        entry = {column: row[column] for column in spec.text_columns}
        if spec.task == "regression":
            entry.update(label=row[spec.label_column], prediction=pred)
        else:
            entry.update(label=row[spec.label_column], predicted_label=spec.classes[pred], probability=prob)
        rows.append(entry)
    return rows


def write_predictions(path: str, rows: list[dict[str, Any]]) -> None:
    """``rows`` to ``path`` (jsonl or csv), through a temporary file renamed into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            if target.suffix.lower() == ".csv":
                writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
                writer.writeheader()
                writer.writerows(rows)
            else:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
