"""Deprecated: moved to :mod:`lamda_peft.apps.data` (helpers of the CLI, the benchmarks and the examples, not the
library API). Importing this path still works, with a DeprecationWarning, and gives that module's objects
(and ``read_table``, now in :mod:`lamda_peft.apps.data_loading`)."""

from .apps import _moved_here

_moved_here(globals(), read_table="data_loading")
