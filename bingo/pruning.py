"""One-shot pruning from significance scores, and structured shrinking of pruned MLPs.

After training, the ticket search has produced a score per unit (a weight element, or a whole
output neuron / channel). :func:`prune` ranks every unit of every scored layer globally and
removes the lowest-ranked ones, either a fixed number (``sparsity=``) or as many as an accuracy
floor allows (``floor=`` with ``eval_fn``), or, for a lower-is-better metric such as perplexity, as
many as a ceiling allows (``ceiling=``). The pruned model uses :mod:`torch.nn.utils.prune`
masks, so the usual tools (``prune.remove``, ``prune.is_pruned``) work on it.

For neuron-granularity scores on a plain MLP, :func:`shrink_mlp` turns the masked model into a
physically smaller one that computes exactly the same function; for structured scores (attention
heads keyed ``"<block>.heads"`` and MLP-block neurons, see :func:`bingo.units.find_units`),
:func:`shrink_structured` does the same for transformers.
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
from bingo.attention import HeadLayout, head_layout, param_head_masks, shrink_heads
from bingo.reconstruct import LeastSquaresReconstruction as Reconstruction
from bingo.units import HEADS_KEY, layer_kind, linear_names, mlp_problem

__all__ = ["PruneResult", "StructuredResult", "prune", "shrink_mlp", "shrink_structured"]

EvalFn = Callable[[nn.Module], float]


STRUCTURED_CHOICES = ("auto", True, False)

# Timing of the structured speedup: a fixed batch, a few warm-up passes, then the median.
_SPEEDUP_BATCH_ROWS = 256
_SPEEDUP_WARMUP = 3
_SPEEDUP_REPEATS = 15


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class StructuredResult:
    """A physically smaller copy of a neuron-pruned MLP (see :func:`shrink_mlp`)."""

    model: nn.Module = field(repr=False)
    """The shrunk model (an nn.Sequential for an MLP); its outputs equal the masked model's."""
    parameters: int
    """Number of parameters of the shrunk model."""
    dense_parameters: int
    """Number of parameters of the unpruned model."""
    speedup: float | None
    """Measured CPU inference speedup: median dense forward time / median shrunk forward time
    (MLPs; None for other models, whose inputs bingo cannot synthesise)."""


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
    """"weight" (each weight element is a unit) or "neuron" (each output row/channel is)."""
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
        """Write :meth:`export_state_dict` to ``path`` in the safetensors format."""
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


# Granularity name -> the score shape it implies for a weight.
UNIT_SHAPES: dict[str, Callable[[Tensor], tuple[int, ...]]] = {
    "weight": _weight_unit_shape,
    "neuron": _neuron_unit_shape,
}


@dataclass
class _ScoredLayer:
    """One scored weight, with its scores flattened in ranking order."""

    key: str
    """The weight's parameter name, e.g. "1.weight"."""
    module_name: str
    """Name of the nn.Linear / nn.Conv2d owning the weight."""
    unit_shape: tuple[int, ...]
    """Shape of the score tensor (= of the unit mask)."""
    scores: Tensor
    """Flat scores on the CPU."""
    coverage: Tensor | None
    """Flat sample counts on the CPU, or None when the scores carry no coverage."""
    heads: bool = False
    """Whether the key names an attention block's heads (``"<block>.heads"``)."""

    @property
    def units(self) -> int:
        return self.scores.numel()


def _module_of(model: nn.Module, key: str) -> tuple[str, nn.Module]:
    module_name, _, _ = key.rpartition(".")
    return module_name, model.get_submodule(module_name)


def _head_layout_of(key: str, model: nn.Module) -> HeadLayout | None:
    """The heads a ``"<block>.heads"`` score key names, or None for other keys."""
    module_name, _, last = key.rpartition(".")
    if last != HEADS_KEY:
        return None
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    return head_layout(module_name, module)


def _check_key(key: str, model: nn.Module, params: Mapping[str, Tensor]) -> tuple[str, Tensor]:
    """Return (module_name, weight) for a score key, or raise naming what is wrong with it."""
    if not isinstance(key, str):
        raise InputMismatchError(f"score keys must be parameter names (str); got {key!r}")
    if key.rpartition(".")[2] == HEADS_KEY and key not in params:
        raise InputMismatchError(
            f"score key '{key}' names heads, but '{key.rpartition('.')[0]}' is not a recognised "
            "attention block (nn.MultiheadAttention, or one declared with "
            "bingo.attention.declare_heads)")
    if key not in params:
        if key + "_orig" in params:
            raise InputMismatchError(
                f"'{key}' is already pruned with torch.nn.utils.prune; call prune.remove on it "
                "(or pass the unpruned model) before pruning again"
            )
        raise InputMismatchError(
            f"score key '{key}' is not a parameter of the model "
            f"(parameters: {', '.join(list(params)[:8])}{', ...' if len(params) > 8 else ''})"
        )
    module_name, module = _module_of(model, key)
    if key.rpartition(".")[2] != "weight" or layer_kind(module) is None:
        raise InputMismatchError(
            f"score key '{key}' is not the weight of an nn.Linear, nn.Conv2d or Conv1D layer "
            f"(it belongs to {type(module).__name__})"
        )
    return module_name, params[key]


def _granularity_of(key: str, score: Tensor, weight: Tensor) -> str:
    for name, shape_of in UNIT_SHAPES.items():
        if tuple(score.shape) == shape_of(weight):
            return name
    expected = " or ".join(
        f"{tuple(shape_of(weight))} ({name})" for name, shape_of in UNIT_SHAPES.items()
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


def _scored_layers(
    model: nn.Module, scores: Mapping[str, Tensor]
) -> tuple[list[_ScoredLayer], str]:
    """Validate ``scores`` against ``model``; return the layers in key order and the granularity."""
    if not isinstance(model, nn.Module):
        raise InputMismatchError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(scores, Mapping):
        raise InputMismatchError(
            f"scores must be a mapping from parameter name to tensor, got {type(scores).__name__}"
        )
    if len(scores) == 0:
        raise NoPrunableLayersError("scores is empty: there is no layer to prune")
    params = dict(model.named_parameters())
    coverage = _checked_coverage(scores)
    layers: list[_ScoredLayer] = []
    granularities: dict[str, str] = {}
    for key, score in scores.items():
        heads = _head_layout_of(key, model)
        flat = _flat_cpu(key, "scores", score)
        if heads is not None:
            if tuple(score.shape) != (heads.num_heads,):
                raise InputMismatchError(f"scores['{key}'] has shape {tuple(score.shape)}; "
                                         f"expected ({heads.num_heads},) (one per head)")
            module_name, granularities[key] = heads.name, "head"
        else:
            module_name, weight = _check_key(key, model, params)
            granularities[key] = _granularity_of(key, score, weight)
        cov = None if coverage is None else _flat_coverage(key, coverage[key], score)
        layers.append(_ScoredLayer(key, module_name, tuple(score.shape), flat, cov,
                                   heads is not None))
    kinds = set(granularities.values())
    if "head" in kinds and kinds <= {"head", "neuron"}:
        return layers, "structured"  # heads with MLP neurons: the structured unit set
    if len(kinds) > 1:
        detail = ", ".join(f"'{k}': {g}" for k, g in granularities.items())
        raise InvalidOptionError(f"all scores must share one granularity; got a mix ({detail})")
    return layers, kinds.pop()


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
    layers: list[_ScoredLayer], unit_masks: dict[str, Tensor], granularity: str, model: nn.Module
) -> dict[str, Tensor]:
    masks = {}
    for layer in layers:
        module = model.get_submodule(layer.module_name)
        if layer.heads:  # keep-masks of the kept heads' rows and columns
            masks.update(param_head_masks(head_layout(layer.module_name, module),
                                          unit_masks[layer.key]))
            continue
        prefix = f"{layer.module_name}." if layer.module_name else ""
        unit_kind = "neuron" if granularity == "structured" else granularity
        for pname, mask in PARAM_MASKS[unit_kind](unit_masks[layer.key], module).items():
            masks[prefix + pname] = mask
    return masks


class _MaskWriter:
    """Rewrites a model's scored parameters as original * mask, from one saved copy of originals.

    This lets the floor search evaluate many pruned counts on one model instead of a deep copy each.
    """

    def __init__(
        self, model: nn.Module, layers: list[_ScoredLayer], granularity: str, ranking: _Ranking,
        reconstruct: Reconstruction | None = None,
    ):
        self.model = model
        self.layers = layers
        self.granularity = granularity
        self.ranking = ranking
        self.reconstruct = reconstruct
        self.params = dict(model.named_parameters())
        names = set(_param_masks(layers, _unit_masks(layers, ranking, 0, model), granularity,
                                 model))
        if reconstruct is not None:  # it rewrites unmasked parameters too
            names.update(reconstruct.parameter_names(model))
        self.originals = {name: self.params[name].detach().clone() for name in names}

    @torch.no_grad()
    def write(self, count: int) -> None:
        unit_masks = _unit_masks(self.layers, self.ranking, count, self.model)
        masks = _param_masks(self.layers, unit_masks, self.granularity, self.model)
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
    for name, mask in masks.items():
        module_name, _, pname = name.rpartition(".")
        module = model.get_submodule(module_name)
        torch_prune.custom_from_mask(module, pname, mask)
        _DetachMasked.attach(module, pname)


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


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``name`` in ``model``; returns the model (``new`` itself when name is "")."""
    if not name:
        return new
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model


def _mlp_block_masks(model: nn.Module, unit_masks: Mapping[str, Tensor]
                     ) -> dict[str, dict[str, Tensor]]:
    """Neuron masks grouped by the MLP block (nn.Sequential) holding their Linear."""
    blocks: dict[str, dict[str, Tensor]] = {}
    for key, mask in unit_masks.items():
        if key.rpartition(".")[2] == HEADS_KEY and _head_layout_of(key, model) is not None:
            continue
        linear = key.rpartition(".")[0]
        block, _, child = linear.rpartition(".")
        parent = model.get_submodule(block) if block else None
        problem = None if parent is None else mlp_problem(parent)
        if not child or problem is not None:
            raise InputMismatchError(
                f"cannot shrink '{key}': its Linear is not inside an MLP block ("
                f"{problem or 'no parent nn.Sequential'}); structured shrinking removes heads "
                "and hidden neurons of nn.Sequential MLP blocks")
        blocks.setdefault(block, {})[f"{child}.weight"] = mask
    return blocks


def shrink_structured(model: nn.Module, unit_masks: Mapping[str, Tensor]) -> nn.Module:
    """A physically smaller copy of ``model`` without the pruned heads and MLP neurons.

    ``unit_masks`` maps ``"<attention block>.heads"`` to a bool keep-mask over its heads and the
    weight name of a hidden Linear of an nn.Sequential MLP block to a keep-mask over its neurons
    (as in :attr:`PruneResult.unit_masks` of structured scores). Heads lose their q/k/v rows and
    o-projection columns (:func:`bingo.attention.shrink_heads`; nn.MultiheadAttention becomes a
    :class:`bingo.attention.PrunedMultiheadAttention`), MLP blocks are shrunk by
    :func:`shrink_mlp`. ``model`` may be dense or masked; it is not modified. The result computes
    what the masked model computes (a pruned head contributes nothing: its o columns are zero).
    """
    small = copy.deepcopy(model)
    for key, mask in unit_masks.items():
        layout = _head_layout_of(key, small)
        if layout is not None:
            small = _replace(small, layout.name, shrink_heads(layout, mask.bool().cpu()))
    for block, masks in _mlp_block_masks(small, unit_masks).items():
        small = _replace(small, block, shrink_mlp(small.get_submodule(block), masks))
    return small


def _parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def median_seconds_interleaved(models: list[nn.Module], batch: Tensor) -> list[float]:
    """Median forward time of each model; runs alternate so drift in machine load hits all alike."""
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for _ in range(_SPEEDUP_WARMUP):
            for m in models:
                m(batch)
        for _ in range(_SPEEDUP_REPEATS):
            for i, m in enumerate(models):
                start = time.perf_counter()
                m(batch)
                times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _measured_speedup(dense: nn.Sequential, small: nn.Sequential) -> float:
    """CPU speedup of ``small`` over ``dense`` (a plain MLP this function may move and modify)."""
    first = dense.get_submodule(linear_names(dense)[0])
    dense_cpu = dense.cpu().eval()
    small_cpu = copy.deepcopy(small).cpu().eval()
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(
        _SPEEDUP_BATCH_ROWS, first.in_features, generator=generator, dtype=first.weight.dtype
    )
    dense_s, small_s = median_seconds_interleaved([dense_cpu, small_cpu], batch)
    return dense_s / max(small_s, 1e-12)


def _structured(
    model: nn.Module, unit_masks: dict[str, Tensor], granularity: str, option: bool | str
) -> StructuredResult | None:
    """The shrunk model for ``structured=option``; ``model`` is still dense here."""
    if option is False:
        return None
    if granularity == "structured":
        try:
            small = shrink_structured(model, unit_masks)
        except InputMismatchError as exc:
            if option == "auto":
                return None
            raise InputMismatchError(f"structured=True: {exc}") from exc
        return StructuredResult(model=small, parameters=_parameter_count(small),
                                dense_parameters=_parameter_count(model), speedup=None)
    problem = None
    if granularity != "neuron":
        problem = f"structured shrinking needs neuron-granularity scores, got {granularity}"
    if problem is None:
        problem = mlp_problem(model) or _mask_problem(model, unit_masks)
    if problem is not None:
        if option == "auto":
            return None
        raise InputMismatchError(f"structured=True: {problem}")
    small = shrink_mlp(model, unit_masks)
    dense = shrink_mlp(model, {})  # a plain copy, so the timing compares like with like
    return StructuredResult(
        model=small,
        parameters=_parameter_count(small),
        dense_parameters=_parameter_count(model),
        speedup=_measured_speedup(dense, small),
    )


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
    granularity: str,
    ranking: _Ranking,
    bound: _Bound,
    eval_fn: EvalFn,
    grid: int,
    tolerance: int,
    progress: bool,
    reconstruct: Reconstruction | None,
) -> tuple[int, _Evaluator]:
    writer = _MaskWriter(work, layers, granularity, ranking, reconstruct)
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
) -> PruneResult:
    """Prune the lowest-scored units of ``model`` in one shot.

    Args:
        model: the trained model.
        scores: weight parameter name (of an nn.Linear / nn.Conv2d) -> scores, shaped like the
            weight (weight granularity) or (out_features / out_channels,) (neuron granularity).
            Higher means keep. An attribute ``coverage`` (same keys and shapes) marks units the
            ticket search never sampled (0); pruning those raises unless ``allow_unsampled``.
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
        structured: "auto" shrinks neuron-pruned MLPs when possible, True requires it, False skips.
        progress: show a progress bar over the floor search's evaluations.
        reconstruct: refit the surviving weights after masking, e.g.
            :class:`bingo.reconstruct.LeastSquaresReconstruction` (calibration data in, no
            retraining). Every count the floor search evaluates is reconstructed first, so the
            floor holds for the reconstructed model, and so is the returned one.

    Ranking is global over all scored units, lowest score first; ties go by key order, then by
    flat index. The floor search evaluates ``grid`` counts from 0 to the most that may be pruned,
    then bisects between the last passing grid point and the first failing one; the count chosen
    was evaluated and passed. Never-sampled units are checked at the chosen count, so with
    ``floor`` the error comes after the search.
    """
    _check_options(floor, ceiling, sparsity, eval_fn, min_keep, grid, tolerance, structured)
    _check_reconstruct(reconstruct)
    require_data("model tensor", model.state_dict(keep_vars=True).items())
    if isinstance(scores, Mapping):
        require_data("score", scores.items())
    layers, granularity = _scored_layers(model, scores)
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
            work, layers, granularity, ranking, bound, eval_fn, grid, tolerance, progress,
            reconstruct,
        )
        history = sorted(evaluate.history, key=lambda point: point["pruned_units"])
        dense_accuracy, accuracy = evaluate.accuracy[0], evaluate.accuracy[count]
    else:
        count = _count_for_sparsity(sparsity, ranking)

    unit_masks = _unit_masks(layers, ranking, count, work)
    _check_unsampled(layers, unit_masks, allow_unsampled)
    masks = _param_masks(layers, unit_masks, granularity, work)

    if sparsity is not None and eval_fn is not None:
        dense_accuracy = _accuracy_value(eval_fn(work), 0)
    reconstructed = None
    params = dict(work.named_parameters())
    originals: dict[str, Tensor] = {}
    # inplace=True: whatever fails from here on (the refit, structured=True, eval_fn), the
    # caller's model is left as it came in: its values and its modules (no torch prune masks).
    structure = ModelStructure(work)
    try:
        if reconstruct is not None:
            originals = {n: params[n].detach().clone()
                         for n in {*masks, *reconstruct.parameter_names(work)}}
            _write_masked(params, originals, masks)
            reconstruct(work, masks)
            reconstructed = list(reconstruct.refitted)
        structured_result = _structured(work, unit_masks, granularity, structured)
        _apply_torch_masks(work, masks)
        if sparsity is not None and eval_fn is not None:
            accuracy = _accuracy_value(eval_fn(work), count)
    except BaseException:
        structure.restore()
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
    )
