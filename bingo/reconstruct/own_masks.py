"""``bingo.refit``: least-squares refit of a model whose units were removed with masks of your own
(another library's, or your own), without going through :func:`bingo.prune`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from bingo.errors import InputMismatchError
from bingo.structure import discover
from bingo.structure.shrink import _check_masks as check_unit_masks

from .reconstruction import LeastSquaresReconstruction, _named_tensors


@dataclass
class RefitResult:
    """What :func:`refit` did."""

    refitted: list[str]
    """Layers refitted, in forward order."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Layers reached but left as they were, and why (already the exact fit, ...)."""
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Per refitted layer: mean squared error of its output against the dense model's on the
    calibration data, with the masked weights and after the refit (same input)."""
    layer_seconds: dict[str, float] = field(default_factory=dict)
    """Per refitted layer: seconds spent on it."""
    seconds: float = 0.0
    """Wall time of the whole call (preparation included)."""
    masks: dict[str, Tensor] = field(default_factory=dict, repr=False)
    """The parameter keep-masks written into the model."""


def _param_masks(model: nn.Module, masks: Mapping[str, Tensor], example: Any
                 ) -> dict[str, Tensor]:
    """Parameter keep-masks from ``masks``: each entry a parameter keep-mask (the parameter's
    shape) or a unit keep-mask ``(U,)`` of a structure group (its key); several masks of one
    parameter are joined."""
    if not isinstance(masks, Mapping) or not masks:
        raise InputMismatchError("masks must be a non-empty mapping: parameter name -> bool "
                                 "keep-mask of its shape, or unit group key -> bool (U,)")
    tensors = _named_tensors(model)
    structure = None
    out: dict[str, Tensor] = {}

    def add(name: str, mask: Tensor) -> None:
        out[name] = mask if name not in out else out[name] & mask.to(out[name].device)

    for key, mask in masks.items():
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise InputMismatchError(f"masks[{key!r}] must be a bool tensor, got "
                                     f"{getattr(mask, 'dtype', type(mask).__name__)}")
        if key in tensors and tuple(mask.shape) == tuple(tensors[key].shape):
            add(key, mask)
            continue
        structure = structure or discover(model, example)
        if key in structure.keys():
            keep = check_unit_masks(structure, {key: mask})[key]
            for name, m in structure.group(key).param_masks(keep, structure.shapes).items():
                add(name, m)
            continue
        expected = (f"the shape of parameter {key!r}, {tuple(tensors[key].shape)}"
                    if key in tensors else "a parameter name or a unit group key "
                    f"({', '.join(structure.keys()) or 'the model has no unit groups'})")
        raise InputMismatchError(f"masks[{key!r}] (shape {tuple(mask.shape)}) does not name "
                                 f"a parameter or unit group of the model: expected {expected}")
    return out


def refit(model: nn.Module, masks: Mapping[str, Tensor], data, *,
          dense: Optional[nn.Module] = None, **options) -> RefitResult:
    """Remove units with ``masks`` and refit the survivors of ``model`` to the dense outputs,
    in place.

    Args:
        model: the model to prune and refit, modified in place. Without ``dense`` it must
            still be dense: its outputs now are the targets. If anything fails, it is left
            as it was.
        masks: what to remove: parameter keep-masks (``{param name: bool tensor of the
            parameter's shape}``, from any pruning library) and/or unit keep-masks keyed by
            structure group (``{key: bool (U,)}``, keys of :func:`bingo.structure.discover`:
            heads, MLP neurons, channels, each with every slice of every parameter it owns).
            They are written into ``model`` (removed entries zeroed), then the refit keeps them
            at zero.
        data: calibration data, as :class:`bingo.LeastSquaresReconstruction` takes it (token
            ids, keyword dicts, tensors, ``(inputs, targets)``, a TensorDataset, a list of
            batches).
        dense: the dense reference, when ``model`` has already been pruned (or otherwise
            changed): same architecture, not modified; the targets are its outputs.
        options: :class:`bingo.LeastSquaresReconstruction` options (``samples``, ``damping``,
            ``chunk``, ``layers``, ``dtype``, ``device``, ``progress``...).

    Returns:
        :class:`RefitResult`: which layers were refitted (or left, and why), their output error
        before and after, timings, the parameter masks written.
    """
    started = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise InputMismatchError(f"model must be an nn.Module, got {type(model).__name__}")
    if dense is not None and not isinstance(dense, nn.Module):
        raise InputMismatchError(f"dense must be an nn.Module, got {type(dense).__name__}")
    reconstruction = LeastSquaresReconstruction(data, **options)
    reference = model if dense is None else dense
    reconstruction.prepare(reference)
    device = next(model.parameters()).device
    param_masks = _param_masks(model, masks, reconstruction.calibration.example(device))
    params = dict(model.named_parameters())
    canonical = reconstruction._canonical
    written = {canonical.get(n, n) for n in param_masks} | \
        set(reconstruction.parameter_names(model))
    # Restoring needs the values before the call: the dense copy prepare() kept where there is
    # one (without ``dense``, the model is the prepared one), a copy of the rest.
    kept = reconstruction._dense if dense is None else {}
    originals = {n: kept[n] if n in kept else params[n].detach().clone()
                 for n in written if n in params}
    try:
        with torch.no_grad():
            for name, mask in param_masks.items():
                target = params.get(canonical.get(name, name))
                if target is not None:  # buffers (batch norm statistics) are not masked
                    target.mul_(mask.to(target.device, target.dtype))
        # The model is the prepared one, or (with ``dense``) may differ from it by design.
        reconstruction(model, param_masks, same_weights=False)
    except BaseException:
        with torch.no_grad():
            for name, value in originals.items():
                params[name].copy_(value)
        raise
    return RefitResult(refitted=list(reconstruction.refitted), skipped=dict(reconstruction.skipped),
                       errors=dict(reconstruction.errors),
                       layer_seconds=dict(reconstruction.layer_seconds),
                       seconds=time.perf_counter() - started, masks=param_masks)
