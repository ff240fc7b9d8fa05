"""Significance estimators: from per-subset metric changes to per-unit scores.

Every search contributes, for each unit u, the subsets that reset it. An estimator turns the
search's metrics into one value ``v_k`` per subset; the search accumulates, per unit, the count
``n_u``, the sum and the sum of squares of ``v_k`` over the subsets containing u (with the
``subset_unit_sums`` op, which regenerates the masks), plus the same three totals over all subsets.
From those sufficient statistics each estimator derives a raw per-unit statistic and its standard
error. ``significance()`` rescales the raw statistic to [0, 1] (min-max over all sampled units of
all layers: a monotone map, so rankings are unchanged); higher means keep.

Cost: every estimator here uses the same K forward passes per search (plus one unreset pass);
they differ only in what they compute from them. Register new ones with :func:`register_estimator`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from .errors import InvalidOptionError, NonFiniteError
from .executor import Metrics

METRICS = ("accuracy", "loss")


def damage(metric: str, before: Metrics, after: Metrics) -> Tensor:
    """How much each subset's reset hurt: accuracy lost, or loss gained (float64, ``(K,)``)."""
    b, a = before.get(metric).double(), after.get(metric).double()
    return b - a if metric == "accuracy" else a - b


def _sample_var(n: Tensor, s: Tensor, ss: Tensor) -> Tensor:
    """Unbiased variance from count, sum and sum of squares (NaN where n < 2)."""
    var = (ss - s * s / n.clamp_min(1)) / (n - 1).clamp_min(1)
    return torch.where(n >= 2, var.clamp_min(0), torch.full_like(var, math.nan))


class Estimator:
    """Base class. Subclasses define ``subset_values`` and ``raw``."""

    name = "base"
    defined_when = "a unit's estimate needs a subset that resets it"
    """When ``raw`` defines a unit's estimate (said in warnings about undefined ones)."""

    def __init__(self, metric: str, literal: bool = False):
        self.metric = metric
        self.literal = literal

    def subset_values(self, before: Metrics, after: Metrics) -> Optional[Tensor]:
        """``(K,)`` float64 values to accumulate, or None to skip this search (with a reason)."""
        raise NotImplementedError

    def raw(self, stats: Tensor, totals: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(raw, stderr, defined)`` per unit from ``stats`` ``(units, 3)`` and ``totals`` ``(3,)``.

        Higher ``raw`` = more significant. ``defined`` is False where the estimate does not exist
        (a unit never sampled).
        """
        raise NotImplementedError

    def fraction_problem(self, max_fraction: float) -> Optional[str]:
        """Why inclusion probabilities up to ``max_fraction`` (float32) leave some estimates
        undefined however long the search runs, or None."""
        return None


class SeedEstimator(Estimator):
    """The seed paper's score: per subset ``S = 1 - |M_before - M_after| / M_before``.

    Estimates, for each unit, the mean relative metric change of the random subsets that contain
    it. Variance: that of a mean over ``n_u`` subsets (``stderr = sd(S) / sqrt(n_u)``).

    Direction. As written, ``S = 1`` when a reset changes nothing, so averaging S and pruning the
    lowest first would remove the units whose reset moved the metric most — the opposite of the
    paper's stated intent ("high significance means the unit matters; prune the lowest"). By
    default the raw statistic is therefore ``1 - mean(S)``, the mean relative damage. ``literal=True``
    keeps ``mean(S)`` itself, to measure the formula's own ordering in ablations.
    """

    name = "seed"

    def subset_values(self, before, after):
        m_b = before.get(self.metric).double()
        if float(m_b) == 0.0:
            return None  # S is undefined when the unreset metric is 0 (e.g. no correct sample)
        return 1.0 - (m_b - after.get(self.metric).double()).abs() / m_b

    def raw(self, stats, totals):
        n, s, ss = stats.unbind(-1)
        mean = s / n.clamp_min(1)
        raw = mean if self.literal else 1.0 - mean
        stderr = (_sample_var(n, s, ss) / n.clamp_min(1)).sqrt()
        return raw, stderr, n > 0


class AttributionEstimator(Estimator):
    """Banzhaf-style attribution: mean damage of subsets containing u minus of those without u.

    With subsets drawn independently of each other and of u's membership, this is an unbiased
    estimate of u's average marginal damage over random contexts of size ~``fraction``. Variance:
    ``var_in / n_in + var_out / n_out`` (a difference of two independent means).
    """

    name = "attribution"
    defined_when = "a unit's estimate needs subsets that reset it and subsets that do not"

    def fraction_problem(self, max_fraction):
        if max_fraction >= 1.0:
            return ("score='attribution' compares the subsets without a unit with those with it, "
                    "and a fraction of 1.0 puts a unit in every subset, so its score can never be "
                    "estimated; use fractions below 1")
        return None

    def subset_values(self, before, after):
        return damage(self.metric, before, after)

    def raw(self, stats, totals):
        n_in, s_in, ss_in = stats.unbind(-1)
        n_out, s_out, ss_out = totals[0] - n_in, totals[1] - s_in, totals[2] - ss_in
        raw = s_in / n_in.clamp_min(1) - s_out / n_out.clamp_min(1)
        var = _sample_var(n_in, s_in, ss_in) / n_in.clamp_min(1) + \
            _sample_var(n_out, s_out, ss_out) / n_out.clamp_min(1)
        return raw, var.sqrt(), (n_in > 0) & (n_out > 0)


ESTIMATORS: dict[str, type[Estimator]] = {
    SeedEstimator.name: SeedEstimator,
    AttributionEstimator.name: AttributionEstimator,
}


def register_estimator(cls: type[Estimator]) -> type[Estimator]:
    """Make ``cls`` available as ``TicketSearch(score=cls.name)`` (usable as a decorator)."""
    ESTIMATORS[cls.name] = cls
    return cls


def make_estimator(score: str, metric: str, literal: bool) -> Estimator:
    """Instantiate the estimator named ``score``; options are checked here."""
    if score not in ESTIMATORS:
        raise InvalidOptionError(
            f"score={score!r} is not supported; choose one of {', '.join(map(repr, ESTIMATORS))}")
    if metric not in METRICS:
        raise InvalidOptionError(f"metric={metric!r} is not supported; choose one of {METRICS}")
    if literal and score != SeedEstimator.name:
        raise InvalidOptionError("literal=True applies only to score='seed' (the paper's formula)")
    return ESTIMATORS[score](metric, literal)


class Significance(dict):
    """Per-unit significance in [0, 1] keyed by weight parameter name (higher = keep).

    A plain dict of tensors, so :func:`bingo.prune` and any code expecting a score dict accept it,
    with the evidence behind it as attributes:

    * ``coverage``: per unit, how many subsets reset it (0 = never sampled, score set to 1 so that
      it is pruned last, and :func:`bingo.prune` refuses to remove it silently);
    * ``stderr``: standard error of each score, in the same [0, 1] units (NaN where fewer than
      two samples make it undefined) — the confidence measure;
    * ``raw``: the estimator's raw statistic before rescaling;
    * ``estimator``, ``metric``, ``granularity``, ``searches``.
    """

    def __init__(self, scores, *, coverage, stderr, raw, estimator, metric, granularity, searches):
        super().__init__(scores)
        self.coverage: dict[str, Tensor] = coverage
        self.stderr: dict[str, Tensor] = stderr
        self.raw: dict[str, Tensor] = raw
        self.estimator: str = estimator
        self.metric: str = metric
        self.granularity: str = granularity
        self.searches: int = searches

    def unsampled(self) -> int:
        """Number of units no subset ever reset."""
        return int(sum(int((c == 0).sum()) for c in self.coverage.values()))

    def summary(self) -> dict:
        """JSON-ready overview: units, coverage and score spread per layer."""
        layers = {}
        for key, score in self.items():
            cov = self.coverage[key].double()
            layers[key] = dict(units=score.numel(), mean_score=float(score.double().mean()),
                               min_coverage=float(cov.min()), mean_coverage=float(cov.mean()),
                               unsampled=int((cov == 0).sum()))
        return dict(estimator=self.estimator, metric=self.metric, granularity=self.granularity,
                    searches=self.searches, unsampled=self.unsampled(), layers=layers)


@dataclass
class UnitStatistics:
    """Sufficient statistics accumulated over searches (float64)."""

    per_unit: dict[str, Tensor] = field(default_factory=dict)
    """Per score key: ``(units, 3)`` = count, sum and sum of squares of subset values."""
    totals: Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))
    """The same three sums over all subsets of all searches."""


def significance_from(stats: UnitStatistics, estimator: Estimator, unit_shapes: dict,
                      granularity: str, searches: int) -> Significance:
    """Rescale the estimator's raw statistics to [0, 1] over all sampled units of all layers."""
    raws, errs, defined = {}, {}, {}
    for key, s in stats.per_unit.items():
        raws[key], errs[key], defined[key] = estimator.raw(s, stats.totals.to(s.device))
    valid = [raws[k][defined[k]] for k in raws if bool(defined[k].any())]
    if valid:
        flat = torch.cat(valid)
        if not bool(torch.isfinite(flat).all()):
            raise NonFiniteError("significance statistics contain NaN or Inf")
        lo, hi = float(flat.min()), float(flat.max())
    else:
        lo = hi = 0.0
    spread = hi - lo
    # Units reset by some subset whose estimate is still undefined: they score 1 (keep) like
    # unsampled ones, but their coverage is not 0, so prune's check for those would not see them.
    undefined = sum(int(((s[:, 0] > 0) & ~defined[key]).sum())
                    for key, s in stats.per_unit.items())
    if not valid:
        warnings.warn("bingo: no unit has been sampled yet; every significance is 1 (keep)"
                      if not undefined else
                      f"bingo: no unit has an estimate yet ({estimator.defined_when}); every "
                      "significance is 1 (keep)", stacklevel=3)
    elif undefined:
        warnings.warn(f"bingo: {undefined} sampled units have no estimate yet "
                      f"({estimator.defined_when}); their significance is 1 (keep)", stacklevel=3)
    if valid and spread == 0.0:
        warnings.warn("bingo: the metric never moved differently between subsets, so every sampled "
                      "unit has the same significance; use metric='loss', more subsets or larger "
                      "search batches", stacklevel=3)
    scores, stderr, coverage = {}, {}, {}
    for key in raws:
        shape = unit_shapes[key]
        norm = (raws[key] - lo) / spread if spread > 0 else torch.full_like(raws[key], 0.5)
        norm = torch.where(defined[key], norm, torch.ones_like(norm)).clamp(0.0, 1.0)
        scores[key] = norm.float().reshape(shape)
        stderr[key] = (errs[key] / spread if spread > 0 else errs[key] * 0).float().reshape(shape)
        coverage[key] = stats.per_unit[key][:, 0].round().long().reshape(shape)
        raws[key] = raws[key].reshape(shape)
    return Significance(scores, coverage=coverage, stderr=stderr, raw=raws,
                        estimator=estimator.name, metric=estimator.metric, granularity=granularity,
                        searches=searches)
