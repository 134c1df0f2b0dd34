"""The top-r singular subspaces of the loss gradient with respect to frozen base weights, without ever forming it.

For a linear layer ``y = x W0^T`` the gradient of the loss over the calibration batches is

    G = dL/dW0 = sum_t  delta_t^T x_t        (d_out, d_in)       delta = dL/dy (n, d_out), x (n, d_in)

A full G per module is what makes LoRA-GA cost +13-26 GB on a 7B model. Here G is only ever multiplied by thin
matrices, through autograd and *zero-valued sketch parameters* hooked onto each layer's output:

    right sketch  y += (x Omega) N^T      N (d_out, k) = 0    ->  N.grad = G Omega     (autograd keeps x Omega)
    left sketch   y += (x M^T) Q^T        M (k, d_in)  = 0    ->  M.grad = Q^T G       (autograd keeps x)

The output does not change (N = M = 0), so every pass is an ordinary forward and backward of the model: gradient
checkpointing, any loss and any model work as in training, and DDP ranks sum the small gradients. The randomized
SVD of Halko et al. with ``power_iterations`` q, one calibration pass per product with G or G^T:

    Y = G Omega                     (pass 1; Omega (d_in, k) Gaussian, k = r + oversample, seeded)
    q times:  P = orth((orth(Y)^T G)^T),  Y = G P          (2 passes each)
    Q = orth(Y),  W = Q^T G         (last pass)   ->   G ~= Q W,   W = U_w diag(sigma) V^T,   U = Q U_w

The small matrices are float64; the top r of (U, sigma, V^T) are returned. Memory per module:
O((d_in + d_out) k) for Omega, N, M and Q, plus, during a left pass, the layer's input x kept for backward (what a
LoRA training step keeps; use small calibration batches on a large model).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from ...spectral import TopSVD
from ..delta import weight_as_out_in

LossFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]


def model_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The loss of one batch: ``model(**batch).loss`` (the batch must carry ``labels``)."""
    output = model(**batch)
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if loss is None:
        raise ValueError("the model returned no loss: the gradient init needs batches with labels (as in training), "
                         "or pass loss_fn=... computing the loss from (model, batch)")
    return loss


class _SketchedLayer:
    """The zero-valued sketch parameters of one layer for one pass (see the module docstring)."""

    def __init__(self, layer: nn.Module, right: Optional[torch.Tensor], left: Optional[torch.Tensor]) -> None:
        d_out, d_in = weight_as_out_in(layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer).shape
        device = right.device if right is not None else left.device
        self.right = right  # Omega or P: (d_in, k)
        self.left = left  # Q: (d_out, k)
        self.N = torch.zeros(d_out, right.shape[1], device=device, requires_grad=True) if right is not None else None
        self.M = torch.zeros(left.shape[1], d_in, device=device, requires_grad=True) if left is not None else None
        self.handle = layer.register_forward_hook(self._add)

    def _add(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].float()
        extra = 0.0
        with torch.autocast(x.device.type, enabled=False):  # float32 sketches under a bf16/fp16 autocast too
            if self.N is not None:
                extra = extra + nn.functional.linear(nn.functional.linear(x, self.right.T), self.N)
            if self.M is not None:
                extra = extra + nn.functional.linear(nn.functional.linear(x, self.M), self.left)
        return output + extra.to(output.dtype)

    def remove(self) -> None:
        self.handle.remove()


def _orth(y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(y.double()).Q


def _sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def _one_pass(model: nn.Module, layers: Mapping[str, nn.Module], batches: list, loss_fn: LossFn,
              right: Mapping[str, torch.Tensor], left: Mapping[str, torch.Tensor],
              progress: Callable[[], None]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({name: G right[name]}, {name: left[name]^T G}) summed over ``batches`` (and over DDP ranks)."""
    sketches = {name: _SketchedLayer(layer, right.get(name), left.get(name)) for name, layer in layers.items()}
    try:
        for batch in batches:
            loss_fn(model, batch).backward()
            progress()
    finally:
        for sketch in sketches.values():
            sketch.remove()
    products_right = {n: _sum_over_ranks(_grad(s.N)) for n, s in sketches.items() if s.N is not None}
    products_left = {n: _sum_over_ranks(_grad(s.M)) for n, s in sketches.items() if s.M is not None}
    return products_right, products_left


def _grad(sketch: torch.Tensor) -> torch.Tensor:
    """The sketch's gradient in float64; zeros where the loss did not reach the layer (checked by the caller)."""
    return sketch.grad.double() if sketch.grad is not None else torch.zeros_like(sketch, dtype=torch.float64)


def gradient_top_svd(model: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable[Mapping[str, Any]],
                     ranks: Mapping[str, int], *, oversample: int = 8, power_iterations: int = 1, seed: int = 0,
                     loss_fn: LossFn = model_loss, show_progress_bar: Optional[bool] = None) -> dict[str, TopSVD]:
    """{name: TopSVD of G} with the top ``ranks[name]`` singular triplets of each layer's loss gradient G.

    Args:
        model: runs the batches (``loss_fn(model, batch).backward()``); its parameters' ``requires_grad`` and
            ``.grad`` and its modules' train/eval modes are left as they were. It runs in eval mode (no dropout).
        layers: {name: module} whose base weight's gradient is sketched (a LaMDA layer or a plain ``nn.Linear``).
        batches: the calibration batches (dicts of tensors on the model's device); read once per pass, in order,
            so it must be re-iterable (a list).
        ranks: {name: r}; each layer's sketch has ``r + oversample`` columns (at most ``min(d_out, d_in)``).
        power_iterations: q (2q + 2 passes in all).
        seed: the sketch's own generator (the same call gives the same factors).

    ``TopSVD.total_energy`` is ``||Q^T G||_F^2``, the energy of G captured by the sketch.
    """
    from tqdm.auto import tqdm

    batches = list(batches)
    if not batches:
        raise ValueError("the gradient init needs at least one calibration batch")
    if isinstance(power_iterations, bool) or not isinstance(power_iterations, int) or power_iterations < 0:
        raise ValueError(f"power_iterations must be an integer >= 0, got {power_iterations!r}")
    generator = torch.Generator().manual_seed(seed)
    widths, right = {}, {}
    for name, layer in layers.items():
        weight = weight_as_out_in(layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer)
        widths[name] = min(ranks[name] + oversample, *weight.shape)
        omega = torch.randn(weight.shape[1], widths[name], generator=generator, dtype=torch.float64)
        right[name] = omega.to(device=weight.device, dtype=torch.float32)
    passes = 2 * power_iterations + 2
    bar = tqdm(total=passes * len(batches), desc="gradient init", unit="batch",
               disable=None if show_progress_bar is None else not show_progress_bar)
    saved = _freeze_everything(model)
    try:
        Y, _ = _one_pass(model, layers, batches, loss_fn, right, {}, bar.update)
        for _ in range(power_iterations):
            Q = {n: _orth(y).float() for n, y in Y.items()}
            _, Z = _one_pass(model, layers, batches, loss_fn, {}, Q, bar.update)
            P = {n: _orth(z.T).float() for n, z in Z.items()}
            Y, _ = _one_pass(model, layers, batches, loss_fn, P, {}, bar.update)
        Q = {n: _orth(y) for n, y in Y.items()}
        _, W = _one_pass(model, layers, batches, loss_fn, {}, {n: q.float() for n, q in Q.items()}, bar.update)
    finally:
        _restore(model, saved)
        bar.close()
    found = {}
    for name, w in W.items():
        U_w, sigma, Vh = torch.linalg.svd(w, full_matrices=False)
        r = ranks[name]
        U = Q[name] @ U_w[:, :r]
        found[name] = TopSVD(U=U.float(), S=sigma[:r].float(), Vh=Vh[:r].float(),
                             total_energy=float(w.square().sum()))
    return found


def _freeze_everything(model: nn.Module) -> dict:
    """Turn every parameter's gradient off (only the sketches need one), keeping what to restore."""
    state = {"grad": {}, "modes": {m: m.training for m in model.modules()}}
    for param in model.parameters():
        state["grad"][param] = (param.requires_grad, param.grad)
        param.requires_grad_(False)
        param.grad = None
    model.eval()
    return state


def _restore(model: nn.Module, state: dict) -> None:
    for param, (requires_grad, grad) in state["grad"].items():
        param.requires_grad_(requires_grad)
        param.grad = grad
    for module, training in state["modes"].items():
        module.training = training
