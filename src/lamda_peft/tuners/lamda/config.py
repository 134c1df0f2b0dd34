"""LamdaConfig: PEFT-style configuration of LaMDA (method.md section 3), validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ..._peft_registry import peft_type
from ..checkpoint import mark_loaded_from_checkpoint
from ..validation import check_common_fields

LAMDA = peft_type("LAMDA")

INITS = ("spectral", "spectral_zero", "random", "activations", "gradient")
#: inits computed from data by lamda_peft.initialize(model, dataloader) after get_peft_model
CALIBRATED_INITS = ("activations", "gradient")
SVD_METHODS = ("exact", "randomized")
FREEZE_ORDERS = ("largest_first", "smallest_first")
RANK_ALLOCATIONS = ("uniform", "energy")


@dataclass
class LamdaConfig(PeftConfig):
    """Configuration of a LaMDA adapter: ``y = W0 x + s (B S - B0S0) A x`` with A frozen, S trained, B frozen
    column by column over the first ``freeze_ratio`` of training.

    Field names follow PEFT's ``LoraConfig`` where the concept is the same (``r``, ``lora_alpha``,
    ``target_modules``, ``rank_pattern``, ...). The scaling is ``s = lora_alpha / r``.
    """

    r: int = field(default=8, metadata={"help": "Rank of A (r x d_in), S (r x r) and B (d_out x r)."})
    lora_alpha: float = field(default=8, metadata={"help": "Scaling numerator: s = lora_alpha / r."})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "Dropout on the r-dimensional x A^T (not on x: that would keep n x d_in)."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names, a regex, or 'all-linear' (as in PEFT)."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip."})
    init: Literal["spectral", "spectral_zero", "random", "activations", "gradient"] = field(
        default="spectral",
        metadata={"help": "'spectral' (S=I, top-r SVD factors), 'spectral_zero' (S=0), 'random' (random A, B=0), "
                          "'activations' (A spans the top-r principal directions of the layer's inputs), "
                          "'gradient' (A and B span the top-r singular subspaces of the loss gradient with respect "
                          "to the base weight); both need lamda_peft.initialize(model, dataloader) before training."},
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: the adapter starts as the identity (the delta is exactly zero). False: S and B get a "
                          "seeded perturbation (A and B0S0 keep the init), so the adapter changes the outputs from the "
                          "start; PEFT's own switch of the same name, for tests and debugging."},
    )
    svd_method: Literal["exact", "randomized"] = field(
        default="exact", metadata={"help": "'exact' SVD, or 'randomized' (seeded, with svd_niter power iterations)."}
    )
    svd_niter: int = field(default=4, metadata={"help": "Power iterations of the randomized SVD."})
    svd_seed: int = field(default=0, metadata={"help": "Seed of the randomized SVD's own generator."})
    freeze_ratio: float = field(
        default=0.3, metadata={"help": "Fraction of training steps over which B is frozen column by column."}
    )
    freeze_order: Literal["largest_first", "smallest_first"] = field(
        default="largest_first", metadata={"help": "Which singular directions of B freeze first."}
    )
    rank_pattern: dict = field(
        default_factory=dict,
        metadata={"help": "Per-module ranks {name or regex: r}. With rank_allocation='energy' it holds the computed "
                          "allocation (one escaped module name per targeted module) and is reused as is."},
    )
    rank_allocation: Literal["uniform", "energy"] = field(
        default="uniform",
        metadata={"help": "'uniform' (r everywhere, or rank_pattern) or 'energy' (LaMDA++: ranks from the spectral "
                          "energy of each weight, computed once at injection and written to rank_pattern)."},
    )
    r_min: Optional[int] = field(default=None, metadata={"help": "LaMDA++ lower rank bound (default max(1, r // 2))."})
    r_max: Optional[int] = field(default=None, metadata={"help": "LaMDA++ upper rank bound (default 2 r)."})
    rank_budget: Optional[int] = field(
        default=None, metadata={"help": "LaMDA++ total rank sum_l r_l (default r times the number of targeted modules)."}
    )
    alpha_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module lora_alpha {name or regex: alpha}."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Name of the layer list."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules trained and saved in full, e.g. a classification head."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LAMDA
        check_common_fields(self)
        _check_choice("init", self.init, INITS)
        if self.init in CALIBRATED_INITS and not self.init_weights:
            raise ValueError(
                f"init_weights=False cannot be combined with init={self.init!r}: lamda_peft.initialize replaces S and "
                "B, so the perturbation would be lost. Use another init, or init_weights=True."
            )
        _check_choice("svd_method", self.svd_method, SVD_METHODS)
        _check_choice("freeze_order", self.freeze_order, FREEZE_ORDERS)
        if not isinstance(self.svd_niter, int) or self.svd_niter < 0:
            raise ValueError(f"svd_niter must be an integer >= 0, got {self.svd_niter!r}")
        _check_rank_allocation(self)
        if not 0.0 <= float(self.freeze_ratio) <= 1.0:
            raise ValueError(
                f"freeze_ratio must be in [0, 1] (0 freezes B from the start, 1 at the very end), got {self.freeze_ratio!r}"
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        return mark_loaded_from_checkpoint(super().from_pretrained(pretrained_model_name_or_path, subfolder, **kwargs))

    @property
    def rank_bounds(self) -> tuple[int, int]:
        """(r_min, r_max) of LaMDA++ with the defaults of method.md 3.3 filled in."""
        r_min = self.r_min if self.r_min is not None else max(1, self.r // 2)
        r_max = self.r_max if self.r_max is not None else 2 * self.r
        return r_min, r_max


def _check_rank_allocation(config: LamdaConfig) -> None:
    _check_choice("rank_allocation", config.rank_allocation, RANK_ALLOCATIONS)
    for name in ("r_min", "r_max", "rank_budget"):
        value = getattr(config, name)
        if value is None:
            continue
        if config.rank_allocation != "energy":
            raise ValueError(f"{name} only applies to rank_allocation='energy'; set rank_allocation='energy' or drop {name}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    r_min, r_max = config.rank_bounds
    if r_min > r_max:
        raise ValueError(f"r_min={r_min} is larger than r_max={r_max}; LaMDA++ needs r_min <= r_max")
    if config.rank_allocation == "energy" and config.rank_budget is None and not r_min <= config.r <= r_max:
        raise ValueError(
            f"the default rank budget (r={config.r} per module) cannot be met with ranks in [{r_min}, {r_max}]; "
            "choose r_min <= r <= r_max, or set rank_budget"
        )


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, choices))}")
