"""Shared fixtures: tiny random models for unit tests, real offline models and data for integration tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lamda_peft  # noqa: F401  (registers the methods with PEFT)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A 2-layer LLaMA-like model (hidden 32) with random weights; the same seed gives the same weights."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype).eval()


def run_two_ranks(worker: Path, *args: str, port: int, timeout: int = 300) -> dict:
    """Run ``worker`` in 2 processes (torchrun; the workers use gloo) on its own ``port``, and return the one JSON
    line rank 0 prints (lines starting with '{"'), plus the processes' stderr."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               str(worker), *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"')]
    assert len(lines) == 1, proc.stdout[-3000:]
    return json.loads(lines[0]) | {"stderr": proc.stderr}


def assert_reload_reproduces(out: Path) -> None:
    """The adapter a distributed worker saved in ``out/adapter`` (on ``make_tiny_llama(seed=0)``), reloaded in this
    process without any distribution, gives the logits rank 0 wrote to ``out/logits.pt``, and they are not the
    base's (it trained)."""
    from peft import PeftModel

    saved = torch.load(out / "logits.pt")
    reloaded = PeftModel.from_pretrained(make_tiny_llama(seed=0), out / "adapter").eval()
    with torch.no_grad():
        logits = reloaded(input_ids=saved["ids"]).logits
        assert not torch.equal(logits, make_tiny_llama(seed=0)(input_ids=saved["ids"]).logits)
    assert torch.allclose(logits, saved["logits"], rtol=1e-5, atol=1e-6)


def make_tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32) -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (Conv1D layers, transposed weights) with random weights."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).to(dtype).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2


@pytest.fixture
def input_ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(123))


def _offline_model(alias: str) -> str:
    """The local folder of an offline model alias, or a skip naming the package to install."""
    from lamda_peft.apps.models import ModelNotAvailable, resolve_model

    try:
        return resolve_model(alias)
    except ModelNotAvailable as err:
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def minilm_path() -> str:
    return _offline_model("minilm")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return _offline_model("smollm2")


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    path = SHARED_DATA / "glue"
    if not path.is_dir():
        pytest.skip(f"GLUE data not found at {path} (the project expects ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def tiny_chat_model(smollm2_path, tmp_path_factory) -> str:
    """A folder with a tiny random LLaMA and SmolLM2's tokenizer (with its chat template): for the CLI, TRL and
    bitsandbytes tests, which need a tokenizer but not real weights."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
