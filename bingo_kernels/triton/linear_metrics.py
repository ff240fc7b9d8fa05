"""``subset_linear_metrics`` in Triton: a last Linear layer fused with per-subset cross-entropy.

``subset_metrics(masked_reset_linear(h, W, ...), targets)`` without the ``(K, B, C)`` logits: one
program takes BLOCK_M rows of one subset and walks the C classes (the layer's output units) in
BLOCK_N tiles. Each tile of logits is computed in registers by the same tile functions as the
unfused kernels of :mod:`.linear` (neuron masks: each class row read from W or W0 by its base
pointer, reset-to-zero rows not read at all; weight masks: W and W0 blended element-wise in the
reduction loop; masks regenerated in-kernel) and folded at once into the rows' online
log-sum-exp, target logit and first-maximum argmax (:func:`.metrics.online_step`). Per-row NLL
and hit flags go to a ``(K, B)`` float32 buffer that torch sums, as in :mod:`.metrics`.

Semantics match the unfused composition: each logit is rounded to the layer's dtype before the
float32 metrics (as ``masked_reset_linear``'s output is), ties go to the first maximum,
``ignore_index`` rows count in neither mean.

Simplest form, not tuned: every (subset, row block) program recomputes its logits with its own
reduction over ``in``, so a shared ``h`` with neuron masks does K products where the unfused
path does two (``_pair_gemm_kernel``); and a row block re-reads all of W (from L2) per subset.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import config, launcher
from .linear import _row_select_tile, _weight_blend_tile, layer_args
from .metrics import online_step, reduce_rows, store_rows


@triton.jit(do_not_specialize=["base", "k_start", "off_lo", "off_hi", "ignore_index"])
def _linear_metrics_kernel(h_ptr, w_ptr, w0_ptr, b_ptr, b0_ptr, targets_ptr, nll_ptr, hit_ptr,
                           masks_ptr, smk, smn, prob_ptr, prob_scalar, base, k_start, off_lo,
                           off_hi, M, N, IN, ignore_index, shk, shm, shi, swn, swi, sw0n, sw0i,
                           HAS_INIT: tl.constexpr, HAS_BIAS: tl.constexpr,
                           WEIGHT_UNITS: tl.constexpr, EXPLICIT: tl.constexpr,
                           PER_UNIT: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    k = tl.program_id(0)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = rm < M
    target = tl.load(targets_ptr + rm, mask=m_valid, other=0)
    counted = m_valid & (target != ignore_index)
    safe_target = tl.where(counted, target, 0)
    h_base = h_ptr + k.to(tl.int64) * shk

    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    best = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros((BLOCK_M,), dtype=tl.int32)
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_valid = rn < N
        if WEIGHT_UNITS:
            acc = _weight_blend_tile(h_base, w_ptr, w0_ptr, b_ptr, prob_ptr, prob_scalar, base,
                                     k_start, off_lo, off_hi, k, rm, rn, m_valid, n_valid, IN,
                                     shm, shi, swn, swi, sw0n, sw0i, HAS_INIT, HAS_BIAS,
                                     PER_UNIT, ACC, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            acc = _row_select_tile(h_base, w_ptr, w0_ptr, b_ptr, b0_ptr, masks_ptr, smk, smn,
                                   prob_ptr, prob_scalar, base, k_start, off_lo, off_hi, k, rm,
                                   rn, m_valid, n_valid, IN, shm, shi, swn, swi, sw0n, sw0i,
                                   HAS_INIT, HAS_BIAS, EXPLICIT, PER_UNIT, ACC, BLOCK_M,
                                   BLOCK_N, BLOCK_K)
        # Rounded to the layer's dtype first, as the unfused layer's output is; classes past C
        # are -inf (rows past M hold finite values: zero inputs plus bias, so no NaN forms).
        logits = acc.to(h_ptr.dtype.element_ty).to(tl.float32)
        logits = tl.where(n_valid[None, :], logits, float("-inf"))
        is_target = rn[None, :] == safe_target[:, None]
        target_logit += tl.sum(tl.where(is_target, logits, 0.0), axis=1)
        run_max, run_sum, best, best_idx = online_step(logits, n0, run_max, run_sum, best,
                                                       best_idx)
    store_rows(nll_ptr, hit_ptr, k.to(tl.int64) * M + rm, m_valid, counted, safe_target,
               run_max, run_sum, best_idx, target_logit)


_linear_metrics = launcher(
    _linear_metrics_kernel,
    [config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16, num_warps=4, num_stages=3),  # fp32 weight masks
     config(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
     config(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
     config(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3),
     config(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=3),
     config(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3)],
    key=["M", "N", "IN"],
    interpreter_meta=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32))


def subset_linear_metrics(
    h: torch.Tensor,
    weight: torch.Tensor,
    init_weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    init_bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    explicit_masks: Optional[torch.Tensor],
    prob: Optional[torch.Tensor],
    prob_scalar: float,
    seed: int,
    search: int,
    k_start: int,
    num_subsets: int,
    unit_offset: int,
    granularity: str,
    ignore_index: int,
    chunk: int,
):
    """The Triton implementation; same flat signature and semantics as the torch reference.

    ``chunk`` (the reference's class chunk) is not used: the kernel tiles classes by BLOCK_N.
    """
    K = int(explicit_masks.shape[0]) if explicit_masks is not None else int(num_subsets)
    C, IN = weight.shape
    M = h.shape[-2]
    nll = torch.empty((K, M), dtype=torch.float32, device=h.device)
    hit = torch.empty_like(nll)
    la = layer_args(h, weight, init_weight, bias, init_bias, explicit_masks, prob, prob_scalar,
                    seed, search, k_start, unit_offset, granularity, nll)
    if K and M and C:
        mk = la["mk"]
        _linear_metrics(
            lambda meta: (K, triton.cdiv(M, meta["BLOCK_M"])), h, weight, la["w0"], la["b"],
            la["b0"], targets.contiguous(), nll, hit, mk["masks"], mk["smk"], mk["smn"],
            mk["prob"], mk["scalar"], *mk["hashed"], M, C, IN, int(ignore_index),
            *la["x_strides"], *la["wstrides"], HAS_INIT=la["HAS_INIT"], HAS_BIAS=la["HAS_BIAS"],
            WEIGHT_UNITS=granularity == "weight", EXPLICIT=mk["explicit"],
            PER_UNIT=mk["per_unit"], ACC=la["ACC"])
    else:  # no classes: every target is ignore_index (ops checks the range), nothing counts
        nll.zero_()
        hit.zero_()
    return reduce_rows(nll, hit, targets, ignore_index)
