"""``lamda-peft export`` and ``lamda-peft merge``: a trained LaMDA or LoRA-FA adapter as a stock PEFT LoRA adapter for
the original base (``lamda_peft.export_lora``), or merged into a full copy of its base (``merge_and_unload``).

    lamda-peft export runs/lamda --output-dir runs/lamda-lora     # loads with plain peft, serves with vLLM
    lamda-peft merge runs/lamda --output-dir runs/lamda-merged    # a plain transformers model folder

The base is ``--model``, else the one the run recorded (``metrics.json`` / ``lamda_peft_run.json``), else the one the
adapter names. It is always loaded in full precision: an adapter trained on a 4-bit base merges into the
full-precision weights. Both write under a temporary name and rename, so a failure leaves nothing behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from . import UsageError
from .validate import check_output_folder

HELP = {"export": "write a trained LaMDA / LoRA-FA adapter as a stock PEFT LoRA adapter for the original base",
        "merge": "merge a trained adapter into a full copy of its base model and save that model"}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    for name, run in (("export", run_export), ("merge", run_merge)):
        p = subparsers.add_parser(name, help=HELP[name], description=HELP[name] + ".")
        p.add_argument("adapter", help="the adapter folder (the output folder of 'lamda-peft train', a checkpoint, or "
                                       "a folder written by save_pretrained)")
        p.add_argument("--output-dir", required=True, help="the new folder to write (must not exist yet)")
        p.add_argument("--model", help="the base model (alias, folder or Hub id); default: the one the run recorded, "
                                       "else the one the adapter names")
        if name == "export":
            p.add_argument("--for-vllm", action="store_true",
                           help="refuse an adapter vLLM would not serve as trained (e.g. one with a trained head)")
        p.set_defaults(func=run)


def run_export(args: argparse.Namespace) -> int:
    out = _checked_output(args)  # before the heavy import: a wrong --output-dir is one line at once

    from .. import export_lora

    model, _ = load_adapter(Path(args.adapter), args.model)
    try:
        export_lora(model, out, for_vllm=getattr(args, "for_vllm", False))
    except ValueError as err:  # not a LaMDA / LoRA-FA adapter, merged, or refused for vLLM
        raise UsageError(f"{args.adapter}: {err}") from None
    print(f"wrote {out} (a PEFT LoRA adapter: adapter_config.json, adapter_model.safetensors); load it with "
          "PeftModel.from_pretrained(base, path), no lamda_peft needed")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    out = _checked_output(args)
    model, tokenizer = load_adapter(Path(args.adapter), args.model)
    merged = model.merge_and_unload()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        merged.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"wrote {out} (the base with the adapter merged into its weights; a plain transformers model folder)")
    return 0


def _checked_output(args: argparse.Namespace) -> Path:
    out = Path(args.output_dir)
    check_output_folder("--output-dir", out)
    if out.exists():
        raise UsageError(f"--output-dir {out} already exists; choose a new folder (nothing is overwritten)")
    if not (Path(args.adapter) / "adapter_config.json").is_file():
        raise UsageError(f"{args.adapter}: no adapter_config.json there; give an adapter folder (the output folder of "
                         "'lamda-peft train', a checkpoint, or one written by save_pretrained)")
    return out


def load_adapter(adapter: Path, base: Optional[str]) -> tuple[Any, Any]:
    """(PeftModel, tokenizer or None): the adapter on its full-precision base, with the task the run recorded (else
    the adapter's task_type: SEQ_CLS with the saved head's number of labels, or a causal LM)."""
    from peft import PeftConfig, PeftModel

    from .._peft_hook import register_methods
    from .eval import _saved_config, load_base
    from .model_path import resolve_model_path

    register_methods()  # LaMDA and LoRA-FA with PEFT, before PeftConfig reads the adapter's peft_type
    saved = _saved_config(adapter)
    config = PeftConfig.from_pretrained(str(adapter))
    base = base or saved.get("model") or config.base_model_name_or_path
    if not base:
        raise UsageError(f"{adapter}: neither the run nor the adapter names its base model; pass --model")
    task, num_labels = _task(adapter, saved, config)
    try:
        model, tokenizer = load_base(resolve_model_path(base), task, num_labels, head_from_adapter=True,
                                     tokenizer_optional=True)
        return PeftModel.from_pretrained(model, str(adapter)), tokenizer
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # a missing base, or weights that do not fit
        raise UsageError(f"cannot load {adapter} on the base {base!r}: {err}") from None


def _task(adapter: Path, saved: dict, config: Any) -> tuple[str, int]:
    if saved.get("task"):
        task = saved["task"]
        return task, 1 if task == "regression" else len(saved.get("classes") or []) or 2
    task_type = str(getattr(config, "task_type", None) or "CAUSAL_LM")
    if task_type.endswith("CAUSAL_LM"):
        return "causal-lm", 2
    if task_type.endswith("SEQ_CLS"):
        return "classification", _saved_head_labels(adapter)
    raise UsageError(f"{adapter}: task_type {task_type} is not one the command line loads (SEQ_CLS, CAUSAL_LM); use "
                     "lamda_peft.export_lora or merge_and_unload in Python")


def _saved_head_labels(adapter: Path) -> int:
    """The number of labels of the classification head the adapter saved (its output rows)."""
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as weights:
        heads = [weights.get_slice(k).get_shape()[0] for k in weights.keys() if "modules_to_save" not in k
                 and k.endswith(".weight") and any(p in k for p in ("score", "classifier", "out_proj"))]
    if not heads:
        raise UsageError(f"{adapter}: a SEQ_CLS adapter without a saved classification head; pass the run's folder "
                         "(with its metrics.json) or export in Python")
    return int(heads[-1])
