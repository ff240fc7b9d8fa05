"""The structure layer: which slices of which parameters form a unit, for any model.

:func:`discover` traces one forward pass (:mod:`bingo.structure.trace`) and groups the coupled
parameter slices into unit groups (:mod:`bingo.structure.groups`): attention heads (or key/value
groups with their query heads), MLP neurons, conv channels with their BatchNorm entries and every
layer coupled to them through residual adds. Search, pruning masks, targeted elimination,
least-squares refit and shrinking all read this one :class:`Structure`; none of them looks at the
model's layers on its own.

Why a tracer of our own and not Torch-Pruning's ``DependencyGraph``: docs/structure.md records the
comparison on the model zoo (the short version: Torch-Pruning crashed on GPT-2's Conv1D, did not
finish the key/value group of a two-layer Llama in 10 minutes, and finds no heads without being
told their count).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from bingo.errors import InputMismatchError

from .groups import CHANNELS, HEADS, HEADS_KEY, KINDS, NEURONS, Slice, StructureGroup, build_groups
from .trace import ContractionUse, TraceResult, canonical_names
from .trace import trace as _trace

__all__ = ["CHANNELS", "HEADS", "HEADS_KEY", "KINDS", "NEURONS", "Slice", "Structure",
           "StructureGroup", "discover", "example_inputs_for"]


@dataclass
class Structure:
    """The unit groups of one model (see :func:`discover`)."""

    groups: list[StructureGroup]
    """Every removable unit group, in forward order of its first producer."""
    blocked: dict[str, str]
    """Parameter -> why the units that start there cannot be removed (they reach the output,
    or span a whole axis: the hidden stream of a transformer, normalised as a whole)."""
    contractions: list[ContractionUse] = field(repr=False)
    """Every parameter the forward used as a contraction weight, in call order."""
    unsupported: dict[str, str] = field(repr=False)
    """ATen ops the tracer has no rule for -> the module that called them (they block what
    they touch)."""
    module_calls: dict[str, int] = field(repr=False)
    """Module name -> forward calls in the traced pass (> 1: a shared module)."""
    module_order: list[str] = field(repr=False)
    """Module names in the order their forward first ran."""
    param_names: dict[str, list[str]] = field(repr=False)
    """Canonical parameter name -> all its names (tied weights share one canonical name)."""
    shapes: dict[str, tuple[int, ...]] = field(repr=False)
    """Canonical parameter/buffer name -> shape, as traced."""

    def group(self, key: str) -> StructureGroup:
        """The group with score key ``key``."""
        for g in self.groups:
            if g.key == key:
                return g
        raise InputMismatchError(
            f"no unit group has the key {key!r}; groups: {', '.join(self.keys()) or 'none'}")

    def keys(self) -> list[str]:
        """Score keys of every group."""
        return [g.key for g in self.groups]

    def canonical(self, name: str) -> str:
        """The canonical name of a parameter known under ``name`` (a tied alias)."""
        for canon, names in self.param_names.items():
            if name in names:
                return canon
        return name

    def param_masks(self, unit_masks: dict[str, Tensor]) -> dict[str, Tensor]:
        """Parameter name -> bool keep-mask of its shape, from score key -> unit keep-mask
        (a parameter in several groups, such as a Linear whose rows and columns are units of two
        groups, gets the AND of their masks)."""
        out: dict[str, Tensor] = {}
        for key, keep in unit_masks.items():
            for name, m in self.group(key).param_masks(keep, self.shapes).items():
                out[name] = m if name not in out else out[name] & m
        return out

    def summary(self) -> list[dict]:
        """One row per group: key, kind, units, parameters (for reports and errors)."""
        return [dict(key=g.key, kind=g.kind, units=g.num_units, params=len(g.params()))
                for g in self.groups]


# --------------------------------------------------------------------------------------------
# Example inputs
# --------------------------------------------------------------------------------------------

def example_inputs_for(model: nn.Module) -> Any:
    """A small input the model accepts, built from what the model says about itself: its own
    ``bingo_example_inputs()`` method if it has one, a transformers model's config
    (``input_ids`` of its vocabulary; ``pixel_values`` of its image size and channels), or the
    first layer of an nn.Sequential (an nn.Linear's ``in_features``). Raises naming what to pass
    otherwise."""
    own = getattr(model, "bingo_example_inputs", None)
    if callable(own):
        return own()
    config = getattr(model, "config", None)
    name = getattr(model, "main_input_name", None)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if config is not None and name == "input_ids" and getattr(config, "vocab_size", None):
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, int(config.vocab_size), (1, 8), generator=generator)
        return {"input_ids": ids.to(device)}
    if config is not None and name == "pixel_values":
        size = getattr(config, "image_size", None) or 64
        size = size if isinstance(size, int) else size[0]
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(1, channels, size, size, device=device, dtype=dtype)}
    first = next((m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))), None)
    if isinstance(first, nn.Linear) and isinstance(model, nn.Sequential):
        return torch.randn(1, first.in_features, device=device, dtype=dtype)
    raise InputMismatchError(
        f"bingo cannot build an example input for {type(model).__name__}: pass example_inputs= "
        "(one batch, or a single example, as the model's forward takes it)")


def _shrink_example(inputs: Any) -> Any:
    """One example of a batch (the structure does not depend on the batch size)."""
    if isinstance(inputs, Tensor):
        return inputs[:1] if inputs.dim() > 0 and inputs.shape[0] > 1 else inputs
    if isinstance(inputs, dict):
        return {k: _shrink_example(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_shrink_example(v) for v in inputs)
    return inputs


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------

_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Structure]]" = \
    weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> tuple:
    """What a cached structure depends on: the identity and shape of every tensor, and the
    module tree (a replaced layer or a shrunk model gets a new structure)."""
    tensors = tuple((n, id(t), tuple(t.shape)) for n, t in
                    list(model.named_parameters(remove_duplicate=False)) +
                    list(model.named_buffers(remove_duplicate=False)) if t is not None)
    modules = tuple((n, id(m)) for n, m in model.named_modules())
    return tensors, modules


def _declared_head_edges(model: nn.Module, result: TraceResult) -> list[np.ndarray]:
    """Coupling edges that make each head of a block declared with
    :func:`bingo.attention.declare_heads` one unit (the declaration overrides the trace where
    the trace alone would find finer units)."""
    from bingo.attention import HEADS_ATTR, HeadSpec, head_layout

    edges = []
    for name, module in model.named_modules():
        if not isinstance(getattr(module, HEADS_ATTR, None), HeadSpec):
            continue
        layout = head_layout(name, module)
        for h in range(layout.num_heads):
            ids = []
            for s in layout.slices:
                axis = result.axes.get((s.param, s.axis))
                if axis is None:
                    continue
                rows = torch.arange(s.start, s.stop)[s.head_of() == h]
                ids.append(axis.first + rows.numpy())
            if ids:
                joined = np.concatenate(ids)
                edges.append(np.stack([np.full_like(joined, joined[0]), joined], 1))
    return edges


def discover(model: nn.Module, example_inputs: Any = None, *, refresh: bool = False
             ) -> Structure:
    """The :class:`Structure` of ``model``, traced on one example of ``example_inputs`` (built
    from the model's config when None, see :func:`example_inputs_for`). Cached per model until
    a parameter, buffer or submodule is replaced or reshaped (``refresh=True`` traces again).
    The model is not modified (its train/eval mode is restored)."""
    if not isinstance(model, nn.Module):
        raise InputMismatchError(f"model must be an nn.Module, got {type(model).__name__}")
    fingerprint = _fingerprint(model)
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == fingerprint and not refresh:
        return cached[1]
    if example_inputs is None:
        example_inputs = example_inputs_for(model)
    example = _shrink_example(example_inputs)
    try:
        result = _trace(model, example)
    except Exception as exc:  # noqa: BLE001  the user's forward failed on the example
        raise InputMismatchError(
            f"tracing {type(model).__name__} for its structure failed on the example input: "
            f"{type(exc).__name__}: {exc}") from exc
    groups, blocked = build_groups(result, _declared_head_edges(model, result))
    tensors, _ = canonical_names(model)
    structure = Structure(
        groups=groups, blocked=blocked, contractions=result.contractions,
        unsupported=result.unsupported, module_calls=result.module_calls,
        module_order=result.module_order, param_names=result.param_names,
        shapes={name: tuple(t.shape) for name, t in tensors.values()})
    _CACHE[model] = (fingerprint, structure)
    return structure
