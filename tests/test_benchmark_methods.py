"""The benchmarks' data-driven methods (benchmarks/data_driven.py): PEFT's LoRA-GA, EVA and CorDA and LaMDA with the
gradient init, built on a tiny random BERT classifier (the benchmark's architecture, pooler included).

Each must start at the base model's function (LoRA-GA and CorDA move the base weight by what their adapter adds,
EVA's B and LaMDA's delta start at zero), adapt every targeted module, and train as its base method (the CLI keys
LaMDA's optimizer groups and B's freezing on the method's name: a lamda-gradient run that trained as "lora-ga" would
silently never freeze B)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from data_driven import DATA_DRIVEN, TRAINED_AS, build  # noqa: E402

from lamda_peft import LamdaLayer  # noqa: E402


def _bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def _batches(count: int = 3, size: int = 8, length: int = 12) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        mask = torch.ones(size, length, dtype=torch.long)
        mask[: size // 2, length - 3:] = 0  # padded rows, as a collator gives them
        out.append({"input_ids": torch.randint(1, 64, (size, length), generator=generator) * mask,
                    "token_type_ids": torch.zeros(size, length, dtype=torch.long), "attention_mask": mask,
                    "labels": torch.randint(0, 2, (size,), generator=generator)})
    return out


@pytest.mark.parametrize("method", DATA_DRIVEN)
def test_each_method_starts_at_the_base_function_and_adapts_every_linear_module(method):
    batches = _batches()
    probe = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        base = _bert()(**probe).logits
    model = build(method, _bert(), batches, r=4, seed=0).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**probe).logits, base, rtol=1e-4, atol=1e-5)
    adapted = {n.split(".", 3)[-1] for n, m in model.named_modules()
               if isinstance(m, LamdaLayer) or (hasattr(m, "lora_A") and "default" in m.lora_A)}
    linear = {n.removeprefix("bert.") for n, m in _bert().named_modules()
              if isinstance(m, torch.nn.Linear) and n != "classifier"}
    assert {n.split("bert.", 1)[-1] for n in adapted} == linear  # the pooler too (EVA and CorDA needed help there)
    if method.startswith("lamda"):
        A = next(m for m in model.modules() if isinstance(m, LamdaLayer)).lamda_A["default"]
        assert torch.count_nonzero(A) > 0 and not any(m.awaiting_calibration for m in model.modules()
                                                      if isinstance(m, LamdaLayer))


def test_each_method_trains_as_its_base_method():
    assert set(TRAINED_AS) == set(DATA_DRIVEN)
    assert TRAINED_AS["lamda-gradient"] == "lamda" and TRAINED_AS["lamda++-gradient"] == "lamda++"
    assert {TRAINED_AS[m] for m in ("lora-ga", "eva", "corda")} == {"lora"}
