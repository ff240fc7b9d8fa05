"""LAMP + Taylor: LAMP's layer-adaptive normalisation applied to first-order Taylor saliency.

Estimates: LAMP (Lee et al. 2021) scores a unit by its share of the squared magnitude of itself
and every unit of its layer that would survive it; the squared magnitude there stands for the
distortion the unit's removal causes. Here that distortion is the first-order Taylor estimate of
the loss change, ``|w dL/dw|`` summed over training (:mod:`bingo.baselines.taylor`), used as
``s**2``: within a layer the order is Taylor's, across layers LAMP's rescaling decides how much
each layer gives up. At structured granularity a structure group is the layer and the saliency
is the group Taylor criterion (:mod:`bingo.baselines.taylor`). Cost: that of the Taylor scores
(free during training with :class:`~bingo.baselines.TaylorAccumulator`) plus one sort per layer.
"""

from __future__ import annotations

from torch import nn

from ._common import UnitScores
from .lamp import lamp_from_magnitudes
from .taylor import taylor


def lamp_taylor(model: nn.Module, granularity: str = "weight", include=None, exclude=None,
                **taylor_options) -> UnitScores:
    """LAMP scores of ``sqrt(Taylor saliency)`` (higher = keep); ``taylor_options`` are
    :func:`bingo.baselines.taylor`'s (``accumulator=`` or ``data=``, ``loss_fn=``,
    ``example_inputs=``)."""
    saliency = taylor(model, granularity, include, exclude, **taylor_options)
    return UnitScores({key: lamp_from_magnitudes(value.double().clamp_min(0).sqrt())
                       for key, value in saliency.items()}, saliency.granularity)
