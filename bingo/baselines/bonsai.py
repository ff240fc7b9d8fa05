"""Bonsai: forward-only structured pruning by regression over randomly masked sub-models.

Paper: L. Dery, S. Kolawole, J.-F. Kagy, V. Smith, G. Neubig, A. Talwalkar, "Everybody Prune
Now: Structured Pruning of LLMs with only Forward Passes", arXiv:2402.05406 (2024); code
github.com/ldery/Bonsai (``main.py``: ``get_random_mask``, ``get_random_mask_scores``,
``get_score_models``, ``investigate_score_based_mask``; ``lib/scoring_model.py``:
``ScoreModelHP``, ``LinearModel``; ``lib/eval.py``: ``eval_ppl_trainonly``).

Estimates: the importance of each structured unit (attention head or key/value group, MLP neuron
with its consumers' columns, conv channel; the groups of :func:`bingo.units.find_units`) as its
coefficient in a linear model of a sub-model's quality on which units it keeps, fitted to many
random sub-models, each scored by forward passes only. Units are removed over several rounds,
the least important first; the scores are that elimination order.

How, per round r = 1..R (R = ``rounds``), on the model with the units removed in rounds < r
zeroed:

1. Sample n = ``submodels`` sub-models. Sub-model k removes a random set of surviving units:
   mask ``m_k`` (True = removed), keep-indicators ``a_k = 1 - m_k``. Each surviving unit is
   removed with probability p = ``submodel_fraction`` (default ``target_fraction / rounds``:
   Bonsai's ``prune_frac``, used both as the share pruned per round and as each sub-model's
   removal share). ``sampling="fixed"`` removes exactly ``int(p * alive) + 1`` survivors of each
   group instead, as Bonsai's ``get_random_mask`` does per module.
2. Evaluate each sub-model on the calibration batch ``data``: removing a unit zeroes every
   parameter slice it owns (what :func:`bingo.prune` removes); ``L_k`` is the mean cross-entropy
   (per token for a language model with ``(N, T)`` next-token targets) and the regressed metric
   is Bonsai's ``U_k = -exp(L_k)`` (minus the perplexity, capped at 1e8 as Bonsai's ``INF``), or
   ``U_k = -L_k`` with ``metric="loss"``.
3. Fit, on the candidate units' keep-indicators, Bonsai's L1-regularised linear model

       beta = argmin_b (1/n) sum_k (U_k - mean(U) - (a_k - mean(a))^T b)^2 + lambda ||b||_1

   (centering makes the intercept exact). lambda is chosen from ``l1_weights`` (Bonsai's
   default grid ``sm_reg_weight = [1e2, 1e-4, 0]``) by ``folds``-fold cross-validation on
   contiguous blocks of sub-models, maximising the mean held-out Kendall tau between predicted
   and measured ``U`` (Bonsai's ``ScoreModelHP.search_best_linear_fit``); then refitted on all n.
   ``beta_u`` is how much keeping unit u raises ``U`` (lowers the perplexity): its importance.
4. Remove, globally across groups, the ``c_r`` candidates with the lowest ``beta`` (Bonsai's
   default ``sm_lin_model_type="global"``), where ``c_r`` spreads ``floor(target_fraction *
   units)`` evenly over the rounds. Removed units stay removed; later rounds sample survivors only.

Scores (higher = keep): the global elimination order, as float32 ranks 0..N-1: a unit removed in
round r ranks below every unit removed in round r+1, within a round by its coefficient; the
survivors rank above all removed units, by their coefficient of the last round they were a
candidate in. ``scores.result`` (:class:`BonsaiResult`) has the costs and each round's
coefficients, removals, chosen lambda and the pruned model's loss.

Evaluation modes (the same masks, the same losses to float rounding; a test checks it):

* ``evaluation="sequential"`` (default; Bonsai's loop): one sub-model per forward pass. The
  removal is written into a working copy of the model (the removed units' slices zeroed in place,
  ``index_fill_`` over :attr:`bingo.units.UnitGroup.slices`), one plain forward of the batch is
  run (:meth:`bingo.executor.BatchedEvaluator.baseline`), and the slices are copied back. Bonsai
  multiplies each module's activations by a 0/1 mask inside an otherwise plain forward, so its
  cost per sub-model is one plain forward; writing and restoring the removed slices costs memory
  traffic proportional to those slices only, small beside the forward, so this path pays what
  Bonsai pays and nothing of bingo's batching. (Bonsai feeds a sub-model its calibration set in
  forwards of ``bsz`` = 1-4 sequences; here the whole batch goes through one forward.)
* ``evaluation="batched"``: bingo's batched evaluation: all n sub-models of a round as one
  :class:`bingo.executor.ExplicitDesign` through :meth:`bingo.executor.BatchedEvaluator.subsets`
  (reset to zero = removal), the sub-models folded into the batch and chunked to
  ``memory_budget``. :func:`compare_evaluation` times both on the same masks.

The units removed between rounds are zeroed in the working copy by
:class:`bingo.targeted.grouped.GroupEvaluator` (as the targeted elimination does), whose refresh
gives the pruned model's loss after each round. The caller's model is never changed.

Where this differs from Bonsai's code (and why):

* No prior. Bonsai's default (``--prune_method wanda``) computes a Wanda-style activation score
  per unit, keeps the top ``1 - 2p`` share of each module fixed for the round (never sampled,
  never pruned) and samples the rest with probability proportional to ``max(prior) - prior``;
  it then also evaluates each sample's complement within that candidate set (antithetic pairs,
  ``use_complement``). Here every survivor is a candidate and sampled uniformly (the baseline
  is the forward-only regression over random sub-models, without another method's scores), so
  a complement would remove ``1 - p`` of the model; none are drawn.
* Sampling. Bonsai removes exactly ``int(p * n) + 1`` units per module, so the keep-indicators of
  a module sum to the same constant in every sub-model: the regression cannot tell a module's
  mean importance from the intercept (its complements break this by two units only), and a
  global ranking across modules rests on the fit's implicit bias. The default here removes each
  unit independently with probability p (the same expected share), which keeps every
  coefficient identifiable; ``sampling="fixed"`` is Bonsai's rule.
* The fit. Bonsai minimises the objective above with Adam from zero (at most 50 epochs of
  minibatches of 32-128 sub-models, early stopping on the held-out tau, a grid over learning
  rate and batch size as well); here lambda > 0 takes up to 1000 FISTA steps from zero (stopping earlier once a step
  changes no coefficient by more than 1e-7 of the largest), and lambda = 0 the minimum-norm
  least-squares solution, which is where gradient descent from zero converges: deterministic,
  and free of the optimiser's grids.
* Pruning counts units, not parameters (Bonsai prunes the lowest coefficients until
  ``prune_frac`` of the original parameter count is gone), and a group keeps its last unit (as
  the targeted elimination does; Bonsai can drop a whole module).
* One calibration batch for every round (Bonsai draws ``nsamples`` = 32 fresh sequences per
  round; ``calibration_examples`` takes a seeded subset of ``data`` once).

Cost: ``rounds * submodels`` sub-model evaluations of the calibration batch: that many forward
passes sequentially, or ``rounds * ceil(submodels / chunk)`` batched passes of ``chunk * B`` rows;
plus ``rounds + 1`` plain forwards (the dense and each round's pruned loss) and, per round,
``folds * len(l1_weights) + 1`` regressions of an ``(n, candidates)`` design. No backward pass.
Memory: one copy of the model, plus one chunk of sub-models in batched mode.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from bingo.errors import InputMismatchError, InvalidOptionError, NonFiniteError, require_option
from bingo.executor import BatchedEvaluator, ExplicitDesign
from bingo.targeted.checks import check_evidence
from bingo.targeted.elimination import data_tensors, evidence_batch
from bingo.targeted.grouped import GroupEvaluator
from bingo.units import UnitLayout, find_units

from ._common import UnitScores, check_unpruned, unsupported_granularity

EVALUATIONS = ("sequential", "batched")
"""How sub-models are evaluated: one per forward pass (Bonsai), or batched (bingo)."""
METRICS = ("perplexity", "loss")
"""The regressed quality: minus the perplexity (Bonsai) or minus the mean cross-entropy."""
SAMPLINGS = ("independent", "fixed")
"""Each survivor removed with probability p, or exactly ``int(p * alive) + 1`` per group."""
PERPLEXITY_CAP = 1e8
"""Bonsai's ``INF``: a sub-model's perplexity is clipped here (its loss at ln 1e8)."""
DEFAULT_L1_WEIGHTS = (1e2, 1e-4, 0.0)
"""Bonsai's ``--sm_reg_weight`` grid."""
_FISTA_STEPS = 1000
_FISTA_TOLERANCE = 1e-7


@dataclass
class BonsaiRound:
    """One round: what was sampled, fitted and removed."""

    removal_probability: float
    """p: each candidate's removal probability in a sub-model (``sampling="fixed"``: the share
    ``int(p * alive) + 1`` is computed from)."""
    importance: dict[str, Tensor]
    """Score key -> float64 (units,) coefficients (how much keeping the unit raises ``-metric``);
    NaN for units that were not candidates (removed earlier, or the last of their group)."""
    removed: dict[str, Tensor]
    """Score key -> int64 indices of the units removed this round, lowest coefficient first."""
    l1_weight: float
    """The chosen lambda."""
    cv_tau: float
    """Its mean held-out Kendall tau (NaN when no cross-validation ran)."""
    loss_after: float
    """Mean cross-entropy of the model with every unit removed so far (one plain forward)."""


@dataclass
class BonsaiResult:
    """Costs and history of one :func:`bonsai` run (``scores.result``)."""

    evaluations: int
    """Sub-models evaluated (``rounds * submodels``)."""
    forward_passes: int
    """Forward passes that evaluated them (sequential: one each; batched: one per chunk). The
    plain forwards of the dense and pruned models, and the batched evaluator's one-off path
    probe, are not counted."""
    tokens_evaluated: int
    """Target positions scored over all sub-models (``evaluations * targets.numel()``)."""
    evaluation_seconds: float
    """Wall time of the sub-model evaluations (batched: with the evaluator's one-off path
    choice in its first call)."""
    total_seconds: float
    """Wall time of the whole call."""
    rounds: int
    """Rounds run."""
    mode: str
    """``"sequential"`` or ``"batched"``."""
    metric: str
    """The regressed metric (``"perplexity"`` or ``"loss"``)."""
    sampling: str
    """``"independent"`` or ``"fixed"``."""
    dense_loss: float
    """Mean cross-entropy of the unpruned model on the calibration batch."""
    history: list[BonsaiRound] = field(default_factory=list)
    """Per round: coefficients, removals, lambda, loss after."""
    removal_counts: dict[str, Tensor] = field(default_factory=dict)
    """Score key -> int64 (units,): in how many sub-models each unit was removed."""
    path: Optional[str] = None
    """The batched evaluator's path (``"fast"`` / ``"vmap"``), None when it was not used."""


class BonsaiScores(UnitScores):
    """:class:`bingo.scoring.UnitScores` that also carry the run's :class:`BonsaiResult`."""

    result: Optional[BonsaiResult] = None


# -- evaluating sub-models ------------------------------------------------------------------------


class _SliceWriter:
    """Zeroes the slices of chosen units in the working model in place, and puts them back.

    Only the removed units' slices are read and written (``index_select`` / ``index_fill_`` /
    ``index_copy_`` along each slice's axis), so a sub-model costs memory traffic proportional to
    what it removes, not a copy of the weights. Buffers (batch norm statistics) are never
    touched: a removal zeroes weights, as :func:`bingo.prune` does."""

    def __init__(self, layout: UnitLayout):
        self.parts: dict[str, list[tuple[Tensor, int, Tensor, Tensor]]] = {}
        for g in layout.groups:
            tensors = g.tensors()
            self.parts[g.param_name] = [
                (tensors[s.param], s.axis, s.positions.to(tensors[s.param].device),
                 s.unit_of.to(tensors[s.param].device))
                for s in g.slices if s.param in tensors]

    @torch.no_grad()
    def zero(self, removed: Mapping[str, Tensor]) -> list[tuple[Tensor, int, Tensor, Tensor]]:
        """Zero the units ``removed`` (score key -> bool (units,)); returns what :meth:`restore`
        needs."""
        picks = []
        for key, mask in removed.items():
            for live, axis, positions, unit_of in self.parts[key]:
                chosen = positions[mask.to(positions.device)[unit_of]]
                if chosen.numel():
                    picks.append((live, axis, chosen))
        # Every original is read before anything is zeroed: an element two removed units share
        # (a row of one, a column of another) is then restored to its value, not to a zero.
        saved = [(live, axis, chosen, live.index_select(axis, chosen))
                 for live, axis, chosen in picks]
        for live, axis, chosen in picks:
            live.index_fill_(axis, chosen, 0.0)
        return saved

    @torch.no_grad()
    def restore(self, saved: list[tuple[Tensor, int, Tensor, Tensor]]) -> None:
        """Put back what :meth:`zero` returned."""
        for live, axis, chosen, values in saved:
            live.index_copy_(axis, chosen, values)


class _SubmodelEvaluator:
    """Losses of sub-models (bool removal masks per group) of a working model, one at a time or
    batched, with counters of what it cost."""

    def __init__(self, work: nn.Module, layout: UnitLayout, inputs: Tensor, targets: Tensor, *,
                 backend: str, memory_budget: int):
        self.work, self.layout = work, layout
        self.inputs, self.targets = inputs, targets
        # The units removed between rounds are zeroed as the targeted elimination zeroes them.
        self.removals = GroupEvaluator(work, layout, inputs, targets,
                                       memory_budget=memory_budget, backend=backend)
        self.evaluator = BatchedEvaluator(work, layout, backend=backend,
                                          memory_budget=memory_budget)
        self.writer = _SliceWriter(layout)
        self.evaluations = self.forward_passes = 0
        self.seconds = 0.0
        self.batched_used = False

    def reset_counters(self) -> None:
        self.evaluations = self.forward_passes = 0
        self.seconds = 0.0

    @torch.no_grad()
    def sequential(self, masks: Mapping[str, Tensor],
                   step: Optional[Callable[[int], None]] = None) -> Tensor:
        """float64 (K,) losses, one plain forward per sub-model (``step(1)`` after each)."""
        count = _count(masks)
        started = time.perf_counter()
        # On the groups' devices once, not once per sub-model and slice.
        devices = {g.param_name: g.device for g in self.layout.groups}
        masks = {key: m.to(devices[key]) for key, m in masks.items()}
        losses = []
        for k in range(count):
            saved = self.writer.zero({key: m[k] for key, m in masks.items()})
            try:
                losses.append(self.evaluator.baseline(self.inputs, self.targets).loss)
            finally:
                self.writer.restore(saved)
            if step is not None:
                step(1)
        out = torch.stack(losses).double().cpu()  # .cpu() waits for the device
        self.seconds += time.perf_counter() - started
        self.evaluations += count
        self.forward_passes += count
        return out

    @torch.no_grad()
    def batched(self, masks: Mapping[str, Tensor],
                step: Optional[Callable[[int], None]] = None) -> Tensor:
        """float64 (K,) losses, all sub-models through one batched evaluation."""
        count = _count(masks)
        started = time.perf_counter()
        metrics = self.evaluator.subsets(self.inputs, self.targets, ExplicitDesign(dict(masks)),
                                         None)
        out = metrics.loss.double().cpu()
        self.seconds += time.perf_counter() - started
        self.batched_used = True
        self.evaluations += count
        # The evaluator split the K sub-models into chunks of this size (cached by now).
        self.forward_passes += math.ceil(count / self.evaluator.chunk_size(self.inputs, count))
        if step is not None:
            step(count)
        return out

    def evaluate(self, mode: str, masks: Mapping[str, Tensor],
                 step: Optional[Callable[[int], None]] = None) -> Tensor:
        return (self.sequential if mode == "sequential" else self.batched)(masks, step)


def _count(masks: Mapping[str, Tensor]) -> int:
    return int(next(iter(masks.values())).shape[0])


# -- inputs and options ---------------------------------------------------------------------------


def _calibration(data, who: str) -> tuple[Tensor, Tensor]:
    """The ``(inputs, targets)`` tensors of ``data``; a dict of inputs with one tensor (a
    transformers ``{"input_ids": ...}``) is unwrapped, as the evaluators call ``model(inputs)``."""
    if data is None:
        raise InvalidOptionError(f"{who} needs data=: (inputs, targets) tensors (token ids with "
                                 "(N, T) next-token targets, or features with class targets)")
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Mapping):
        if len(data[0]) != 1:
            raise InputMismatchError(f"{who}: inputs given as a dict must hold one tensor (the "
                                     f"model's first argument); got keys {sorted(data[0])}")
        data = (next(iter(data[0].values())), data[1])
    return data_tensors(data)


def _on_model_device(model: nn.Module, inputs: Tensor, targets: Tensor) -> tuple[Tensor,
                                                                                   Tensor]:
    parameter = next(model.parameters(), None)
    device = inputs.device if parameter is None else parameter.device
    return inputs.to(device), targets.to(device)


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidOptionError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _open_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0.0 < float(value) < 1.0:
        raise InvalidOptionError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def _rebased(layout: UnitLayout, work: nn.Module) -> UnitLayout:
    """``layout`` on a deep copy ``work`` of its model (slices and keys are names; only the
    module references change), so the trace is not run twice."""
    return UnitLayout(layout.granularity, [
        dataclasses.replace(g, module=work.get_submodule(g.name) if g.name else work, root=work)
        for g in layout.groups])


def _masks_for(layout: UnitLayout, masks: Mapping[str, Tensor]) -> tuple[UnitLayout,
                                                                          dict[str, Tensor]]:
    """The groups ``masks`` names (checked: known keys, bool (K, units), one K) and the masks."""
    if not isinstance(masks, Mapping) or not masks:
        raise InvalidOptionError("masks must be a non-empty mapping score key -> bool "
                                 "(sub-models, units) tensor (True = removed)")
    groups = {g.param_name: g for g in layout.groups}
    unknown = [k for k in masks if k not in groups]
    if unknown:
        raise InputMismatchError(f"masks has unknown score key(s) {unknown}; the model's unit "
                                 f"groups are: {', '.join(groups)}")
    counts = set()
    for key, m in masks.items():
        if not isinstance(m, Tensor) or m.dtype != torch.bool or m.dim() != 2 or \
                m.shape[1] != groups[key].num_units:
            shape = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise InputMismatchError(f"masks[{key!r}] must be a bool (sub-models, "
                                     f"{groups[key].num_units}) tensor, got {shape}")
        counts.add(int(m.shape[0]))
    if len(counts) != 1 or 0 in counts:
        raise InputMismatchError(f"every mask needs the same, non-zero number of sub-models; got "
                                 f"{sorted(counts)}")
    chosen = [g for g in layout.groups if g.param_name in masks]
    return UnitLayout(layout.granularity, chosen), {g.param_name: masks[g.param_name].cpu()
                                                    for g in chosen}


def _schedule(layout: UnitLayout, target_fraction: float, rounds: int) -> list[int]:
    """Units removed in each round: ``floor(target_fraction * units)`` spread evenly."""
    total = layout.total
    removable = total - len(layout.groups)  # every group keeps its last unit
    target = math.floor(target_fraction * total)
    if target > removable:
        raise InvalidOptionError(
            f"target_fraction={target_fraction} would remove {target} of {total} units, but each "
            f"of the {len(layout.groups)} groups keeps one unit (at most {removable})")
    if target < rounds:
        raise InvalidOptionError(
            f"target_fraction={target_fraction} removes {target} of {total} units, fewer than "
            f"rounds={rounds}; lower rounds or raise target_fraction")
    return [(target * (r + 1)) // rounds - (target * r) // rounds for r in range(rounds)]


# -- sampling and fitting -------------------------------------------------------------------------


def _sample(alive: dict[str, Tensor], candidate: dict[str, bool], count: int, probability: float,
            sampling: str, generator: torch.Generator) -> dict[str, Tensor]:
    """Score key -> bool (count, units) removal masks over the candidate groups' survivors."""
    out = {}
    for key, live in alive.items():
        if not candidate[key]:
            out[key] = torch.zeros(count, live.numel(), dtype=torch.bool)
            continue
        draws = torch.rand(count, live.numel(), generator=generator, dtype=torch.float64)
        if sampling == "independent":
            out[key] = (draws < probability) & live
        else:  # Bonsai's get_random_mask: int(p * alive) + 1 survivors, without replacement
            survivors = int(live.sum())
            drop = min(int(probability * survivors) + 1, survivors - 1)
            draws[:, ~live] = math.inf
            picked = draws.argsort(dim=1, stable=True)[:, :drop]
            mask = torch.zeros(count, live.numel(), dtype=torch.bool)
            mask.scatter_(1, picked, True)
            out[key] = mask
    return out


def _kendall_tau(a: Tensor, b: Tensor) -> float:
    """Kendall's tau-b of two 1-d tensors (NaN when either is constant): what Bonsai's
    ``scipy.stats.kendalltau`` selects lambda by."""
    i, j = torch.triu_indices(a.numel(), a.numel(), 1)
    sa, sb = torch.sign(a[i] - a[j]), torch.sign(b[i] - b[j])
    norm = math.sqrt(float((sa != 0).sum()) * float((sb != 0).sum()))
    return float((sa * sb).sum()) / norm if norm > 0 else math.nan


def _lipschitz(x: Tensor) -> float:
    """The Lipschitz constant ``2 ||x||_2^2 / n`` of the gradient of ``(1/n) ||y - x b||^2``."""
    return 2.0 * float(torch.linalg.matrix_norm(x, ord=2)) ** 2 / x.shape[0]


def _l1_regression(x: Tensor, y: Tensor, weight: float,
                   lipschitz: Optional[float] = None) -> Tensor:
    """``argmin_b (1/n) ||y - x b||^2 + weight ||b||_1`` for centered float64 ``x`` (n, p) and
    ``y`` (n,): FISTA (Beck & Teboulle 2009) from zero, at most ``_FISTA_STEPS`` steps (with
    n << p and a small weight it converges slowly; Bonsai's Adam takes fewer); weight 0: the
    minimum-norm least-squares solution (pseudo-inverse), where gradient descent from zero
    converges.
    ``lipschitz``: :func:`_lipschitz` of ``x`` when already known."""
    if weight == 0.0 or x.shape[1] == 0:
        return torch.linalg.pinv(x) @ y
    lipschitz = _lipschitz(x) if lipschitz is None else lipschitz
    beta = torch.zeros(x.shape[1], dtype=x.dtype)
    if lipschitz == 0.0:
        return beta  # a constant design: nothing to explain
    n = x.shape[0]
    z, t = beta, 1.0
    threshold = weight / lipschitz
    for _ in range(_FISTA_STEPS):
        moved = z - ((2.0 / n) * (x.T @ (x @ z - y))) / lipschitz
        new = torch.sign(moved) * (moved.abs() - threshold).clamp_min(0.0)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        z = new + ((t - 1.0) / t_next) * (new - beta)
        done = float((new - beta).abs().max()) <= _FISTA_TOLERANCE * max(
            1e-12, float(new.abs().max()))
        beta, t = new, t_next
        if done:
            break
    return beta


def _fit(keep: Tensor, quality: Tensor, l1_weights: Sequence[float],
         folds: int) -> tuple[Tensor, float, float]:
    """(coefficients (p,), chosen lambda, its mean held-out Kendall tau) of the regression of
    ``quality`` (n,) on the keep-indicators ``keep`` (n, p), lambda by ``folds``-fold
    cross-validation on contiguous blocks as Bonsai's ``split_train_test`` makes them (the
    training sub-models' means center both sides)."""
    n = keep.shape[0]
    folds = min(folds, n // 2)  # a held-out block of one sub-model has no tau
    weights = list(l1_weights)
    best_weight, best_tau = min(weights), math.nan
    if len(weights) > 1 and folds >= 2:
        block = n // folds
        taus: dict[float, list[float]] = {w: [] for w in weights}
        for fold in range(folds):
            held = torch.zeros(n, dtype=torch.bool)
            held[fold * block:(fold + 1) * block] = True
            x, y = keep[~held], quality[~held]
            x_mean, y_mean = x.mean(0), y.mean()
            x, y = x - x_mean, y - y_mean
            # One spectral norm per fold serves every lambda.
            lipschitz = _lipschitz(x) if any(w > 0 for w in weights) and x.shape[1] else None
            for weight in weights:
                beta = _l1_regression(x, y, weight, lipschitz)
                taus[weight].append(_kendall_tau((keep[held] - x_mean) @ beta,
                                                 quality[held] - y_mean))
        best = -math.inf
        for weight in weights:  # the first of equals wins, as in Bonsai's grid loop
            tau = sum(taus[weight]) / folds
            if not math.isnan(tau) and tau > best:
                best, best_weight, best_tau = tau, weight, tau
    beta = _l1_regression(keep - keep.mean(0), quality - quality.mean(), best_weight)
    return beta, float(best_weight), best_tau


def _quality(losses: Tensor, metric: str) -> Tensor:
    """``-metric`` of each sub-model: minus the perplexity (capped, as Bonsai's ``INF``) or
    minus the loss (capped at the same point)."""
    if bool(torch.isnan(losses).any()):
        raise NonFiniteError(f"{int(torch.isnan(losses).sum())} sub-model loss(es) are NaN: the "
                             "model's outputs overflow or the data holds non-finite values")
    capped = losses.clamp_max(math.log(PERPLEXITY_CAP))
    return -(capped.exp() if metric == "perplexity" else capped)


# -- the baseline ---------------------------------------------------------------------------------


def bonsai(model: nn.Module, granularity: str = "structured", include=None, exclude=None, *,
           data=None, submodels: int = 200, rounds: int = 10, target_fraction: float = 0.5,
           submodel_fraction: Optional[float] = None, sampling: str = "independent",
           metric: str = "perplexity", l1_weights: Sequence[float] = DEFAULT_L1_WEIGHTS,
           folds: int = 5, evaluation: str = "sequential", backend: str = "auto",
           memory_budget: int = 512 * 2**20, calibration_examples: Optional[int] = None,
           seed: int = 0, progress: bool = True, example_inputs: Any = None) -> BonsaiScores:
    """Bonsai scores of ``model``'s structured units (higher = keep); see the module docstring.

    Args:
        model: the trained model (not changed; a copy is evaluated and pruned).
        granularity: ``"structured"`` only (sub-models remove whole unit groups' units).
        include, exclude: unit groups, as for :func:`bingo.units.find_units`.
        data: the calibration batch, ``(inputs, targets)`` tensors or a TensorDataset; token ids
            with ``(N, T)`` next-token targets, or features with class targets. A dict of inputs
            holding one tensor is unwrapped.
        submodels: sub-models sampled and evaluated per round (Bonsai's ``masks_per_iter``,
            default 200); at least 2.
        rounds: pruning rounds (Bonsai: ``sparsity_ratio / prune_frac`` = 0.5 / 0.05 = 10).
        target_fraction: share of the units removed after all rounds, in (0, 1).
        submodel_fraction: p, each survivor's removal probability in a sub-model; default
            ``target_fraction / rounds`` (Bonsai's ``prune_frac``).
        sampling: ``"independent"`` (each survivor removed with probability p) or ``"fixed"``
            (Bonsai's exactly ``int(p * alive) + 1`` survivors per group).
        metric: ``"perplexity"`` (Bonsai: minus ``exp`` of the mean cross-entropy is regressed)
            or ``"loss"`` (minus the mean cross-entropy).
        l1_weights: the lambda grid of the L1 penalty (Bonsai's ``[1e2, 1e-4, 0]``), chosen by
            cross-validation; one value: no cross-validation.
        folds: cross-validation folds (Bonsai: 5); reduced to ``submodels // 2`` when larger.
        evaluation: ``"sequential"`` (one sub-model per forward pass, as Bonsai) or
            ``"batched"`` (bingo's batched evaluation); the same masks and losses either way.
        backend: bingo_kernels backend of the evaluator.
        memory_budget: bytes one batched pass may use.
        calibration_examples: evaluate on a seeded random subset of this many examples of
            ``data`` (Bonsai's ``nsamples``, 32 sequences); None: all of ``data``.
        seed: seed of the sub-model sampling (a torch.Generator) and of the subset.
        progress: tqdm bar over the sub-models.
        example_inputs: what the structure trace runs; default one example of ``data``.

    Returns:
        :class:`BonsaiScores`: ``{score key: float32 (units,)}`` ranks of the elimination order,
        with ``.result`` (:class:`BonsaiResult`).
    """
    started = time.perf_counter()
    unsupported_granularity("bonsai", granularity, ("structured",),
                            "its sub-models remove structured units: heads, neurons with their "
                            "consumers' columns, channels")
    require_option("evaluation", evaluation, EVALUATIONS)
    require_option("metric", metric, METRICS)
    require_option("sampling", sampling, SAMPLINGS)
    _positive_int("submodels", submodels, 2)
    _positive_int("rounds", rounds)
    _positive_int("folds", folds)
    target_fraction = _open_fraction("target_fraction", target_fraction)
    probability = target_fraction / rounds if submodel_fraction is None else \
        _open_fraction("submodel_fraction", submodel_fraction)
    weights = _l1_weights(l1_weights)
    _positive_int("memory_budget", memory_budget)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidOptionError(f"seed must be an integer, got {seed!r}")
    if calibration_examples is not None:
        _positive_int("calibration_examples", calibration_examples)
    inputs, targets = _calibration(data, "baseline 'bonsai'")
    if calibration_examples is not None:
        inputs, targets = evidence_batch((inputs, targets), calibration_examples, seed)
    check_evidence(model, inputs, targets)
    inputs, targets = _on_model_device(model, inputs, targets)
    layout = find_units(model, "structured", include, exclude,
                        example_inputs=inputs[:1] if example_inputs is None else example_inputs)
    check_unpruned(model, layout)
    per_round = _schedule(layout, target_fraction, rounds)

    work = copy.deepcopy(model).eval()
    layout = _rebased(layout, work)
    keys = [g.param_name for g in layout.groups]
    engine = _SubmodelEvaluator(work, layout, inputs, targets, backend=backend,
                                memory_budget=memory_budget)
    result = BonsaiResult(evaluations=0, forward_passes=0, tokens_evaluated=0,
                          evaluation_seconds=0.0, total_seconds=0.0, rounds=rounds,
                          mode=evaluation, metric=metric, sampling=sampling,
                          dense_loss=engine.removals.loss)
    alive = {g.param_name: torch.ones(g.num_units, dtype=torch.bool) for g in layout.groups}
    counts = {k: torch.zeros(a.numel(), dtype=torch.long) for k, a in alive.items()}
    last = {k: torch.full((a.numel(),), math.nan, dtype=torch.float64) for k, a in alive.items()}
    order: list[tuple[str, int]] = []
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(total=rounds * submodels, desc="bingo bonsai", unit="sub-model",
               disable=not progress)
    index = {k: i for i, k in enumerate(keys)}
    with bar:
        for r, removing in enumerate(per_round):
            bar.set_postfix_str(f"round {r + 1}/{rounds}")
            candidate = {k: int(a.sum()) >= 2 for k, a in alive.items()}
            masks = _sample(alive, candidate, submodels, probability, sampling, generator)
            losses = engine.evaluate(evaluation, masks, bar.update)
            quality = _quality(losses, metric)
            columns = [(k, alive[k].nonzero().flatten()) for k in keys if candidate[k]]
            keep = torch.cat([(~masks[k][:, units]).double() for k, units in columns], dim=1)
            beta, weight, tau = _fit(keep, quality, weights, folds)

            importance = {k: torch.full((a.numel(),), math.nan, dtype=torch.float64)
                          for k, a in alive.items()}
            owners: list[tuple[str, int]] = []
            offset = 0
            for k, units in columns:
                values = beta[offset:offset + units.numel()]
                importance[k][units] = values
                last[k][units] = values
                owners.extend((k, int(u)) for u in units)
                offset += units.numel()
            for k, m in masks.items():
                counts[k] += m.sum(0)

            removed = _lowest(beta, owners, alive, removing)
            order.extend(removed)
            engine.removals.remove([(index[k], u) for k, u in removed])
            for k, u in removed:
                alive[k][u] = False
            by_group = {k: torch.tensor([u for kk, u in removed if kk == k], dtype=torch.long)
                        for k in keys}
            result.history.append(BonsaiRound(
                removal_probability=probability, importance=importance, removed=by_group,
                l1_weight=weight, cv_tau=tau, loss_after=engine.removals.loss))

    scores = _ranks(layout, order, alive, last)
    result.evaluations = engine.evaluations
    result.forward_passes = engine.forward_passes
    result.tokens_evaluated = engine.evaluations * int(targets.numel())
    result.evaluation_seconds = engine.seconds
    result.removal_counts = counts
    result.path = engine.evaluator.path if engine.batched_used else None
    result.total_seconds = time.perf_counter() - started
    out = BonsaiScores({k: v.to(g.device) for (k, v), g in zip(scores.items(), layout.groups)},
                       "structured")
    out.result = result
    return out


def _l1_weights(l1_weights) -> list[float]:
    try:
        weights = [float(w) for w in l1_weights]
    except (TypeError, ValueError):
        raise InvalidOptionError(f"l1_weights must be a sequence of numbers >= 0, got "
                                 f"{l1_weights!r}") from None
    if not weights or not all(w >= 0.0 and math.isfinite(w) for w in weights):
        raise InvalidOptionError(f"l1_weights must be a non-empty sequence of finite numbers "
                                 f">= 0, got {l1_weights!r}")
    return weights


def _lowest(beta: Tensor, owners: list[tuple[str, int]], alive: dict[str, Tensor],
            count: int) -> list[tuple[str, int]]:
    """The ``count`` candidates with the lowest coefficients (lowest first; ties in unit order),
    skipping any that would remove the last unit of its group."""
    spare = {k: int(a.sum()) - 1 for k, a in alive.items()}
    chosen = []
    for j in torch.argsort(beta, stable=True).tolist():
        if len(chosen) == count:
            break
        key, unit = owners[j]
        if spare[key] > 0:
            spare[key] -= 1
            chosen.append((key, unit))
    return chosen


def _ranks(layout: UnitLayout, order: list[tuple[str, int]], alive: dict[str, Tensor],
           last: dict[str, Tensor]) -> dict[str, Tensor]:
    """float32 ranks (0 = first removed): the removal order, then the survivors by their last
    coefficient; a unit that never was a candidate (the only unit of its group) ranks highest."""
    ranks = {g.param_name: torch.zeros(g.num_units, dtype=torch.float32) for g in layout.groups}
    for rank, (key, unit) in enumerate(order):
        ranks[key][unit] = float(rank)
    survivors = []
    for position, g in enumerate(layout.groups):
        for unit in alive[g.param_name].nonzero().flatten().tolist():
            value = float(last[g.param_name][unit])
            survivors.append((math.inf if math.isnan(value) else value, position, unit))
    survivors.sort()
    for rank, (_, position, unit) in enumerate(survivors, start=len(order)):
        ranks[layout.groups[position].param_name][unit] = float(rank)
    return ranks


# -- evaluating given sub-models ------------------------------------------------------------------


def _engine_for(model: nn.Module, data, masks, example_inputs, backend: str, memory_budget: int,
                who: str) -> tuple[_SubmodelEvaluator, dict[str, Tensor]]:
    inputs, targets = _calibration(data, who)
    check_evidence(model, inputs, targets)
    _positive_int("memory_budget", memory_budget)
    inputs, targets = _on_model_device(model, inputs, targets)
    layout = find_units(model, "structured",
                        example_inputs=inputs[:1] if example_inputs is None else example_inputs)
    check_unpruned(model, layout)
    layout, masks = _masks_for(layout, masks)
    work = copy.deepcopy(model).eval()
    engine = _SubmodelEvaluator(work, _rebased(layout, work), inputs, targets, backend=backend,
                                memory_budget=memory_budget)
    return engine, masks


def submodel_losses(model: nn.Module, data, masks: Mapping[str, Tensor], *,
                    evaluation: str = "sequential", example_inputs: Any = None,
                    backend: str = "auto", memory_budget: int = 512 * 2**20) -> Tensor:
    """float64 (K,) mean cross-entropy of each sub-model ``k`` of ``model`` on ``data``: the model
    with the units ``masks[key][k]`` (score key -> bool (K, units), True = removed) zeroed, as
    :func:`bonsai` evaluates them (``evaluation="sequential"`` or ``"batched"``). The model is
    not changed."""
    require_option("evaluation", evaluation, EVALUATIONS)
    engine, masks = _engine_for(model, data, masks, example_inputs, backend, memory_budget,
                                "submodel_losses")
    return engine.evaluate(evaluation, masks)


def sample_submodels(layout: UnitLayout, submodels: int, fraction: float, *,
                     sampling: str = "independent", seed: int = 0) -> dict[str, Tensor]:
    """Bool (submodels, units) removal masks per group of ``layout`` (True = removed), drawn as
    :func:`bonsai` draws its first round's (``fraction`` = p); for :func:`compare_evaluation`."""
    _positive_int("submodels", submodels)
    fraction = _open_fraction("fraction", fraction)
    require_option("sampling", sampling, SAMPLINGS)
    alive = {g.param_name: torch.ones(g.num_units, dtype=torch.bool) for g in layout.groups}
    candidate = {k: a.numel() >= 2 for k, a in alive.items()}
    return _sample(alive, candidate, submodels, fraction, sampling,
                   torch.Generator().manual_seed(seed))


def compare_evaluation(model: nn.Module, data, masks: Mapping[str, Tensor], *, repeats: int = 1,
                       example_inputs: Any = None, backend: str = "auto",
                       memory_budget: int = 512 * 2**20) -> dict:
    """Evaluate the same sub-models one at a time (Bonsai's loop) and batched (bingo), and time
    both: what a benchmark reports as "batched vs one at a time on the same sub-models".

    ``masks``: score key -> bool (K, units) removal masks (True = removed; e.g. from
    :func:`sample_submodels`); groups not named remove nothing and are not patched. Each mode runs
    once untimed first (the batched evaluator chooses its path, buffers are allocated), then
    ``repeats`` timed times; the best time of each is reported.

    Returns a dict: ``submodels`` (K), ``repeats``, ``sequential_seconds``,
    ``batched_seconds``, ``sequential_per_second``, ``batched_per_second`` (sub-models per
    second), ``speedup`` (batched / sequential sub-models per second), ``max_abs_difference``
    (of the two modes' losses), ``sequential_forward_passes``, ``batched_forward_passes`` (per
    evaluation of the K sub-models), ``path`` (the batched evaluator's), and the float64 (K,)
    ``sequential_losses`` and ``batched_losses``.
    """
    _positive_int("repeats", repeats)
    engine, masks = _engine_for(model, data, masks, example_inputs, backend, memory_budget,
                                "compare_evaluation")
    count = _count(masks)
    timed: dict[str, tuple[float, int, Tensor]] = {}
    for mode in EVALUATIONS:
        engine.evaluate(mode, {k: m[:min(2, count)] for k, m in masks.items()})  # warm-up
        best, passes, losses = math.inf, 0, None
        for _ in range(repeats):
            engine.reset_counters()
            losses = engine.evaluate(mode, masks)
            best, passes = min(best, engine.seconds), engine.forward_passes
        timed[mode] = (best, passes, losses)
    (seq_s, seq_passes, seq_losses), (bat_s, bat_passes, bat_losses) = \
        timed["sequential"], timed["batched"]
    seq_rate, bat_rate = count / max(seq_s, 1e-12), count / max(bat_s, 1e-12)
    return {
        "submodels": count, "repeats": repeats,
        "sequential_seconds": seq_s, "batched_seconds": bat_s,
        "sequential_per_second": seq_rate, "batched_per_second": bat_rate,
        "speedup": bat_rate / seq_rate,
        "max_abs_difference": float((seq_losses - bat_losses).abs().max()),
        "sequential_forward_passes": seq_passes, "batched_forward_passes": bat_passes,
        "path": engine.evaluator.path,
        "sequential_losses": seq_losses, "batched_losses": bat_losses,
    }


__all__ = ["BonsaiResult", "BonsaiRound", "BonsaiScores", "bonsai", "compare_evaluation",
           "sample_submodels", "submodel_losses"]
