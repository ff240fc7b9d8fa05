"""Layer inputs: the squared L2 norm of every input channel each weight reads, recorded by hooks.

Activation-aware scores (Wanda) weigh a weight ``W_ij`` by the norm of the input ``x_j`` it
multiplies. Which module feeds a weight, and how its input channels line up with the weight's
axes, is per module type: a registry of :class:`InputRule` (Linear, Conv1D, Conv2d with any
``groups`` including depthwise, nn.MultiheadAttention, which reads its out-projection's weight
functionally). Which module uses a weight comes from the structure trace's contractions
(:attr:`bingo.structure.Structure.contractions`) at structured granularity, and from the layer
itself (or an enclosing module that uses it functionally) at weight and neuron granularity: no
baseline rediscovers the model's layers.

:func:`input_squares` runs the model on calibration batches with the hooks on and returns, per
weight, the summed squared input norms in a shape that broadcasts against the weight
(``(1, in)`` for nn.Linear, ``(in, 1)`` for Conv1D, ``(out, in/groups, 1, 1)`` for a grouped
conv, ...); :func:`input_moments` the per-channel means and sample variances (FLAP), laid out
the same way, from the same recording (row counts, sums and sums of squares per channel).
Cost: one forward per batch, no backward; memory three float64 vectors per input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from bingo.attention import mha_forward, packed_in_projection
from bingo.errors import InputMismatchError
from bingo.structure import discover
from bingo.units import UnitLayout

from ._common import batch_inputs, run_model

Add = Callable[[str, Tensor, int], None]
"""``add(role, x, channel_dim)``: accumulate the squared norms of ``x``'s channels."""


@dataclass(frozen=True)
class InputRule:
    """How one module type feeds its weights (see the module docstring)."""

    record: Callable[[nn.Module, Add], Callable[[], None]]
    """``record(module, add)`` makes every forward of ``module`` call ``add`` on the inputs its
    weights read; returns the function that undoes it."""
    squares: Callable[[nn.Module, str, Mapping[str, Tensor]], Tensor]
    """``squares(module, attr, recorded)``: the squared input norms of the weight at attribute
    path ``attr`` of ``module`` (``"weight"``, ``"out_proj.weight"``), broadcastable to it, from
    the role -> squared norms that ``record`` collected (any other per-channel statistic, a
    sum or a row count, is laid out the same way)."""
    in_axis: Callable[[str], int]
    """The axis of weight ``attr`` that reads the input channels (a consumer's columns)."""
    functional: tuple[str, ...] = ()
    """Weights of child modules this module uses in its own forward, without calling the child
    (nn.MultiheadAttention's ``out_proj.weight``)."""


def _hook(role: str, channel_dim: int):
    def record(module: nn.Module, add: Add) -> Callable[[], None]:
        handle = module.register_forward_hook(
            lambda _m, inp, _out: add(role, inp[0], channel_dim))
        return handle.remove
    return record


def _conv2d_squares(module: nn.Module, attr: str, recorded: Mapping[str, Tensor]) -> Tensor:
    squares = recorded["in"]
    if module.groups == 1:
        return squares.view(1, -1, 1, 1)
    # Output channel o of a grouped conv reads input channels g*(I/G) .. (g+1)*(I/G) - 1 of its
    # group g = o // (O/G); depthwise (G = I): output channel o reads input channel o // (O/I).
    out, per_group = module.weight.shape[:2]
    group_of = torch.arange(out, device=squares.device) // (out // module.groups)
    index = group_of[:, None] * per_group + torch.arange(per_group, device=squares.device)
    return squares[index].view(out, per_group, 1, 1)


def _record_mha(module: nn.Module, add: Add) -> Callable[[], None]:
    if not module._qkv_same_embed_dim or module.in_proj_weight is None:
        raise InputMismatchError(
            f"{type(module).__name__} with separate q/k/v projection weights (kdim/vdim != "
            "embed_dim) is not supported by the input recorder")
    plain_in = packed_in_projection(module)

    def project_in(query, key, value):
        for role, x in zip("qkv", (query, key, value)):
            add(role, x, -1)
        return plain_in(query, key, value)

    def project_out(x):
        add("o", x, -1)
        return module.out_proj(x)

    def forward(query, key, value, **kwargs):
        return mha_forward(module, query, key, value, project_in, project_out, **kwargs)

    module.forward = forward

    def undo():
        del module.forward  # the instance attribute shadowed the class's forward
    return undo


def _mha_squares(module: nn.Module, attr: str, recorded: Mapping[str, Tensor]) -> Tensor:
    if attr == "in_proj_weight":  # rows q; k; v, each block reading its own input
        qkv = torch.stack([recorded[r] for r in "qkv"])
        return qkv.repeat_interleave(module.embed_dim, dim=0)
    return recorded["o"].view(1, -1)


_LINEAR = InputRule(_hook("in", -1), lambda m, a, r: r["in"].view(1, -1), lambda a: 1)
INPUT_RULES: dict[str, InputRule] = {
    "Linear": _LINEAR,
    "NonDynamicallyQuantizableLinear": _LINEAR,
    "Conv1D": InputRule(_hook("in", -1), lambda m, a, r: r["in"].view(-1, 1), lambda a: 0),
    "Conv2d": InputRule(_hook("in", 1), _conv2d_squares, lambda a: 1),
    "MultiheadAttention": InputRule(_record_mha, _mha_squares, lambda a: 1,
                                    functional=("out_proj.weight",)),
}
"""Module class name -> :class:`InputRule`. A subclass of a listed class counts as that class
only when it keeps the class's forward (one that overrides it may read its weights otherwise)."""


def input_rule(module: nn.Module) -> Optional[InputRule]:
    """The :class:`InputRule` of ``module``'s type, or None."""
    for cls in type(module).__mro__:
        if cls.__name__ in INPUT_RULES:
            return INPUT_RULES[cls.__name__] if type(module).forward is cls.forward else None
    return None


def _attr_of(module: nn.Module, tensor: Tensor) -> str:
    """The attribute path under which ``module`` holds ``tensor`` (tied weights have several
    names; the module's own is the one its rule knows)."""
    for attr, p in module.named_parameters(remove_duplicate=False):
        if p is tensor:
            return attr
    raise InputMismatchError(f"{type(module).__name__} does not hold the weight it was said to use")


def weight_users(model: nn.Module, layout: UnitLayout, params: Iterable[str],
                 example_inputs: Any = None) -> dict[str, list[tuple[str, str]]]:
    """Weight name -> ``[(module name, attribute path in it)]`` of the modules whose forward
    multiplies the weight with an input (several for a weight used by several modules).

    Structured layouts read the structure trace's contractions (embedding lookups are not
    inputs and are left out, so an embedding weight gets no entry); per-layer layouts use the
    layer, or the enclosing module that uses it functionally (:attr:`InputRule.functional`).
    """
    params = set(params)
    live = dict(model.named_parameters(remove_duplicate=False))
    users: dict[str, list[tuple[str, str]]] = {}

    def add(param: str, module_name: str) -> None:
        module = model.get_submodule(module_name) if module_name else model
        pair = (module_name, _attr_of(module, live[param]))
        if pair not in users.setdefault(param, []):
            users[param].append(pair)

    if layout.granularity == "structured":
        for use in discover(model, example_inputs).contractions:
            if use.name in params and use.op != "embedding":
                add(use.name, use.module)
        return users
    functional = {}
    for name, module in model.named_modules():
        rule = input_rule(module)
        for attr in rule.functional if rule is not None else ():
            functional[id(module.get_parameter(attr))] = name
    for g in layout.groups:
        if g.param_name in params:
            add(g.param_name, functional.get(id(g.module.weight), g.name))
    return users


class _Moments:
    """Running row counts, sums and sums of squares of input channels, keyed by (module name,
    role)."""

    def __init__(self):
        self.sums: dict[tuple[str, str], tuple[int, Tensor, Tensor]] = {}

    def adder(self, module_name: str) -> Add:
        def add(role: str, x: Tensor, channel_dim: int) -> None:
            x = x.detach().movedim(channel_dim, -1)
            x = x.reshape(-1, x.shape[-1]).double()
            key = (module_name, role)
            rows, total, squares = self.sums.get(key, (0, 0, 0))
            self.sums[key] = (rows + x.shape[0], total + x.sum(0), squares + x.pow(2).sum(0))
        return add

    def of(self, module_name: str) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
        """Role -> (row count per channel, sums, sums of squares) of one module's inputs."""
        return {role: (torch.full_like(total, rows), total, squares)
                for (name, role), (rows, total, squares) in self.sums.items()
                if name == module_name}


Statistic = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``statistic(rows, sums, sums of squares)`` -> per-channel values (float64, elementwise)."""


def _record(model: nn.Module, users: Mapping[str, list[tuple[str, str]]], data: Iterable,
            batches: Optional[int], what: str) -> tuple[dict[str, InputRule], _Moments]:
    """Every user module's rule, and the moments of its inputs over up to ``batches`` batches of
    ``data`` (see :func:`input_squares` for the errors)."""
    modules = {name for pairs in users.values() for name, _ in pairs}
    rules = {}
    for name in sorted(modules):
        module = model.get_submodule(name) if name else model
        rules[name] = input_rule(module)
        if rules[name] is None:
            held = sorted(p for p, pairs in users.items() if any(n == name for n, _ in pairs))
            raise InputMismatchError(
                f"{what}: module {name or '<model>'!r} ({type(module).__name__}) multiplies "
                f"{held} with its input, and bingo has no input rule for it (supported: "
                f"{', '.join(INPUT_RULES)})")
    moments = _Moments()
    undo = []
    was_training = model.training
    seen = 0
    try:
        for name in sorted(modules):
            module = model.get_submodule(name) if name else model
            undo.append(rules[name].record(module, moments.adder(name)))
        model.eval()
        with torch.no_grad():
            for i, batch in enumerate(data):
                if batches is not None and i >= batches:
                    break
                run_model(model, batch_inputs(batch))
                seen += 1
    finally:
        for u in undo:
            u()
        model.train(was_training)
    if not seen:
        raise InputMismatchError(f"{what}: data yielded no batch")
    return rules, moments


def _per_weight(model: nn.Module, users: Mapping[str, list[tuple[str, str]]],
                rules: Mapping[str, InputRule], moments: _Moments, statistic: Statistic,
                what: str) -> dict[str, Tensor]:
    """Weight name -> ``statistic`` of the input channels it reads, broadcastable to the weight.
    The moments are laid out per weight first and summed over its users (a weight several
    modules multiply), so that the statistic is of all the rows it read."""
    out = {}
    for param, pairs in users.items():
        total = None
        for name, attr in pairs:
            recorded = moments.of(name)
            if not recorded:
                raise InputMismatchError(
                    f"{what}: no input reached {name or '<model>'!r} (which uses {param!r}) "
                    "during calibration; is it used in the forward?")
            module = model.get_submodule(name) if name else model
            laid = [rules[name].squares(module, attr, {role: m[k] for role, m in recorded.items()})
                    for k in range(3)]
            total = laid if total is None else [a + b for a, b in zip(total, laid)]
        out[param] = statistic(*total)
    return out


def input_squares(model: nn.Module, users: Mapping[str, list[tuple[str, str]]], data: Iterable,
                  batches: Optional[int] = None, what: str = "input norms"
                  ) -> dict[str, Tensor]:
    """Weight name -> float64 summed squared norms of the input channels it reads, broadcastable
    to the weight, over up to ``batches`` batches of ``data`` (run in eval mode without
    gradients; the model's mode and forwards are restored). A module that no batch reached, or
    one without an :class:`InputRule`, raises naming it."""
    rules, moments = _record(model, users, data, batches, what)
    return _per_weight(model, users, rules, moments, lambda rows, total, squares: squares, what)


def input_moments(model: nn.Module, users: Mapping[str, list[tuple[str, str]]], data: Iterable,
                  batches: Optional[int] = None, what: str = "input moments"
                  ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``(means, variances)``: weight name -> float64 mean and sample variance (``N - 1``) over
    every row of the input channels it reads, broadcastable to the weight, from one recording
    as :func:`input_squares` makes it (same errors; fewer than two rows raise too). The
    variance is ``(sum x^2 - (sum x)^2 / N) / (N - 1)`` in float64, clamped at 0: its relative
    rounding error is about ``1e-16 (mean / std)^2``, negligible unless a channel's mean
    exceeds its standard deviation a million times."""
    rules, moments = _record(model, users, data, batches, what)
    short = sorted(name for (name, _), (rows, _, _) in moments.sums.items() if rows < 2)
    if short:
        raise InputMismatchError(f"{what}: a variance needs at least 2 input rows; "
                                 f"{short[0]!r} read fewer in the calibration data")
    means = _per_weight(model, users, rules, moments,
                        lambda rows, total, squares: total / rows, what)
    variances = _per_weight(
        model, users, rules, moments,
        lambda rows, total, squares: ((squares - total * total / rows) / (rows - 1)).clamp_min(0),
        what)
    return means, variances


def input_axis(model: nn.Module, users: Mapping[str, list[tuple[str, str]]], param: str
               ) -> int:
    """The axis of ``param`` that reads its input channels (its users agree on it)."""
    name, attr = users[param][0]
    module = model.get_submodule(name) if name else model
    return input_rule(module).in_axis(attr)
