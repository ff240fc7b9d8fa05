"""Random pruning scores: the floor any informed ranking must beat.

Estimates nothing (uniform noise); a ranking that does not beat it carries no information.
Cost: one draw per unit, no data. Any granularity. No paper: the standard control in pruning
studies (e.g. Frankle & Carbin 2019 compare winning tickets with random pruning /
reinitialisation).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from bingo.errors import InvalidOptionError

from bingo.units import find_units

from ._common import UnitScores


def random_scores(model: nn.Module, granularity: str = "weight", seed: int = 0, include=None,
                  exclude=None, example_inputs: Any = None) -> UnitScores:
    """Uniform random scores in [0, 1) for ``model``'s units (higher = keep).

    Drawn on the CPU from one ``torch.Generator`` seeded with ``seed``, group after group in unit
    order, so the same seed gives the same scores on every device; the scores are then moved to
    each group's device.

    Args:
        model: the network (only the shapes of its unit groups are used).
        granularity: ``"weight"``, ``"neuron"`` or ``"structured"``.
        seed: seed of the generator.
        include, exclude: layer or group names or patterns, as for
            :func:`bingo.units.find_units`.
        example_inputs: structured granularity: one batch to trace the model with.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidOptionError(f"seed must be an integer, got {seed!r}")
    layout = find_units(model, granularity, include, exclude, example_inputs=example_inputs)
    generator = torch.Generator().manual_seed(seed)
    return UnitScores({g.param_name: torch.rand(layout.unit_shape(g), generator=generator)
                       .to(g.device) for g in layout.groups}, layout.granularity)
