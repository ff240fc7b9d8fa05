"""The experiment's four disjoint splits of one dataset: train, search, val, test.

MNIST here is the official 10k *test* split only (the 60k training files are not on these
machines), divided by a seeded permutation into 5000 train / 1000 search / 2000 val / 2000 test
images (:data:`bingo.experiment.config.SPLIT_FRACTIONS`):

* train: every method trains (and every IMP round retrains) on it; ticket searches and Taylor
  accumulate on its batches.
* search: the held-out search set of the "search on a held-out set" ablation, never trained on.
* val: every threshold is chosen on it (accuracy floors, IMP's best round).
* test: only reported.

It is :func:`bingo.data.split_dataset`'s 60/20/20 split (so val and test are the demo's) with the
last sixth of its train part set aside as the search split.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import TensorDataset

from bingo.data import split_dataset

from .config import SPLIT_FRACTIONS


@dataclass
class ExperimentSplits:
    """Disjoint subsets of one dataset, chosen by one seed."""

    train: TensorDataset
    """Training images."""
    search: TensorDataset
    """Held-out search images (the search-set ablation only)."""
    val: TensorDataset
    """Validation images: all thresholds."""
    test: TensorDataset
    """Test images: reported only."""

    def sizes(self) -> dict[str, int]:
        """Split name -> number of images."""
        return {name: len(getattr(self, name)) for name in ("train", "search", "val", "test")}


def experiment_splits(dataset: TensorDataset, seed: int) -> ExperimentSplits:
    """Split ``dataset`` by ``seed`` as the module docstring describes."""
    train_frac, search_frac, val_frac, test_frac = SPLIT_FRACTIONS
    base = split_dataset(dataset, (train_frac + search_frac, val_frac, test_frac), seed)
    inputs, targets = base.train.tensors
    cut = round(len(targets) * train_frac / (train_frac + search_frac))
    return ExperimentSplits(train=TensorDataset(inputs[:cut], targets[:cut]),
                            search=TensorDataset(inputs[cut:], targets[cut:]),
                            val=base.val, test=base.test)
