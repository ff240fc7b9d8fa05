"""The ``triton`` backend of bingo_kernels: Triton kernels for CUDA tensors.

What it implements (design notes in ``docs/kernels.md``):

* ``masked_reset_linear`` (:mod:`.linear`): subset masks regenerated in-kernel from the hash spec
  of :func:`bingo_kernels.hashing.subset_mask`, so no ``K x units`` mask tensor ever exists.
  Shared input + neuron masks: one pass computes ``x W^T`` and ``x W0^T`` and writes every
  subset's output by a per-column select; per-subset input + neuron masks: each output row's
  weights are read from W or W0 by choosing the row's base pointer; weight masks: W and W0 tiles
  are blended element-wise inside the reduction loop.
* ``subset_metrics`` (:mod:`.metrics`): per-subset mean cross-entropy and accuracy, one online
  log-sum-exp / argmax pass over the classes.
* ``subset_linear_metrics`` (:mod:`.linear_metrics`): the last linear layer fused with
  ``subset_metrics``; logits tiles computed in registers and folded into the online log-sum-exp /
  argmax over class tiles, so the ``K x B x C`` logits never exist.
* ``subset_unit_sums`` (:mod:`.unit_sums`): per-unit sums over the subsets containing each unit,
  masks regenerated in-kernel, no atomics (deterministic).
* ``masked_reset_conv2d`` is not implemented: ``backend="triton"`` raises
  :class:`~bingo_kernels.errors.BackendUnavailableError` for it (a TicketSearch with
  ``path="auto"`` then takes the vmap path, with a warning naming this), while ``backend="auto"``
  uses the torch implementation for convolutions.

Importing :mod:`bingo_kernels` never imports triton (about 2 s, and an optional extra): this
module only registers the backend and the custom ops' CUDA kernels with thin wrappers; the kernel
modules, and triton itself, are imported on the first call.

Where it runs: on CUDA tensors when triton is installed and a CUDA device exists. With
``TRITON_INTERPRET=1`` in the environment (before the first kernel call, since ``triton.jit``
decides at decoration time) the same kernels run in Triton's CPU interpreter on CPU tensors;
that is how the test suite checks them without a GPU. Under the interpreter every kernel uses a
single small tile configuration; on a GPU the tile sizes are autotuned per shape.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional

import torch

from ..backends import Backend, register_backend

_TRUE = ("1", "true", "on", "yes", "y")


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's CPU interpreter (triton's own parsing)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


_IMPORT_ERROR: Optional[str] = None
_IMPORT_TRIED = False


def _triton_import_error() -> Optional[str]:
    """None if ``import triton`` works, else why not (checked once, only when asked)."""
    global _IMPORT_ERROR, _IMPORT_TRIED
    if not _IMPORT_TRIED:
        _IMPORT_TRIED = True
        if importlib.util.find_spec("triton") is None:
            _IMPORT_ERROR = "triton is not installed (pip install 'bingo-prune[triton]')"
        else:
            try:
                importlib.import_module("triton")
            except Exception as exc:  # noqa: BLE001  (a broken install: say what broke)
                _IMPORT_ERROR = f"triton is installed but failed to import ({exc})"
    return _IMPORT_ERROR


def unavailable_reason() -> Optional[str]:
    """Why the triton backend cannot run here, or None if it can."""
    error = _triton_import_error()
    if error is not None:
        return error
    if interpreter_requested() or torch.cuda.is_available():
        return None
    return ("no CUDA device and TRITON_INTERPRET is not set (set TRITON_INTERPRET=1 to run the "
            "Triton kernels in the CPU interpreter, a slow correctness tool)")


def devices() -> tuple[str, ...]:
    """Device types the backend accepts: CPU tensors only through the interpreter."""
    return ("cpu", "cuda") if interpreter_requested() else ("cuda",)


# The kernels' modules are imported on first use; these wrappers keep the ops' flat signatures.

def _lazy(module: str, function: str):
    def call(*args):
        impl = getattr(importlib.import_module(f"{__name__}.{module}"), function)
        return impl(*args)

    call.__name__ = call.__qualname__ = function
    call.__doc__ = f"Triton implementation of ``{function}`` (see :mod:`{__name__}.{module}`)."
    return call


masked_reset_linear = _lazy("linear", "masked_reset_linear")
subset_metrics = _lazy("metrics", "subset_metrics")
subset_unit_sums = _lazy("unit_sums", "subset_unit_sums")
subset_linear_metrics = _lazy("linear_metrics", "subset_linear_metrics")

OPS = {
    "masked_reset_linear": masked_reset_linear,
    "subset_metrics": subset_metrics,
    "subset_unit_sums": subset_unit_sums,
    "subset_linear_metrics": subset_linear_metrics,
}

_REGISTERED = False


def register() -> None:
    """Register the backend and the custom ops' CUDA kernels, if triton is installed.

    Called by ``bingo_kernels`` on import; cheap (no triton import). The backend is registered
    even without triton, so that ``backend="triton"`` says why it cannot run ("not installed");
    the CUDA kernels of the custom ops only when triton is installed.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    register_backend(Backend("triton", dict(OPS), unavailable_reason, devices))
    if importlib.util.find_spec("triton") is None:
        return
    from ..ops import CUSTOM_OPS  # here, not at the top: ops imports the registry

    for name, fn in OPS.items():
        CUSTOM_OPS[name].register_kernel("cuda")(fn)
