"""lamda-peft report: parameter figures equal the closed forms of method.md for the shipped configs."""

from __future__ import annotations

import json

import pytest
import torch

from lamda_peft.cli import main
from lamda_peft.cli.report import load_config, plan
from lamda_peft.memory import lamda_average_updates


def _llama_modules(h=4096, inter=11008, layers=32):
    """(d_in, d_out) of the seven projections of every LLaMA-2-7B layer (32 heads = 32 KV heads)."""
    per_layer = [(h, h)] * 4 + [(h, inter), (h, inter), (inter, h)]
    return per_layer * layers


def test_llama_2_7b_parameters_match_closed_forms():
    r = 64
    rows = {row.method: row for row in plan(load_config("llama-2-7b"), r, 1, 16, "all-linear", torch.bfloat16)}
    mods = _llama_modules()
    assert len(mods) == 224
    assert rows["LoRA"].start == rows["LoRA"].end == sum(r * (a + b) for a, b in mods)
    assert rows["LoRA-FA"].start == sum(r * b for _, b in mods)
    lamda = rows["LaMDA, B training"]
    assert lamda.start == sum(r * r + r * b for _, b in mods)
    assert lamda.end == rows["LaMDA, B frozen"].start == 224 * r * r
    assert lamda.average_updates == pytest.approx(sum(lamda_average_updates(b, r, 0.3, 1000) for _, b in mods))
    # parameter updates averaged with k(t): r^2 + d_out (r - k(t)) -> about r^2 + d_out r 0.3 / 2
    assert lamda.average_updates == pytest.approx(sum(r * r + b * r * 0.15 for _, b in mods), rel=0.02)
    assert rows["LaMDA, B frozen"].gradient_bytes == 224 * r * r * 4
    assert rows["LaMDA, B frozen"].optimizer_bytes == 2 * 224 * r * r * 4 + 224 * 4


@pytest.mark.parametrize("name,modules", [
    ("deberta-v3-base", [(768, 768)] * 4 * 12 + [(768, 3072), (3072, 768)] * 12 + [(768, 768)]),  # + pooler dense
    ("bart-large", ([(1024, 1024)] * 4 + [(1024, 4096), (4096, 1024)]) * 12
                   + ([(1024, 1024)] * 8 + [(1024, 4096), (4096, 1024)]) * 12),  # self-attn, cross-attn, FFN
])
def test_encoder_configs_parameters_match_closed_forms(name, modules):
    r = 8
    rows = {row.method: row for row in plan(load_config(name), r, 2, 16, "all-linear", torch.float32)}
    head = rows["LoRA"].start - sum(r * (a + b) for a, b in modules)  # a trained classification head, if any
    assert head >= 0
    assert rows["LoRA-FA"].start == sum(r * b for _, b in modules) + head
    assert rows["LaMDA, B training"].start == sum(r * r + r * b for _, b in modules) + head
    assert rows["LaMDA, B frozen"].end == len(modules) * r * r + head


def test_report_command_prints_a_table_and_json(capsys):
    assert main(["report", "llama-2-7b", "--r", "16", "--batch", "1", "--seq", "8"]) == 0
    out = capsys.readouterr().out
    assert "| LaMDA, B frozen |" in out and "LaMDA++" in out
    assert main(["report", "llama-2-7b", "--r", "16", "--batch", "1", "--seq", "8", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["method"] for row in rows][:2] == ["LoRA", "LoRA-FA"] and rows[0]["ratio_to_lora"] == 1.0


def test_report_rejects_bad_input(tmp_path, capsys):
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"\0")
    assert main(["report", str(bad)]) == 2
    assert "not a config.json" in capsys.readouterr().err
    assert main(["report", "llama-2-7b", "--r", "0"]) == 2
    assert main(["report", "llama-2-7b", "--targets", "nope", "--batch", "1", "--seq", "4"]) == 2
    assert "matches no module" in capsys.readouterr().err
