"""Wanda-style scores: weight magnitude times input activation norm, ``|W_ij| * ||X_j||``.

Paper: M. Sun, Z. Liu, A. Bair, J. Z. Kolter, "A Simple and Effective Pruning Approach for Large
Language Models", ICLR 2024 (arXiv:2306.11695).

Estimates: how much output a weight carries on typical inputs: ``|W_ij|`` times the L2 norm of
input feature ``j`` over all calibration rows (tokens). ``||X_j||`` is measured by forward hooks
(or, for nn.MultiheadAttention, whose out-projection is not called as a module, by running its
forward through :func:`bingo.attention.mha_forward` with recording projections) on ``data``.

* ``granularity="weight"``: ``|W_ij| * ||X_j||`` per weight of each nn.Linear, ranked globally.
  (Wanda proper compares weights within each output row; bingo's :func:`bingo.prune` ranks all
  units globally, so this is the global variant.)
* ``granularity="neuron"``: a row's sum ``sum_j |W_ij| ||X_j||``, divided by the layer mean (the
  same layer normalisation as :func:`bingo.baselines.magnitude`).
* ``granularity="structured"``: MLP neurons as above; a head sums ``|W| ||X||`` over its q/k/v
  rows (each with its own input: query, key, value) and its o-projection columns (input: the head
  outputs), divided by the block's mean. Biases are left out (their input is the constant 1).

nn.Conv2d layers use one norm per input channel (over batch and positions), not per unfolded
patch element: a simplification of Wanda for convolutions.

Cost: one forward pass per calibration batch, no backward; memory one float64 vector per layer
input.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from bingo.attention import HeadLayout, head_totals, mha_forward, packed_in_projection
from bingo.errors import InputMismatchError, InvalidOptionError
from bingo.units import UnitGroup, find_units

from ._common import check_unpruned, layer_normalised


class _Norms:
    """Running sums of squared input features, keyed by (score key, role)."""

    def __init__(self):
        self.squares: dict[tuple[str, str], Tensor] = {}

    def add(self, key: tuple[str, str], x: Tensor, channel_dim: int = -1) -> None:
        x = x.detach().movedim(channel_dim, -1)
        sq = x.reshape(-1, x.shape[-1]).double().pow(2).sum(0)
        self.squares[key] = self.squares.get(key, 0) + sq

    def norm(self, key: tuple[str, str]) -> Tensor:
        if key not in self.squares:
            raise InputMismatchError(
                f"wanda: no input reached {key[0]!r} ({key[1]}) during calibration; is it used "
                "in the forward?")
        return self.squares[key].sqrt()


# Layer kind -> the dimension of its input that holds the features its weight's dim 1 reads.
_CHANNEL_DIM = {"linear": -1, "conv2d": 1}


def _linear_hooks(group: UnitGroup, norms: _Norms) -> list:
    dim = _CHANNEL_DIM[group.kind]
    return [group.module.register_forward_hook(
        lambda _m, inp, _out: norms.add((group.param_name, "in"), inp[0], dim))]


def _head_hooks(group: UnitGroup, norms: _Norms) -> list:
    layout = group.heads
    key = group.param_name
    if layout.kind == "linear":
        handles = []
        for role, child in layout.projections.items():
            roles = "qkv" if role == "qkv" else role

            def hook(_m, inp, _out, roles=roles):
                for r in roles:
                    norms.add((key, r), inp[0])
            handles.append(layout.module.get_submodule(child).register_forward_hook(hook))
        return handles
    module = layout.module
    plain_in = packed_in_projection(module)

    def project_in(query, key_, value):
        for r, x in zip("qkv", (query, key_, value)):
            norms.add((key, r), x)
        return plain_in(query, key_, value)

    def project_out(x):
        norms.add((key, "o"), x)
        return module.out_proj(x)

    def forward(query, key_, value, **kwargs):
        return mha_forward(module, query, key_, value, project_in, project_out, **kwargs)

    module.forward = forward

    class _Unpatch:
        def remove(self):
            del module.forward
    return [_Unpatch()]


def _head_scores(layout: HeadLayout, key: str, norms: _Norms) -> Tensor:
    values = {}
    for s in layout.slices:
        if not s.param.endswith("weight"):
            continue  # biases read the constant input 1; Wanda scores weights
        live = layout.tensors()[s.param]
        if s.param not in values:
            values[s.param] = torch.zeros(live.shape, dtype=torch.float64)
        run = live.detach().narrow(s.axis, s.start, s.stop - s.start).abs().double().cpu()
        x = norms.norm((key, s.role))
        if s.axis == 1:  # o-projection columns: the inputs are the same columns
            x = x[s.start:s.stop]
        values[s.param].narrow(s.axis, s.start, s.stop - s.start).copy_(run * x.cpu())
    return layer_normalised(head_totals(layout, values))


def _batches(data: Iterable, batches: Optional[int]):
    for i, batch in enumerate(data):
        if batches is not None and i >= batches:
            return
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def wanda(model: nn.Module, granularity: str = "weight", include=None, exclude=None, *,
          data: Optional[Iterable] = None, batches: Optional[int] = None) -> dict[str, Tensor]:
    """Wanda scores ``|W| * ||X||`` of ``model``'s units (higher = keep); see the module docstring.

    Args:
        model: the trained network (run in eval mode on ``data``, restored after).
        granularity: ``"weight"``, ``"neuron"`` or ``"structured"``.
        include, exclude: layer names or patterns, as for :func:`bingo.units.find_units`.
        data: calibration batches: ``(inputs, targets)`` pairs or bare input tensors.
        batches: use at most this many batches of ``data`` (None: all).

    Returns:
        ``{score key: float32 scores}`` on each layer's device.
    """
    if data is None:
        raise InvalidOptionError("wanda needs data=: calibration batches (inputs, targets)")
    if batches is not None and (isinstance(batches, bool) or not isinstance(batches, int)
                                or batches < 1):
        raise InvalidOptionError(f"batches must be a positive integer or None, got {batches!r}")
    layout = find_units(model, granularity, include, exclude)
    check_unpruned(model, layout)
    norms = _Norms()
    handles = []
    was_training = model.training
    try:
        for g in layout.groups:
            handles += _head_hooks(g, norms) if g.heads is not None else _linear_hooks(g, norms)
        model.eval()
        seen = 0
        with torch.no_grad():
            for x in _batches(data, batches):
                model(x)
                seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not seen:
        raise InputMismatchError("wanda: data yielded no batch")
    scores = {}
    for g in layout.groups:
        device = g.module.weight.device
        if g.heads is not None:
            scores[g.param_name] = _head_scores(g.heads, g.param_name, norms).to(device)
            continue
        weight = g.module.weight.detach()
        x = norms.norm((g.param_name, "in")).view(1, -1, *([1] * (weight.dim() - 2)))
        per_weight = weight.abs().double() * x
        if layout.granularity == "weight":
            scores[g.param_name] = per_weight.float()
        else:
            scores[g.param_name] = layer_normalised(
                per_weight.reshape(per_weight.shape[0], -1).sum(1)).to(device)
    return scores


__all__ = ["wanda"]
