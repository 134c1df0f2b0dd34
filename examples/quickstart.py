"""The README's API snippet, end to end, with nothing beyond a core install (``pip install lamda-peft``).

    python examples/quickstart.py                      # a small randomly initialised LLaMA, built here (no download)
    python examples/quickstart.py --model PATH_OR_HUB_ID --target-modules q_proj,v_proj

For each method (LaMDA, LaMDA++, LoRA-FA, LaMDA with the activation init) it does what the README shows:
``get_peft_model``, ``lamda_param_groups`` (with weight decay), the Trainer (with ``LamdaCallback``, the freezing of
B, for LaMDA), ``save_pretrained``, ``PeftModel.from_pretrained``, ``export_lora`` and ``merge_and_unload``; and it checks what
the library promises: step 0 is the base model, the loss falls, the reload, the exported stock LoRA adapter and the
merged model give the trained model's logits. Any broken promise exits with status 1. CI runs it in a fresh venv
holding only the core dependencies (``.ci/run``). ``--output-dir`` keeps the adapters (and the small base model,
for ``lamda-peft spectrum`` and ``lamda-peft report``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import lamda_peft  # registers LAMDA and LORAFA with PEFT
from lamda_peft import LamdaConfig, LoraFAConfig, export_lora

VOCAB, LENGTH = 96, 24


def small_llama(folder: Path) -> str:
    """A 2-layer LLaMA (hidden 64) with random weights, saved to ``folder``: the library's real code path, no
    download."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


def counting_data(rows: int, vocab: int, seed: int = 0) -> Dataset:
    """Sequences that count up by a step of their own (t, t+k, t+2k, ... mod vocab): learnable from context."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (rows, 1), generator=g)
    step = torch.randint(1, 4, (rows, 1), generator=g)
    ids = (start + step * torch.arange(LENGTH)) % vocab
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def check(ok: bool, what: str, failures: list[str]) -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        failures.append(what)


def run(name: str, config, base_path: str, data: Dataset, probe: torch.Tensor, out: Path, failures: list[str]) -> None:
    print(f"{name}:")
    base = AutoModelForCausalLM.from_pretrained(base_path)
    reference = logits(base, probe)
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    if getattr(config, "init", None) == "activations":
        calibration = [{"input_ids": torch.tensor(data[i:i + 8]["input_ids"])} for i in range(0, 32, 8)]
        lamda_peft.initialize_from_activations(model, calibration, num_batches=4, show_progress_bar=False)
    check(torch.equal(logits(model, probe), reference), "step 0 gives the base model's logits", failures)

    optimizer = torch.optim.AdamW(lamda_peft.lamda_param_groups(model, lr=3e-3, weight_decay=0.01))
    args = TrainingArguments(output_dir=str(out / "trainer"), max_steps=60, per_device_train_batch_size=16,
                             logging_steps=5, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0)
    callbacks = [lamda_peft.LamdaCallback(stall_min_decrease=None)] if isinstance(config, LamdaConfig) else []
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None), callbacks=callbacks)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    check(losses[-1] < losses[0], f"the loss falls ({losses[0]:.3f} -> {losses[-1]:.3f})", failures)
    trained = logits(model, probe)

    model.save_pretrained(out / name)  # adapter_config.json + adapter_model.safetensors
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), out / name)
    check(torch.allclose(logits(reloaded, probe), trained, atol=1e-5), "the reloaded adapter gives the same logits",
          failures)
    export_lora(reloaded, out / f"{name}-lora")  # a plain LoRA adapter for the original base
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), out / f"{name}-lora")
    check(isinstance(lora.peft_config["default"], LoraConfig) and torch.allclose(logits(lora, probe), trained,
                                                                                 atol=1e-4),
          "the exported stock PEFT LoRA adapter gives the same logits", failures)
    merged = reloaded.merge_and_unload()
    check(torch.allclose(logits(merged, probe), trained, atol=1e-4), "merge_and_unload gives the same logits", failures)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a causal LM (local folder or Hub id); default: a small random LLaMA")
    parser.add_argument("--target-modules", default="all-linear")
    parser.add_argument("--output-dir", help="where to keep the adapters (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.output_dir or tmp)
        out.mkdir(parents=True, exist_ok=True)
        base_path = args.model or small_llama(out / "base")
        vocab = AutoModelForCausalLM.from_pretrained(base_path).config.vocab_size if args.model else VOCAB
        data = counting_data(256, min(vocab, VOCAB))
        probe = torch.tensor(counting_data(4, min(vocab, VOCAB), seed=1)["input_ids"])
        targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
        common = dict(r=8, lora_alpha=16, target_modules=targets, task_type="CAUSAL_LM")
        methods = {"lamda": LamdaConfig(**common), "lamda++": LamdaConfig(**common, rank_allocation="energy"),
                   "lora-fa": LoraFAConfig(**common), "lamda-activations": LamdaConfig(**common, init="activations")}
        failures: list[str] = []
        for name, config in methods.items():
            run(name, config, base_path, data, probe, out, failures)
    if failures:
        print(f"{len(failures)} check(s) failed: " + "; ".join(failures), file=sys.stderr)
        return 1
    print("every check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
