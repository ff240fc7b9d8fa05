"""The layers a least-squares refit can fit, found in the model's structure.

A refittable layer computes ``y = W x + b`` on rows ``x`` of features read from its input. Each
:class:`LayerKind` (registry :data:`LAYER_KINDS`, keyed by module class and weight attribute)
says how its input becomes rows ``(n, G, F)``, its output rows ``(n, G, O)`` and its weight a
``(G, O, F)`` matrix, for ``G`` independent groups of outputs that each read their own features:

* ``nn.Linear``: one group, the last dimension of its input;
* transformers' ``Conv1D`` (GPT-2): the same, with the weight stored ``(in, out)``;
* ``nn.Conv2d``: patches of the (padded) input; ``groups`` groups, each reading its own input
  channels (a depthwise conv is ``C`` independent fits of one channel's ``k x k`` patch);
* ``nn.MultiheadAttention``'s packed in-projection (self-attention: query = key = value), a
  Linear of its query;
* ``nn.MultiheadAttention``'s ``out_proj``: a Linear its forward applies without calling it, so
  its input is reached by running the block through :func:`bingo.attention.mha_forward`, which
  calls it (:data:`ROUTES`).

Layers come from :attr:`bingo.structure.Structure.contractions` (every parameter used as a
contraction weight, in call order); nothing here looks for layers on its own. A contraction with
no rule, or whose weight is used more than once per forward, is listed with the reason it cannot
be refitted: a refit that reaches it raises that reason.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from bingo.errors import InputMismatchError
from bingo.structure import Structure


class StopForward(Exception):
    """Raised by a capture hook once the layer of interest has been seen: the rest of the
    forward pass is not needed."""


class LayerKind:
    """How one kind of layer reads its input and holds its weight (a ``Linear`` by default)."""

    weight_attr = "weight"
    bias_attr = "bias"
    observed = True
    """Whether the hooked module's forward computes the layer (its output is then recorded
    as the model computes it; otherwise it is computed from the captured input)."""

    def problem(self, module: nn.Module) -> Optional[str]:
        """Why this instance cannot be refitted (None: it can)."""
        return None

    def input(self, module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
        """The layer's input, from the arguments of the hooked module's call."""
        return args[0] if args else next(iter(kwargs.values()))

    def rows(self, module: nn.Module, x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1]).unsqueeze(1)

    def output_rows(self, module: nn.Module, y: Tensor) -> Tensor:
        return y.reshape(-1, y.shape[-1]).unsqueeze(1)

    def matrix(self, module: nn.Module, weight: Tensor) -> Tensor:
        """A weight-shaped tensor (the weight, or its mask) as ``(G, O, F)``."""
        return weight.unsqueeze(0)

    def from_matrix(self, module: nn.Module, matrix: Tensor) -> Tensor:
        return matrix[0]


class Conv1DKind(LayerKind):
    """transformers' ``Conv1D``: ``x @ W + b`` with ``W`` stored ``(in, out)``."""

    def matrix(self, module, weight):
        return weight.T.unsqueeze(0)

    def from_matrix(self, module, matrix):
        return matrix[0].T


class Conv2dKind(LayerKind):
    """``nn.Conv2d``, any padding mode and any number of groups."""

    def problem(self, module):
        if module.transposed:
            return "a transposed convolution"
        return None

    def rows(self, module, x):
        padding = module.padding
        if module.padding_mode != "zeros" or isinstance(padding, str):
            # What nn.Conv2d itself does for these: pad explicitly, then an unpadded conv.
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        patches = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
        n, features, positions = patches.shape
        groups = module.groups
        return patches.view(n, groups, features // groups, positions).permute(0, 3, 1, 2) \
            .reshape(n * positions, groups, features // groups)

    def output_rows(self, module, y):
        n, channels = y.shape[:2]
        groups = module.groups
        return y.reshape(n, groups, channels // groups, -1).permute(0, 3, 1, 2) \
            .reshape(-1, groups, channels // groups)

    def matrix(self, module, weight):
        return weight.reshape(module.groups, weight.shape[0] // module.groups, -1)

    def from_matrix(self, module, matrix):
        return matrix.reshape(module.weight.shape)


class MhaInProjectionKind(LayerKind):
    """``nn.MultiheadAttention``'s packed q/k/v projection, for self-attention (one input)."""

    weight_attr = "in_proj_weight"
    bias_attr = "in_proj_bias"
    observed = False

    def problem(self, module):
        if not module._qkv_same_embed_dim:
            return "separate q/k/v projection weights (kdim/vdim differ from embed_dim)"
        return None

    def input(self, module, args, kwargs):
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
        query, key, value = (bound.arguments[k] for k in ("query", "key", "value"))
        if key is not query or value is not query:
            raise InputMismatchError(
                f"cannot refit the in-projection of {type(module).__name__}: it is called "
                "with a key or value other than its query (cross-attention), so its q, k and v "
                "rows read different inputs")
        return query


LAYER_KINDS: dict[tuple[str, str], LayerKind] = {
    ("Linear", "weight"): LayerKind(),
    ("Conv1D", "weight"): Conv1DKind(),
    ("Conv2d", "weight"): Conv2dKind(),
    ("MultiheadAttention", "in_proj_weight"): MhaInProjectionKind(),
}
"""(module class name, weight attribute) -> its rule. Keyed by class name so that transformers
need not be imported; subclasses fall back to their bases."""


def _mha_route(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """nn.MultiheadAttention's forward through :func:`bingo.attention.mha_forward`, which
    calls ``out_proj`` as a module (the native forward only reads its weight)."""
    from bingo.attention import mha_forward, packed_in_projection

    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    a = dict(bound.arguments)
    query, key, value = a.pop("query"), a.pop("key"), a.pop("value")
    return mha_forward(module, query, key, value, packed_in_projection(module), module.out_proj,
                       **a)


ROUTES: dict[str, Callable[[nn.Module, tuple, dict], Any]] = {
    "MultiheadAttention": _mha_route,
}
"""Module class name -> a forward equivalent to the module's (eval mode) that calls, as
modules, the layers its own forward applies without calling them."""


def _by_class(table: dict, module: nn.Module, *rest) -> Any:
    for cls in type(module).__mro__:
        hit = table.get((cls.__name__, *rest) if rest else cls.__name__)
        if hit is not None:
            return hit
    return None


def route_of(module: nn.Module) -> Optional[Callable[[nn.Module, tuple, dict], Any]]:
    """The :data:`ROUTES` entry for ``module``, or None."""
    return _by_class(ROUTES, module)


def kind_of(module: nn.Module, attr: str) -> Optional[LayerKind]:
    """The rule for the weight ``attr`` of ``module``, or None."""
    return _by_class(LAYER_KINDS, module, attr)


@dataclass
class Layer:
    """One contraction of the model, refittable or not (then ``problem`` says why)."""

    name: str
    """Reported name: the module (``"attn.in_proj"`` for an attention block's in-projection)."""
    weight: str
    """The weight's parameter name, as the module holding it names it."""
    canonical: str
    """The weight's canonical name (:attr:`bingo.structure.Structure.param_names`)."""
    bias: Optional[str]
    """The bias's parameter name, if the layer has one."""
    module: str
    """The module whose forward pre-hook captures the input."""
    kind: Optional[LayerKind]
    """Its rule (:data:`LAYER_KINDS`); None for a layer type without one."""
    route: Optional[str] = None
    """A parent module whose forward must be routed (:data:`ROUTES`) for ``module`` to run."""
    problem: Optional[str] = None
    """Why the layer cannot be refitted; None when it can."""


def _owner(name: str) -> tuple[str, str]:
    owner, _, attr = name.rpartition(".")
    return owner, attr


def find_layers(model: nn.Module, structure: Structure) -> list[Layer]:
    """Every contraction of ``model``'s traced forward, in call order, with its rule (see the
    module docstring). Embedding lookups (no input features) are left out."""
    modules = dict(model.named_modules())
    uses: dict[str, int] = {}
    for u in structure.contractions:
        uses[u.name] = uses.get(u.name, 0) + 1
    layers, seen = [], set()
    for u in structure.contractions:
        if u.op == "embedding" or u.name in seen:
            continue
        seen.add(u.name)
        aliases = structure.param_names.get(u.name, [u.name])
        # The alias held by the calling module itself, else by a module inside it.
        direct = [a for a in aliases if _owner(a)[0] == u.module]
        inside = [a for a in aliases if _owner(a)[0].startswith(f"{u.module}.") or not u.module]
        weight = (direct or inside or aliases)[0]
        owner, attr = _owner(weight)
        module = modules[owner]
        kind = kind_of(module, attr)
        route = None
        problem = None
        if not direct:
            caller = modules.get(u.module)
            if caller is not None and route_of(caller) is not None and kind is not None \
                    and kind.observed:
                route = u.module
            else:
                problem = (f"its weight is applied inside {u.module or '<model>'} "
                           f"({type(caller).__name__}) without calling its own forward, so "
                           "bingo cannot capture its input")
        if kind is None:
            problem = (f"{type(module).__name__}.{attr} has no least-squares rule "
                       f"(bingo.reconstruct.layers.LAYER_KINDS)")
        elif problem is None:
            problem = kind.problem(module)
        if problem is None and uses[u.name] > 1:
            problem = (f"its weight is used {uses[u.name]} times per forward (a shared module "
                       f"or a tied weight: {', '.join(aliases)}). The least-squares fit of one "
                       "weight to several uses is the sum of their statistics only when no use "
                       "reads what another wrote; when a later call's input depends on the "
                       "weight (a repeated block, a tied embedding), a refit changes the inputs "
                       "it was fitted to, so bingo does not refit it")
        bias = None
        if kind is not None and getattr(module, kind.bias_attr, None) is not None:
            bias = f"{owner}.{kind.bias_attr}" if owner else kind.bias_attr
        name = owner if kind is None or kind.observed else \
            (f"{owner}.in_proj" if owner else "in_proj")
        layers.append(Layer(name=name, weight=weight, canonical=u.name, bias=bias,
                            module=owner, kind=kind, route=route, problem=problem))
    return layers


def parameter_names(model: nn.Module) -> list[str]:
    """The weights and biases of every module with a rule in :data:`LAYER_KINDS`, each under
    its canonical name (a weight tied to another module's appears once, under the name
    ``named_parameters`` gives it)."""
    from bingo.structure.trace import canonical_names

    canonical = {id(t): name for name, t in canonical_names(model)[0].values()}
    names = []
    for module in model.modules():
        for attr in ("weight", "in_proj_weight"):
            kind = kind_of(module, attr)
            if kind is None or getattr(module, attr, None) is None:
                continue
            for a in (kind.weight_attr, kind.bias_attr):
                value = getattr(module, a, None)
                if isinstance(value, nn.Parameter) and id(value) in canonical:
                    names.append(canonical[id(value)])
    return list(dict.fromkeys(names))
