"""bingo_kernels: the ops behind ticket search, with one signature and several backends.

Ops (see :mod:`bingo_kernels.ops`): ``masked_reset_linear``, ``masked_reset_conv2d``,
``subset_metrics``, ``subset_unit_sums``, ``subset_linear_metrics`` (last linear layer fused with
``subset_metrics``). Backends: ``torch`` (reference and CPU fallback, always
present), ``triton`` (:mod:`bingo_kernels.triton`; registered here without importing triton, which
is an optional extra) and ``cuda`` (:mod:`bingo_kernels.cuda`: C++/CUDA from ``csrc/``, built on
first use).
The subset-mask specification every backend reproduces bit for bit is
:func:`bingo_kernels.hashing.subset_mask`.
"""

from .backends import available_backends, resolve_backend, unavailable_reason
from .errors import BackendUnavailableError, BingoError, InputMismatchError, InvalidOptionError
from .hashing import subset_mask
from .ops import (masked_reset_conv2d, masked_reset_linear, subset_linear_metrics, subset_metrics,
                  subset_unit_sums)
from .subsets import SubsetMasks
from .cuda import register as _register_cuda
from .triton import register as _register_triton

_register_triton()
_register_cuda()  # registers the custom ops' CUDA kernels only where triton is not installed

__all__ = [
    "BackendUnavailableError", "BingoError", "InputMismatchError", "InvalidOptionError",
    "SubsetMasks", "available_backends", "masked_reset_conv2d", "masked_reset_linear",
    "resolve_backend", "subset_linear_metrics", "subset_mask", "subset_metrics", "subset_unit_sums",
    "unavailable_reason",
]
