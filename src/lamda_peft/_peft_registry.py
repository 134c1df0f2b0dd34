"""The one place where lamda_peft extends PEFT.

PEFT's ``register_peft_method`` only accepts a name whose upper-case form is already a member of the
``peft.utils.PeftType`` enum, and PEFT offers no public way to add a member. We add ours here, through the
enum's own member tables, then register the config and tuner classes the documented way. Everything else in
lamda_peft goes through PEFT's public API. Tested against the PEFT versions pinned in pyproject.toml
(tests/test_peft_registry.py checks the round trip JSON -> PeftType -> config class).
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method


def peft_type(name: str) -> PeftType:
    """Add ``name`` to PeftType (a ``str`` enum) unless it is there, and return the member."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    # The same three tables Enum fills for a member declared in the class body; hashing and equality come
    # from ``str``, so the JSON value "LAMDA" finds the member in PEFT's mappings.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register(name: str, config_cls: type, model_cls: type, prefix: str) -> PeftType:
    """Register one method with PEFT (idempotent: importing lamda_peft twice does not fail)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    member = peft_type(name.upper())
    if PEFT_TYPE_TO_TUNER_MAPPING.get(member) is not model_cls:
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    return member
