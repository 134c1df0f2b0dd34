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
    lamda_peft.initialize(model, train_dataloader, num_batches=8)   # initialize.py; or initialize_from_activations
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


def __getattr__(name: str):
    """The entry point moved to initialize.py (shared with the gradient init); its old path still works."""
    if name == "initialize_from_activations":
        from .initialize import initialize_from_activations

        return initialize_from_activations
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
