"""``subset_metrics`` in Triton: per-subset mean cross-entropy and accuracy of ``(K, N, C)`` logits.

One program takes BLOCK_N rows of one subset and streams their classes in BLOCK_C chunks with an
online log-sum-exp (running max and rescaled sum, so C may be a vocabulary) and a running
argmax. Each row's NLL and hit flag go to a ``(K, N)`` float32 buffer that torch then sums: the
buffer is C times smaller than the logits, its layout does not depend on the tile size (so
autotuning cannot leave stale partial sums behind), and the result is deterministic (no atomics).

Semantics match :func:`bingo_kernels.reference.subset_metrics`: computed in float32 whatever the
logits' dtype; rows whose target is ``ignore_index`` count in neither mean; ties in the argmax go
to the first maximum (``torch.argmax``'s rule). Not matched: NaN logits (torch.argmax treats NaN
as the maximum; here a NaN row's argmax is unspecified, its loss NaN either way).

The online step and the row epilogue are shared with the fused last-linear kernel
(:mod:`.linear_metrics`), which never materialises the K x N x C logits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import config, launcher


@triton.jit
def _metrics_kernel(logits_ptr, targets_ptr, nll_ptr, hit_ptr, N, C, ignore_index,
                    slk, sln, slc, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    k = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rc = tl.arange(0, BLOCK_C)
    n_valid = rn < N
    target = tl.load(targets_ptr + rn, mask=n_valid, other=0)
    counted = n_valid & (target != ignore_index)
    safe_target = tl.where(counted, target, 0)
    row = logits_ptr + k.to(tl.int64) * slk + rn.to(tl.int64) * sln

    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    best = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + rc
        tile = tl.load(row[:, None] + cols[None, :] * slc,
                       mask=n_valid[:, None] & (cols < C)[None, :], other=float("-inf"))
        # Rows past N read as zeros, not -inf, so that no -inf - -inf NaN is ever formed.
        tile = tl.where(n_valid[:, None], tile.to(tl.float32), 0.0)
        run_max, run_sum, best, best_idx = online_step(tile, c0, run_max, run_sum, best, best_idx)
    target_logit = tl.load(row + safe_target * slc, mask=counted, other=0.0).to(tl.float32)
    store_rows(nll_ptr, hit_ptr, k.to(tl.int64) * N + rn, n_valid, counted, safe_target,
               run_max, run_sum, best_idx, target_logit)


@triton.jit
def online_step(tile, c0, run_max, run_sum, best, best_idx):
    """Folds a float32 ``(rows, classes c0...)`` tile into the rows' online log-sum-exp (running
    max and rescaled sum) and first-maximum argmax; columns past C must hold -inf."""
    chunk_max = tl.max(tile, axis=1)
    # Strictly greater: an equal maximum in a later chunk does not replace the first one.
    chunk_idx = tl.argmax(tile, axis=1, tie_break_left=True).to(tl.int32) + c0
    better = chunk_max > best
    best_idx = tl.where(better, chunk_idx, best_idx)
    best = tl.where(better, chunk_max, best)
    new_max = tl.maximum(run_max, chunk_max)
    run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(tile - new_max[:, None]), axis=1)
    return new_max, run_sum, best, best_idx


@triton.jit
def store_rows(nll_ptr, hit_ptr, out, n_valid, counted, safe_target, run_max, run_sum, best_idx,
               target_logit):
    """Writes the rows' NLL (0 where not counted) and hit flags at offsets ``out``."""
    nll = run_max + tl.log(run_sum) - target_logit
    hit = counted & (best_idx == safe_target.to(tl.int32))
    tl.store(nll_ptr + out, tl.where(counted, nll, 0.0), mask=n_valid)
    tl.store(hit_ptr + out, hit.to(tl.float32), mask=n_valid)


_metrics = launcher(
    _metrics_kernel,
    [config(BLOCK_N=16, BLOCK_C=64, num_warps=4, num_stages=2),
     config(BLOCK_N=8, BLOCK_C=256, num_warps=4, num_stages=2),
     config(BLOCK_N=4, BLOCK_C=1024, num_warps=4, num_stages=2),
     config(BLOCK_N=1, BLOCK_C=4096, num_warps=8, num_stages=2)],
    key=["N", "C"],
    interpreter_meta=dict(BLOCK_N=16, BLOCK_C=32))


def subset_metrics(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """The Triton implementation; same signature and semantics as the torch reference."""
    K, N, C = logits.shape
    nll = torch.empty((K, N), dtype=torch.float32, device=logits.device)
    hit = torch.empty_like(nll)
    if K and N and C:
        _metrics(lambda meta: (K, triton.cdiv(N, meta["BLOCK_N"])), logits, targets.contiguous(),
                 nll, hit, N, C, int(ignore_index), *logits.stride())
    else:  # no classes: every target is ignore_index (ops checks the range), nothing counts
        nll.zero_()
        hit.zero_()
    return reduce_rows(nll, hit, targets, ignore_index)


def reduce_rows(nll: torch.Tensor, hit: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """Per-subset means of the kernels' ``(K, N)`` per-row NLL and hit buffers."""
    count = (targets != ignore_index).sum().clamp_min(1).float()
    return nll.sum(1) / count, hit.sum(1) / count
