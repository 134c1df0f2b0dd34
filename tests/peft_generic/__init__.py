"""PEFT's own generic tuner tests (from the installed PEFT's source release) run on LaMDA, LaMDA++ and LoRA-FA.

upstream.py fetches and imports PEFT's test modules, models.py builds the tiny Hub models offline, tables.py holds
our configs in PEFT's table formats, exceptions.py the reasoned skips, adapt.py swaps PEFT's tables for ours.
tests/test_peft_generic.py collects the result; docs/api.md ("PEFT's generic tests") says how to run it.
"""
