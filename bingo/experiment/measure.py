"""What the harness measures of one ranking: floors, accuracy curve, fine-tuning, IMP overlap.

A *ranking* is a score dict in the format of :meth:`bingo.TicketSearch.significance` (higher =
keep). Everything here prunes a copy of the trained model with :func:`bingo.prune`; the model
itself never changes.
"""

from __future__ import annotations

import copy
import time
import warnings
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import bingo
from bingo.pruning import median_seconds_interleaved
from bingo.targeted.shrink import shrink_sequential
from bingo.training import accuracy, train


def pruned_at(model: nn.Module, scores: Mapping[str, Tensor], sparsity: float
              ) -> bingo.PruneResult:
    """``model`` with exactly ``sparsity`` of its scored units pruned (never-sampled units may go:
    the report counts them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bingo.prune(model, scores, sparsity=sparsity, allow_unsampled=True,
                           structured=False, progress=False, reconstruct=_reconstruction(scores))


def _reconstruction(scores: Mapping[str, Tensor]):
    """The reconstruction a criterion asks every prune of its scores to apply (None: masks only;
    see :class:`bingo.experiment.criteria.ReconstructedScores`)."""
    return getattr(scores, "reconstruct", None)


def floors(model: nn.Module, scores: Mapping[str, Tensor], dense_val: float,
           drops: Sequence[float], val: TensorDataset, test: TensorDataset,
           resolution: float = 0.0) -> dict[str, dict]:
    """For each drop: the largest sparsity whose validation accuracy stays >= dense - drop.

    Accuracy is not monotone in sparsity, so :func:`bingo.prune` evaluates a grid, then bisects
    inside the first failing cell, down to one unit or to ``resolution`` times the units; its
    whole evaluated curve is kept as ``history``.
    """
    tolerance = max(1, int(resolution * sum(v.numel() for v in scores.values())))
    out = {}
    for drop in drops:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = bingo.prune(model, scores, floor=dense_val - drop,
                                 eval_fn=lambda m: accuracy(m, val), allow_unsampled=True,
                                 structured=False, progress=False, tolerance=tolerance,
                                 reconstruct=_reconstruction(scores))
        seconds = time.perf_counter() - start
        out[f"{drop:g}"] = dict(sparsity=result.sparsity, val_accuracy=result.accuracy,
                                seconds=seconds,
                                test_accuracy=accuracy(result.model, test),
                                weight_sparsity=result.weight_sparsity,
                                pruned_units=result.pruned_units, history=result.history)
    return out


def curve(model: nn.Module, scores: Mapping[str, Tensor], sparsities: Sequence[float],
          test: TensorDataset) -> list[float]:
    """Test accuracy after one-shot pruning to each of ``sparsities``."""
    return [accuracy(pruned_at(model, scores, s).model, test) for s in sparsities]


def finetuned(model: nn.Module, scores: Mapping[str, Tensor], sparsities: Sequence[float],
              loader: DataLoader, epochs: int, lr: float, test: TensorDataset) -> dict[str, list]:
    """Test accuracy after each of ``epochs`` fine-tuning epochs, the mask held fixed.

    The pruned copy carries torch.nn.utils.prune masks, so Adam updates ``weight_orig`` and the
    pruned entries stay zero.
    """
    out = {}
    for sparsity in sparsities:
        pruned = pruned_at(model, scores, sparsity).model
        stats = train(pruned, loader, epochs, lr, progress=False,
                      on_epoch_end=lambda _epoch: accuracy(pruned, test))
        out[f"{sparsity:g}"] = stats.epoch_end
    return out


def pruned_sets(unit_masks: Mapping[str, Tensor]) -> Tensor:
    """The flat bool vector "unit was pruned" over all layers, in key order."""
    return torch.cat([~m.reshape(-1).cpu() for _, m in sorted(unit_masks.items())])


def overlap(pruned_a: Tensor, pruned_b: Tensor) -> dict[str, float]:
    """How far two pruned sets agree, each figure next to its level for independent random sets.

    ``share`` is the seed paper's "share of a's pruned units also pruned by b"; for a random ``a``
    it is b's sparsity. ``jaccard`` is |a ∩ b| / |a ∪ b|; for random sets of those sizes it is
    about E|a ∩ b| / (|a| + |b| - E|a ∩ b|) with E|a ∩ b| = |a| |b| / n.
    """
    n = pruned_a.numel()
    a, b = int(pruned_a.sum()), int(pruned_b.sum())
    both = int((pruned_a & pruned_b).sum())
    either = a + b - both
    expected_both = a * b / n
    expected_either = a + b - expected_both
    return dict(share=both / a if a else float("nan"), share_chance=b / n,
                jaccard=both / either if either else float("nan"),
                jaccard_chance=expected_both / expected_either if expected_either else float("nan"),
                pruned_a=a / n, pruned_b=b / n)


class IMPPrunedSets:
    """IMP's pruned set at any sparsity (units in the order IMP removed them: its scores),
    computed once per sparsity and shared by every method compared with it."""

    def __init__(self, model: nn.Module, imp_scores: Mapping[str, Tensor]):
        self.model, self.imp_scores, self._cache = model, imp_scores, {}

    def at(self, sparsity: float) -> Tensor:
        """The flat "pruned by IMP" vector at ``sparsity``."""
        if sparsity not in self._cache:
            self._cache[sparsity] = pruned_sets(
                pruned_at(self.model, self.imp_scores, sparsity).unit_masks)
        return self._cache[sparsity]


def imp_overlaps(model: nn.Module, scores: Mapping[str, Tensor], imp: IMPPrunedSets,
                 sparsities: Sequence[float]) -> dict[str, dict]:
    """Overlap of the one-shot pruned set with IMP's at each (equal) sparsity."""
    out = {}
    for sparsity in sparsities:
        if sparsity <= 0:
            continue
        mine = pruned_sets(pruned_at(model, scores, sparsity).unit_masks)
        out[f"{sparsity:g}"] = overlap(mine, imp.at(sparsity))
    return out


def state_accuracy(model: nn.Module, state: Mapping[str, Tensor], data: TensorDataset) -> float:
    """Accuracy of ``model``'s architecture with the plain state dict ``state`` loaded."""
    clone = copy.deepcopy(model)
    clone.load_state_dict(state)
    return accuracy(clone, data)


def structured(model: nn.Module, scores: Mapping[str, Tensor], floors_: Mapping[str, dict],
               config, test: TensorDataset) -> dict:
    """The physically smaller model at the first floor: parameters, its test accuracy (equal to
    the masked model's) and the measured inference speedup over the dense model (median of
    interleaved repeats, ``config.speedup_batch`` test images, this machine's threads)."""
    key = f"{config.floor_drops[0]:g}"
    pruned = pruned_at(model, scores, floors_[key]["sparsity"])
    small = shrink_sequential(pruned.model, pruned.unit_masks).eval()
    dense = copy.deepcopy(model).eval()
    batch = test.tensors[0][:config.speedup_batch]
    dense_s, small_s = median_seconds_interleaved([dense, small], batch)
    return dict(parameters=sum(p.numel() for p in small.parameters()),
                dense_parameters=sum(p.numel() for p in model.parameters()),
                test_accuracy=accuracy(small, test), dense_seconds=dense_s, seconds=small_s,
                speedup=dense_s / max(small_s, 1e-12), batch=int(batch.shape[0]))
