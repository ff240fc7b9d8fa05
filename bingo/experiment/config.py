"""Hyper-parameters of the MNIST experiment, and its ticket-search ablations.

Every number the harness reports comes from these fields; the report stores them all. Defaults
are the full run of docs/results.md; :data:`QUICK` shrinks it to a smoke test of every step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from bingo.choices import GRANULARITIES, MODELS

from .criteria import CRITERIA

SPLIT_FRACTIONS = (0.5, 0.1, 0.2, 0.2)
"""train / search / val / test fractions: 5000/1000/2000/2000 of the 10k official MNIST test
images (see :func:`bingo.experiment.splits.experiment_splits`)."""

MAIN_SEARCH = dict(subsets=64, fraction=0.05, score="attribution", metric="loss", reset="init")
"""The main BINGO setting (as `bingo demo`'s defaults); ablations change one thing at a time."""

ABLATIONS: dict[str, dict] = {
    # The seed paper's own setting (accuracy metric, its S formula in the intended direction),
    # and the formula taken literally: the "literal vs intended" pair.
    "seed-paper": dict(score="seed", metric="accuracy"),
    "seed-paper-literal": dict(score="seed", metric="accuracy", literal=True),
    "seed-score": dict(score="seed"),
    "metric=accuracy": dict(metric="accuracy"),
    "reset=zero": dict(reset="zero"),
    "reset=rewind": dict(reset="rewind"),
    "K=16": dict(subsets=16),
    "K=256": dict(subsets=256),
    "fraction=0.01": dict(fraction=0.01),
    "fraction=0.2": dict(fraction=0.2),
    "held-out-search-set": dict(search_data="search"),
}
"""Ablation name -> what it changes in :data:`MAIN_SEARCH` (``search_data="search"``: evaluate
on batches of the held-out search split instead of the training batch)."""


@dataclass
class ExperimentConfig:
    """Hyper-parameters of ``bingo experiment mnist``; each field is described below."""

    dataset: str = "mnist"
    """Dataset of bingo.data.DATASETS (``digits`` needs no files; the CI smoke test uses it)."""
    data_dir: Optional[str] = None
    """Directory of the MNIST IDX files (default: $BINGO_DATA, else download where possible)."""
    model: str = "lenet_300_100"
    """Architecture, a key of bingo.models.MODELS (``lenet5``: the conv net, channels as units)."""
    criteria: tuple[str, ...] = tuple(CRITERIA)
    """Names of :data:`bingo.experiment.CRITERIA` to measure (IMP and the ticket searches always
    run); a subset saves CPU time."""
    speedup_batch: int = 256
    """Batch size (test images) of the structured models' inference timing."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of the data split, initial weights, batch order and search hash; one full run each.
    Tables report mean ± std over them."""
    granularities: tuple[str, ...] = ("weight", "neuron")
    """Units pruned: each weight, and/or each hidden neuron."""
    epochs: int = 20
    """Training epochs of the dense run and of every IMP round (same schedule)."""
    batch_size: int = 64
    """Training and search batch size."""
    lr: float = 1e-3
    """Adam learning rate (training, IMP rounds, fine-tuning)."""
    every: dict = field(default_factory=lambda: {"weight": 20, "neuron": 4})
    """Search after every N-th training step, per granularity. A weight-granularity search costs
    ~80 training steps on the CPU (mask hashing), a neuron one ~4."""
    search: dict = field(default_factory=lambda: dict(MAIN_SEARCH))
    """The main BINGO setting: TicketSearch keyword arguments."""
    ablations: tuple[str, ...] = tuple(ABLATIONS)
    """Names of :data:`ABLATIONS` to run beside the main setting (on the same training run)."""
    ablation_seeds: Optional[int] = 1
    """Run ablations on the first N seeds only (None: all seeds). One by default: on 2 CPU cores
    the eleven weight-granularity ablation searches cost ~10 min per seed."""
    rewind_epochs: float = 1.0
    """``reset="rewind"`` and IMP's rewind point: the weights after this many epochs."""
    imp_rounds: dict = field(default_factory=lambda: {"weight": 18, "neuron": 18})
    """IMP rounds per granularity (20% of the remaining units per round: 18 rounds reach ~98%)."""
    imp_rewind: str = "init"
    """IMP rewinds survivors to ``"init"`` (W0, Frankle & Carbin 2019) or ``"rewind"`` (the
    weights after ``rewind_epochs``, Frankle et al. 2020)."""
    shapley_samples: int = 1024
    """Subsets evaluated by the Monte-Carlo Shapley baseline (zero reset, final weights)."""
    refit_samples: int = 4096
    """Training images the least-squares refit of the ``+ls`` criteria is fitted on."""
    refit_exact_features: int = 1024
    """The ``+ls`` refit solves each weight row exactly up to this many surviving inputs, and by
    SparseGPT's blocked update beyond (:class:`bingo.LeastSquaresReconstruction`)."""
    floor_resolution: float = 0.0
    """The floor search (grid, then bisection) stops when its cell is narrower than this share
    of the units (0: one unit, exact)."""
    floor_drops: tuple[float, ...] = (0.01, 0.005)
    """Accuracy floors: dense validation accuracy minus each of these."""
    sparsities: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
    """Sparsities of the accuracy-vs-sparsity curves (test split)."""
    report_sparsities: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.98)
    """Sparsities shown in the main table (a subset of ``sparsities``)."""
    finetune_sparsities: tuple[float, ...] = (0.9, 0.95, 0.98)
    """Sparsities at which every one-shot mask is fine-tuned (mask fixed)."""
    finetune_epochs: int = 2
    """Fine-tuning epochs; test accuracy is recorded after each."""
    out: str = "bingo-experiment"
    """Directory of results.json, results.md and the plots."""
    progress: bool = True
    """tqdm progress bars on stderr."""
    threads: Optional[int] = 1
    """torch intra-op threads (one: these small ops gain little from a second thread)."""
    quick: bool = False
    """Set by :func:`quick`; recorded so that a smoke run is never mistaken for a result."""

    def validate(self) -> None:
        """Raise InvalidOptionError naming the first bad value."""
        from bingo.errors import InvalidOptionError

        for name in ("epochs", "batch_size", "finetune_epochs", "shapley_samples",
                     "speedup_batch", "refit_samples", "refit_exact_features"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidOptionError(f"{name} must be a positive integer, got {value!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise InvalidOptionError(f"seeds must be distinct integers, got {self.seeds!r}")
        for granularity in self.granularities:
            if granularity not in GRANULARITIES:
                raise InvalidOptionError(
                    f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
            for name in ("every", "imp_rounds"):
                value = getattr(self, name).get(granularity)
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise InvalidOptionError(
                        f"{name}[{granularity!r}] must be a positive integer, got {value!r}")
        if self.model not in MODELS:
            raise InvalidOptionError(f"model {self.model!r} is not one of {', '.join(MODELS)}")
        unknown_criteria = [c for c in self.criteria if c not in CRITERIA]
        if unknown_criteria:
            raise InvalidOptionError(f"unknown criteria {unknown_criteria}; choose from "
                                     f"{', '.join(CRITERIA)}")
        unknown = [a for a in self.ablations if a not in ABLATIONS]
        if unknown:
            raise InvalidOptionError(
                f"unknown ablation(s) {unknown}; choose from {', '.join(ABLATIONS)}")
        if self.imp_rewind not in ("init", "rewind"):
            raise InvalidOptionError(f"imp_rewind must be 'init' or 'rewind', got "
                                     f"{self.imp_rewind!r}")
        if not self.rewind_epochs > 0:
            raise InvalidOptionError(f"rewind_epochs must be positive, got {self.rewind_epochs}")
        for name in ("sparsities", "report_sparsities", "finetune_sparsities"):
            values = getattr(self, name)
            if any(not 0.0 <= s < 1.0 for s in values):
                raise InvalidOptionError(f"{name} must lie in [0, 1), got {values}")
        missing = [s for s in self.report_sparsities if s not in self.sparsities]
        if missing:
            raise InvalidOptionError(f"report_sparsities {missing} are not in sparsities")
        if not 0.0 <= self.floor_resolution < 1.0:
            raise InvalidOptionError(f"floor_resolution must lie in [0, 1), got "
                                     f"{self.floor_resolution}")
        if any(not 0.0 <= d < 1.0 for d in self.floor_drops) or not self.floor_drops:
            raise InvalidOptionError(f"floor_drops must lie in [0, 1), got {self.floor_drops}")


QUICK = dict(seeds=(0,), epochs=2, every={"weight": 4, "neuron": 1},
             search=dict(MAIN_SEARCH, subsets=16), imp_rounds={"weight": 2, "neuron": 2},
             criteria=("magnitude", "lamp", "taylor", "random", "targeted+ls",
                       "targeted-iterative+ls"),
             sparsities=(0.0, 0.5, 0.9, 0.98), report_sparsities=(0.5, 0.9, 0.98),
             floor_drops=(0.01,), floor_resolution=0.005, refit_samples=1024,
             refit_exact_features=1, shapley_samples=64, finetune_epochs=1,
             finetune_sparsities=(0.9,), ablations=("seed-paper-literal", "held-out-search-set"),
             quick=True)
"""What ``--quick`` changes: every step of the harness (training with the searches, ablations,
criteria with and without the refit, IMP, fine-tuning, the report) in about 75 s of CPU time
(the defaults' ``--quick`` took 7.7 min of CPU): fewer criteria, sparsities and floors, a coarser
floor search and a cheaper refit. A smoke test, not a result."""


def quick(config: ExperimentConfig) -> ExperimentConfig:
    """``config`` with the :data:`QUICK` settings."""
    return dataclasses.replace(config, **QUICK)
