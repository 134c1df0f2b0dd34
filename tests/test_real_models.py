"""Integration on the real models that install offline: MiniLM (sequence classification) and SmolLM2 (causal LM)."""

import csv
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from lamda_peft import LamdaConfig, LamdaLayer, export_lora

pytestmark = pytest.mark.slow


def _sst2_rows(glue_dir, count):
    with open(glue_dir / "SST-2" / "train.tsv", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [row for _, row in zip(range(count), reader)]


def _minilm(path):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()


def test_minilm_sst2_fine_tune_then_reload_and_export(minilm_path, glue_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    rows = _sst2_rows(glue_dir, 128)
    batch = tokenizer([r["sentence"] for r in rows], padding=True, truncation=True, max_length=48, return_tensors="pt")
    labels = torch.tensor([int(r["label"]) for r in rows])
    probe = {k: v[:8] for k, v in batch.items()}

    base_logits = _minilm(minilm_path)(**probe).logits
    config = LamdaConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"],
                         modules_to_save=["classifier", "pooler"], task_type="SEQ_CLS")
    model = get_peft_model(_minilm(minilm_path), config)
    assert torch.equal(model(**probe).logits, base_logits)  # step 0 is the pretrained model (same head)

    layers = [m for m in model.modules() if isinstance(m, LamdaLayer)]
    initial = {id(l): (l.lamda_A["default"].clone(), l.lamda_S["default"].detach().clone(), l.lamda_B["default"].detach().clone())
               for l in layers}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for epoch in range(4):
        for start in range(0, len(rows), 32):
            chunk = {k: v[start:start + 32] for k, v in batch.items()}
            loss = model(**chunk, labels=labels[start:start + 32]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    model.eval()
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.2  # the loss falls clearly
    for layer in layers:
        A0, S0, B0 = initial[id(layer)]
        assert torch.equal(layer.lamda_A["default"], A0)  # A bit-identical
        assert not torch.equal(layer.lamda_S["default"], S0) and not torch.equal(layer.lamda_B["default"], B0)

    expected = model(**probe).logits
    model.save_pretrained(tmp_path / "adapter")
    torch.save(dict(probe), tmp_path / "probe.pt")
    script = textwrap.dedent(f"""
        import torch, lamda_peft
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification
        torch.manual_seed(12345)
        base = AutoModelForSequenceClassification.from_pretrained({minilm_path!r}, num_labels=2)
        model = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r}).eval()
        torch.save(model(**torch.load({str(tmp_path / 'probe.pt')!r})).logits, {str(tmp_path / 'out.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=180)
    assert torch.allclose(torch.load(tmp_path / "out.pt"), expected, rtol=1e-6, atol=1e-6)

    export_lora(model, tmp_path / "lora")
    stock = PeftModel.from_pretrained(_minilm(minilm_path), tmp_path / "lora").eval()
    assert torch.allclose(stock(**probe).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smollm2_init_is_exact_and_export_reproduces(smollm2_path, tmp_path, dtype):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    ids = tokenizer(["The capital of France is", "Two plus two equals"], return_tensors="pt", padding=True)
    base = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=dtype).eval()
    reference = base(**ids).logits
    model = get_peft_model(base, LamdaConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM",
                                             svd_method="randomized", svd_niter=2))
    layers = [m for m in model.modules() if isinstance(m, LamdaLayer)]
    assert len(layers) == 30 * 7
    assert torch.equal(model(**ids).logits, reference)
    with torch.no_grad():
        for layer in layers:
            layer.lamda_S["default"].add_(0.01 * torch.randn(8, 8))
    expected = model(**ids).logits.float()
    assert not torch.allclose(expected, reference.float())
    if dtype == torch.float32:
        export_lora(model, tmp_path / "lora")
        fresh = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=dtype).eval()
        stock = PeftModel.from_pretrained(fresh, tmp_path / "lora")
        out = stock(**ids).logits
        assert float((out - expected).abs().max() / expected.abs().max()) <= 1e-5
