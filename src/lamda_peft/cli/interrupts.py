"""Ctrl-C (SIGINT) for the command line, with nothing heavy imported: ``main`` installs the handler before it
imports any subcommand (transformers, peft), so a Ctrl-C during those imports is one line too.

Ctrl-C raises ``KeyboardInterrupt`` and is remembered (``check_interrupt`` raises it again at the next safe point),
except inside the few renames that publish files (``sigint_deferred``), which finish first.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Any, Iterator


class _Sigint:
    caught = False  # set by Ctrl-C; stays set even where Python swallowed the KeyboardInterrupt (see below)


def _on_sigint(signum: int, frame: Any) -> None:
    _Sigint.caught = True
    raise KeyboardInterrupt


@contextmanager
def sigint_handled() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt and is remembered: one raised inside a weakref callback or a ``__del__`` is
    printed and dropped by Python, so ``check_interrupt`` raises it again at the next safe point."""
    _Sigint.caught = False
    with _sigint_handler(_on_sigint):
        yield


@contextmanager
def _sigint_handler(handler: Any) -> Iterator[None]:
    """SIGINT goes to ``handler`` inside the block. Outside the main thread (an embedding application) nothing is
    installed: signals cannot be handled there, and the application's handler stays."""
    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def check_interrupt() -> None:
    if _Sigint.caught:
        raise KeyboardInterrupt


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block ends (renames that must not be cut in half), then raise it."""
    caught: list[Any] = []
    with _sigint_handler(lambda signum, frame: caught.append(signum)):
        yield
    if caught:
        _Sigint.caught = True
        raise KeyboardInterrupt
