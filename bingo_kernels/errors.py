"""Exceptions shared by the kernel package and :mod:`bingo` (which re-exports them).

They live here because the flow is one-way (``bingo`` imports ``bingo_kernels``, never the
reverse) and the ops must raise the same errors the high-level API documents.
Each also derives from the built-in exception a caller would naturally catch.
"""

from __future__ import annotations


class BingoError(Exception):
    """Base class of every error bingo raises on purpose."""


class InvalidOptionError(BingoError, ValueError):
    """An option has a value bingo does not know (a typo, an unsupported combination)."""


class InputMismatchError(BingoError, ValueError):
    """Tensors do not fit together or do not fit the model: shape, dtype or device."""


class BackendUnavailableError(BingoError, RuntimeError):
    """A kernel backend was asked for but cannot run here (not built, no GPU, not installed)."""


def require_option(name: str, value, allowed) -> None:
    """Raise InvalidOptionError unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise InvalidOptionError(f"{name}={value!r} is not supported; choose one of {choices}")
