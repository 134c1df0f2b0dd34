"""LaMDA's activation-subspace init (``LamdaConfig(init="activations")``), an option beside the paper's spectral init.

A spans the top-r principal directions of the layer's *input activations* instead of the top-r right singular
vectors of W0. For one layer with inputs x (d_in,) over the calibration tokens (padding left out):

    G  = sum_x x x^T                      (d_in, d_in)   uncentered second moment, accumulated in float64
    Q  = top-r eigenvectors of G          (d_in, r)      largest eigenvalue first
    W0 Q = U' diag(sigma') V'^T           (d_out, r) = (d_out, r) (r,) (r, r)
    A  = diag(sqrt(sigma'/s)) V'^T Q^T    (r, d_in)      frozen
    B  = B0S0 = U' diag(sqrt(sigma'/s))   (d_out, r)     S = I

so ``s B0 S0 A = W0 Q Q^T`` (W0 restricted to the subspace), scaled like the spectral init (which it equals when Q
spans W0's top-r right singular vectors); B's columns are ordered by sigma', so ``freeze_order`` keeps its meaning.
The delta form keeps step 0 exact whatever A is.

Usage, in the style of PEFT's EVA (``peft.tuners.lora.eva``)::

    model = get_peft_model(base, LamdaConfig(init="activations", target_modules="all-linear"))
    initialize_from_activations(model, train_dataloader, num_batches=8)
    # then train as usual; training or saving before this call raises

Until it runs, each layer holds placeholders (A = 0, B = B0S0 = 0, S = I: the delta is zero) and refuses to train
or be saved. A reloaded adapter takes its A and B0S0 from the checkpoint: nothing to initialize.
Memory: one float64 (d_in, d_in) matrix per targeted module during the calibration passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ...integrations.deepspeed import broadcast_from_first_rank
from ..delta import weight_as_out_in

INIT = "activations"


def activation_factors(gram: torch.Tensor, weight: torch.Tensor, r: int, scaling: float) -> dict[str, torch.Tensor]:
    """The factors of one layer from its input second moment ``gram`` (d_in, d_in) and base ``weight`` (d_out, d_in).

    Returns {"lamda_A": (r, d_in), "lamda_B": (d_out, r), "lamda_S": (r, r), "lamda_B0S0": (d_out, r)}, in float64
    (the layer casts on copy).
    """
    eigenvectors = torch.linalg.eigh(gram.double()).eigenvectors  # ascending eigenvalues
    Q = eigenvectors[:, -r:].flip(-1)  # (d_in, r)
    U, sigma, Vh = torch.linalg.svd(weight.double() @ Q, full_matrices=False)  # (d_out, r), (r,), (r, r)
    root = torch.sqrt(sigma / scaling)
    B = U * root[None, :]
    return {"lamda_A": root[:, None] * (Vh @ Q.T), "lamda_B": B, "lamda_S": torch.eye(r, dtype=torch.float64),
            "lamda_B0S0": B.clone()}


def _token_rows(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """x (..., d_in) -> (n, d_in): the rows of real tokens where x is per token (x.shape[:-1] == mask.shape), else
    all rows (e.g. a pooler's input, one row per sequence)."""
    if mask is not None and x.shape[:-1] == mask.shape:
        x = x[mask.to(x.device)]
    return x.reshape(-1, x.shape[-1])


def _encoder_decoder(model: nn.Module) -> Optional[nn.Module]:
    """The transformers encoder-decoder model inside ``model`` (BART, T5, ...), or None."""
    for module in model.modules():
        if getattr(getattr(module, "config", None), "is_encoder_decoder", False) and hasattr(module, "get_encoder"):
            return module
    return None


def _forward_dict(model: nn.Module, batch: Mapping[str, Any]) -> Any:
    """``model(**batch)``: without ``labels``, except for an encoder-decoder model, whose decoder inputs are built
    from them (without labels or ``decoder_input_ids``, BART's decoder would read a shifted copy of ``input_ids``)."""
    keep_labels = "decoder_input_ids" not in batch and _encoder_decoder(model) is not None
    return model(**{k: v for k, v in batch.items() if k != "labels" or keep_labels})


class _TokenMasks:
    """Which rows of a layer's input are real tokens, for the batch being run.

    Decoder-only and encoder models: ``attention_mask``. Encoder-decoder models: the encoder's layers, and the
    decoder's cross-attention projections (whose input is the encoder's output), use ``attention_mask``; the
    decoder's other layers use ``decoder_attention_mask``, else the positions whose label counts (``labels !=
    -100``). Matching by module and by the encoder's output tensor, not by sequence length (which can be equal).
    """

    def __init__(self, model: nn.Module) -> None:
        seq2seq = _encoder_decoder(model)
        self.encoder = seq2seq.get_encoder() if seq2seq is not None else None
        self.encoder_modules = {id(m) for m in self.encoder.modules()} if self.encoder is not None else set()
        self.encoder_output: Optional[torch.Tensor] = None
        self.source: Optional[torch.Tensor] = None
        self.target: Optional[torch.Tensor] = None

    def start(self, batch: Mapping[str, Any]) -> None:
        self.source = batch["attention_mask"].bool() if "attention_mask" in batch else None
        self.target = None
        if "decoder_attention_mask" in batch:
            self.target = batch["decoder_attention_mask"].bool()
        elif "labels" in batch and isinstance(batch["labels"], torch.Tensor):
            self.target = batch["labels"] != -100
        self.encoder_output = None

    def hooks(self) -> list:
        if self.encoder is None:
            return []
        return [self.encoder.register_forward_hook(self._keep_encoder_output)]

    def _keep_encoder_output(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.encoder_output = output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state

    def for_input(self, layer: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        if self.encoder is None or id(layer) in self.encoder_modules or self._is_encoder_output(x):
            return self.source
        return self.target

    def _is_encoder_output(self, x: torch.Tensor) -> bool:
        out = self.encoder_output
        return out is not None and x.shape == out.shape and x.data_ptr() == out.data_ptr()


@torch.no_grad()
def input_second_moments(model: nn.Module, layers: Mapping[str, nn.Module], dataloader: Iterable, *,
                         num_batches: int, forward_fn: Callable[[nn.Module, Any], Any] = _forward_dict,
                         show_progress_bar: Optional[bool] = None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """({name: G (d_in, d_in) float64}, {name: number of token rows}) of each layer's input over ``num_batches``
    batches of ``dataloader`` (dicts of tensors; padding is left out, see ``_TokenMasks``). The model runs in eval
    mode without gradients; every module's mode is restored afterwards."""
    from tqdm.auto import tqdm

    grams = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64,
                               device=m.get_base_layer().weight.device) for name, m in layers.items()}
    counts = dict.fromkeys(layers, 0)
    masks = _TokenMasks(model)

    def collector(name: str):
        def collect(module: nn.Module, args: tuple) -> None:
            x = _token_rows(args[0], masks.for_input(module, args[0])).to(grams[name].device, torch.float64)
            grams[name].addmm_(x.T, x)
            counts[name] += x.shape[0]
        return collect

    device = next(model.parameters()).device
    handles = [m.register_forward_pre_hook(collector(name)) for name, m in layers.items()] + masks.hooks()
    modes = {module: module.training for module in model.modules()}  # each its own: a PeftModel wrapper says
    model.eval()                                                      # "training" over an eval-mode base
    seen = 0
    try:
        for batch in tqdm(dataloader, total=num_batches, desc="activation init", disable=_quiet(show_progress_bar)):
            if seen == num_batches:
                break
            if not isinstance(batch, Mapping):
                raise TypeError("the dataloader must yield dicts of tensors (a collator's output), got "
                                f"{type(batch).__name__}")
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            masks.start(batch)
            forward_fn(model, batch)
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    if seen == 0:
        raise ValueError("the dataloader yielded no batch; the activation init needs calibration data")
    return grams, counts


def _quiet(show_progress_bar: Optional[bool]) -> bool:
    if show_progress_bar is None:
        import sys

        return not sys.stderr.isatty()
    return not show_progress_bar


def initialize_from_activations(model: nn.Module, dataloader: Iterable, *, num_batches: int = 8,
                                adapter_name: Optional[str] = None,
                                forward_fn: Callable[[nn.Module, Any], Any] = _forward_dict,
                                show_progress_bar: Optional[bool] = None) -> None:
    """Initialize every layer of a ``LamdaConfig(init="activations")`` adapter from its input activations.

    Args:
        model: the PeftModel (or tuner) holding the adapter, not initialized yet: a second call, or a call on a
            loaded adapter, is refused (it would reset A, B, S).
        dataloader: yields dicts of tensors as the model takes them (e.g. a collator's output); the first
            ``num_batches`` batches are used. ``attention_mask`` leaves padding tokens out; ``labels`` are dropped,
            except for an encoder-decoder model (BART, T5), whose decoder reads them as in training (its padding,
            ``labels == -100`` or ``decoder_attention_mask``, is left out too).
        num_batches: calibration batches (8 batches of 16 SST-2 sentences: ~1,700 tokens).
        adapter_name: the adapter (default: the single active one).
        forward_fn: ``forward_fn(model, batch)`` runs one batch (default ``model(**batch)`` without labels).
        show_progress_bar: None shows it on a terminal only.

    Data parallel (DDP; ``torch.distributed`` initialized; not tested under ZeRO): call it on every rank with its own
    batches; the second moments are summed over the ranks and rank 0's factors broadcast, so every rank gets the
    same A (collectives). A model already sharded by FSDP2 is refused: initialize before sharding.

    Raises ValueError for a model without such an adapter, an adapter already initialized, an empty dataloader, a layer that saw fewer token rows
    than its rank (use more or longer batches), or an FSDP2-sharded weight.
    """
    from .layer import LamdaLayer

    if not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1:
        raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
    configs = getattr(model, "peft_config", None)
    if not configs:
        raise ValueError("initialize_from_activations needs a PEFT model: call "
                         "peft.get_peft_model(base, LamdaConfig(init='activations', ...)) first")
    if adapter_name is None:
        active = list(getattr(model, "active_adapters", []))
        if len(active) != 1:
            raise ValueError(f"the model has {len(active)} active adapters ({active}); pass adapter_name=...")
        adapter_name = active[0]
    config = configs.get(adapter_name)
    if getattr(config, "init", None) != INIT:
        raise ValueError(f"adapter {adapter_name!r} was not created with LamdaConfig(init={INIT!r}) (its init is "
                         f"{getattr(config, 'init', None)!r}); the activation init would replace its own init")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LamdaLayer) and adapter_name in m.r}
    for layer in layers.values():
        layer.materialize()  # a deferred init (a config read from disk, nothing loaded) runs first: placeholders
    done = [name for name, m in layers.items() if adapter_name not in m.awaiting_activations]
    if done:
        raise ValueError(
            f"adapter {adapter_name!r} is already initialized ({done[0]} holds real factors: from an earlier "
            "initialize_from_activations call, or from a checkpoint); calling it again would reset A, B and S and "
            "throw away any training. To recalibrate, create a fresh adapter (get_peft_model or add_adapter).")
    sharded = [name for name, m in layers.items() if callable(getattr(m.get_base_layer().weight, "to_local", None))]
    if sharded:
        raise ValueError(f"{sharded[0]} has a sharded (FSDP2) weight: run initialize_from_activations before sharding "
                         "(fully_shard / accelerator.prepare), on every rank")
    grams, counts = input_second_moments(model, layers, dataloader, num_batches=num_batches, forward_fn=forward_fn,
                                         show_progress_bar=show_progress_bar)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed:  # data parallel: every rank saw its own batches; all ranks must get the same A (collectives)
        for name in layers:
            dist.all_reduce(grams[name])
            seen = torch.tensor([counts[name]], dtype=torch.float64, device=grams[name].device)
            dist.all_reduce(seen)
            counts[name] = int(seen.item())
    for name, layer in layers.items():
        r = layer.r[adapter_name]
        if counts[name] < r:
            raise ValueError(f"{name} saw {counts[name]} input rows in {num_batches} batches, fewer than its rank "
                             f"r={r}: its principal directions are undetermined; pass more (or longer) batches")
        weight = weight_as_out_in(layer.get_base_layer())
        factors = activation_factors(grams[name], weight, r, layer.scaling[adapter_name])
        if distributed:  # the same gram on every rank; rank 0's factors make them agree bit for bit
            factors = broadcast_from_first_rank(factors)
        with torch.no_grad():
            for container, value in factors.items():
                getattr(layer, container)[adapter_name].copy_(value)
        layer.awaiting_activations.discard(adapter_name)


def check_initialized(layer: nn.Module, adapter: str, action: str) -> None:
    """Raise if ``adapter`` still holds the placeholders of an activation init that has not run."""
    if adapter in getattr(layer, "awaiting_activations", ()):
        raise RuntimeError(
            f"adapter {adapter!r} uses LamdaConfig(init={INIT!r}) and has not been initialized yet, so it cannot "
            f"{action}; call lamda_peft.initialize_from_activations(model, dataloader) first"
        )
