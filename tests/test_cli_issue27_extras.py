"""Issue 27, what run_glue / run_clm / TRL users expect: a validation split held out of the training file,
per-row predictions from eval, --modules-to-save, and the CLI under torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lamda_peft.apps.data_loading import read_table
from lamda_peft.cli import main
from lamda_peft.cli.holdout import split_rows

from test_cli_new_user import read_run, reviews, tiny_bert, train_argv  # noqa: F401 (fixtures)


def test_held_out_rows_are_disjoint_cover_the_file_and_follow_the_seed(reviews):  # noqa: F811
    table = read_table(reviews[0])
    train, val = split_rows(table, 10, seed=3)
    key = lambda rows: [r["text"] for r in rows]  # noqa: E731
    assert len(val.rows) == 3 and len(train.rows) == 29
    assert not set(key(train.rows)) & set(key(val.rows))
    assert sorted(key(train.rows) + key(val.rows)) == sorted(key(table.rows))
    assert key(split_rows(table, 10, seed=3)[1].rows) == key(val.rows)
    assert key(split_rows(table, 10, seed=4)[1].rows) != key(val.rows)


def test_train_without_validation_file_holds_out_rows_and_eval_finds_them(tiny_bert, reviews, tmp_path,  # noqa: F811
                                                                          capsys):
    out = tmp_path / "run"
    argv = ["train", "--train-file", str(reviews[0]), "--model", tiny_bert, "--output-dir", str(out),
            "--batch-size", "4", "--max-length", "16", "--max-steps", "1", "--seed", "3"]
    assert main(argv) == 0
    assert "validation: 10% of the training rows (3 rows) held out, seed 3" in capsys.readouterr().out
    run = read_run(out)
    assert run["validation_rows"] == 3 and run["train_rows"] == 29
    assert run["config"]["validation_split_percentage"] == 10
    assert main(["eval", "--adapter", str(out)]) == 0
    assert "(3 rows" in capsys.readouterr().out


def test_a_validation_file_run_records_no_split_percentage(tiny_bert, reviews, tmp_path):  # noqa: F811
    import argparse

    from lamda_peft.cli.run_record import given_options
    from lamda_peft.cli.train_args import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(), run=None)
    args = parser.parse_args(train_argv(tiny_bert, reviews, tmp_path / "x"))
    assert "validation_split_percentage" not in given_options(args)


@pytest.mark.parametrize("extra, message", [
    (["--validation-split-percentage", "0"], "--validation-split-percentage must be a percentage in (0, 100), got 0"),
    (["--validation-split-percentage", "100"], "--validation-split-percentage must be a percentage in (0, 100)"),
])
def test_bad_split_percentages_are_refused(extra, message, reviews, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "never"
    assert main(["train", "--train-file", str(reviews[0]), "--output-dir", str(out), *extra]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_a_split_percentage_with_a_validation_file_or_too_few_rows_is_refused(reviews, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "never"
    assert main(["train", "--train-file", str(reviews[0]), "--validation-file", str(reviews[1]),
                 "--validation-split-percentage", "5", "--output-dir", str(out)]) == 2
    assert "applies to --train-file without --validation-file" in capsys.readouterr().err
    one = tmp_path / "one.csv"
    one.write_text("text,label\ngood,1\n")
    assert main(["train", "--train-file", str(one), "--output-dir", str(out)]) == 2
    assert "too few to hold 1 out" in capsys.readouterr().err and not out.exists()


@pytest.fixture(scope="module")
def trained(tiny_bert, reviews, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(train_argv(tiny_bert, reviews, out, "--max-steps", "2")) == 0
    return out


@pytest.mark.parametrize("name", ["preds.jsonl", "preds.csv"])
def test_eval_predictions_hold_one_row_per_example_and_give_the_printed_accuracy(name, trained, reviews, tmp_path,  # noqa: F811
                                                                                  capsys):
    import csv

    capsys.readouterr()
    path, metrics = tmp_path / "sub" / name, tmp_path / "m.json"
    assert main(["eval", "--adapter", str(trained), "--predictions", str(path), "--output", str(metrics)]) == 0
    assert f"wrote 4 predictions to {path}" in capsys.readouterr().out
    if name.endswith(".csv"):
        rows = list(csv.DictReader(path.open()))
    else:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    validation = read_table(reviews[1])
    assert [r["text"] for r in rows] == [r["text"] for r in validation.rows]
    assert all(0.0 < float(r["probability"]) <= 1.0 for r in rows)
    accuracy = sum(str(r["label"]) == str(r["predicted_label"]) for r in rows) / len(rows)
    assert accuracy == pytest.approx(json.loads(metrics.read_text())["accuracy"])
    assert not [p for p in path.parent.iterdir() if p.name != name]  # no temporary file left


@pytest.mark.parametrize("name, message", [
    ("preds.txt", "--predictions {p}: the extension says the format; give a .jsonl or .csv file name"),
    ("", "--predictions {p} is a folder"),
])
def test_bad_predictions_files_are_refused_before_anything_runs(name, message, trained, tmp_path, capsys):
    path = tmp_path / name
    assert main(["eval", "--adapter", str(trained), "--predictions", str(path)]) == 2
    err = capsys.readouterr().err
    assert message.format(p=path) in err and len(err.strip().splitlines()) == 1


def test_modules_to_save_are_trained_and_saved_in_the_adapter(tiny_bert, reviews, tmp_path, capsys):  # noqa: F811
    from safetensors.torch import load_file
    from transformers import AutoModel

    out = tmp_path / "run"
    argv = train_argv(tiny_bert, reviews, out, "--max-steps", "2", "--target-modules", "query", "value",
                      "--modules-to-save", "pooler")
    assert main(argv) == 0
    saved = load_file(str(out / "adapter_model.safetensors"))
    pooler = {k: v for k, v in saved.items() if ".pooler." in k}
    assert pooler and any("classifier" in k for k in saved)  # the head is saved as always
    base = AutoModel.from_pretrained(tiny_bert).pooler.dense.weight
    trained_weight = next(v for k, v in pooler.items() if k.endswith("dense.weight"))
    assert not torch.equal(trained_weight, base)  # it was trained
    assert read_run(out)["config"]["modules_to_save"] == ["pooler"]
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"][:1] == ["pooler"]
    assert main(["eval", "--adapter", str(out)]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--method", "full", "--modules-to-save", "pooler"], "--modules-to-save pooler applies to the adapter methods"),
    (["--modules-to-save", ","], "--modules-to-save names no module"),
    (["--modules-to-save", "pooler,nowhere"], "--modules-to-save nowhere: no such module in the model"),
])
def test_bad_modules_to_save_are_refused(extra, message, tiny_bert, reviews, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "never"
    assert main(train_argv(tiny_bert, reviews, out, *extra)) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_the_cli_under_torchrun_trains_with_ddp_and_rank_0_writes_the_run_once(tiny_bert, reviews, tmp_path):  # noqa: F811
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29681",
               "-m", "lamda_peft.cli", *train_argv(tiny_bert, reviews, out, "--max-steps", "2", "--save-steps", "1")]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"wrote {out}/") == 1  # rank 0 alone evaluates and writes
    run = read_run(out)
    assert run["steps"] == 2 and run["validation"]["eval_rows"] == 4
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-2"]
    assert [p.name for p in tmp_path.iterdir()] == ["ddp"]  # no rank's temporary folder is left
