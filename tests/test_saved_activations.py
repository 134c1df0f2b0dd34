"""Memory is real: with A frozen, the adapter path keeps only x A^T (n x r) for backward (method.md section 4)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lamda_peft import LamdaConfig, LoraFAConfig
from lamda_peft.tuners.base_layer import LowRankDeltaLayer

from conftest import make_tiny_gpt2, make_tiny_llama


def saved_bytes(model, run) -> int:
    """Bytes autograd saves for backward during ``run()``, each storage once, parameters and buffers excluded."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(storages.values())


def frozen(model):
    """The floor: the pretrained model with every weight frozen, backpropagating to its input embeddings."""
    return model.requires_grad_(False).train()


def _embeds(model, input_ids):
    embeds = model.get_input_embeddings()(input_ids).detach().requires_grad_()
    return embeds


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config_cls", [LamdaConfig, LoraFAConfig])
@pytest.mark.parametrize("make_model", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
def test_adapter_path_keeps_exactly_n_r_per_layer(make_model, config_cls, dtype, input_ids):
    """Saved bytes over the floor (the frozen model backpropagating to its inputs) = n * r * layers * element size."""
    config = config_cls(r=4, target_modules="all-linear")
    base = frozen(make_model(dtype=dtype))
    floor = saved_bytes(base, lambda: base(inputs_embeds=_embeds(base, input_ids)).logits)
    model = get_peft_model(make_model(dtype=dtype), config).train()
    layers = [m for m in model.modules() if isinstance(m, LowRankDeltaLayer)]
    adapted = saved_bytes(model, lambda: model(inputs_embeds=_embeds(model, input_ids)).logits)
    n = input_ids.numel()
    assert adapted - floor == n * config.r * len(layers) * dtype.itemsize


def test_stock_lora_keeps_x_for_comparison(input_ids):
    """The reference point: PEFT LoRA also keeps x (n x d_in) per layer, which LaMDA and LoRA-FA do not."""
    base = frozen(make_tiny_llama())
    floor = saved_bytes(base, lambda: base(inputs_embeds=_embeds(base, input_ids)).logits)
    lora = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules="all-linear")).train()
    adapted = saved_bytes(lora, lambda: lora(inputs_embeds=_embeds(lora, input_ids)).logits)
    lamda = get_peft_model(make_tiny_llama(), LamdaConfig(r=4, target_modules="all-linear")).train()
    lamda_bytes = saved_bytes(lamda, lambda: lamda(inputs_embeds=_embeds(lamda, input_ids)).logits)
    assert adapted - floor > 2 * (lamda_bytes - floor)


def test_dropout_acts_on_the_low_dimensional_tensor(input_ids):
    """Adapter dropout on x A^T adds an n x r mask, never an n x d_in one."""
    config = LamdaConfig(r=4, target_modules="all-linear", lora_dropout=0.1)
    base = frozen(make_tiny_llama())
    floor = saved_bytes(base, lambda: base(inputs_embeds=_embeds(base, input_ids)).logits)
    model = get_peft_model(make_tiny_llama(), config).train()
    layers = [m for m in model.modules() if isinstance(m, LowRankDeltaLayer)]
    adapted = saved_bytes(model, lambda: model(inputs_embeds=_embeds(model, input_ids)).logits)
    n, r = input_ids.numel(), config.r
    # what dropout itself keeps for an (n, r) input on this backend (a bool mask on CUDA, a float one on CPU)
    probe = torch.randn(n, r, requires_grad=True)
    mask_bytes = saved_bytes(torch.nn.Module(), lambda: torch.nn.functional.dropout(probe, 0.1, training=True))
    # x A^T before dropout is not kept; the dropped (n, r) tensor and dropout's (n, r) mask are
    assert adapted - floor == len(layers) * (n * r * 4 + mask_bytes)
    assert mask_bytes <= n * r * 4
