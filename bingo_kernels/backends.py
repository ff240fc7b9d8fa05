"""Registry of kernel backends: which implementations of the ops exist and whether they can run.

``torch`` (the reference) is always present. Accelerated backends (``triton``, ``cuda``) register
themselves here with :func:`register_backend` when their module is importable, and also register
their kernels for CUDA tensors on the custom ops, so that ``backend="auto"`` reaches them through
``torch.library`` dispatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import reference
from .errors import BackendUnavailableError, InvalidOptionError

OP_NAMES = ("masked_reset_linear", "masked_reset_conv2d", "subset_metrics", "subset_unit_sums",
            "subset_linear_metrics")
KNOWN_BACKENDS = ("auto", "torch", "triton", "cuda")
# Accelerated backends in order of preference for backend="auto" on CUDA tensors.
AUTO_PREFERENCE = ("triton", "cuda")


@dataclass
class Backend:
    """One implementation of (some of) the ops."""

    name: str
    """Registry name, also the value users pass as ``backend=``."""
    ops: dict[str, Callable] = field(default_factory=dict)
    """Op name -> function with the op's flat signature (see :mod:`bingo_kernels.reference`)."""
    unavailable_reason: Callable[[], str | None] = lambda: None
    """Returns why the backend cannot run here (no GPU, failed build...), or None if it can."""
    devices: tuple[str, ...] | Callable[[], tuple[str, ...]] = ("cpu", "cuda")
    """Device types whose tensors this backend accepts, or a function returning them (for a
    backend whose devices depend on the environment, like triton's CPU interpreter)."""

    def device_types(self) -> tuple[str, ...]:
        """The accepted device types, as of now."""
        return self.devices() if callable(self.devices) else tuple(self.devices)


_BACKENDS: dict[str, Backend] = {
    "torch": Backend("torch", {name: getattr(reference, name) for name in OP_NAMES}),
}

_NOT_BUILT = {
    # triton registers itself from bingo_kernels.triton (with its own reason when it cannot run).
    "triton": "the triton backend was not registered (bingo_kernels.triton failed to load)",
    # cuda registers itself from bingo_kernels.cuda (its reason says why it cannot run here).
    "cuda": "the cuda backend was not registered (bingo_kernels.cuda failed to load)",
}


def register_backend(backend: Backend) -> None:
    """Add or replace a backend (called by the accelerated backends' modules on import)."""
    _BACKENDS[backend.name] = backend


def available_backends() -> list[str]:
    """Names of the backends that can run here."""
    return [name for name, b in _BACKENDS.items() if b.unavailable_reason() is None]


def unavailable_reason(name: str) -> str | None:
    """Why ``name`` cannot run here, or None if it can."""
    if name not in KNOWN_BACKENDS:
        raise InvalidOptionError(
            f"backend={name!r} is not supported; choose one of {', '.join(KNOWN_BACKENDS)}"
        )
    if name == "auto":
        return None
    if name not in _BACKENDS:
        return _NOT_BUILT[name]
    return _BACKENDS[name].unavailable_reason()


def supported_devices(name: str) -> tuple[str, ...]:
    """Device types whose tensors the registered backend ``name`` takes (empty if unregistered)."""
    return _BACKENDS[name].device_types() if name in _BACKENDS else ()


def resolve_backend(name: str, device: torch.device | str = "cpu") -> str:
    """The concrete backend ``name`` means for tensors on ``device`` (``auto`` resolved).

    Raises BackendUnavailableError naming the reason when an explicitly requested backend cannot
    run, and InvalidOptionError for unknown names.
    """
    device_type = torch.device(device).type
    reason = unavailable_reason(name)
    if name == "auto":
        if device_type == "cuda":
            for candidate in AUTO_PREFERENCE:
                if (candidate in _BACKENDS and unavailable_reason(candidate) is None
                        and device_type in _BACKENDS[candidate].device_types()):
                    return candidate
        return "torch"
    if reason is not None:
        raise BackendUnavailableError(
            f"backend {name!r} is unavailable: {reason}. Available here: "
            f"{', '.join(available_backends())}"
        )
    supported = _BACKENDS[name].device_types()
    if device_type not in supported:
        raise BackendUnavailableError(
            f"backend {name!r} does not run on {device_type} tensors (it supports "
            f"{', '.join(supported)}); use backend='torch' or 'auto'"
        )
    return name


def backend_op(name: str, op: str) -> Callable:
    """The implementation of ``op`` in backend ``name`` (a resolved, available backend)."""
    ops = _BACKENDS[name].ops
    if op not in ops:
        raise BackendUnavailableError(f"backend {name!r} does not implement {op}")
    return ops[op]
