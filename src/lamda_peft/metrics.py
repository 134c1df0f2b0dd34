"""Deprecated: moved to :mod:`lamda_peft.apps.metrics` (helpers of the CLI, the benchmarks and the examples, not the
library API). Importing this path still works, with a DeprecationWarning, and gives that module's objects."""

from .apps import _moved_here

_moved_here(globals())
