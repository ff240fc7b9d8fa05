"""Random pruning scores: the floor any informed ranking must beat.

Estimates nothing (uniform noise); a ranking that does not beat it carries no information.
Cost: one draw per unit, no data. No paper: the standard control in pruning studies (e.g.
Frankle & Carbin 2019 compare winning tickets with random pruning / reinitialisation).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bingo.errors import InvalidOptionError
from bingo.units import find_units


def random_scores(model: nn.Module, granularity: str = "weight", seed: int = 0, include=None,
                  exclude=None) -> dict[str, Tensor]:
    """Uniform random scores in [0, 1) for ``model``'s units (higher = keep).

    Drawn on the CPU from one ``torch.Generator`` seeded with ``seed``, layer after layer in unit
    order, so the same seed gives the same scores on every device; the scores are then moved to
    each weight's device.

    Args:
        model: the network (only the shapes of its layers are used).
        granularity: ``"weight"`` or ``"neuron"``.
        seed: seed of the generator.
        include, exclude: layer names or patterns, as for :func:`bingo.units.find_units`.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidOptionError(f"seed must be an integer, got {seed!r}")
    layout = find_units(model, granularity, include, exclude)
    generator = torch.Generator().manual_seed(seed)
    return {g.param_name: torch.rand(layout.unit_shape(g), generator=generator)
            .to(g.module.weight.device) for g in layout.groups}
