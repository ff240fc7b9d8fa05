"""The one-shot pruning criteria the experiment compares, as a registry.

Each entry turns the trained model and what training recorded (:class:`TrainedRun`) into a score
dict (higher = keep) for one granularity. BINGO's own rankings come from the ticket searches that
rode along with training (main setting and ablations); they are added by the runner, not here.
IMP is not one-shot: the runner runs it separately (:mod:`bingo.baselines.imp`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from torch import Tensor, nn
    from torch.utils.data import TensorDataset

Scores = dict[str, "Tensor"]


def baseline_scores(name: str, model: nn.Module, granularity: str, **options: Any) -> Scores:
    """:func:`bingo.baselines.baseline_scores`, imported on the first call: this registry's
    names are the command line's choices, which must not wait for torch."""
    from bingo.baselines import baseline_scores as scores

    return scores(name, model, granularity, **options)


@dataclass
class TrainedRun:
    """The trained model and what the criteria need from its training run."""

    model: nn.Module
    """The trained dense model (never modified by a criterion)."""
    initial_state: dict
    """Parameter name -> weights at initialisation (W0)."""
    taylor: dict = field(default_factory=dict)
    """Granularity -> TaylorAccumulator that was attached during training."""
    score_data: TensorDataset = None
    """Training images on which data-driven criteria evaluate the final weights (Shapley)."""
    seed: int = 0
    """Seed of the run (random baseline, Shapley hash)."""
    shapley_samples: int = 1024
    """Coalitions evaluated by the Shapley baseline."""
    refit: dict = field(default_factory=dict)
    """Options of the ``+ls`` criteria's :class:`bingo.LeastSquaresReconstruction`."""
    train_data: TensorDataset = None
    """The whole training split: the evidence of the targeted search is drawn from it."""


Criterion = Callable[[TrainedRun, str], Scores]


def _targeted(run, granularity: str, **options) -> Scores:
    """The targeted search on the run's training data; its own progress bar stays off under
    the harness's (``--no-progress`` silences both)."""
    return baseline_scores("targeted", run.model, granularity, data=run.train_data,
                           seed=run.seed, progress=False, **options)


def _neuron_only(granularity: str) -> str:
    from bingo.errors import InvalidOptionError

    if granularity != "neuron":
        raise InvalidOptionError(f"this targeted variant exists for neurons only, not "
                                 f"{granularity!r}")
    return granularity


CRITERIA: dict[str, Criterion] = {
    "magnitude": lambda run, g: baseline_scores("magnitude", run.model, g),
    "lamp": lambda run, g: baseline_scores("lamp", run.model, g),
    "magnitude-increase": lambda run, g: baseline_scores(
        "magnitude_increase", run.model, g, initial=run.initial_state),
    "taylor": lambda run, g: baseline_scores("taylor", run.model, g,
                                             accumulator=run.taylor[g]),
    "shapley": lambda run, g: baseline_scores(
        "shapley", run.model, g, data=run.score_data.tensors, samples=run.shapley_samples,
        seed=run.seed),
    "random": lambda run, g: baseline_scores("random", run.model, g, seed=run.seed),
    "lamp-taylor": lambda run, g: baseline_scores("lamp_taylor", run.model, g,
                                                  accumulator=run.taylor[g]),
    # The targeted search (bingo.targeted) as first measured: greedy elimination for neurons /
    # channels (the default), searched per-layer allocation for weights (named here: the weight
    # default is now the iterative refit, "targeted-iterative").
    "targeted": lambda run, g: _targeted(
        run, g, search={"neuron": "elimination", "weight": "allocation"}[g]),
    # Its measured design choices (neuron granularity only): every unit re-measured every step
    # instead of the lazy short list, no joint check, and the accuracy as damage measure.
    "targeted-exhaustive": lambda run, g: _targeted(run, _neuron_only(g), lazy=0),
    "targeted-no-joint": lambda run, g: _targeted(run, _neuron_only(g), joint_check=False),
    "targeted-accuracy": lambda run, g: _targeted(run, _neuron_only(g), metric="accuracy"),
    # Damage per multiply-add saved instead of per unit: for nets whose layers differ in cost
    # per unit (LeNet-5's conv channels and fc neurons).
    "targeted-macs": lambda run, g: _targeted(run, _neuron_only(g), saving="macs"),
    # Refit the working model by least squares every 8 steps of the elimination (measured with
    # the reconstructed prune, "targeted-refit+ls").
    "targeted-refit": lambda run, g: _targeted(run, _neuron_only(g), refit_every=8),
    # IMP's schedule with a least-squares refit in place of each retraining (ranked by LAMP for
    # weights, by layer-normalised magnitude for neurons).
    "targeted-iterative": lambda run, g: _targeted(
        run, g, search="iterative", ranking="lamp" if g == "weight" else "magnitude"),
}
"""Criterion name -> ``(run, granularity) -> scores``; the tables list them in this order."""


class ReconstructedScores(dict):
    """A criterion's scores together with the reconstruction every prune of them applies
    (``reconstruct``, passed to :func:`bingo.prune` by :mod:`bingo.experiment.measure`); the
    search result of a targeted criterion stays reachable as ``result``."""

    def __init__(self, scores: Scores, reconstruct):
        super().__init__(scores)
        self.reconstruct = reconstruct
        self.result = getattr(scores, "result", None)


def _least_squares(criterion: Criterion) -> Criterion:
    def reconstructed(run: TrainedRun, granularity: str) -> Scores:
        from bingo.reconstruct import LeastSquaresReconstruction

        return ReconstructedScores(criterion(run, granularity), LeastSquaresReconstruction(
            run.train_data, seed=run.seed, **run.refit))
    return reconstructed


RECONSTRUCTED = ("magnitude", "lamp", "taylor", "targeted", "targeted-macs", "targeted-refit",
                 "targeted-iterative")
"""Criteria also measured with least-squares reconstruction (:mod:`bingo.reconstruct`, on the
training split) as ``"<name>+ls"``: the same masks, the surviving weights refitted to the dense
layer outputs. Measuring it for the baselines too tells what the search adds and what the refit
adds."""
CRITERIA.update({f"{name}+ls": _least_squares(CRITERIA[name]) for name in RECONSTRUCTED})

ONLY_AT: dict[str, tuple[str, ...]] = {
    **{name: ("neuron",) for name in ("targeted-exhaustive", "targeted-no-joint",
                                      "targeted-accuracy", "targeted-macs", "targeted-refit")},
    "targeted-iterative": ("weight", "neuron")}
"""Criteria that exist at some granularities only (the runner skips them elsewhere); every other
criterion applies to all. A ``"+ls"`` criterion exists where its base does."""
ONLY_AT.update({f"{name}+ls": ONLY_AT[name] for name in RECONSTRUCTED if name in ONLY_AT})


def applies(name: str, granularity: str) -> bool:
    """Whether criterion ``name`` is measured at ``granularity``."""
    return granularity in ONLY_AT.get(name, (granularity,))


TRAINING_HOOKED = ("taylor", "lamp-taylor")
TRAINING_HOOKED += tuple(f"{name}+ls" for name in RECONSTRUCTED if name in TRAINING_HOOKED)
"""Criteria whose evidence is gathered by hooks inside the training steps (their cost is part of
the measured training time; the report measures it apart, see ``runner._hook_overhead``)."""
