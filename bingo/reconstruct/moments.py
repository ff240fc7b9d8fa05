"""Running moments of one layer's input rows ``x`` and target rows ``y`` over the calibration data.

Only sums are kept (``n``, ``Σx``, ``Σxxᵀ``, ``Σxyᵀ``, ``Σy``, ``Σy²``, per group of outputs),
so a layer with ``F`` input features costs ``F x F`` accumulator memory however many rows the
calibration data has; the rows themselves are seen one chunk at a time.

Each chunk's products are formed in ``dtype`` on ``device`` and added to float64 accumulators on
``device``. ``float64`` is the exact reference (on the CPU it is bitwise the computation bingo's
recorded results were made with); ``float32`` is the fast path on a GPU (TF32 switched off for
these products). With a reduced-precision ``dtype`` the rows are first shifted by the first
chunk's means, so that a large mean does not swamp the variance in the float32 products: moments
about the shift are exact to convert back, which :meth:`Moments.statistics` does in float64.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@contextlib.contextmanager
def _ieee_float32():
    """float32 matrix products at full precision (no TF32) inside the block."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


class Moments:
    """Sums over rows ``x`` ``(n, G, F)`` and ``y`` ``(n, G, O)`` (see the module docstring)."""

    def __init__(self, device, dtype: torch.dtype):
        self.device, self.dtype = torch.device(device), dtype
        self.n = 0
        self.shift_x: Optional[Tensor] = None
        self.shift_y: Optional[Tensor] = None
        self.sx = self.sxx = self.sxy = self.sy = self.syy = None

    def add(self, x: Tensor, y: Tensor) -> None:
        x = x.to(self.device, self.dtype)
        y = y.to(self.device, self.dtype)
        if self.dtype != torch.float64:
            if self.shift_x is None:
                self.shift_x, self.shift_y = x.double().mean(0), y.double().mean(0)
            x = x - self.shift_x.to(self.dtype)
            y = y - self.shift_y.to(self.dtype)
        with _ieee_float32():
            if x.shape[1] == 1:
                x2, y2 = x[:, 0], y[:, 0]
                xx, xy = (x2.T @ x2).unsqueeze(0), (x2.T @ y2).unsqueeze(0)
            else:
                xg, yg = x.transpose(0, 1), y.transpose(0, 1)
                xx, xy = xg.mT @ xg, xg.mT @ yg
        sums = (x.sum(0), xx, xy, y.sum(0), (y * y).sum(0))
        if self.sx is None:
            self.sx, self.sxx, self.sxy, self.sy, self.syy = (s.double() for s in sums)
        else:
            for acc, s in zip((self.sx, self.sxx, self.sxy, self.sy, self.syy), sums):
                acc.add_(s)  # upcast inside the add: no float64 copy of a float32 product
        self.n += x.shape[0]

    @property
    def groups(self) -> int:
        return self.sxx.shape[0]

    def finite(self) -> bool:
        return bool(torch.isfinite(self.sxx).all()) and bool(torch.isfinite(self.sxy).all())

    def statistics(self, g: int, centred: bool) -> "Statistics":
        """Group ``g``'s second moments (float64): central ones for a fit with a bias (the
        shift cancels in them), about zero for one without."""
        n = self.n
        if centred:
            mean_x, mean_y = self.sx[g] / n, self.sy[g] / n
            xx = self.sxx[g] / n
            xx -= torch.outer(mean_x, mean_x)
            xy = self.sxy[g] / n
            xy -= torch.outer(mean_x, mean_y)
            yy = self.syy[g] / n - mean_y * mean_y
            if self.shift_x is not None:
                mean_x, mean_y = mean_x + self.shift_x[g], mean_y + self.shift_y[g]
            return Statistics(xx, xy, yy, mean_x, mean_y)
        xx, xy, yy = self.sxx[g] / n, self.sxy[g] / n, self.syy[g] / n
        if self.shift_x is not None:  # Σ(x'+s)(y'+t)ᵀ from the sums about the shift
            s, t, sx, sy = self.shift_x[g], self.shift_y[g], self.sx[g] / n, self.sy[g] / n
            xx += torch.outer(s, sx) + torch.outer(sx, s) + torch.outer(s, s)
            xy += torch.outer(sx, t) + torch.outer(s, sy) + torch.outer(s, t)
            yy = yy + 2 * t * sy + t * t
        return Statistics(xx, xy, yy)


@dataclass
class Statistics:
    """One group's second moments, what a fit and its error need (float64)."""

    xx: Tensor
    """``(F, F)``: covariance of x (centred), or ``E[x xᵀ]``."""
    xy: Tensor
    """``(F, O)``: cross-covariance of x and y (centred), or ``E[x yᵀ]``."""
    yy: Tensor
    """``(O,)``: variance of each y (centred), or ``E[y²]``."""
    mean_x: Optional[Tensor] = None
    """``(F,)``: mean of x (centred statistics only)."""
    mean_y: Optional[Tensor] = None
    """``(O,)``: mean of y (centred statistics only)."""

    @property
    def centred(self) -> bool:
        return self.mean_x is not None
