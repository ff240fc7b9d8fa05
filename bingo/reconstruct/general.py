"""The general path: any model, each layer's input captured with a forward pre-hook.

For every layer to refit, in forward order, each calibration chunk runs twice, each pass stopped
at the layer:

* through the model as it is now (masked, the layers before already refitted): the layer's
  input ``x``;
* through the *dense* model: the same modules with the dense values of every parameter a mask or
  a refit can change, kept by prepare() and swapped in with :func:`torch.func.functional_call`
  (the model itself is not touched): the layer's dense input and output ``y``.

Only one chunk's activations exist at a time; the fit sees them through its moments
(:mod:`bingo.reconstruct.moments`). Cost: two forward passes, each up to the layer, over the
calibration data per refitted layer, and the layer's ``F x F`` statistics.

Which layers are refitted (``layers=`` of :class:`~bingo.reconstruct.LeastSquaresReconstruction`):
with ``"touched"``, every layer whose weight or bias a mask touches (the producers of removed
units, layers with per-weight masks) and every *consumer* of a unit group from which a mask
removes a unit, a whole index of one of its slices (a layer whose weight's input axis reads the
group's units: ``o_proj`` after heads, ``down_proj`` / GPT-2's ``c_proj`` after MLP neurons, the
next conv after channels, a depthwise conv on them); with ``"downstream"``, also every refittable
layer after the first touched one. A touched layer
is left as it is when, in every group of its outputs, each row is kept or removed whole, every
feature a kept weight reads is the dense one on every calibration row and its kept weights are
the dense ones: its kept rows already are the exact fit (the first producers of a pruned model,
a depthwise conv whose own channels are dense). A producer further on, whose input an earlier
refit has changed, is refitted with its removed rows held at zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from bingo.errors import InputMismatchError, NonFiniteError
from bingo.structure import Structure, Slice

from .calibration import Calibration, call
from .layers import Layer, StopForward, route_of
from .moments import Moments

if TYPE_CHECKING:
    from .reconstruction import LeastSquaresReconstruction


def _removes(mask: Optional[Tensor], s: Slice) -> bool:
    """Whether ``mask`` removes an index of slice ``s`` whole (a producer's row, a consumer's
    column): entries masked here and there (per-weight masks, or another group's removed units
    crossing this slice) do not remove a unit."""
    if mask is None:
        return False
    along = mask.movedim(s.axis, 0)[s.positions.to(mask.device)]
    return bool((~along.reshape(along.shape[0], -1)).all(1).any())


def _masked(mask: Optional[Tensor]) -> bool:
    return mask is not None and not bool(mask.all())


class GeneralPath:
    """See the module docstring."""

    def __init__(self, structure: Structure, layers: list[Layer]):
        self.structure = structure
        self.layers = layers
        self.in_axes = {(u.name, u.in_axis) for u in structure.contractions
                        if u.in_axis is not None}
        # A grouped conv whose rows are in a group reads the group's channels too (the trace
        # couples a depthwise conv's output channel with its own input channel).
        self.grouped = {u.name for u in structure.contractions
                        if u.op == "convolution" and u.groups > 1 and u.in_axis is None}

    def consumers(self, masks: Mapping[str, Tensor]) -> set[str]:
        """Canonical weights that read the units of a group from which ``masks`` removes a
        unit."""
        out: set[str] = set()
        for group in self.structure.groups:
            if any(_removes(masks.get(s.param), s) for s in group.slices):
                out.update(s.param for s in group.slices
                           if (s.param, s.axis) in self.in_axes or s.param in self.grouped)
        return out

    def select(self, masks: Mapping[str, Tensor], policy: str, skipped: dict[str, str]
               ) -> list[Layer]:
        """The layers to refit, in forward order; raises for a touched layer bingo cannot refit
        (before any work)."""
        consumers = self.consumers(masks)
        selected, changed = [], False
        for layer in self.layers:
            bias = self.structure.canonical(layer.bias) if layer.bias else None
            touched = _masked(masks.get(layer.canonical)) or _masked(masks.get(bias)) or \
                layer.canonical in consumers
            if touched:
                if layer.problem is not None:
                    raise InputMismatchError(f"cannot refit layer {layer.name!r} (its units "
                                             f"or inputs are pruned): {layer.problem}")
                selected.append(layer)
                changed = True
            elif policy == "downstream" and changed:
                if layer.problem is not None:
                    skipped[layer.name] = layer.problem
                else:
                    selected.append(layer)
        return selected

    @torch.no_grad()
    def run(self, rec: "LeastSquaresReconstruction", model: nn.Module,
            masks: Mapping[str, Tensor], calibration: Calibration, device) -> None:
        """Refit ``model`` in place (see the module docstring)."""
        for layer in rec._progress(self.select(masks, rec.layers_policy, rec.skipped)):
            started = rec._clock()
            moments, dense_features = self._statistics(rec, model, layer, calibration, device)
            rec._fit_layer(model, layer, moments, masks, started, dense_features)

    def _capture(self, model: nn.Module, layer: Layer, batch, dense: Optional[dict] = None
                 ) -> tuple[Tensor, Optional[Tensor]]:
        """``layer``'s input (and, in the dense pass of a layer whose forward computes it, its
        output) on one chunk; the forward stops there."""
        module = model.get_submodule(layer.module)
        got: dict[str, Any] = {}
        observe = dense is not None and layer.kind.observed

        def pre(m, args, kwargs):
            got["x"] = layer.kind.input(m, args, kwargs)
            if not observe:
                raise StopForward

        def post(m, args, out):
            got["y"] = out
            raise StopForward

        handles = [module.register_forward_pre_hook(pre, with_kwargs=True)]
        if observe:
            handles.append(module.register_forward_hook(post))
        if layer.route is not None:
            parent = model.get_submodule(layer.route)
            route = route_of(parent)

            def through(m, args, kwargs):
                route(m, args, kwargs)  # reaches ``module``, whose hooks stop the forward

            handles.append(parent.register_forward_pre_hook(through, with_kwargs=True))
        try:
            if dense is None:
                call(model, batch)
            elif isinstance(batch, dict):
                functional_call(model, dense, (), batch)
            else:
                functional_call(model, dense, (batch,))
        except StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        if "x" not in got or (observe and "y" not in got):
            raise InputMismatchError(f"layer {layer.name!r} did not run on the calibration data")
        return got["x"], got.get("y")

    def _statistics(self, rec: "LeastSquaresReconstruction", model: nn.Module, layer: Layer,
                    calibration: Calibration, device) -> tuple[Moments, Tensor]:
        """The moments of ``layer``'s input now and its dense output, and per group and input
        feature whether that feature is the dense one on every calibration row."""
        module = model.get_submodule(layer.module)
        kind = layer.kind
        dense = rec._dense
        moments = rec._moments(model)
        dtype = moments.dtype
        weight = kind.matrix(module, dense[layer.canonical]).to(moments.device, dtype)
        bias = dense[self.structure.canonical(layer.bias)] if layer.bias else None
        if bias is not None:
            bias = bias.reshape(weight.shape[:2]).to(moments.device, dtype)
        equal: Optional[Tensor] = None
        for i, batch in enumerate(calibration.chunks(device)):
            x, _ = self._capture(model, layer, batch)
            x_dense, y = self._capture(model, layer, batch, dense)
            rows, rows_dense = kind.rows(module, x), kind.rows(module, x_dense)
            rule = torch.einsum("ngf,gof->ngo", rows_dense.to(moments.device, dtype), weight)
            if bias is not None:
                rule = rule + bias
            if kind.observed:
                y = kind.output_rows(module, y)
                if i == 0:
                    _check_rule(layer, module, y.to(moments.device, dtype), rule)
            else:
                y = rule
            same = (rows == rows_dense).all(0)
            equal = same if equal is None else equal & same
            moments.add(rows, y)
        if not moments.finite():
            raise NonFiniteError(f"the input of layer {layer.name!r} is not finite in the pruned "
                                 "model (NaN or Inf weights?)")
        return moments, equal


def _check_rule(layer: Layer, module: nn.Module, observed: Tensor, rule: Tensor) -> None:
    """The layer's own output must be its rule's ``W x + b``: a module with a forward of its own
    (an adapter, quantised weights) is not fitted as if it were a plain layer."""
    scale = float(observed.abs().max())
    difference = float((observed - rule).abs().max())
    if not difference <= 1e-2 * scale + 1e-6:
        raise InputMismatchError(
            f"layer {layer.name!r} ({type(module).__name__}) does not compute its weight times "
            f"its input plus its bias (max difference {difference:.3g} at output scale "
            f"{scale:.3g}): bingo cannot refit a layer with a forward of its own")
