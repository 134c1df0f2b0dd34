"""LoraFAConfig: LoRA with A frozen for the whole run (method.md section 2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from ..._peft_registry import peft_type
from ..checkpoint import mark_loaded_from_checkpoint
from ..validation import check_common_fields

LORAFA = peft_type("LORAFA")


@dataclass
class LoraFAConfig(PeftConfig):
    """Configuration of a LoRA-FA adapter: ``y = W0 x + s B A x`` with A random and frozen, B trained from zero.

    Field names are PEFT ``LoraConfig``'s; the scaling is ``s = lora_alpha / r``.
    """

    r: int = field(default=8, metadata={"help": "Rank of A (r x d_in) and B (d_out x r)."})
    lora_alpha: float = field(default=8, metadata={"help": "Scaling numerator: s = lora_alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the r-dimensional x A^T."})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "As in PEFT."})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip."})
    rank_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module ranks {name or regex: r}."})
    alpha_pattern: dict = field(default_factory=dict, metadata={"help": "Per-module lora_alpha."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Name of the layer list."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Extra modules trained in full."})
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: B starts at zero (the adapter is the identity). False: B gets a seeded perturbation "
                          "(A keeps its init), so the adapter changes the outputs from the start; PEFT's own switch "
                          "of the same name, for tests and debugging."},
    )
    grad_correction: bool = field(
        default=False,
        metadata={"help": "LoRA-FA v2: replace B's gradient g_B by (1/s^2) g_B (A A^T)^+ (the projection of the full "
                          "gradient onto B's span); (A A^T)^+ is r x r, computed once per layer."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LORAFA
        check_common_fields(self)
        if not isinstance(self.grad_correction, bool):
            raise ValueError(f"grad_correction must be True or False, got {self.grad_correction!r}")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        return mark_loaded_from_checkpoint(super().from_pretrained(pretrained_model_name_or_path, subfolder, **kwargs))
