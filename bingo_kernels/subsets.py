"""Descriptions of a block of subsets, passed to the ops instead of K x P mask tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from .errors import InputMismatchError, require_option
from .hashing import check_u32, check_units, subset_mask

GRANULARITIES = ("neuron", "weight")


@dataclass(frozen=True)
class SubsetMasks:
    """Hashed subset masks for one layer: subsets ``k_start .. k_start+num_subsets-1`` of a search.

    Nothing of size K x P exists: every backend regenerates the masks from these numbers with the
    specification in :func:`bingo_kernels.hashing.subset_mask`.
    """

    seed: int
    """Seed of the whole ticket search (uint32)."""
    search: int
    """Index of this search among all searches run so far (uint32)."""
    k_start: int
    """Global index of the first subset in this block (uint32); blocks of one search tile k."""
    num_subsets: int
    """Number of subsets in this block (the K of the op's output)."""
    unit_offset: int
    """Global index of this layer's first unit in the model's unit layout (uint64)."""
    prob: Union[float, torch.Tensor]
    """Inclusion probability: a scalar, or one float32 value per unit of this layer."""
    granularity: str = "weight"
    """``"neuron"``: a unit is an output row (with its bias entry); ``"weight"``: an element."""

    def __post_init__(self):
        require_option("granularity", self.granularity, GRANULARITIES)
        for name in ("seed", "search", "k_start"):
            check_u32(name, getattr(self, name))
        if self.num_subsets < 1:
            raise InputMismatchError(f"num_subsets must be >= 1, got {self.num_subsets}")
        check_units(self.unit_offset, 0)
        if not isinstance(self.prob, torch.Tensor):
            if not 0.0 <= float(self.prob) <= 1.0:
                raise InputMismatchError(f"inclusion probability must be in [0, 1], got {self.prob}")
        elif self.prob.numel() and not bool(((self.prob >= 0) & (self.prob <= 1)).all()):
            raise InputMismatchError("per-unit inclusion probabilities must all lie in [0, 1]")

    def materialize(self, num_units: int, device=None, k_start: int | None = None,
                    num_subsets: int | None = None) -> torch.Tensor:
        """Bool masks ``(num_subsets, num_units)`` (or a sub-block of k): True = reset."""
        return subset_mask(
            self.seed,
            self.search,
            self.k_start if k_start is None else k_start,
            self.num_subsets if num_subsets is None else num_subsets,
            self.unit_offset,
            num_units,
            self.prob,
            device,
        )

    def scalar_prob(self) -> float:
        """The scalar probability (``-1.0`` when probabilities are per unit), for op arguments."""
        return -1.0 if isinstance(self.prob, torch.Tensor) else float(self.prob)

    def prob_tensor(self):
        """The per-unit probability tensor as float32, or None for a scalar probability."""
        if isinstance(self.prob, torch.Tensor):
            return self.prob.detach().reshape(-1).to(torch.float32)
        return None
