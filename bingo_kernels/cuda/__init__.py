"""The ``cuda`` backend of bingo_kernels: C++/CUDA kernels from ``csrc/`` behind pybind11.

What it implements (design notes in ``docs/kernels.md``, sources in ``csrc/``):

* ``masked_reset_linear``, ``subset_metrics``, ``subset_unit_sums``: CUDA kernels with the
  structure of the triton backend (masks regenerated in-kernel from ``csrc/bingo_hash.cuh``, the
  hash spec of :mod:`bingo_kernels.hashing` as ``__host__ __device__`` code; tensor cores for the
  fp16/bf16 GEMM tiles).
* ``subset_linear_metrics``: **not fused**; composed from the two CUDA kernels above, blocks of
  subsets at a time, so at most a ``(K_block, B, C)`` tile of logits (64 MiB budget, at least one
  subset) exists. Same results as the fused triton kernel up to rounding.
* ``masked_reset_conv2d``: not implemented (``backend="cuda"`` raises BackendUnavailableError
  naming the op, as the triton backend does).

The extension is built on the first call (JIT, cached) unless an ahead-of-time build is
installed: see :mod:`.build`. Importing :mod:`bingo_kernels` never builds or imports the
extension; :func:`unavailable_reason` answers from cheap checks (torch's CUDA build, a device,
its compute capability, nvcc, ninja) plus the outcome of a build already tried in this process.

``backend="auto"`` prefers triton (``backends.AUTO_PREFERENCE``): a custom op has one CUDA kernel,
and it is triton's whenever triton is installed. Only where triton is not installed does this
backend register the custom ops' CUDA kernels (falling back to the torch reference, with a
warning, if the extension cannot be built), so that ``auto`` reaches it there.
"""

from __future__ import annotations

import importlib.util
import shutil
import warnings
from typing import Optional

import torch

from .. import reference
from ..backends import Backend, register_backend
from ..errors import BackendUnavailableError
from . import build

MIN_CAPABILITY = (8, 0)  # bf16 WMMA (tensor cores) needs sm_80+

_EXTENSION = None
_BUILD_ERROR: Optional[str] = None


def unavailable_reason() -> Optional[str]:
    """Why the cuda backend cannot run here, or None if it can (never builds anything)."""
    if _BUILD_ERROR is not None:
        return _BUILD_ERROR
    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    capability = torch.cuda.get_device_capability()
    if tuple(capability) < MIN_CAPABILITY:
        return (f"the CUDA device has compute capability {capability[0]}.{capability[1]}; the "
                f"kernels need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (bf16 tensor cores)")
    if _EXTENSION is None and not build.aot_available():
        if build.cuda_home() is None:
            return ("nvcc not found (set CUDA_HOME or put nvcc on PATH) and no prebuilt "
                    "extension is installed (see csrc/README.md)")
        if shutil.which("ninja") is None:  # torch's JIT build runs the ninja executable
            return "ninja is not installed (pip install 'bingo-prune[build]')"
    return None


def extension():
    """The loaded extension module, built on first use; BackendUnavailableError if it cannot be."""
    global _EXTENSION, _BUILD_ERROR
    if _EXTENSION is None:
        reason = unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"backend 'cuda' is unavailable: {reason}")
        try:
            _EXTENSION = build.extension()
        except build.BuildFailed as exc:
            _BUILD_ERROR = str(exc)  # remembered: later calls and unavailable_reason say it
            raise BackendUnavailableError(f"backend 'cuda' is unavailable: {exc}") from exc
    return _EXTENSION


# --- the ops (flat signatures of bingo_kernels.reference) ---------------------------------------

def masked_reset_linear(x, weight, init_weight, bias, init_bias, explicit_masks, prob,
                        prob_scalar, seed, search, k_start, num_subsets, unit_offset, granularity):
    """CUDA implementation (csrc/kernels/linear.cu)."""
    return extension().masked_reset_linear(
        x, weight, init_weight, bias, init_bias, explicit_masks, prob, float(prob_scalar),
        int(seed), int(search), int(k_start), int(num_subsets), int(unit_offset), granularity)


def subset_metrics(logits, targets, ignore_index):
    """CUDA implementation (csrc/kernels/metrics.cu)."""
    return tuple(extension().subset_metrics(logits, targets, int(ignore_index)))


def subset_unit_sums(values, explicit_masks, prob, prob_scalar, seed, search, k_start,
                     unit_offset, num_units):
    """CUDA implementation (csrc/kernels/unit_sums.cu)."""
    return extension().subset_unit_sums(values, explicit_masks, prob, float(prob_scalar),
                                        int(seed), int(search), int(k_start), int(unit_offset),
                                        int(num_units))


_LOGIT_ELEMENTS = 1 << 24  # logits held at once by subset_linear_metrics (64 MiB of fp32)


def subset_linear_metrics(h, weight, init_weight, bias, init_bias, targets, explicit_masks, prob,
                          prob_scalar, seed, search, k_start, num_subsets, unit_offset,
                          granularity, ignore_index, chunk):
    """Unfused: masked_reset_linear then subset_metrics (both CUDA) per block of subsets.

    Subsets are independent, so blocking over them needs no online merge (unlike blocking over
    classes); ``chunk`` (the torch implementation's class chunk) does not apply and is ignored.
    """
    K = int(explicit_masks.shape[0]) if explicit_masks is not None else int(num_subsets)
    B, C = h.shape[-2], weight.shape[0]
    k_block = max(1, _LOGIT_ELEMENTS // max(1, B * C))
    loss = torch.empty(K, dtype=torch.float32, device=h.device)
    accuracy = torch.empty_like(loss)
    for k0 in range(0, K, k_block):
        k1 = min(K, k0 + k_block)
        logits = masked_reset_linear(
            h if h.dim() == 2 else h[k0:k1], weight, init_weight, bias, init_bias,
            None if explicit_masks is None else explicit_masks[k0:k1], prob, prob_scalar, seed,
            search, (k_start + k0) & 0xFFFFFFFF, k1 - k0, unit_offset, granularity)
        loss[k0:k1], accuracy[k0:k1] = subset_metrics(logits, targets, ignore_index)
    return loss, accuracy


OPS = {
    "masked_reset_linear": masked_reset_linear,
    "subset_metrics": subset_metrics,
    "subset_unit_sums": subset_unit_sums,
    "subset_linear_metrics": subset_linear_metrics,
}


def _auto_kernel(name: str):
    """The custom op's CUDA kernel where triton is absent: this backend, else the reference."""
    def call(*args):
        if unavailable_reason() is None:
            try:
                return OPS[name](*args)
            except BackendUnavailableError as exc:
                warnings.warn(f"backend='auto': {exc}; using the torch implementation",
                              RuntimeWarning, stacklevel=2)
        return getattr(reference, name)(*args)

    call.__name__ = call.__qualname__ = f"{name}_auto_cuda"
    return call


_REGISTERED = False


def register() -> None:
    """Register the backend (cheap: no build, no extension import); called by bingo_kernels."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    register_backend(Backend("cuda", dict(OPS), unavailable_reason, ("cuda",)))
    if importlib.util.find_spec("triton") is not None:
        return  # the custom ops' CUDA kernels are triton's (auto prefers it)
    from ..ops import CUSTOM_OPS  # noqa: PLC0415  (ops imports the registry)

    for name in OPS:
        CUSTOM_OPS[name].register_kernel("cuda")(_auto_kernel(name))
