"""``lamda-peft spectrum``: the table's figures against a direct float64 ``torch.linalg.svdvals`` computation, the
plot, the LaMDA++ budget and bounds, and bad input (exit code 2, no traceback)."""

from __future__ import annotations

import csv

import pytest
import torch
from transformers import AutoModel

from lamda_peft.cli import main
from lamda_peft.cli.spectrum import CSV_NAME, MD_NAME, PNG_NAME


def _energy(weight: torch.Tensor, k: int) -> float:
    sigma2 = torch.linalg.svdvals(weight.detach().double()).square()
    return float(sigma2[:k].sum() / sigma2.sum())


def _run_and_check(model_path: str, targets: str, rank: int, expected_modules: int, out) -> list[dict]:
    assert main(["spectrum", model_path, "--rank", str(rank), "--targets", targets, "--output-dir", str(out)]) == 0
    png = (out / PNG_NAME).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert (out / MD_NAME).read_text().count("\n") == expected_modules + 2
    with open(out / CSV_NAME) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == expected_modules
    # independent reference: the weights as loaded by transformers, float64 singular values
    modules = dict(AutoModel.from_pretrained(model_path, dtype=torch.float32).named_modules())
    for row in rows:
        weight = modules[row["module"]].weight
        assert (int(row["d_out"]), int(row["d_in"])) == tuple(weight.shape)
        assert float(row[f"E({rank})"]) == pytest.approx(_energy(weight, rank), abs=2e-6)
        assert float(row["E(allocated)"]) == pytest.approx(_energy(weight, int(row["allocated_rank"])), abs=2e-6)
    ranks = [int(row["allocated_rank"]) for row in rows]
    assert sum(ranks) == rank * expected_modules
    assert all(max(1, rank // 2) <= r <= 2 * rank for r in ranks)
    return rows


@pytest.mark.slow
def test_spectrum_on_minilm(minilm_path, tmp_path, capsys):
    rows = _run_and_check(minilm_path, "query,value", 4, 12, tmp_path)
    assert {row["type"] for row in rows} == {"attention.self.query", "attention.self.value"}
    assert sorted({int(row["layer"]) for row in rows}) == list(range(6))
    out = capsys.readouterr().out
    assert "encoder.layer.5.attention.self.value" in out and "after B is frozen" in out


@pytest.mark.slow
def test_spectrum_on_smollm2(smollm2_path, tmp_path):
    # attention of the first and last layers (8 modules) keeps the exact SVDs to seconds
    rows = _run_and_check(smollm2_path, r"layers\.(0|29)\.self_attn\.\w+_proj", 8, 8, tmp_path)
    assert {row["type"] for row in rows} == {f"self_attn.{p}_proj" for p in "qkvo"}
    assert {int(row["layer"]) for row in rows} == {0, 29}


@pytest.mark.parametrize(
    "args, message",
    [
        (["/no/such/model"], "no such folder"),
        (["{minilm}", "--rank", "0"], "--rank must be a positive integer"),
        (["{minilm}", "--rank", "200", "--targets", "query"], r"r_max=400 exceeds min\(d_in, d_out\)=384"),
        (["{minilm}", "--rank", "400", "--targets", "query"], "--rank 400 exceeds min"),
        (["{minilm}", "--targets", "no_such_module"], "no Linear/Conv1D module matches"),
        (["{minilm}", "--rank", "8", "--targets", "query", "--budget", "5"], "budget 5 cannot be met"),
    ],
)
def test_bad_input_is_a_usage_error(args, message, minilm_path, capsys):
    assert main(["spectrum", *[a.format(minilm=minilm_path) for a in args]]) == 2
    err = capsys.readouterr().err
    assert message in err or __import__("re").search(message, err), err
    assert "Traceback" not in err
