"""One-shot pruning from significance scores, and physically smaller ("shrunk") models.

After training, the ticket search has produced a score per unit. :func:`prune` ranks every unit
of every scored layer (or unit group) globally and removes the lowest-ranked ones, either a fixed
number (``sparsity=``) or as many as an accuracy floor allows (``floor=`` with ``eval_fn``), or,
for a lower-is-better metric such as perplexity, as many as a ceiling allows (``ceiling=``). The
pruned model uses :mod:`torch.nn.utils.prune` masks, so the usual tools (``prune.remove``,
``prune.is_pruned``) work on it.

What a unit is (the *granularity*, see :func:`prune` for how it is chosen):

* ``"weight"``: one element of an nn.Linear / nn.Conv2d weight (scores shaped like the weight);
* ``"neuron"``: one output row / channel of one layer with its bias entry (scores ``(out,)``),
  nothing else: a per-layer unit;
* ``"structured"``: one unit of a unit group of :func:`bingo.structure.discover` (scores keyed by
  the group's key, ``(num_units,)``): every slice the unit owns is masked, the producers' rows, the
  consumers' columns, BatchNorm entries, a head's q/k/v rows and o columns.

For structured scores on any model the structure layer understands, and for neuron scores on a
plain MLP, ``prune`` also returns the physically smaller model
(:func:`bingo.structure.shrink.shrink`, :func:`shrink_mlp`) with its measured CPU speedup.
:func:`bingo.save.save_pruned` / :func:`bingo.save.load_pruned` keep either model on disk.
"""

from __future__ import annotations

import copy
import math
import numbers
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import prune as torch_prune
from tqdm.auto import tqdm

from bingo.errors import (
    BingoError,
    InputMismatchError,
    InvalidOptionError,
    NonFiniteError,
    NoPrunableLayersError,
    UnreachableFloorError,
    require_data,
    require_option,
)
from bingo.executor import ModelStructure
from bingo.reconstruct import LeastSquaresReconstruction as Reconstruction
from bingo.scoring import UnitScores
from bingo.structure import HEADS_KEY, Structure, StructureGroup, discover, example_inputs_for
from bingo.structure.shrink import _outputs as _forward
from bingo.structure.shrink import shrink
from bingo.structure.trace import canonical_names
from bingo.units import GRANULARITIES, layer_kind, linear_names, mlp_problem

__all__ = ["PruneResult", "StructuredResult", "UnitScores", "plain_copy", "prune", "pruning_order",
           "shrink_mlp", "shrink_structured", "torch_prune_masks"]

EvalFn = Callable[[nn.Module], float]


STRUCTURED_CHOICES = ("auto", True, False)

# Timing of the structured speedup: a fixed batch, a few warm-up passes, then the median. An MLP
# gets a batch of rows; other models their example inputs repeated to a batch of examples (a
# sequence or an image each, so fewer).
_SPEEDUP_BATCH_ROWS = 256
_SPEEDUP_BATCH_EXAMPLES = 32
_SPEEDUP_WARMUP = 3
_SPEEDUP_REPEATS = 15


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class StructuredResult:
    """A physically smaller copy of a pruned model: structured scores on any model
    (:func:`bingo.structure.shrink.shrink`), neuron scores on a plain MLP (:func:`shrink_mlp`)."""

    model: nn.Module = field(repr=False)
    """The shrunk model (an nn.Sequential for an MLP); its outputs equal the masked model's."""
    parameters: int
    """Number of parameters of the shrunk model."""
    dense_parameters: int
    """Number of parameters of the unpruned model."""
    speedup: float | None
    """Measured CPU inference speedup: median dense forward time / median shrunk forward time,
    timed interleaved on a batch of the example inputs (256 random rows for an MLP)."""


@dataclass
class PruneResult:
    """What :func:`prune` returns: the pruned model, its masks and how it was chosen."""

    model: nn.Module = field(repr=False)
    """The pruned model, masked with torch.nn.utils.prune (``weight_orig``/``weight_mask``)."""
    masks: dict[str, Tensor] = field(repr=False)
    """Parameter name -> bool keep-mask of the parameter's shape (biases too, for neurons)."""
    unit_masks: dict[str, Tensor] = field(repr=False)
    """Score key -> bool keep-mask in the score's shape."""
    granularity: str
    """"weight" (each weight element is a unit), "neuron" (each output row/channel of one layer
    is) or "structured" (each unit of a structure group is; see the module docstring)."""
    pruned_units: int
    """Number of units removed."""
    total_units: int
    """Number of units in all scored layers."""
    sparsity: float
    """pruned_units / total_units."""
    weight_sparsity: float
    """Fraction of the elements of the scored weights that are masked to zero."""
    accuracy: float | None
    """eval_fn of the pruned model (accuracy, or e.g. perplexity with ``ceiling``), or None
    without eval_fn."""
    dense_accuracy: float | None
    """eval_fn of the unpruned model, or None without eval_fn."""
    floor: float | None
    """The accuracy floor asked for, or None (pruning to a sparsity or a ceiling)."""
    history: list[dict[str, Any]] = field(repr=False)
    """Floor search evaluations sorted by pruned_units: pruned_units, sparsity, accuracy, phase."""
    structured: StructuredResult | None
    """The shrunk model (neuron-pruned MLPs, structured-pruned transformers), else None."""
    ceiling: float | None = None
    """The ceiling asked for (lower-is-better eval_fn, e.g. perplexity), or None."""
    reconstructed: list[str] | None = None
    """Layers whose surviving weights ``reconstruct=`` refitted (forward order), or None."""
    structured_note: str | None = None
    """Why ``structured`` is None (``structured="auto"`` could not shrink), or None."""

    def export_state_dict(self) -> dict[str, Tensor]:
        """A plain state_dict of the pruned model: usual names (no _orig/_mask), zeros where pruned.

        The tensors are fresh copies, so editing them leaves the model alone.
        """
        state = self.model.state_dict()
        plain: dict[str, Tensor] = {}
        for name, value in state.items():
            if name.endswith("_mask") and name[: -len("_mask")] + "_orig" in state:
                continue
            base = name[: -len("_orig")]
            if name.endswith("_orig") and base + "_mask" in state:
                plain[base] = (value * state[base + "_mask"]).detach().clone()
            else:
                plain[name] = value.detach().clone()
        return plain

    def save_safetensors(self, path: str) -> None:
        """Write :meth:`export_state_dict` to ``path`` in the safetensors format: one file, the
        masked model's plain state (zeros where pruned, tied tensors under each name), no masks
        and no shapes. To load a pruned model back (masked or shrunk, any architecture, in a
        fresh process), use :func:`bingo.save.save_pruned` / :func:`bingo.save.load_pruned`."""
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.export_state_dict().items()}, str(path))

    def remove(self) -> nn.Module:
        """Make the pruning permanent and return the model.

        Like :func:`torch.nn.utils.prune.remove` on every masked parameter: each becomes a plain
        ``nn.Parameter`` again, zero where pruned (no ``weight_orig`` / ``weight_mask``, no
        hooks), so the model trains, saves and loads like any other; training may then revive
        pruned weights. ``masks`` keeps the record. Calling it twice is harmless.
        """
        for name in self.masks:
            module_name, _, pname = name.rpartition(".")
            module = self.model.get_submodule(module_name)
            if pname + "_orig" in module._parameters:
                torch_prune.remove(module, pname)
            _DetachMasked.forget(module, pname)
        return self.model


# --------------------------------------------------------------------------------------------
# Scores -> layers
# --------------------------------------------------------------------------------------------


def _weight_unit_shape(weight: Tensor) -> tuple[int, ...]:
    return tuple(weight.shape)


def _neuron_unit_shape(weight: Tensor) -> tuple[int, ...]:
    return (weight.shape[0],)


# Granularity name -> the score shape it implies for a weight (per-layer scores).
UNIT_SHAPES: dict[str, Callable[[Tensor], tuple[int, ...]]] = {
    "weight": _weight_unit_shape,
    "neuron": _neuron_unit_shape,
}


@dataclass
class _ScoredLayer:
    """One scored weight (per-layer scores) or unit group (structured scores), with its scores
    flattened in ranking order."""

    key: str
    """The score key: a weight's canonical parameter name ("1.weight"), or a group's key."""
    module_name: str
    """The nn.Linear / nn.Conv2d the score key names (an alias's own module for a tied
    weight), or the group's module."""
    unit_shape: tuple[int, ...]
    """Shape of the score tensor (= of the unit mask)."""
    scores: Tensor
    """Flat scores on the CPU."""
    coverage: Tensor | None
    """Flat sample counts on the CPU, or None when the scores carry no coverage."""
    unit: str = "weight"
    """What a unit is: a key of :data:`PARAM_MASKS` (per-layer), or ``"structured"``."""
    group: StructureGroup | None = field(default=None, repr=False)
    """The unit group (structured scores)."""
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    """Structured scores: the structure's parameter shapes."""
    parameters: tuple[str, ...] = ()
    """Structured scores: the group's slices that are parameters (buffers, such as BatchNorm
    statistics, need no mask: the consumers' columns are masked)."""
    canonical: Mapping[str, str] = field(default_factory=dict, repr=False)
    """Per-layer scores: tied alias -> canonical parameter name."""

    @property
    def units(self) -> int:
        return self.scores.numel()

    def param_masks(self, unit_mask: Tensor, model: nn.Module) -> dict[str, Tensor]:
        """Canonical parameter name -> keep-mask of its shape, for this layer's unit mask."""
        if self.group is not None:
            masks = self.group.param_masks(unit_mask, self.shapes)
            return {name: masks[name].contiguous() for name in self.parameters}
        module = model.get_submodule(self.module_name)
        prefix = f"{self.module_name}." if self.module_name else ""
        return {self.canonical.get(prefix + p, prefix + p): mask
                for p, mask in PARAM_MASKS[self.unit](unit_mask, module).items()}


def _module_of(model: nn.Module, key: str) -> tuple[str, nn.Module]:
    module_name, _, _ = key.rpartition(".")
    return module_name, model.get_submodule(module_name)


def _names_heads(key: Any) -> bool:
    return isinstance(key, str) and key.rpartition(".")[2] == HEADS_KEY


def _requested_granularity(scores: Mapping[str, Tensor], granularity: str | None) -> str | None:
    """The granularity to prune at: ``granularity=``, else the scores' own ``granularity``
    attribute, else ``"structured"`` when a key names heads; None: per layer, each score's
    shape says weight or neuron."""
    carried = getattr(scores, "granularity", None)
    for what, value in (("granularity", granularity), ("scores.granularity", carried)):
        if value is not None:
            require_option(what, value, GRANULARITIES)
    if granularity is not None and carried is not None and granularity != carried:
        raise InvalidOptionError(
            f"granularity={granularity!r} contradicts the scores, which score {carried!r} units")
    if granularity is not None or carried is not None:
        return granularity or carried
    return "structured" if any(_names_heads(k) for k in scores) else None


def _check_key(key: str, model: nn.Module, params: Mapping[str, Tensor],
               canonical: Mapping[str, str]) -> tuple[str, Tensor]:
    """Return (module_name, weight) for a per-layer score key (a tied alias names the same
    weight as its canonical name), or raise naming what is wrong with it."""
    if not isinstance(key, str):
        raise InputMismatchError(f"score keys must be parameter names (str); got {key!r}")
    name = canonical.get(key, key)
    if name not in params:
        if canonical.get(key + "_orig", key + "_orig") in params:
            raise InputMismatchError(
                f"'{key}' is already pruned with torch.nn.utils.prune; call prune.remove on it "
                "(or pass the unpruned model) before pruning again"
            )
        raise InputMismatchError(
            f"score key '{key}' is not a parameter of the model "
            f"(parameters: {', '.join(list(params)[:8])}{', ...' if len(params) > 8 else ''}); "
            "scores keyed by unit groups (bingo.structure) need granularity='structured'"
        )
    # A tied weight is prunable where any of its names is a layer's weight (an embedding tied
    # to the LM head): that layer's rows and bias are the per-layer units.
    tied = [key] + [a for a, c in canonical.items() if c == name and a != key]
    for alias in tied:
        module_name, module = _module_of(model, alias)
        if alias.rpartition(".")[2] == "weight" and layer_kind(module) is not None:
            return module_name, params[name]
    raise InputMismatchError(
        f"score key '{key}' is not the weight of an nn.Linear, nn.Conv2d or Conv1D layer "
        f"(it belongs to {type(_module_of(model, key)[1]).__name__})"
    )


def _granularity_of(key: str, score: Tensor, weight: Tensor, wanted: str | None) -> str:
    for name, shape_of in UNIT_SHAPES.items():
        if tuple(score.shape) == shape_of(weight) and wanted in (None, name):
            return name
    expected = " or ".join(
        f"{tuple(shape_of(weight))} ({name})" for name, shape_of in UNIT_SHAPES.items()
        if wanted in (None, name)
    )
    raise InputMismatchError(
        f"scores['{key}'] has shape {tuple(score.shape)}; expected {expected}"
    )


def _flat_cpu(key: str, what: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        raise InputMismatchError(
            f"{what}['{key}'] must be a torch.Tensor, got {type(value).__name__}"
        )
    if value.is_complex() or value.dtype == torch.bool:
        raise InputMismatchError(f"{what}['{key}'] must be real numbers, got dtype {value.dtype}")
    flat = value.detach().to("cpu").reshape(-1)
    if flat.is_floating_point() and not bool(torch.isfinite(flat).all()):
        bad = int((~torch.isfinite(flat)).sum())
        raise NonFiniteError(f"{what}['{key}'] contains {bad} NaN or Inf value(s)")
    return flat


def _checked_coverage(scores: Mapping[str, Tensor]) -> Mapping[str, Tensor] | None:
    coverage = getattr(scores, "coverage", None)
    if coverage is None:
        return None
    if not isinstance(coverage, Mapping):
        raise InputMismatchError(
            f"scores.coverage must be a mapping like scores, got {type(coverage).__name__}"
        )
    missing = [k for k in scores if k not in coverage]
    extra = [k for k in coverage if k not in scores]
    if missing or extra:
        raise InputMismatchError(
            f"scores.coverage must have the same keys as scores; missing {missing}, extra {extra}"
        )
    return coverage


def _flat_coverage(key: str, coverage: Any, score: Tensor) -> Tensor:
    if not isinstance(coverage, Tensor) or tuple(coverage.shape) != tuple(score.shape):
        found = tuple(coverage.shape) if isinstance(coverage, Tensor) else type(coverage).__name__
        raise InputMismatchError(
            f"scores.coverage['{key}'] must have the score's shape {tuple(score.shape)}; "
            f"found {found}"
        )
    flat = _flat_cpu(key, "scores.coverage", coverage)
    if bool((flat < 0).any()):
        raise InputMismatchError(f"scores.coverage['{key}'] has negative counts")
    return flat


def _once(key: str, name: str, seen: dict[str, str]) -> None:
    """Refuse two score keys for one parameter or group (a tied weight and its alias)."""
    if name in seen:
        raise InputMismatchError(f"scores['{seen[name]}'] and scores['{key}'] both score "
                                 f"'{name}' (tied names of one parameter); score it once")
    seen[name] = key


def _per_layer(model: nn.Module, scores: Mapping[str, Tensor], wanted: str | None,
               coverage: Mapping[str, Tensor] | None) -> tuple[list[_ScoredLayer], str]:
    params = dict(model.named_parameters())
    _, names = canonical_names(model)
    canonical = {alias: name for name, aliases in names.items() for alias in aliases}
    layers: list[_ScoredLayer] = []
    granularities: dict[str, str] = {}
    seen: dict[str, str] = {}
    for key, score in scores.items():
        flat = _flat_cpu(key, "scores", score)
        module_name, weight = _check_key(key, model, params, canonical)
        _once(key, canonical.get(key, key), seen)
        granularities[key] = _granularity_of(key, score, weight, wanted)
        cov = None if coverage is None else _flat_coverage(key, coverage[key], score)
        layers.append(_ScoredLayer(canonical.get(key, key), module_name, tuple(score.shape), flat,
                                   cov, granularities[key], canonical=canonical))
    kinds = set(granularities.values())
    if len(kinds) > 1:
        detail = ", ".join(f"'{k}': {g}" for k, g in granularities.items())
        raise InvalidOptionError(f"all scores must share one granularity; got a mix ({detail})")
    return layers, kinds.pop()


def _unknown_group(key: str, structure: Structure) -> InputMismatchError:
    groups = structure.keys()
    listed = f"{', '.join(groups[:8])}{', ...' if len(groups) > 8 else ''}" or "none"
    if _names_heads(key):
        return InputMismatchError(
            f"score key '{key}' names heads, but '{key.rpartition('.')[0]}' is not a recognised "
            f"attention block: the model's structure has no head group there (groups: {listed})")
    why = structure.blocked.get(structure.canonical(key))
    if why is not None:
        return InputMismatchError(f"score key '{key}' names units that cannot be removed: {why}")
    return InputMismatchError(
        f"score key '{key}' is not a unit group of the model's structure (groups: {listed})")


def _grouped(model: nn.Module, scores: Mapping[str, Tensor], structure: Structure,
             coverage: Mapping[str, Tensor] | None) -> list[_ScoredLayer]:
    params = dict(model.named_parameters())
    keys = set(structure.keys())
    layers: list[_ScoredLayer] = []
    seen: dict[str, str] = {}
    for key, score in scores.items():
        if not isinstance(key, str):
            raise InputMismatchError(f"score keys must be unit group keys (str); got {key!r}")
        name = key if key in keys else structure.canonical(key)
        if name not in keys:
            raise _unknown_group(key, structure)
        _once(key, name, seen)
        group = structure.group(name)
        flat = _flat_cpu(key, "scores", score)
        if tuple(score.shape) != (group.num_units,):
            raise InputMismatchError(
                f"scores['{key}'] has shape {tuple(score.shape)}; expected ({group.num_units},) "
                f"(one per unit of the {group.kind} group)")
        cov = None if coverage is None else _flat_coverage(key, coverage[key], score)
        layers.append(_ScoredLayer(
            name, group.module, (group.num_units,), flat, cov, "structured", group=group,
            shapes=structure.shapes, parameters=tuple(p for p in group.params() if p in params)))
    return layers


def _scored_layers(
    model: nn.Module, scores: Mapping[str, Tensor], granularity: str | None = None,
    example_inputs: Any = None,
) -> tuple[list[_ScoredLayer], str, Structure | None]:
    """Validate ``scores`` against ``model``; return the layers in key order, the granularity
    and, for structured scores, the model's structure."""
    if not isinstance(model, nn.Module):
        raise InputMismatchError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(scores, Mapping):
        raise InputMismatchError(
            f"scores must be a mapping from parameter name to tensor, got {type(scores).__name__}"
        )
    if len(scores) == 0:
        raise NoPrunableLayersError("scores is empty: there is no layer to prune")
    wanted = _requested_granularity(scores, granularity)
    coverage = _checked_coverage(scores)
    if wanted != "structured":
        return (*_per_layer(model, scores, wanted, coverage), None)
    masked = torch_prune_masks(model)
    if masked:
        raise InputMismatchError(
            f"the model is already pruned with torch.nn.utils.prune ({', '.join(masked)}); "
            "call prune.remove on it (or pass the unpruned model) before pruning again")
    # Discovered on the caller's model (a structure cached by a search is reused); it names
    # parameters, so it holds for the working copy too.
    structure = discover(model, example_inputs)
    return _grouped(model, scores, structure, coverage), wanted, structure


# --------------------------------------------------------------------------------------------
# Ranking
# --------------------------------------------------------------------------------------------


@dataclass
class _Ranking:
    """The global pruning order over all scored units, minus the units that are always kept."""

    order: Tensor
    """Flat indices (into the concatenation of all layers) of prunable units, prune-first first."""
    sizes: list[int]
    """Units per layer, in key order."""

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def max_pruned(self) -> int:
        return self.order.numel()

    def keep_flat(self, count: int) -> list[Tensor]:
        """Per-layer flat bool keep-masks after pruning the ``count`` first units of the order."""
        keep = torch.ones(self.total, dtype=torch.bool)
        keep[self.order[:count]] = False
        return list(torch.split(keep, self.sizes))


def _kept_per_layer(units: int, min_keep: float) -> int:
    # round() first: min_keep * units can land just above an integer (0.7 * 10 = 7.000000000000001).
    return max(1, math.ceil(round(min_keep * units, 9)))


def _rank(layers: list[_ScoredLayer], min_keep: float) -> _Ranking:
    sizes = [layer.units for layer in layers]
    dtype = torch.float64 if any(l.scores.dtype == torch.float64 for l in layers) else torch.float32
    flat = torch.cat([layer.scores.to(dtype) for layer in layers])
    # A stable sort of the key-ordered concatenation breaks ties by key order, then flat index.
    order = torch.sort(flat, stable=True).indices
    layer_of = torch.repeat_interleave(torch.arange(len(layers)), torch.tensor(sizes))[order]
    # Positions in the order grouped by layer, each group still in rank order.
    by_layer = torch.sort(layer_of, stable=True).indices
    prunable = torch.ones(order.numel(), dtype=torch.bool)
    end = 0
    for layer in layers:
        end += layer.units
        # A layer's highest-ranked units are the ones it keeps.
        prunable[by_layer[end - _kept_per_layer(layer.units, min_keep) : end]] = False
    return _Ranking(order=order[prunable], sizes=sizes)


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


def _weight_param_masks(unit_mask: Tensor, module: nn.Module) -> dict[str, Tensor]:
    return {"weight": unit_mask}


def _neuron_param_masks(unit_mask: Tensor, module: nn.Module) -> dict[str, Tensor]:
    weight = module.weight
    view = unit_mask.view(-1, *([1] * (weight.dim() - 1)))
    masks = {"weight": view.expand(weight.shape).contiguous()}
    if getattr(module, "bias", None) is not None:
        masks["bias"] = unit_mask.clone()
    return masks


# Granularity -> how a unit mask becomes masks of the module's parameters.
PARAM_MASKS: dict[str, Callable[[Tensor, nn.Module], dict[str, Tensor]]] = {
    "weight": _weight_param_masks,
    "neuron": _neuron_param_masks,
}


def _unit_masks(
    layers: list[_ScoredLayer], ranking: _Ranking, count: int, model: nn.Module
) -> dict[str, Tensor]:
    masks = {}
    for layer, keep in zip(layers, ranking.keep_flat(count)):
        device = next(model.get_submodule(layer.module_name).parameters()).device
        masks[layer.key] = keep.view(layer.unit_shape).to(device)
    return masks


def _param_masks(
    layers: list[_ScoredLayer], unit_masks: dict[str, Tensor], model: nn.Module
) -> dict[str, Tensor]:
    """Canonical parameter name -> keep-mask, on the parameter's device. A parameter in several
    layers' masks (a Linear whose rows are units of one group and columns of another) gets the
    AND of them."""
    params = dict(model.named_parameters())
    masks: dict[str, Tensor] = {}
    for layer in layers:
        for name, mask in layer.param_masks(unit_masks[layer.key], model).items():
            mask = mask.to(params[name].device)
            masks[name] = mask if name not in masks else masks[name] & mask
    return masks


class _MaskWriter:
    """Rewrites a model's scored parameters as original * mask, from one saved copy of originals.

    This lets the floor search evaluate many pruned counts on one model instead of a deep copy each.
    """

    def __init__(
        self, model: nn.Module, layers: list[_ScoredLayer], ranking: _Ranking,
        reconstruct: Reconstruction | None = None,
    ):
        self.model = model
        self.layers = layers
        self.ranking = ranking
        self.reconstruct = reconstruct
        self.params = dict(model.named_parameters())
        names = set(_param_masks(layers, _unit_masks(layers, ranking, 0, model), model))
        if reconstruct is not None:  # it rewrites unmasked parameters too
            names.update(reconstruct.parameter_names(model))
        self.originals = {name: self.params[name].detach().clone() for name in names}

    @torch.no_grad()
    def write(self, count: int) -> None:
        unit_masks = _unit_masks(self.layers, self.ranking, count, self.model)
        masks = _param_masks(self.layers, unit_masks, self.model)
        if self.reconstruct is not None:
            self.restore()
        _write_masked(self.params, self.originals, masks)
        if self.reconstruct is not None:
            self.reconstruct(self.model, masks)

    @torch.no_grad()
    def restore(self) -> None:
        _restore(self.params, self.originals)


@torch.no_grad()
def _restore(params: Mapping[str, Tensor], originals: Mapping[str, Tensor]) -> None:
    for name, original in originals.items():
        params[name].copy_(original)


@torch.no_grad()
def _write_masked(params: Mapping[str, Tensor], originals: Mapping[str, Tensor],
                  masks: Mapping[str, Tensor]) -> None:
    for name, mask in masks.items():
        original = originals[name]
        params[name].copy_(original * mask.to(original.dtype))


class _DetachMasked:
    """Forward hook that keeps a masked module deep-copyable and picklable.

    torch.nn.utils.prune recomputes ``weight = weight_orig * weight_mask`` before every forward
    and leaves it on the module; with gradients on, that tensor is not a graph leaf, and
    ``copy.deepcopy`` / ``torch.save`` refuse non-leaf tensors. After each forward this hook
    swaps it for a detached view of the same values. Backward is unaffected: the autograd graph
    holds its own reference to the non-leaf tensor.
    """

    def __init__(self) -> None:
        self.names: set[str] = set()
        """Parameter names (``"weight"``, ``"bias"``) masked on this module."""

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.detach(module)

    def detach(self, module: nn.Module) -> None:
        for name in self.names:
            value = module.__dict__.get(name)
            if isinstance(value, Tensor) and not value.is_leaf:
                setattr(module, name, value.detach())

    @classmethod
    def attach(cls, module: nn.Module, name: str) -> None:
        """Watch ``module.<name>`` (one hook per module, however many names)."""
        hook = next((h for h in module._forward_hooks.values() if isinstance(h, cls)), None)
        if hook is None:
            hook = cls()
            module.register_forward_hook(hook)
        hook.names.add(name)
        hook.detach(module)

    @classmethod
    def forget(cls, module: nn.Module, name: str) -> None:
        """Stop watching ``module.<name>``; the hook goes with its last name."""
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(hook, cls):
                hook.names.discard(name)
                if not hook.names:
                    del module._forward_hooks[key]


def _apply_torch_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """torch.nn.utils.prune masks on every module that holds a masked parameter (a tied weight
    under each of its names, so that every use of it is masked)."""
    _, names = canonical_names(model)
    for name, mask in masks.items():
        for alias in names.get(name, [name]):
            module_name, _, pname = alias.rpartition(".")
            module = model.get_submodule(module_name)
            torch_prune.custom_from_mask(module, pname, mask)
            _DetachMasked.attach(module, pname)


def torch_prune_masks(model: nn.Module) -> dict[str, Tensor]:
    """Tensor name -> keep-mask of every tensor of ``model`` that :mod:`torch.nn.utils.prune`
    reparametrises (``weight_orig`` * ``weight_mask``), under its plain name (``"0.weight"``)."""
    out = {}
    for module_name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, torch_prune.BasePruningMethod):
                name = hook._tensor_name
                prefix = f"{module_name}." if module_name else ""
                out[prefix + name] = getattr(module, name + "_mask")
    return out


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every :mod:`torch.nn.utils.prune` mask made permanent
    (plain parameters holding the masked values; tied parameters stay one parameter); a plain
    copy if nothing is masked."""
    masked = torch_prune_masks(model)
    # A masked tensor's value (orig * mask, computed) is not a graph leaf, which deepcopy
    # refuses when the masks were set outside bingo (no _DetachMasked hook): copy with
    # detached values (the forward hook recomputes them), then restore.
    computed = []
    try:
        for name in masked:
            module_name, _, tensor = name.rpartition(".")
            module = model.get_submodule(module_name)
            computed.append((module, tensor, getattr(module, tensor)))
            setattr(module, tensor, getattr(module, tensor).detach())
        copied = copy.deepcopy(model)
    finally:
        for module, tensor, value in computed:
            setattr(module, tensor, value)
    for name in masked:
        module_name, _, tensor = name.rpartition(".")
        torch_prune.remove(copied.get_submodule(module_name), tensor)
    return copied


# --------------------------------------------------------------------------------------------
# Choosing how many units to prune
# --------------------------------------------------------------------------------------------


def _accuracy_value(value: Any, count: int) -> float:
    try:
        accuracy = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise InvalidOptionError(
            f"eval_fn must return a number (the accuracy); it returned {type(value).__name__}"
        ) from None
    if not math.isfinite(accuracy):
        raise NonFiniteError(f"eval_fn returned {accuracy} with {count} units pruned")
    return accuracy


class _Evaluator:
    """Evaluates the working model at a pruned count and records the point in the history."""

    def __init__(self, writer: _MaskWriter, eval_fn: EvalFn, total: int, bar: tqdm):
        self.writer = writer
        self.eval_fn = eval_fn
        self.total = total
        self.bar = bar
        self.accuracy: dict[int, float] = {}
        self.history: list[dict[str, Any]] = []

    def __call__(self, count: int, phase: str) -> float:
        # The dense model is evaluated first and is grid point 0 too: count it once.
        if count in self.accuracy:
            return self.accuracy[count]
        self.writer.write(count)
        accuracy = _accuracy_value(self.eval_fn(self.writer.model), count)
        self.accuracy[count] = accuracy
        self.history.append(
            {
                "pruned_units": count,
                "sparsity": count / self.total,
                "accuracy": accuracy,
                "phase": phase,
            }
        )
        self.bar.update(1)
        self.bar.set_postfix(pruned=count, accuracy=f"{accuracy:.4g}")
        return accuracy


def _grid_points(max_count: int, grid: int) -> list[int]:
    # Integer rounding of i * max / (grid - 1), so the ends are exactly 0 and max_count.
    steps = grid - 1
    return sorted({(2 * i * max_count + steps) // (2 * steps) for i in range(grid)})


def _bisect_steps(width: int, tolerance: int) -> int:
    steps = 0
    while width > tolerance:
        width = (width + 1) // 2
        steps += 1
    return steps


def _most_evaluations(max_count: int, grid: int, tolerance: int) -> int:
    """The floor search's evaluations at most: every grid point (the dense model is point 0),
    then the bisection of the widest grid cell. Known before the first evaluation, so a
    progress bar can show it as its total from the start."""
    points = _grid_points(max_count, grid)
    widths = [hi - lo for lo, hi in zip(points, points[1:])]
    return len(points) + max((_bisect_steps(w, tolerance) for w in widths), default=0)


@dataclass(frozen=True)
class _Bound:
    """What the floor search must keep: ``eval_fn >= floor``, or ``eval_fn <= ceiling``."""

    value: float
    """The floor or the ceiling."""
    lower_is_better: bool
    """True for a ceiling (perplexity, loss), False for a floor (accuracy)."""

    def passes(self, value: float) -> bool:
        return value <= self.value if self.lower_is_better else value >= self.value

    def unreachable(self, dense: float) -> str:
        if self.lower_is_better:
            return (f"the unpruned model scores {dense:.6g}, above the ceiling {self.value:.6g}; "
                    "raise the ceiling or check eval_fn")
        return (f"the unpruned model reaches accuracy {dense:.6g}, below the floor "
                f"{self.value:.6g}; lower the floor or check eval_fn")


def _search_floor(
    evaluate: _Evaluator, max_count: int, bound: _Bound, grid: int, tolerance: int
) -> int:
    """The pruned count the floor allows: grid search for the first failure, then bisect its cell.

    Accuracy need not fall monotonically with the count, so only the cell before the first failing
    grid point is trusted, and the answer is always a count that was evaluated and passed.
    """
    dense = evaluate(0, "grid")
    if not bound.passes(dense):
        raise UnreachableFloorError(bound.unreachable(dense))
    points = _grid_points(max_count, grid)
    accuracies = [evaluate(count, "grid") for count in points]
    failing = [i for i, accuracy in enumerate(accuracies) if not bound.passes(accuracy)]
    if not failing:
        return max_count
    lo, hi = points[failing[0] - 1], points[failing[0]]
    while hi - lo > tolerance:
        mid = (lo + hi) // 2
        if bound.passes(evaluate(mid, "bisect")):
            lo = mid
        else:
            hi = mid
    return lo


def _count_for_sparsity(sparsity: float, ranking: _Ranking) -> int:
    wanted = round(sparsity * ranking.total)
    if wanted > ranking.max_pruned:
        warnings.warn(
            f"sparsity={sparsity:g} asks for {wanted} of {ranking.total} units, but min_keep and "
            f"keeping one unit per layer allow only {ranking.max_pruned}; pruning "
            f"{ranking.max_pruned} (sparsity {ranking.max_pruned / ranking.total:.4g})",
            stacklevel=3,
        )
        return ranking.max_pruned
    return wanted


# --------------------------------------------------------------------------------------------
# Never-sampled units
# --------------------------------------------------------------------------------------------


def _unsampled_pruned(layers: list[_ScoredLayer], unit_masks: dict[str, Tensor]) -> dict[str, int]:
    counts = {}
    for layer in layers:
        if layer.coverage is None:
            continue
        pruned = ~unit_masks[layer.key].reshape(-1).cpu()
        count = int((pruned & (layer.coverage == 0)).sum())
        if count:
            counts[layer.key] = count
    return counts


def _check_unsampled(
    layers: list[_ScoredLayer], unit_masks: dict[str, Tensor], allow: bool
) -> None:
    counts = _unsampled_pruned(layers, unit_masks)
    if not counts:
        return
    total = sum(counts.values())
    where = ", ".join(f"{n} in '{key}'" for key, n in counts.items())
    if not allow:
        raise BingoError(
            f"pruning would remove {total} unit(s) the ticket search never sampled (coverage 0): "
            f"{where}. Their scores carry no evidence; run the search longer, or pass "
            "allow_unsampled=True to prune them anyway"
        )
    warnings.warn(f"pruning {total} never-sampled unit(s) (coverage 0): {where}", stacklevel=3)


# --------------------------------------------------------------------------------------------
# Structured shrinking of MLPs
# --------------------------------------------------------------------------------------------


def _mask_problem(model: nn.Sequential, unit_masks: Mapping[str, Tensor]) -> str | None:
    """Why ``unit_masks`` cannot shrink ``model`` (an MLP shrink_mlp supports), or None."""
    names = linear_names(model)
    keys = {f"{name}.weight": name for name in names}
    for key, mask in unit_masks.items():
        if key not in keys:
            return f"unit mask key '{key}' is not the weight of an nn.Linear of the MLP"
        linear = model.get_submodule(keys[key])
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            return f"unit_masks['{key}'] must be a bool tensor"
        if tuple(mask.shape) == tuple(linear.weight.shape):
            return "shrink_mlp needs neuron-granularity masks; got weight-granularity ones"
        if tuple(mask.shape) != (linear.out_features,):
            return (
                f"unit_masks['{key}'] has shape {tuple(mask.shape)}; "
                f"expected ({linear.out_features},)"
            )
        removed = int((~mask).sum())
        if keys[key] == names[-1] and removed:
            return (
                f"shrink_mlp cannot remove outputs of the final nn.Linear '{key}' (they are the "
                f"model's outputs); {removed} of {linear.out_features} are pruned"
            )
        if removed == linear.out_features:
            return f"unit_masks['{key}'] removes every neuron of the layer"
    return None


def _zero_image(modules: list[nn.Module], width: int, like: Tensor) -> Tensor:
    """What a pruned neuron (pre-activation 0) feeds the next layer, through ``modules``.

    Evaluated in eval mode (Dropout is the identity), on copies so the caller's modules keep
    their mode.
    """
    value = torch.zeros(1, width, dtype=like.dtype, device=like.device)
    with torch.no_grad():
        for module in modules:
            value = copy.deepcopy(module).eval()(value)
    return value[0]


def with_parameters(layer: nn.Module, weight: Tensor, bias: Tensor | None) -> nn.Module:
    """``layer`` (freshly built with matching shapes) holding copies of ``weight`` and ``bias``."""
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def small_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    out_features, in_features = weight.shape
    return with_parameters(nn.Linear(in_features, out_features, bias=bias is not None,
                                     device=weight.device, dtype=weight.dtype), weight, bias)


def shrink_mlp(model: nn.Module, unit_masks: Mapping[str, Tensor]) -> nn.Sequential:
    """Remove pruned hidden neurons from an MLP, giving a smaller model with the same outputs.

    ``model`` is an nn.Sequential of nn.Linear and elementwise modules (see
    ``bingo.units.ELEMENTWISE_MODULES``), optionally led by nn.Flatten(); it may be dense or already masked.
    ``unit_masks`` maps "<index>.weight" to a bool keep-mask of shape (out_features,) (neuron
    granularity, as in :attr:`PruneResult.unit_masks`); absent layers keep every neuron, and the
    final Linear must keep all its outputs.

    Removing neuron j of Linear i deletes row j of W_i and b_i and column j of W_{i+1}. The masked
    model still feeds act(0) from a pruned neuron to the next layer (Sigmoid(0) = 0.5), so
    W_{i+1}[:, j] * act(0) is folded into b_{i+1}, creating that bias if needed. Dropout is taken
    in eval mode.
    """
    problem = mlp_problem(model)
    if problem is None:
        problem = _mask_problem(model, unit_masks)
    if problem is not None:
        raise InputMismatchError(problem)
    children: list[nn.Module] = []
    # Features leaving the previous Linear: which are kept, and what the removed ones carry.
    kept: Tensor | None = None
    after_kept: list[nn.Module] = []
    for name, child in model.named_children():
        if type(child) is not nn.Linear:
            children.append(copy.deepcopy(child))
            after_kept.append(child)
            continue
        weight = child.weight.detach()
        bias = None if child.bias is None else child.bias.detach()
        if kept is not None:
            removed = ~kept
            carried = _zero_image(after_kept, kept.numel(), weight)
            fold = weight[:, removed] @ carried[removed]
            weight = weight[:, kept]
            if bias is not None:
                bias = bias + fold
            elif bool(fold.any()):
                bias = fold
        mask = unit_masks.get(f"{name}.weight")
        if mask is None:
            mask = torch.ones(child.out_features, dtype=torch.bool)
        kept = mask.to(weight.device)
        weight = weight[kept]
        bias = None if bias is None else bias[kept]
        children.append(small_linear(weight, bias))
        after_kept = []
    return nn.Sequential(*children).train(model.training)


def shrink_structured(model: nn.Module, unit_masks: Mapping[str, Tensor], *,
                      example_inputs: Any = None) -> nn.Module:
    """A physically smaller copy of ``model`` without the units ``unit_masks`` removes, for any
    model the structure layer understands (:func:`bingo.structure.shrink.shrink`: attention
    heads or key/value groups, MLP neurons, conv channels with their BatchNorm entries;
    nn.MultiheadAttention becomes a :class:`bingo.attention.PrunedMultiheadAttention`).

    ``unit_masks`` maps structure-group keys (``"<attention block>.heads"``, the first weight of
    an MLP or of a channel group) to bool keep-masks over the group's units, as
    :attr:`PruneResult.unit_masks` of structured scores. ``model`` may be dense or masked
    (torch.nn.utils.prune); it is not modified. ``example_inputs``: one batch the model takes,
    to trace it and to check the result (built from the config of transformers models and
    MLPs when None). The result computes what the model with every slice of the removed units
    zeroed computes; the shrink checks that on the example inputs and raises otherwise.
    """
    if torch_prune_masks(model):
        model = plain_copy(model)
    return shrink(model, dict(unit_masks), example_inputs=example_inputs)


def _parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def median_seconds_interleaved(models: list[nn.Module], batch: Any) -> list[float]:
    """Median forward time of each model on ``batch`` (a tensor, a tuple of positional
    arguments or a dict of keyword arguments); runs alternate so drift in machine load hits all
    alike."""
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for _ in range(_SPEEDUP_WARMUP):
            for m in models:
                _forward(m, batch)
        for _ in range(_SPEEDUP_REPEATS):
            for i, m in enumerate(models):
                start = time.perf_counter()
                _forward(m, batch)
                times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _timing_batch(inputs: Any, size: int = _SPEEDUP_BATCH_EXAMPLES) -> Any:
    """``inputs`` on the CPU, every tensor repeated along its first (batch) dimension to
    ``size`` examples."""
    if isinstance(inputs, Tensor):
        if inputs.dim() == 0:
            return inputs.cpu()
        repeats = -(-size // max(inputs.shape[0], 1))
        return inputs.cpu().repeat(repeats, *([1] * (inputs.dim() - 1)))[:size]
    if isinstance(inputs, dict):
        return {k: _timing_batch(v, size) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_timing_batch(v, size) for v in inputs)
    return inputs


def _mlp_timing_batch(mlp: nn.Sequential) -> Tensor:
    first = mlp.get_submodule(linear_names(mlp)[0])
    generator = torch.Generator().manual_seed(0)
    return torch.randn(_SPEEDUP_BATCH_ROWS, first.in_features, generator=generator,
                       dtype=first.weight.dtype)


def _measured_speedup(dense: nn.Module, small: nn.Module, batch: Any) -> float:
    """CPU inference speedup of ``small`` over ``dense`` on ``batch`` (CPU copies of both are
    timed in eval mode; a batch the models refuse falls back to its first example)."""
    dense_cpu = copy.deepcopy(dense).cpu().eval()
    small_cpu = copy.deepcopy(small).cpu().eval()
    try:
        dense_s, small_s = median_seconds_interleaved([dense_cpu, small_cpu], batch)
    except Exception:  # noqa: BLE001  an input without a batch dimension was repeated
        single = _timing_batch(batch, 1)
        dense_s, small_s = median_seconds_interleaved([dense_cpu, small_cpu], single)
    return dense_s / max(small_s, 1e-12)


def _shrunk(model: nn.Module, unit_masks: dict[str, Tensor], granularity: str,
            structure: Structure | None, example_inputs: Any) -> tuple[nn.Module, nn.Module, Any]:
    """(shrunk model, the dense model to time it against, timing batch), or InputMismatchError
    saying why ``model`` cannot be shrunk."""
    if granularity == "structured":
        inputs = example_inputs if example_inputs is not None else example_inputs_for(model)
        small = shrink(model, unit_masks, example_inputs=inputs, structure=structure)
        return small, model, _timing_batch(inputs)
    if granularity != "neuron":
        raise InputMismatchError(
            f"structured shrinking needs neuron-granularity or structured scores, got "
            f"{granularity}")
    problem = mlp_problem(model) or _mask_problem(model, unit_masks)
    if problem is not None:
        raise InputMismatchError(problem)
    # The dense side is a plain copy too, so that the timing compares like with like.
    return shrink_mlp(model, unit_masks), shrink_mlp(model, {}), _mlp_timing_batch(model)


def _structured(
    model: nn.Module, unit_masks: dict[str, Tensor], granularity: str, option: bool | str,
    structure: Structure | None = None, example_inputs: Any = None,
) -> tuple[StructuredResult | None, str | None]:
    """The shrunk model for ``structured=option``, or None and why; ``model`` is unmasked here
    (refitted, with ``reconstruct``)."""
    if option is False:
        return None, "structured=False"
    try:
        small, dense, batch = _shrunk(model, unit_masks, granularity, structure, example_inputs)
    except InputMismatchError as exc:
        if option == "auto":
            return None, str(exc)
        raise InputMismatchError(f"structured=True: {exc}") from exc
    return StructuredResult(
        model=small,
        parameters=_parameter_count(small),
        dense_parameters=_parameter_count(model),
        speedup=_measured_speedup(dense, small, batch),
    ), None


# --------------------------------------------------------------------------------------------
# prune
# --------------------------------------------------------------------------------------------


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_options(
    floor: float | None,
    ceiling: float | None,
    sparsity: float | None,
    eval_fn: EvalFn | None,
    min_keep: float,
    grid: int,
    tolerance: int,
    structured: bool | str,
) -> None:
    if sum(v is not None for v in (floor, ceiling, sparsity)) != 1:
        raise InvalidOptionError(
            "pass exactly one of floor= or ceiling= (with eval_fn) or sparsity=")
    for name, bound in (("floor", floor), ("ceiling", ceiling)):
        if bound is None:
            continue
        if not _is_real(bound) or not math.isfinite(bound):
            raise InvalidOptionError(f"{name} must be a finite number, got {bound!r}")
        if eval_fn is None:
            raise InvalidOptionError(f"{name}= needs eval_fn= (a function model -> "
                                     f"{'accuracy' if name == 'floor' else 'e.g. perplexity'})")
    if sparsity is not None and (not _is_real(sparsity) or not 0.0 <= sparsity <= 1.0):
        raise InvalidOptionError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    if eval_fn is not None and not callable(eval_fn):
        raise InvalidOptionError(f"eval_fn must be callable, got {type(eval_fn).__name__}")
    if not _is_real(min_keep) or not 0.0 <= min_keep <= 1.0:
        raise InvalidOptionError(f"min_keep must be a fraction in [0, 1], got {min_keep!r}")
    if not isinstance(grid, int) or isinstance(grid, bool) or grid < 2:
        raise InvalidOptionError(f"grid must be an integer >= 2, got {grid!r}")
    if not isinstance(tolerance, int) or isinstance(tolerance, bool) or tolerance < 1:
        raise InvalidOptionError(f"tolerance must be an integer >= 1, got {tolerance!r}")
    require_option("structured", structured, STRUCTURED_CHOICES)


def _check_reconstruct(reconstruct: Any) -> None:
    if reconstruct is None:
        return
    missing = [a for a in ("prepare", "parameter_names", "refitted")
               if not hasattr(reconstruct, a)] + ([] if callable(reconstruct) else ["__call__"])
    if missing:
        raise InvalidOptionError(
            f"reconstruct must be a reconstruction such as bingo.reconstruct."
            f"LeastSquaresReconstruction(data); {type(reconstruct).__name__} lacks {missing}")


def _floor_count(
    work: nn.Module,
    layers: list[_ScoredLayer],
    ranking: _Ranking,
    bound: _Bound,
    eval_fn: EvalFn,
    grid: int,
    tolerance: int,
    progress: bool,
    reconstruct: Reconstruction | None,
) -> tuple[int, _Evaluator]:
    writer = _MaskWriter(work, layers, ranking, reconstruct)
    # The total is the most evaluations the search can need, fixed before it starts; a search
    # that needs fewer (no grid point fails, or a narrower cell) closes at the count it made.
    bar = tqdm(total=_most_evaluations(ranking.max_pruned, grid, tolerance), desc="bingo prune",
               unit="eval", disable=not progress)
    try:
        evaluate = _Evaluator(writer, eval_fn, ranking.total, bar)
        count = _search_floor(evaluate, ranking.max_pruned, bound, grid, tolerance)
        bar.total = bar.n
    finally:
        # The working model may be the caller's (inplace=True): never leave it half-pruned.
        writer.restore()
        bar.close()
    return count, evaluate


def pruning_order(model: nn.Module, scores: Mapping[str, Tensor], *,
                  granularity: str | None = None, example_inputs: Any = None,
                  min_keep: float = 0.0) -> list[tuple[str, Any]]:
    """``(score key, unit)`` in the order :func:`prune` removes units for these ``scores``
    (lowest score first, ties by key order; every layer keeps ``min_keep`` of its units and at
    least one, which are left out): pruning to ``count`` units removes the first ``count``. A
    unit is a flat index into its score tensor; a structured key is its group's key. Arguments
    as for :func:`prune`."""
    layers, _, _ = _scored_layers(model, scores, granularity, example_inputs)
    ranking = _rank(layers, min_keep)
    starts = torch.tensor([0] + ranking.sizes).cumsum(0)
    layer_of = torch.searchsorted(starts, ranking.order, right=True) - 1
    return [(layers[i].key, int(flat - starts[i]))
            for i, flat in zip(layer_of.tolist(), ranking.order.tolist())]


def prune(
    model: nn.Module,
    scores: Mapping[str, Tensor],
    *,
    floor: float | None = None,
    sparsity: float | None = None,
    eval_fn: EvalFn | None = None,
    ceiling: float | None = None,
    min_keep: float = 0.0,
    grid: int = 8,
    tolerance: int = 1,
    inplace: bool = False,
    allow_unsampled: bool = False,
    structured: bool | str = "auto",
    progress: bool = True,
    reconstruct: Reconstruction | None = None,
    granularity: str | None = None,
    example_inputs: Any = None,
) -> PruneResult:
    """Prune the lowest-scored units of ``model`` in one shot.

    Args:
        model: the trained model.
        scores: score key -> scores, higher means keep. Per-layer scores are keyed by the weight
            of an nn.Linear / nn.Conv2d (a tied weight by any of its names: they are one
            parameter, kept under its canonical name) and shaped like the weight (weight
            granularity) or (out_features / out_channels,) (neuron granularity: the rows and
            bias entries of that layer only). Structured scores are keyed by the unit groups of
            :func:`bingo.structure.discover` (``"<attention block>.heads"``,
            ``"model.layers.0.mlp.gate_proj.weight"``, ...) and shaped (num_units,): a removed
            unit loses every slice of its group. An attribute ``coverage`` (same keys and
            shapes) marks units the ticket search never sampled (0); pruning those raises unless
            ``allow_unsampled``.
        floor: prune as much as keeps ``eval_fn(model) >= floor``; needs ``eval_fn``.
        ceiling: prune as much as keeps ``eval_fn(model) <= ceiling`` (a lower-is-better
            metric such as perplexity); needs ``eval_fn``. Same search as ``floor``.
        sparsity: prune exactly ``round(sparsity * total_units)`` units instead.
        eval_fn: model -> accuracy. With ``sparsity``, only reported.
        min_keep: fraction of each layer's units always kept (besides at least one per layer).
        grid: number of evenly spaced pruned counts the floor search evaluates first.
        tolerance: the floor bisection stops when its cell is at most this many units wide.
        inplace: prune ``model`` itself instead of a deep copy.
        allow_unsampled: prune never-sampled units with a warning instead of raising.
        structured: also return the physically smaller model with its measured CPU speedup
            (``result.structured``), for structured scores on any model the structure layer can
            shrink and for neuron scores on a plain MLP: "auto" when possible (else
            ``result.structured_note`` says why not), True requires it, False skips it.
        progress: show a progress bar over the floor search's evaluations.
        reconstruct: refit the surviving weights after masking, e.g.
            :class:`bingo.reconstruct.LeastSquaresReconstruction` (calibration data in, no
            retraining). Every count the floor search evaluates is reconstructed first, so the
            floor holds for the reconstructed model, and so is the returned one.
        granularity: ``"weight"``, ``"neuron"`` or ``"structured"``; None: the scores' own
            ``granularity`` attribute (:class:`bingo.Significance`, :class:`UnitScores`), else
            ``"structured"`` if a key names heads (``"<block>.heads"``), else per layer as each
            score's shape says. Structured and per-layer neuron scores can have the same keys
            and shapes (the first layer of an MLP) yet differ in what a unit is: say which.
        example_inputs: one batch the model takes (a tensor, a tuple of positional arguments or
            a dict of keyword arguments), for structured scores: to discover the model's
            structure (unless it is cached, e.g. by a search), to check the shrunk model, and,
            repeated to a batch, to time it. Built from the config of transformers models and
            MLPs when None.

    Ranking is global over all scored units, lowest score first; ties go by key order, then by
    flat index. Each layer (or group) keeps at least one unit and ``min_keep`` of its units. The
    floor search evaluates ``grid`` counts from 0 to the most that may be pruned, then bisects
    between the last passing grid point and the first failing one; the count chosen was
    evaluated and passed. Never-sampled units are checked at the chosen count, so with
    ``floor`` the error comes after the search.
    """
    _check_options(floor, ceiling, sparsity, eval_fn, min_keep, grid, tolerance, structured)
    _check_reconstruct(reconstruct)
    require_data("model tensor", model.state_dict(keep_vars=True).items())
    if isinstance(scores, Mapping):
        require_data("score", scores.items())
    layers, granularity, structure = _scored_layers(model, scores, granularity, example_inputs)
    ranking = _rank(layers, min_keep)
    # One working model for everything: the floor search rewrites its weights in place, and it
    # becomes the result, so a model is deep-copied at most once.
    work = model if inplace else copy.deepcopy(model)
    if reconstruct is not None:
        reconstruct.prepare(work)  # the dense targets, before any mask is written

    history: list[dict[str, Any]] = []
    dense_accuracy = accuracy = None
    if sparsity is None:
        bound = _Bound(float(floor), False) if floor is not None else _Bound(float(ceiling), True)
        count, evaluate = _floor_count(
            work, layers, ranking, bound, eval_fn, grid, tolerance, progress, reconstruct,
        )
        history = sorted(evaluate.history, key=lambda point: point["pruned_units"])
        dense_accuracy, accuracy = evaluate.accuracy[0], evaluate.accuracy[count]
    else:
        count = _count_for_sparsity(sparsity, ranking)

    unit_masks = _unit_masks(layers, ranking, count, work)
    _check_unsampled(layers, unit_masks, allow_unsampled)
    masks = _param_masks(layers, unit_masks, work)

    if sparsity is not None and eval_fn is not None:
        dense_accuracy = _accuracy_value(eval_fn(work), 0)
    reconstructed = None
    params = dict(work.named_parameters())
    originals: dict[str, Tensor] = {}
    # inplace=True: whatever fails from here on (the refit, structured=True, eval_fn), the
    # caller's model is left as it came in: its values and its modules (no torch prune masks).
    kept = ModelStructure(work)
    try:
        if reconstruct is not None:
            originals = {n: params[n].detach().clone()
                         for n in {*masks, *reconstruct.parameter_names(work)}}
            _write_masked(params, originals, masks)
            reconstruct(work, masks)
            reconstructed = list(reconstruct.refitted)
        structured_result, structured_note = _structured(
            work, unit_masks, granularity, structured, structure, example_inputs)
        _apply_torch_masks(work, masks)
        if sparsity is not None and eval_fn is not None:
            accuracy = _accuracy_value(eval_fn(work), count)
    except BaseException:
        kept.restore()
        _restore(params, originals)
        raise

    weight_masks = [mask for name, mask in masks.items() if name.endswith("weight")]
    zeroed = sum(int((~m).sum()) for m in weight_masks)
    return PruneResult(
        model=work,
        masks=masks,
        unit_masks=unit_masks,
        granularity=granularity,
        pruned_units=count,
        total_units=ranking.total,
        sparsity=count / ranking.total,
        weight_sparsity=zeroed / sum(m.numel() for m in weight_masks),
        accuracy=accuracy,
        dense_accuracy=dense_accuracy,
        floor=float(floor) if floor is not None else None,
        history=history,
        structured=structured_result,
        ceiling=float(ceiling) if ceiling is not None else None,
        reconstructed=reconstructed,
        structured_note=structured_note,
    )
