"""The constrained least-squares fit of one group of a layer's outputs, from its moments.

``W, b = argmin E||W x + b - y||^2 + damping``, masked entries of ``W`` held at zero (float64, on
the moments' device). With a bias the fit is centred: the bias absorbs every mean, and features
that are constant on the calibration data keep their current weights (the bias absorbs their
value too). A mask that leaves the same features to every kept row (unit pruning) is one ridge
regression with many right-hand sides. Without a bias, features that are zero on every row keep
their weights (they multiply zero). Per-weight masks give every row its own feature set: up
to ``exact_features`` features each row is solved exactly on its own, wider layers use the
blocked Optimal Brain Surgeon update of SparseGPT (Frantar & Alistarh 2023), exact only up to its
column order (:func:`masked_update`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .moments import Statistics


def whole_rows(keep: Tensor) -> Tensor:
    """Per row of a ``(..., O, F)`` keep-mask: kept whole or removed whole."""
    return (keep == keep[..., :1]).all(-1)


def _exact_rows(hessian: Tensor, cross: Tensor, keep: Tensor, rows: Tensor) -> Tensor:
    """Each kept row's own constrained least-squares fit: solve ``H[S, S] w = c[S]`` on the
    row's kept features S (zero where not kept)."""
    weight = torch.zeros(keep.shape, dtype=hessian.dtype, device=hessian.device)
    for row in rows.nonzero().flatten().tolist():
        cols = keep[row].nonzero().flatten()
        if cols.numel():
            weight[row, cols] = torch.linalg.solve(hessian[cols][:, cols], cross[cols, row])
    return weight


def masked_update(weight: Tensor, keep: Tensor, hessian: Tensor, block: int) -> Tensor:
    """SparseGPT's fixed-mask update: zero ``weight``'s entries where ``keep`` is False, column by
    column, compensating each removal on the columns not yet visited (float64 in, float64 out).
    ``hessian`` is the (damped, positive definite) F x F Hessian of the layer-wise error."""
    weight = weight.clone()
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    factor = torch.linalg.cholesky(inverse, upper=True)
    columns = weight.shape[1]
    for start in range(0, columns, block):
        end = min(start + block, columns)
        w = weight[:, start:end].clone()
        errors = torch.zeros_like(w)
        f = factor[start:end, start:end]
        for i in range(end - start):
            err = torch.where(keep[:, start + i], 0.0, w[:, i]) / f[i, i]
            w[:, i:] -= err[:, None] * f[i, i:][None, :]
            errors[:, i] = err
        weight[:, start:end] = torch.where(keep[:, start:end], w, 0.0)
        weight[:, end:] -= errors @ factor[start:end, end:]
    return weight


def fit(stats: Statistics, fitted: Tensor, keep: Tensor, rows: Tensor, damping: float,
        exact_features: int, block: int) -> Optional[Tensor]:
    """Refit one group of outputs: its ``(O, F)`` float64 weight ``fitted``, in place, and
    return its ``(O,)`` bias (None without one: ``stats`` about zero).

    ``fitted`` comes in with the current weights, which features constant on the data (always
    zero, without a bias) keep; ``keep`` is the ``(O, F)`` keep-mask; ``rows`` the ``(O,)`` output
    rows not removed (a removed row's weights and bias are zero). ``stats`` is not changed."""
    hessian, cross = stats.xx, stats.xy
    # Features without variance (with a bias) or always zero (without) carry nothing to fit.
    diagonal = torch.diagonal(hessian)
    varying = diagonal > 1e-12 * diagonal.abs().max().clamp(min=1e-300)
    idx = varying.nonzero().flatten()
    if idx.numel() and bool(rows.any()):
        every = idx.numel() == varying.numel()   # no more F x F copies than the damped one
        h = hessian.clone() if every else hessian[idx][:, idx]
        h.diagonal().add_(damping * torch.diagonal(h).mean())
        c = cross if every else cross[idx]
        sub_keep = keep if every else keep[:, idx]
        pattern = sub_keep[rows]
        if bool((pattern == pattern[:1]).all()):  # one feature set for every kept row
            kept_rows = rows.nonzero().flatten()
            pos = pattern[0].nonzero().flatten()
            solution = torch.zeros(kept_rows.numel(), idx.numel(), dtype=h.dtype,
                                   device=h.device)
            if pos.numel():
                solution[:, pos] = torch.linalg.solve(h[pos][:, pos], c[pos][:, rows]).T
            fitted[kept_rows[:, None], idx[None, :]] = solution
        elif idx.numel() <= exact_features:
            fitted[:, idx] = _exact_rows(h, c, sub_keep, rows)
        else:
            fitted[:, idx] = masked_update(torch.linalg.solve(h, c).T, sub_keep, h, block)
        del h, c
    fitted[~rows] = 0.0
    fitted.masked_fill_(~keep, 0.0)
    bias = None
    if stats.centred:
        bias = stats.mean_y - fitted @ stats.mean_x
        bias[~rows] = 0.0
    return bias


def mean_squared_error(stats: Statistics, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``E||W x + b - y||^2`` summed over the group's outputs, from its statistics alone."""
    per_output = ((weight @ stats.xx) * weight).sum(1) - 2 * (weight * stats.xy.T).sum(1) + \
        stats.yy
    if stats.centred:
        offset = weight @ stats.mean_x + bias - stats.mean_y
        per_output = per_output + offset * offset
    return per_output.clamp(min=0).sum()
