"""Physically remove pruned units from any model the structure layer understands.

:func:`shrink` keeps, in every parameter and buffer slice of every unit group, only the indices
of the kept units, then re-derives the modules' size attributes from their new parameter shapes
(:data:`SIZE_ATTRIBUTES`: ``nn.Linear.out_features``, ``Conv1D.nf``, ``BatchNorm.num_features``,
...) and scales the head-count attributes of attention blocks (:data:`HEAD_ATTRIBUTES`:
``num_heads``, ``split_size``, ...; for a block declared with
:func:`bingo.attention.declare_heads` also its ``HeadSpec`` and the attribute it names; a block
holding the model's config gets a copy with its own head counts when layers differ).
``nn.MultiheadAttention``, whose inner width must equal its embedding width, becomes a
:class:`bingo.attention.PrunedMultiheadAttention`.

The result is checked, not assumed: the shrunk model's outputs on the example input must equal
those of the model with the same units masked (every slice zeroed), or :func:`shrink` raises,
naming the modules it changed. A transformers config that can express the result (every layer
keeps the same number of heads / neurons) is updated too, so ``save_pretrained`` /
``from_pretrained`` round-trip; otherwise :mod:`bingo.save` stores the per-layer shapes.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from bingo.errors import InputMismatchError

from . import Structure, discover
from .groups import HEADS

SizeRule = Callable[[nn.Module], None]


def _linear_sizes(m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


def _conv_sizes(m: nn.modules.conv._ConvNd) -> None:
    out_axis, in_axis = (1, 0) if m.transposed else (0, 1)
    depthwise = m.groups > 1 and m.groups == m.in_channels
    if depthwise:
        m.groups = m.weight.shape[out_axis] if not m.transposed else m.weight.shape[in_axis]
        m.in_channels = m.out_channels = m.groups
        return
    if m.transposed:
        m.in_channels = m.weight.shape[0]
        m.out_channels = m.weight.shape[1] * m.groups
    else:
        m.out_channels = m.weight.shape[0]
        m.in_channels = m.weight.shape[1] * m.groups


def _norm_sizes(m: nn.Module) -> None:
    source = m.weight if getattr(m, "weight", None) is not None else m.running_mean
    m.num_features = source.shape[0]


def _layer_norm_sizes(m: nn.LayerNorm) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


def _embedding_sizes(m: nn.Embedding) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


def _conv1d_sizes(m: nn.Module) -> None:
    m.nx, m.nf = m.weight.shape


SIZE_ATTRIBUTES: dict[str, SizeRule] = {
    "Linear": _linear_sizes,
    "Conv1d": _conv_sizes, "Conv2d": _conv_sizes, "Conv3d": _conv_sizes,
    "ConvTranspose1d": _conv_sizes, "ConvTranspose2d": _conv_sizes,
    "BatchNorm1d": _norm_sizes, "BatchNorm2d": _norm_sizes, "BatchNorm3d": _norm_sizes,
    "LayerNorm": _layer_norm_sizes,
    "Embedding": _embedding_sizes,
    "Conv1D": _conv1d_sizes,          # transformers' GPT-2 layer (weight: in x out)
}
"""Module class name -> re-derives its size attributes from its (shrunk) parameters. Keyed by
class name so that transformers need not be imported; subclasses fall back to their bases."""

HEAD_ATTRIBUTES = ("num_heads", "num_attention_heads", "n_head", "n_heads",
                   "num_key_value_heads", "num_kv_heads", "all_head_size", "split_size",
                   "inner_dim")
"""Attributes of an attention block that count heads (or heads x head width): scaled by the
fraction of the block's units kept. Which of them a block really reads is checked by comparing
the shrunk model's outputs with the masked model's."""

CONFIG_HEAD_ATTRIBUTES = ("num_attention_heads", "num_key_value_heads")
CONFIG_WIDTH_ATTRIBUTES = ("intermediate_size", "n_inner")


def _size_rule(module: nn.Module) -> Optional[SizeRule]:
    for cls in type(module).__mro__:
        if cls.__name__ in SIZE_ATTRIBUTES:
            return SIZE_ATTRIBUTES[cls.__name__]
    return None


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def _set_tensor(model: nn.Module, name: str, value: Tensor) -> None:
    owner, attr = _owner(model, name)
    old = getattr(owner, attr)
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        owner.register_buffer(attr, value, persistent=attr not in
                              getattr(owner, "_non_persistent_buffers_set", set()))


def _check_masks(structure: Structure, unit_masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, keep in unit_masks.items():
        group = structure.group(key)
        if not isinstance(keep, Tensor) or keep.dtype != torch.bool or \
                tuple(keep.shape) != (group.num_units,):
            raise InputMismatchError(
                f"unit mask {key!r} must be a bool tensor of shape ({group.num_units},)")
        if not bool(keep.any()):
            raise InputMismatchError(f"unit mask {key!r} removes every unit of its group; keep "
                                     "at least one")
        out[key] = keep.cpu()
    return out


@torch.no_grad()
def apply_masks(model: nn.Module, structure: Structure, unit_masks: Mapping[str, Tensor]) -> None:
    """Zero, in place, every parameter slice of the removed units (the masked model)."""
    masks = structure.param_masks(dict(unit_masks))
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        if name in params:
            params[name].mul_(keep.to(params[name].device, params[name].dtype))


def _head_blocks(structure: Structure, unit_masks: Mapping[str, Tensor]) -> dict[str, float]:
    """Attention block -> fraction of its head units kept."""
    out = {}
    for key, keep in unit_masks.items():
        group = structure.group(key)
        if group.kind == HEADS:
            out[group.module] = float(keep.sum()) / group.num_units
    return out


def _scaled_counts(owner: Any, attrs: tuple[str, ...], kept: float, block: str,
                   prefix: str = "") -> dict[str, int]:
    """``owner``'s integer attributes among ``attrs`` times ``kept``; raises when one does not
    come out whole (``prefix`` names where they live in the error)."""
    out = {}
    for attr in attrs:
        value = getattr(owner, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            new = value * kept
            if abs(new - round(new)) > 1e-9:
                raise InputMismatchError(
                    f"cannot shrink attention block {block!r}: {prefix}{attr}={value} does not "
                    f"scale to a whole number with {kept:.3g} of its units kept")
            out[attr] = int(round(new))
    return out


def _scale_head_attributes(module: nn.Module, kept: float, changed: list[str], name: str) -> None:
    for attr, value in _scaled_counts(module, HEAD_ATTRIBUTES, kept, name).items():
        setattr(module, attr, value)
        changed.append(f"{name}.{attr}")


def _scale_head_spec(module: nn.Module, kept: float, changed: list[str], name: str) -> None:
    """A block declared with :func:`bingo.attention.declare_heads` keeps its head count in its
    :class:`~bingo.attention.HeadSpec` too (and maybe in an attribute of its own name): both
    must say the heads kept, or the next discovery of the shrunk model reads a stale count."""
    from bingo.attention import HEADS_ATTR, HeadSpec

    spec = getattr(module, HEADS_ATTR, None)
    if not isinstance(spec, HeadSpec):
        return
    heads = spec.num_heads * kept
    if abs(heads - round(heads)) > 1e-9:
        raise InputMismatchError(
            f"cannot shrink attention block {name!r}: its declared num_heads={spec.num_heads} "
            f"does not scale to a whole number with {kept:.3g} of its units kept")
    setattr(module, HEADS_ATTR, dataclasses.replace(spec, num_heads=int(round(heads))))
    changed.append(f"{name}.{HEADS_ATTR}")
    attr = spec.num_heads_attr
    if attr is not None and attr not in HEAD_ATTRIBUTES and \
            isinstance(getattr(module, attr, None), int):
        setattr(module, attr, int(round(heads)))
        changed.append(f"{name}.{attr}")


def _own_head_config(model: nn.Module, small: nn.Module, block: str, kept: float,
                     changed: list[str]) -> None:
    """Give attention block ``block`` of ``small`` a config of its own when it holds the
    model's shared config and that config cannot say its head counts (layers keep different
    numbers of heads): some blocks read them in forward (Phi-3 splits its fused q/k/v output at
    ``config.num_attention_heads * head_dim``)."""
    shared = getattr(small, "config", None)
    module = small.get_submodule(block) if block else small
    if shared is None or getattr(module, "config", None) is not shared:
        return
    own = _scaled_counts(getattr(model, "config", None), CONFIG_HEAD_ATTRIBUTES, kept, block,
                         prefix="config.")
    if all(getattr(shared, attr) == value for attr, value in own.items()):
        return
    module.config = copy.deepcopy(shared)
    for attr, value in own.items():
        setattr(module.config, attr, value)
        changed.append(f"{block}.config.{attr}")


def _replace_mha(model: nn.Module, name: str) -> None:
    """nn.MultiheadAttention cannot hold an inner width other than its embedding width: the
    shrunk tensors move into a PrunedMultiheadAttention."""
    from bingo.attention import PrunedMultiheadAttention

    mha = model.get_submodule(name)
    if isinstance(mha, PrunedMultiheadAttention) or not isinstance(mha, nn.MultiheadAttention):
        return
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        raise InputMismatchError(
            f"cannot shrink attention block {name!r}: nn.MultiheadAttention with kdim/vdim, "
            "add_bias_kv or add_zero_attn has no smaller counterpart in bingo")
    inner = mha.out_proj.in_features
    heads = mha.num_heads  # already scaled to the heads kept
    embed = mha.in_proj_weight.shape[1]
    small = PrunedMultiheadAttention(
        embed, heads, inner // heads, bias=mha.in_proj_bias is not None,
        batch_first=mha.batch_first, device=mha.in_proj_weight.device,
        dtype=mha.in_proj_weight.dtype)
    small.in_proj_weight = mha.in_proj_weight
    small.in_proj_bias = mha.in_proj_bias
    small.out_proj = mha.out_proj
    small.train(mha.training)
    parent, attr = _owner(model, name)
    setattr(parent, attr, small)


def _outputs(model: nn.Module, example: Any) -> Tensor:
    from .trace import _logits

    with torch.no_grad():
        if isinstance(example, dict):
            out = model(**example)
        elif isinstance(example, (tuple, list)):
            out = model(*example)
        else:
            out = model(example)
    return _logits(out)


def _update_config(model: nn.Module, structure: Structure, unit_masks: Mapping[str, Tensor]
                   ) -> Optional[str]:
    """Make a transformers config describe the shrunk model where it can; returns why it
    cannot (None: updated, or no config). A config can say "every layer has H heads of width
    d and I MLP neurons" only: different counts per layer, or fewer heads in a config that
    derives the head width from ``hidden_size / num_attention_heads``, cannot be said."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    kept_heads, kept_neurons = set(), set()
    for g in structure.groups:
        keep = unit_masks.get(g.key)
        kept = (g.num_units if keep is None else int(keep.sum()), g.num_units)
        (kept_heads if g.kind == HEADS else kept_neurons).add(kept)
    problems = []
    if len(kept_heads) > 1:
        problems.append("layers keep different numbers of heads")
    elif kept_heads and next(iter(kept_heads))[0] != next(iter(kept_heads))[1]:
        kept, total = next(iter(kept_heads))
        heads = getattr(config, "num_attention_heads", None)
        if "head_dim" not in config.to_dict() or not isinstance(heads, int):
            problems.append(f"{type(config).__name__} derives the head width from the hidden "
                            "size and head count, so it cannot hold fewer heads")
        else:
            if getattr(config, "head_dim", None) is None:
                config.head_dim = config.hidden_size // heads
            for attr in CONFIG_HEAD_ATTRIBUTES:
                value = getattr(config, attr, None)
                if isinstance(value, int) and value % total == 0:
                    setattr(config, attr, value // total * kept)
    if len(kept_neurons) > 1:
        problems.append("layers keep different numbers of neurons")
    elif kept_neurons:
        kept, total = next(iter(kept_neurons))
        for attr in CONFIG_WIDTH_ATTRIBUTES:
            value = getattr(config, attr, None)
            if attr == "n_inner" and value is None and hasattr(config, "n_embd"):
                value = 4 * config.n_embd
            if isinstance(value, int) and value == total:
                setattr(config, attr, kept)
    return "; ".join(problems) or None


@torch.no_grad()
def shrink(model: nn.Module, unit_masks: Mapping[str, Tensor], *, example_inputs: Any = None,
           structure: Optional[Structure] = None, check: bool = True, atol: float = 1e-4
           ) -> nn.Module:
    """A physically smaller copy of ``model`` without the units ``unit_masks`` removes.

    Args:
        model: dense or masked; not modified.
        unit_masks: score key (see :func:`bingo.structure.discover`) -> bool keep-mask over the
            group's units. Groups not named keep every unit.
        example_inputs: input for the trace (if the structure is not cached yet) and for the
            check; built from the model's config when None.
        structure: the model's structure, if already discovered.
        check: compare the shrunk model's outputs with the masked model's (raises on a
            mismatch, naming what was changed).
        atol: tolerance of that comparison, relative to the output's largest magnitude.

    The shrunk model's ``bingo_config_note`` attribute says whether its transformers config
    could be updated (None) or why not (different layers kept different widths: save it with
    :func:`bingo.save.save_pruned`, which records every layer's shape).
    """
    from . import example_inputs_for

    if example_inputs is None:
        example_inputs = example_inputs_for(model)
    structure = structure or discover(model, example_inputs)
    masks = _check_masks(structure, unit_masks)
    small = copy.deepcopy(model)
    changed: list[str] = []
    tensors = dict(small.named_parameters())
    tensors.update(dict(small.named_buffers()))
    # Per parameter axis, which indices stay: a parameter can be cut on two axes (the rows of
    # one group, the columns of another), and one axis can hold units of several groups.
    keep_along: dict[tuple[str, int], Tensor] = {}
    for key, keep in masks.items():
        for s in structure.group(key).slices:
            along = s.mask(keep, structure.shapes[s.param][s.axis])
            prior = keep_along.get((s.param, s.axis))
            keep_along[(s.param, s.axis)] = along if prior is None else prior & along
    new_values: dict[str, Tensor] = {}
    for (name, axis), along in sorted(keep_along.items()):
        current = new_values.get(name, tensors[name].detach())
        new_values[name] = current.index_select(axis, along.nonzero().flatten().to(
            current.device))
    for name, value in new_values.items():
        _set_tensor(small, name, value.clone())
    touched = sorted({name.rpartition(".")[0] for name in new_values})
    for module_name in touched:
        module = small.get_submodule(module_name) if module_name else small
        rule = _size_rule(module)
        if rule is not None:
            rule(module)
            changed.append(module_name)
    head_blocks = _head_blocks(structure, masks)
    for block, kept in head_blocks.items():
        module = small.get_submodule(block) if block else small
        _scale_head_attributes(module, kept, changed, block)
        _scale_head_spec(module, kept, changed, block)
    for name, module in list(small.named_modules()):
        if isinstance(module, nn.MultiheadAttention) and any(
                n.startswith(f"{name}.") or n.rpartition(".")[0] == name for n in new_values):
            _replace_mha(small, name)
            changed.append(name)
    small.bingo_config_note = _update_config(small, structure, masks)
    for block, kept in head_blocks.items():  # after the shared config took what it can say
        _own_head_config(model, small, block, kept, changed)
    if check:
        _check_equal(model, small, structure, masks, example_inputs, atol, changed)
    return small


def _check_equal(model, small, structure, masks, example, atol, changed) -> None:
    masked = copy.deepcopy(model)
    apply_masks(masked, structure, masks)
    try:
        want = _outputs(masked.eval(), example)
        got = _outputs(small.eval(), example)
    except Exception as exc:  # noqa: BLE001  the shrunk model no longer runs
        raise InputMismatchError(
            f"the shrunk model does not run ({type(exc).__name__}: {exc}); changed: "
            f"{', '.join(changed) or 'nothing'}. A module there keeps a size bingo does not "
            "know how to update") from exc
    scale = float(want.abs().max().clamp_min(1.0))
    if want.shape != got.shape or not torch.allclose(got, want, rtol=atol, atol=atol * scale):
        diff = float((got - want).abs().max()) if want.shape == got.shape else float("nan")
        raise InputMismatchError(
            f"the shrunk model's outputs differ from the masked model's (max difference "
            f"{diff:.3g}); changed: {', '.join(changed)}. A module there computes something "
            "bingo's structure trace does not capture")
