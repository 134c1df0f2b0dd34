"""The LaMDA layer in the delta form (method.md 3.1):

    y = x W0^T + s * dropout(x A^T) (B S - B0S0)^T

    A     (r, d_in)   frozen buffer, in the base weight's dtype   ("PMA")
    S     (r, r)      trainable, float32                          ("LDA")
    B     (d_out, r)  trainable at first, float32                  ("PMB"; frozen gradually by lamda_peft.freezing)
    B0S0  (d_out, r)  frozen buffer, float32: the value of B S at init, so the delta is exactly zero at step 0

The base weight W0 is never modified (except by an explicit ``merge``).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
from torch import nn
from peft.tuners._buffer_dict import BufferDict

from ...integrations.deepspeed import broadcast_from_first_rank, is_zero3_param
from ...spectral import TopSVD, kaiming_uniform_factor, spectral_factors, top_svd
from ..base_layer import LowRankDeltaLayer, perturb_for_non_identity_start
from ..quantized import factor_dtype
from ..delta import weight_as_out_in
from .config import CALIBRATED_INITS, LamdaConfig


class LamdaLinear(LowRankDeltaLayer):
    """A ``torch.nn.Linear`` or transformers ``Conv1D`` with LaMDA adapters (several may coexist)."""

    adapter_layer_names = ("lamda_S", "lamda_B")
    other_param_names = ("r", "scaling", "lamda_A", "lamda_B0S0", "lamda_dropout")
    frozen_factor_names = ("lamda_A", "lamda_B0S0")
    base_dtype_factor_names = ("lamda_A",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LamdaConfig, r: int, lora_alpha: float,
                 module_name: str = "", defer_init: bool = False, svd: Optional[TopSVD] = None, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.lamda_A = BufferDict({}, persistent=True)
        self.lamda_B0S0 = BufferDict({}, persistent=True)
        self.lamda_S = nn.ParameterDict({})
        self.lamda_B = nn.ParameterDict({})
        self.lamda_dropout = nn.ModuleDict({})
        # Adapters with a data-driven init (CALIBRATED_INITS) holding placeholders until lamda_peft.initialize runs.
        self.awaiting_calibration: set[str] = set()
        self.register_state_dict_pre_hook(_refuse_placeholders_in_state_dict)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, r, lora_alpha, module_name=module_name, defer_init=defer_init, svd=svd)

    def _factors(self, adapter: str):
        return self.lamda_A[adapter], self.lamda_B[adapter], self.lamda_S[adapter], self.lamda_B0S0[adapter]

    def _dropout(self, adapter: str) -> nn.Module:
        return self.lamda_dropout[adapter]

    def update_layer(self, adapter_name: str, config: LamdaConfig, r: int, lora_alpha: float, *,
                     module_name: str = "", defer_init: bool = False, svd: Optional[TopSVD] = None) -> None:
        """Add adapter ``adapter_name``: allocate A, S, B, B0S0 and initialize them (now, or deferred on load)."""
        d_in, d_out = self.in_features, self.out_features
        self._set_rank(adapter_name, r, lora_alpha, module_name)
        weight = self.get_base_layer().weight
        self.lamda_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        f32 = dict(device=weight.device, dtype=torch.float32)
        self.lamda_A[adapter_name] = torch.zeros(r, d_in, device=weight.device, dtype=factor_dtype(self.get_base_layer()))
        self.lamda_B0S0[adapter_name] = torch.zeros(d_out, r, **f32)
        self.lamda_S[adapter_name] = nn.Parameter(torch.zeros(r, r, **f32))
        self.lamda_B[adapter_name] = nn.Parameter(torch.zeros(d_out, r, **f32))
        # A partial of a bound method, not a closure, so that a model with a deferred init still pickles.
        init_fn = functools.partial(self._initial_factors, adapter_name, config, r, self.scaling[adapter_name],
                                    module_name, svd)
        self._assign_factors(adapter_name, init_fn, defer=self._defer_until_weights(defer_init))
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _initial_factors(self, adapter_name: str, config: LamdaConfig, r: int, scaling: float, module_name: str,
                         svd: Optional[TopSVD]) -> dict[str, torch.Tensor]:
        if config.init in CALIBRATED_INITS:  # only for a fresh adapter: a loaded one takes the checkpoint's factors
            self.awaiting_calibration.add(adapter_name)
        factors = initial_factors(self.get_base_layer(), config, r, scaling, name=module_name, svd=svd)
        if not config.init_weights:  # part of the fresh init, so never applied again to a loaded adapter
            factors = perturb_for_non_identity_start(factors, ("lamda_S", "lamda_B"), module_name, adapter_name)
        return factors

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.training and torch.is_grad_enabled() and not self.disable_adapters:
            for adapter in self.active_adapters:
                check_calibrated(self, adapter, "train")
        return super().forward(x, *args, **kwargs)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.awaiting_calibration.discard(adapter_name)

    def __repr__(self) -> str:
        return "lamda." + super().__repr__()


# PEFT recognises an already-wrapped layer as linear (for "all-linear" on a second adapter) by the "Linear" in
# its class name; LamdaLayer is the name used across lamda_peft.
LamdaLayer = LamdaLinear


def initial_factors(base: nn.Module, config: LamdaConfig, r: int, scaling: float, name: str = "",
                    svd: Optional[TopSVD] = None) -> dict[str, torch.Tensor]:
    """The init of method.md 3.1 for one layer, as {container name: value}.

    spectral:      A, B from the top-r SVD, S = I, B0S0 = B   (so s B0 S0 A is W0's top-r part)
    spectral_zero: A, B from the top-r SVD, S = 0, B0S0 = 0
    random:        A Kaiming-uniform, B = 0, S = I, B0S0 = 0
    activations,
    gradient:      placeholders A = 0, B = 0, S = I, B0S0 = 0 until lamda_peft.initialize (initialize.py)
    """
    weight = weight_as_out_in(base)
    d_out, d_in = weight.shape
    eye = torch.eye(r, dtype=torch.float32)
    if config.init in CALIBRATED_INITS:
        A = torch.zeros(r, d_in)
        B = B0S0 = torch.zeros(d_out, r)
        S = eye
    elif config.init == "random":
        A = kaiming_uniform_factor(r, d_in)
        B = B0S0 = torch.zeros(d_out, r)
        S = eye
    else:
        if svd is None:  # LaMDA++ passes the decomposition it already made (truncated to r)
            svd = top_svd(weight, r, method=config.svd_method, niter=config.svd_niter, seed=config.svd_seed, name=name)
        factors = spectral_factors(svd, scaling)
        A, B = factors.A, factors.B0
        S = eye if config.init == "spectral" else torch.zeros(r, r)
        B0S0 = B @ S
    factors = {"lamda_A": A, "lamda_B": B, "lamda_S": S, "lamda_B0S0": B0S0}
    if is_zero3_param(base.weight):  # ranks decomposed the same gathered weight; make them agree bit for bit
        factors = broadcast_from_first_rank(factors)
    return factors


def check_calibrated(layer: nn.Module, adapter: str, action: str) -> None:
    """Raise if ``adapter`` still holds the placeholders of a data-driven init that has not run."""
    if adapter in getattr(layer, "awaiting_calibration", ()):
        raise RuntimeError(
            f"adapter {adapter!r} uses a data-driven init ({', '.join(CALIBRATED_INITS)}) and has not been "
            f"initialized yet, so it cannot {action}; call lamda_peft.initialize(model, dataloader) first"
        )


def _refuse_placeholders_in_state_dict(module: LamdaLinear, prefix: str, keep_vars: bool) -> None:
    """state_dict pre-hook (after the deferred-init one): a data-driven init that has not run must not be saved."""
    for adapter in module.awaiting_calibration:
        check_calibrated(module, adapter, "be saved (its factors are placeholders)")
