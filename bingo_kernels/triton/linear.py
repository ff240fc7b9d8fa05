"""``masked_reset_linear`` in Triton: ``y[k] = x[k] @ where(M_k, W0, W).T + b_k`` for K subsets.

Three kernels, one per structure the op can exploit (all regenerate the masks in-kernel from
:mod:`.hashing`, so no ``K x units`` mask tensor exists; explicit neuron masks are read as given):

* **shared input, neuron masks** (the first layer of a network): every subset sees the same
  ``x``, and a neuron mask only decides, per output column, whether the column comes from
  ``x W^T + b`` or ``x W0^T + b0``. So :func:`_pair_gemm_kernel` computes both products once
  (one read of each ``x`` tile feeds both), and :func:`_column_select_kernel` writes the ``K``
  outputs by a per-column select: the K-fold work is only the output write, not K matmuls.
* **per-subset input, neuron masks** (every later layer): each subset needs its own product, but
  a reset row of ``W_k`` is simply row j of ``W0``; :func:`_row_select_kernel` picks each output
  row's base pointer from W or W0 before the reduction loop, so it reads exactly one row per
  output (no extra bytes, no blend). Reset-to-zero masks the row's loads instead (no bytes read).
* **weight masks**: :func:`_weight_blend_kernel` loads a W tile and a W0 tile (none for
  reset-to-zero) and blends them element-wise inside the reduction loop, hashing each element's
  global unit index ``offset + row * in + col`` (the weight's *logical* row-major index, whatever
  its memory strides). This is the straightforward blended form; the delta form
  ``x W^T + x ((W0 - W) * M_k)^T`` for sparse masks is not implemented (see docs/kernels.md).

Dtypes: fp16/bf16/fp32 use ``tl.dot`` with fp32 accumulation (fp32 with ``input_precision=
"ieee"``, never TF32, to match the torch backend); fp64 accumulates in fp64 (for completeness
and the float64 tests, not for speed). Results are rounded to the input dtype, as
``F.linear`` does. ``x``, the weights and explicit masks of any strides are read through their
strides (no copies); biases are made contiguous (a copy of ``out`` values at most); the output is
a fresh contiguous ``(K, B, out)`` tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..errors import InputMismatchError
from ._launch import config, launcher
from .hashing import included, mask_kernel_args, subset_key, thresholds, unit_hash


@triton.jit
def _mma(a, b, acc):
    """``acc + a @ b``; "ieee" keeps fp32 inputs in full precision (no TF32), like torch."""
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _column_masks(masks_ptr, smk, smn, prob_ptr, prob_scalar, base, k_start, off_lo, off_hi,
                  k, rn, n_valid, EXPLICIT: tl.constexpr, PER_UNIT: tl.constexpr):
    """Reset flags of output columns ``rn`` (neuron units) in subset ``k``."""
    if EXPLICIT:
        m = tl.load(masks_ptr + k.to(tl.int64) * smk + rn * smn, mask=n_valid, other=0)
        return m != 0
    else:
        thr = thresholds(prob_ptr, rn, n_valid, prob_scalar, PER_UNIT)
        return included(subset_key(base, k_start, k), unit_hash(off_lo, off_hi, rn), thr)


# --- shared input, neuron masks: two products once, then a per-column select -----------------

@triton.jit
def _pair_gemm_kernel(x_ptr, w_ptr, w0_ptr, b_ptr, b0_ptr, y_ptr, y0_ptr, M, N, IN,
                      sxm, sxi, swn, swi, sw0n, sw0i,
                      HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                      ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """``y = x W^T + b`` and (with HAS_INIT) ``y0 = x W0^T + b0``, each x tile read once."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_valid, n_valid = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for i0 in range(0, IN, BLOCK_K):
        ik = i0 + rk
        k_valid = ik < IN
        xt = tl.load(x_ptr + rm[:, None] * sxm + ik[None, :] * sxi,
                     mask=m_valid[:, None] & k_valid[None, :], other=0.0)
        wt_mask = k_valid[:, None] & n_valid[None, :]
        wt = tl.load(w_ptr + rn[None, :] * swn + ik[:, None] * swi, mask=wt_mask, other=0.0)
        acc = _mma(xt, wt, acc)
        if HAS_INIT:
            w0t = tl.load(w0_ptr + rn[None, :] * sw0n + ik[:, None] * sw0i, mask=wt_mask,
                          other=0.0)
            acc0 = _mma(xt, w0t, acc0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_valid, other=0.0).to(ACC)[None, :]
        if HAS_INIT:
            acc0 += tl.load(b0_ptr + rn, mask=n_valid, other=0.0).to(ACC)[None, :]
    offs = rm[:, None] * N + rn[None, :]
    valid = m_valid[:, None] & n_valid[None, :]
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=valid)
    if HAS_INIT:
        tl.store(y0_ptr + offs, acc0.to(y0_ptr.dtype.element_ty), mask=valid)


@triton.jit(do_not_specialize=["base", "k_start", "off_lo", "off_hi"])
def _column_select_kernel(y_ptr, y0_ptr, out_ptr, masks_ptr, smk, smn, prob_ptr, prob_scalar,
                          base, k_start, off_lo, off_hi, K, M, N,
                          HAS_INIT: tl.constexpr, EXPLICIT: tl.constexpr,
                          PER_UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          SUBSETS: tl.constexpr):
    """``out[k] = where(m_k, y0, y)`` column by column for SUBSETS subsets per program.

    One (y, y0) tile is loaded once and written for each of the program's subsets.
    """
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_valid, n_valid = rm < M, rn < N
    valid = m_valid[:, None] & n_valid[None, :]
    offs = rm[:, None] * N + rn[None, :]
    y = tl.load(y_ptr + offs, mask=valid, other=0.0)
    if HAS_INIT:
        y0 = tl.load(y0_ptr + offs, mask=valid, other=0.0)
    else:
        y0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=y.dtype)
    k_first = tl.program_id(2) * SUBSETS
    for j in range(SUBSETS):
        k = k_first + j
        if k < K:
            m = _column_masks(masks_ptr, smk, smn, prob_ptr, prob_scalar, base, k_start, off_lo,
                              off_hi, k, rn, n_valid, EXPLICIT, PER_UNIT)
            # int64 first: K * M * N may exceed 2**31 (M or N may also be a constexpr 1).
            tl.store(out_ptr + k.to(tl.int64) * M * N + offs, tl.where(m[None, :], y0, y),
                     mask=valid)


# --- per-subset input, neuron masks: each output row read from W or W0 ------------------------

@triton.jit
def _row_select_tile(x_base, w_ptr, w0_ptr, b_ptr, b0_ptr, masks_ptr, smk, smn, prob_ptr,
                     prob_scalar, base, k_start, off_lo, off_hi, k, rm, rn, m_valid, n_valid, IN,
                     sxm, sxi, swn, swi, sw0n, sw0i,
                     HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, EXPLICIT: tl.constexpr,
                     PER_UNIT: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The ``(rows rm, outputs rn)`` tile of subset k's output, neuron masks, in ``ACC``."""
    rk = tl.arange(0, BLOCK_K)
    reset = _column_masks(masks_ptr, smk, smn, prob_ptr, prob_scalar, base, k_start, off_lo,
                          off_hi, k, rn, n_valid, EXPLICIT, PER_UNIT)
    if HAS_INIT:
        # The row's base pointer and strides come from W0 where the neuron is reset.
        row_ptr = tl.where(reset, w0_ptr + rn * sw0n, w_ptr + rn * swn)
        col_stride = tl.where(reset, sw0i, swi)
        row_read = n_valid
    else:
        # Reset to zero: the reset rows are not read at all; their products stay 0.
        row_ptr = w_ptr + rn * swn
        col_stride = tl.zeros((BLOCK_N,), dtype=tl.int32) + swi
        row_read = n_valid & (reset == 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for i0 in range(0, IN, BLOCK_K):
        ik = i0 + rk
        k_valid = ik < IN
        xt = tl.load(x_base + rm[:, None] * sxm + ik[None, :] * sxi,
                     mask=m_valid[:, None] & k_valid[None, :], other=0.0)
        wt = tl.load(row_ptr[None, :] + ik[:, None] * col_stride[None, :],
                     mask=k_valid[:, None] & row_read[None, :], other=0.0)
        acc = _mma(xt, wt, acc)
    if HAS_BIAS:
        b = tl.load(b_ptr + rn, mask=n_valid, other=0.0).to(ACC)
        if HAS_INIT:
            b0 = tl.load(b0_ptr + rn, mask=n_valid, other=0.0).to(ACC)
        else:
            b0 = tl.zeros((BLOCK_N,), dtype=ACC)
        acc += tl.where(reset, b0, b)[None, :]
    return acc


@triton.jit(do_not_specialize=["base", "k_start", "off_lo", "off_hi"])
def _row_select_kernel(x_ptr, w_ptr, w0_ptr, b_ptr, b0_ptr, out_ptr, masks_ptr, smk, smn,
                       prob_ptr, prob_scalar, base, k_start, off_lo, off_hi, M, N, IN,
                       sxk, sxm, sxi, swn, swi, sw0n, sw0i,
                       HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, EXPLICIT: tl.constexpr,
                       PER_UNIT: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(2)
    m_valid, n_valid = rm < M, rn < N
    acc = _row_select_tile(x_ptr + k.to(tl.int64) * sxk, w_ptr, w0_ptr, b_ptr, b0_ptr, masks_ptr,
                           smk, smn, prob_ptr, prob_scalar, base, k_start, off_lo, off_hi, k, rm,
                           rn, m_valid, n_valid, IN, sxm, sxi, swn, swi, sw0n, sw0i, HAS_INIT,
                           HAS_BIAS, EXPLICIT, PER_UNIT, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
    out = out_ptr + k.to(tl.int64) * M * N + rm[:, None] * N + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :])


# --- weight masks: W and W0 blended element-wise inside the reduction loop ---------------------

@triton.jit
def _weight_blend_tile(x_base, w_ptr, w0_ptr, b_ptr, prob_ptr, prob_scalar, base, k_start,
                       off_lo, off_hi, k, rm, rn, m_valid, n_valid, IN,
                       sxm, sxi, swn, swi, sw0n, sw0i,
                       HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, PER_UNIT: tl.constexpr,
                       ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The ``(rows rm, outputs rn)`` tile of subset k's output, weight masks, in ``ACC``."""
    rk = tl.arange(0, BLOCK_K)
    key = subset_key(base, k_start, k)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for i0 in range(0, IN, BLOCK_K):
        ik = i0 + rk
        k_valid = ik < IN
        xt = tl.load(x_base + rm[:, None] * sxm + ik[None, :] * sxi,
                     mask=m_valid[:, None] & k_valid[None, :], other=0.0)
        wt_mask = k_valid[:, None] & n_valid[None, :]
        wt = tl.load(w_ptr + rn[None, :] * swn + ik[:, None] * swi, mask=wt_mask, other=0.0)
        # (in-tile, out-tile) view of W^T; the unit is element (row rn, column ik) of W.
        local = rn[None, :] * IN + ik[:, None]
        thr = thresholds(prob_ptr, local, wt_mask, prob_scalar, PER_UNIT)
        reset = included(key, unit_hash(off_lo, off_hi, local), thr)
        if HAS_INIT:
            w0t = tl.load(w0_ptr + rn[None, :] * sw0n + ik[:, None] * sw0i, mask=wt_mask,
                          other=0.0)
            wt = tl.where(reset, w0t, wt)
        else:
            wt = tl.where(reset, tl.zeros_like(wt), wt)
        acc = _mma(xt, wt, acc)
    if HAS_BIAS:  # weight masks never reset the bias
        acc += tl.load(b_ptr + rn, mask=n_valid, other=0.0).to(ACC)[None, :]
    return acc


@triton.jit(do_not_specialize=["base", "k_start", "off_lo", "off_hi"])
def _weight_blend_kernel(x_ptr, w_ptr, w0_ptr, b_ptr, out_ptr, prob_ptr, prob_scalar,
                         base, k_start, off_lo, off_hi, M, N, IN,
                         sxk, sxm, sxi, swn, swi, sw0n, sw0i,
                         HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr, PER_UNIT: tl.constexpr,
                         ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(2)
    m_valid, n_valid = rm < M, rn < N
    acc = _weight_blend_tile(x_ptr + k.to(tl.int64) * sxk, w_ptr, w0_ptr, b_ptr, prob_ptr,
                             prob_scalar, base, k_start, off_lo, off_hi, k, rm, rn, m_valid,
                             n_valid, IN, sxm, sxi, swn, swi, sw0n, sw0i, HAS_INIT, HAS_BIAS,
                             PER_UNIT, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
    out = out_ptr + k.to(tl.int64) * M * N + rm[:, None] * N + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & n_valid[None, :])


# --- launch configurations ---------------------------------------------------------------------

_GEMM_CONFIGS = [
    # Short K steps for fp32 weight masks: with fp32's FMA dot the blended tile is held per
    # thread, and every longer-K tile below spills there (bench/results/kernel-resources-*).
    config(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=3),
    config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    config(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4),
    config(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    config(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=4, num_stages=3),
    config(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
    config(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
]
_SELECT_CONFIGS = [
    config(BLOCK_M=16, BLOCK_N=128, SUBSETS=8, num_warps=4, num_stages=1),
    config(BLOCK_M=32, BLOCK_N=128, SUBSETS=4, num_warps=4, num_stages=1),
    config(BLOCK_M=64, BLOCK_N=64, SUBSETS=8, num_warps=4, num_stages=1),
    config(BLOCK_M=64, BLOCK_N=128, SUBSETS=16, num_warps=8, num_stages=1),
]
# Under the interpreter: one configuration, large enough that the tests' shapes take few programs.
_INTERPRETER_GEMM = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)
_GEMM_KEY = ["M", "N", "IN"]

_pair_gemm = launcher(_pair_gemm_kernel, _GEMM_CONFIGS, _GEMM_KEY, _INTERPRETER_GEMM)
_column_select = launcher(_column_select_kernel, _SELECT_CONFIGS, ["K", "M", "N"],
                          dict(BLOCK_M=16, BLOCK_N=32, SUBSETS=4))
_row_select = launcher(_row_select_kernel, _GEMM_CONFIGS, _GEMM_KEY, _INTERPRETER_GEMM)
_weight_blend = launcher(_weight_blend_kernel, _GEMM_CONFIGS, _GEMM_KEY, _INTERPRETER_GEMM)


_ACC = {torch.float16: tl.float32, torch.bfloat16: tl.float32, torch.float32: tl.float32,
        torch.float64: tl.float64}


def masked_reset_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    init_weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    init_bias: Optional[torch.Tensor],
    explicit_masks: Optional[torch.Tensor],
    prob: Optional[torch.Tensor],
    prob_scalar: float,
    seed: int,
    search: int,
    k_start: int,
    num_subsets: int,
    unit_offset: int,
    granularity: str,
) -> torch.Tensor:
    """The Triton implementation; same flat signature and semantics as the torch reference."""
    K = int(explicit_masks.shape[0]) if explicit_masks is not None else int(num_subsets)
    N, IN = weight.shape
    M = x.shape[-2]
    out = torch.empty((K, M, N), dtype=x.dtype, device=x.device)
    la = layer_args(x, weight, init_weight, bias, init_bias, explicit_masks, prob, prob_scalar,
                    seed, search, k_start, unit_offset, granularity, out)
    if K == 0 or M == 0 or N == 0:
        return out
    mk, w0, b, b0, wstrides = la["mk"], la["w0"], la["b"], la["b0"], la["wstrides"]
    has_init, has_bias = la["HAS_INIT"], la["HAS_BIAS"]
    common = dict(HAS_INIT=has_init, ACC=la["ACC"])

    if granularity == "neuron" and x.dim() == 2:
        y = torch.empty((M, N), dtype=x.dtype, device=x.device)
        y0 = torch.empty_like(y) if has_init else y
        _pair_gemm(lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"])),
                   x, weight, w0, b, b0, y, y0, M, N, IN, x.stride(0), x.stride(1), *wstrides,
                   HAS_BIAS=has_bias, **common)
        _column_select(
            lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]),
                          triton.cdiv(K, meta["SUBSETS"])),
            y, y0, out, mk["masks"], mk["smk"], mk["smn"], mk["prob"], mk["scalar"],
            *mk["hashed"], K, M, N, HAS_INIT=has_init, EXPLICIT=mk["explicit"],
            PER_UNIT=mk["per_unit"])
        return out

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), K)

    if granularity == "neuron":
        _row_select(grid, x, weight, w0, b, b0, out, mk["masks"], mk["smk"], mk["smn"],
                    mk["prob"], mk["scalar"], *mk["hashed"], M, N, IN, *la["x_strides"],
                    *wstrides, HAS_BIAS=has_bias, EXPLICIT=mk["explicit"],
                    PER_UNIT=mk["per_unit"], **common)
    else:
        _weight_blend(grid, x, weight, w0, b, out, mk["prob"], mk["scalar"], *mk["hashed"],
                      M, N, IN, *la["x_strides"], *wstrides, HAS_BIAS=has_bias,
                      PER_UNIT=mk["per_unit"], **common)
    return out


def layer_args(x, weight, init_weight, bias, init_bias, explicit_masks, prob, prob_scalar, seed,
               search, k_start, unit_offset, granularity, dummy) -> dict:
    """Checks and launch arguments of a masked-reset linear layer, shared by the kernels that
    compute one (here and the fused :mod:`.linear_metrics`).

    ``dummy`` is any tensor on the device, passed for pointers a variant never reads. Returns the
    mask arguments (``mk``), ``w0``/``b``/``b0`` pointers, weight strides (W then W0), x strides
    as (subset, row, feature) with a subset stride of 0 for a shared x, and the constexprs
    ``HAS_INIT``, ``HAS_BIAS``, ``ACC``.
    """
    if x.dtype not in _ACC:
        raise InputMismatchError(f"the triton backend does not support dtype {x.dtype}")
    N, IN = weight.shape
    if weight.numel() >= 2**31 or x.shape[-2] * max(N, IN) >= 2**31:
        raise InputMismatchError("the triton backend indexes one layer with int32: the weight "
                                 "and one subset's input/output must each hold < 2**31 elements")
    if granularity == "weight" and explicit_masks is not None:
        raise InputMismatchError("explicit masks are neuron masks; weight masks must be hashed")
    has_init, has_bias = init_weight is not None, bias is not None
    w0 = init_weight if has_init else weight  # never read when has_init is False
    # Bias vectors are tiny: made contiguous here rather than read through strides.
    b = bias.contiguous() if has_bias else dummy
    return dict(
        mk=mask_kernel_args(explicit_masks, prob, prob_scalar, seed, search, k_start,
                            unit_offset, dummy),
        w0=w0, b=b, b0=init_bias.contiguous() if (has_init and has_bias) else b,
        wstrides=(weight.stride(0), weight.stride(1), w0.stride(0), w0.stride(1)),
        x_strides=(0, *x.stride()) if x.dim() == 2 else tuple(x.stride()),
        HAS_INIT=has_init, HAS_BIAS=has_bias, ACC=_ACC[x.dtype])
