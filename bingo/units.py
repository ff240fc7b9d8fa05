"""Which tensors of a model are units, and how units are numbered.

A *unit* is what ticket search resets and pruning removes:

* ``granularity="weight"``: every element of each nn.Linear / nn.Conv2d weight;
* ``granularity="neuron"``: an output row of nn.Linear or an output channel of nn.Conv2d, together
  with its bias entry.
* ``granularity="structured"``: the units a structured shrink can remove physically: attention
  heads (q/k/v rows of the head with their bias entries + the o-projection's columns of the head;
  see :mod:`bingo.attention` for which blocks are recognised) and hidden neurons of MLP blocks
  (rows of every nn.Linear of an nn.Sequential MLP except its last, which consumes them). A head
  group's score key is ``"<attention block>.heads"``; an MLP layer's is its weight name.

Units are numbered globally, layer after layer in ``model.named_modules()`` order (an attention
block before its children), row-major inside a layer, head by head inside an attention block. The global index is what the subset-mask hash sees (see
:func:`bingo_kernels.hashing.subset_mask`). Scores are keyed by the layer's weight parameter name.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Iterable, Optional

from torch import Tensor, nn

from .attention import HeadLayout, head_layout
from .errors import InvalidOptionError, NoPrunableLayersError, require_option

GRANULARITIES = ("weight", "neuron", "structured")
# Granularity -> the granularity of the hashed subset masks: a head, like a neuron, is one unit.
MASK_GRANULARITY: dict[str, str] = {"weight": "weight", "neuron": "neuron", "structured": "neuron"}
# Module types that carry units, and the name the executor uses for each.
LAYER_KINDS: dict[type, str] = {nn.Linear: "linear", nn.Conv2d: "conv2d"}
HEADS_KIND = "heads"
"""UnitGroup.kind of an attention block's heads (its HeadLayout.kind says which block type)."""
HEADS_KEY = "heads"
"""Last component of a head group's score key: ``"<attention block>.heads"``."""

# Modules an MLP block may hold between its Linears: they act on each feature independently, so a
# removed neuron's constant output can be folded into the next layer's bias. Exact types only: a
# subclass may override forward with something that mixes features.
ELEMENTWISE_MODULES: frozenset[type[nn.Module]] = frozenset(
    {nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.ELU, nn.Softplus,
     nn.Identity, nn.Dropout})


def _is_plain_flatten(module: nn.Module) -> bool:
    # Other dims would fold the batch or keep extra ones; neither is an MLP input.
    return type(module) is nn.Flatten and (module.start_dim, module.end_dim) == (1, -1)


def mlp_problem(model: nn.Module) -> Optional[str]:
    """Why ``model`` is not an MLP block whose hidden neurons can be removed, or None when it is.

    An MLP block is an nn.Sequential of nn.Linear and elementwise modules (``ELEMENTWISE_MODULES``)
    with an optional leading nn.Flatten() and at least one nn.Linear.
    """
    if not isinstance(model, nn.Sequential):
        return f"shrink_mlp needs an nn.Sequential, got {type(model).__name__}"
    supported = ", ".join(sorted(t.__name__ for t in ELEMENTWISE_MODULES))
    for position, (name, child) in enumerate(model.named_children()):
        if type(child) is nn.Linear or type(child) in ELEMENTWISE_MODULES:
            continue
        if position == 0 and _is_plain_flatten(child):
            continue
        return (
            f"shrink_mlp supports an nn.Sequential of nn.Linear and elementwise modules "
            f"({supported}) with an optional leading nn.Flatten(); child '{name}' "
            f"({child.__class__.__name__}) is not supported"
        )
    if not any(type(child) is nn.Linear for child in model):
        return "shrink_mlp needs at least one nn.Linear in the nn.Sequential"
    return None


def linear_names(model: nn.Sequential) -> list[str]:
    """Names of the nn.Linear children of an nn.Sequential, in order."""
    return [name for name, child in model.named_children() if type(child) is nn.Linear]


@dataclass
class UnitGroup:
    """The units of one layer."""

    name: str
    """Module path inside the model ("" when the model is itself the layer)."""
    param_name: str
    """Name of the weight parameter: the key of this layer in score dicts."""
    bias_name: Optional[str]
    """Name of the bias parameter, or None when the layer has no bias."""
    module: nn.Module
    """The layer itself."""
    kind: str
    """``"linear"``, ``"conv2d"`` or ``"heads"`` (a key of the executor's fast-path registry)."""
    weight_shape: tuple[int, ...]
    """Shape of the weight; ``(num_heads,)`` for a head group."""
    num_units: int
    """Units in this layer at the layout's granularity."""
    offset: int
    """Global index of the layer's first unit."""
    heads: Optional[HeadLayout] = None
    """For a head group: its heads and their parameter slices (``module`` is then the
    o-projection, whose weight gives the group's device and dtype); None for other layers."""

    def tensors(self) -> dict[str, Tensor]:
        """Parameter name -> live tensor of every parameter a reset of this group touches."""
        if self.heads is not None:
            return self.heads.tensors()
        out = {self.param_name: self.module.weight}
        if self.bias_name is not None:
            out[self.bias_name] = self.module.bias
        return out


@dataclass
class UnitLayout:
    """All unit groups of a model at one granularity."""

    granularity: str
    """``"weight"`` or ``"neuron"``."""
    groups: list[UnitGroup]
    """Layers in global unit order."""

    @property
    def total(self) -> int:
        """Number of units over all groups."""
        return sum(g.num_units for g in self.groups)

    @property
    def mask_granularity(self) -> str:
        """Granularity of the hashed subset masks (``"neuron"`` for heads and neurons)."""
        return MASK_GRANULARITY[self.granularity]

    def unit_shape(self, group: UnitGroup) -> tuple[int, ...]:
        """Shape of ``group``'s score tensor."""
        return group.weight_shape if self.granularity == "weight" else (group.weight_shape[0],)

    def fingerprint(self) -> list[dict]:
        """What identifies the layout in a checkpoint (names, kinds, shapes, offsets)."""
        return [dict(param=g.param_name, kind=g.kind, shape=list(g.weight_shape),
                     units=g.num_units, offset=g.offset) for g in self.groups]


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_patterns(kind: str, patterns, names: list[str], what: str) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    for p in patterns:
        if not any(_matches(n, [p]) for n in names):
            raise InvalidOptionError(
                f"{kind}={p!r} matches no {what}; candidates are: {', '.join(names)}")
    return patterns


def _candidates(model: nn.Module, granularity: str) -> list[tuple[str, nn.Module, Optional[HeadLayout]]]:
    """Every module that can hold units, in named_modules order, with its heads if attention."""
    out, attention_prefixes = [], []
    for name, m in model.named_modules():
        if any(name.startswith(p) for p in attention_prefixes):
            continue  # the q/k/v/o Linears of a head group are that group's, not neuron layers
        heads = head_layout(name, m) if granularity == "structured" else None
        if heads is not None:
            out.append((name, m, heads))
            attention_prefixes.append(f"{name}." if name else "")
        elif isinstance(m, tuple(LAYER_KINDS)):
            out.append((name, m, None))
    return out


def _mlp_hidden_layers(model: nn.Module) -> set[str]:
    """Names of the Linears whose output neurons a structured shrink can remove: every Linear of
    an MLP block (see :func:`mlp_problem`) but the block's last, which consumes them."""
    hidden = set()
    for name, m in model.named_modules():
        if mlp_problem(m) is None:
            prefix = f"{name}." if name else ""
            hidden.update(prefix + child for child in linear_names(m)[:-1])
    return hidden


def find_units(model: nn.Module, granularity: str = "weight", include=None,
               exclude=None) -> UnitLayout:
    """Collect the unit groups of ``model``.

    Args:
        granularity: ``"weight"``, ``"neuron"`` or ``"structured"`` (see the module docstring).
        include: module names or shell-style patterns (``"encoder.*"``) of the layers to use;
            default all nn.Linear / nn.Conv2d layers, except that at neuron granularity the output
            layer (the last such layer) is left out: its neurons are the model's outputs (the
            classes), so removing one deletes a class rather than a hidden feature, and no
            structured shrink could drop it. Name it in ``include`` to search it anyway. At
            structured granularity the default is every attention block (nn.MultiheadAttention,
            or a block declared with :func:`bingo.attention.declare_heads`) and every hidden
            Linear of an nn.Sequential MLP block; ``include`` may also name other Linear/Conv2d
            layers (their neurons are searched and pruned, but a shrink cannot remove them).
        exclude: names or patterns removed from the selection.
    """
    require_option("granularity", granularity, GRANULARITIES)
    candidates = _candidates(model, granularity)
    names = [n for n, _, _ in candidates]
    what = ("attention block or nn.Linear/nn.Conv2d layer" if granularity == "structured"
            else "nn.Linear/nn.Conv2d layer")
    if not candidates:
        raise NoPrunableLayersError(
            f"{type(model).__name__} has no {what}: nothing to search or prune")
    include_p = _check_patterns("include", include, names, what)
    exclude_p = _check_patterns("exclude", exclude, names, what)
    if include_p:
        chosen = [c for c in candidates if _matches(c[0], include_p)]
    elif granularity == "structured":
        hidden = _mlp_hidden_layers(model)
        chosen = [c for c in candidates if c[2] is not None or c[0] in hidden]
    elif granularity == "neuron" and len(candidates) > 1:
        chosen = candidates[:-1]
    else:
        chosen = candidates
    chosen = [c for c in chosen if not _matches(c[0], exclude_p)]
    if not chosen:
        why = (" (structured granularity found no attention block and no hidden Linear of an "
               "nn.Sequential MLP block; name layers in include)"
               if granularity == "structured" and not include_p else "")
        raise NoPrunableLayersError(
            f"include={include!r} / exclude={exclude!r} leave no layer of {type(model).__name__} "
            f"to search{why}")
    groups, offset = [], 0
    for name, module, heads in chosen:
        prefix = f"{name}." if name else ""
        if heads is not None:
            groups.append(UnitGroup(
                name=name, param_name=prefix + HEADS_KEY, bias_name=None, module=heads.out_module,
                kind=HEADS_KIND, weight_shape=(heads.num_heads,), num_units=heads.num_heads,
                offset=offset, heads=heads))
            offset += heads.num_heads
            continue
        kind = next(k for t, k in LAYER_KINDS.items() if isinstance(module, t))
        shape = tuple(module.weight.shape)
        units = shape[0] if granularity != "weight" else math.prod(shape)
        groups.append(UnitGroup(
            name=name, param_name=f"{prefix}weight",
            bias_name=f"{prefix}bias" if module.bias is not None else None, module=module,
            kind=kind, weight_shape=shape, num_units=units, offset=offset))
        offset += units
    return UnitLayout(granularity, groups)
