"""Attention heads as structured units: finding them, their parameters, and a head-prunable MHA.

A *head unit* of an attention block is everything that only head ``h`` uses: the rows of the q, k
and v projections that produce head ``h`` (with their bias entries) and the columns of the output
projection that read head ``h``. Resetting a head resets those rows and columns; pruning it zeroes
them; shrinking removes them (the o-projection's bias is shared by all heads and stays).

Two kinds of attention blocks are recognised (:data:`HEAD_RESOLVERS`):

* ``"mha"``: :class:`torch.nn.MultiheadAttention` (packed ``in_proj_weight`` with rows q; k; v and
  ``out_proj``), and :class:`PrunedMultiheadAttention`, the smaller module a shrink leaves behind
  (same parameter names, fewer heads). Found automatically.
* ``"linear"``: Hugging Face-style blocks built from nn.Linear layers (separate q/k/v or one fused
  qkv Linear, and an o Linear). The block says which Linear is which with a :class:`HeadSpec`
  stored as its ``bingo_heads`` attribute: ``declare_heads(block, q="q_proj", k="k_proj",
  v="v_proj", o="o_proj", num_heads=4)``, or a class attribute ``bingo_heads = HeadSpec(...)``.

Heads of nn.MultiheadAttention and of transformers' attention blocks are found by the structure
layer's trace (:mod:`bingo.structure`); a :class:`HeadSpec` declaration overrides it, and
:func:`head_layout` (the :class:`HeadSlice` list: which rows or columns of which parameter belong
to which head) is how :func:`bingo.structure.discover` reads one. Every consumer (search,
pruning, scores, refit, shrink) then works on the structure's unit groups. This module also
holds the multi-head attention math they share and :class:`PrunedMultiheadAttention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputMismatchError

HEADS_ATTR = "bingo_heads"
"""Attribute of an attention block holding its :class:`HeadSpec` (Linear-built attention)."""


@dataclass(frozen=True)
class HeadSpec:
    """Which nn.Linear children of a Linear-built attention block form its heads.

    Child names are relative to the block (``"q_proj"``, or a dotted path). Give either ``q``,
    ``k`` and ``v``, or ``qkv`` (one Linear whose output rows are q; k; v, each ``num_heads *
    head_dim`` wide). The block's forward must split heads by ``num_heads_attr`` (or by the
    projections' widths), so that a shrunk block with fewer heads still runs.
    """

    num_heads: int
    """Number of heads; must divide the q/k/v projections' output width."""
    o: str
    """The output projection (its input columns are grouped by head)."""
    q: Optional[str] = None
    """The query projection (or None with ``qkv``)."""
    k: Optional[str] = None
    """The key projection (or None with ``qkv``)."""
    v: Optional[str] = None
    """The value projection (or None with ``qkv``)."""
    qkv: Optional[str] = None
    """A fused projection with output rows q; k; v (instead of ``q``, ``k``, ``v``)."""
    num_heads_attr: Optional[str] = "num_heads"
    """Attribute of the block that holds the head count; a shrink sets it to the heads kept
    (None: the block has no such attribute)."""


def declare_heads(module: nn.Module, **spec) -> HeadSpec:
    """Mark ``module`` as a Linear-built attention block with the :class:`HeadSpec` ``spec``.

    Checked at once (the Linears exist, ``num_heads`` divides their width); returns the spec.
    """
    head_spec = HeadSpec(**spec)
    setattr(module, HEADS_ATTR, head_spec)
    _LinearHeads().resolve("", module)  # raises now, naming the problem, rather than at search
    return head_spec


@dataclass(frozen=True)
class HeadSlice:
    """A contiguous run of rows (axis 0) or columns (axis 1) of one parameter, grouped by head."""

    param: str
    """Full parameter name in the model."""
    axis: int
    """0: output rows of a q/k/v projection or bias entries; 1: input columns of the o-projection."""
    start: int
    """First row/column of the run."""
    stop: int
    """One past the last row/column; head ``h`` owns ``start + h*head_dim ... + head_dim``."""
    head_dim: int
    """Rows/columns per head."""
    role: str
    """Which input the rows/columns read: ``"q"``, ``"k"``, ``"v"`` (rows) or ``"o"`` (columns)."""

    def head_of(self, device=None) -> Tensor:
        """Head index of each row/column of the run (int64)."""
        return torch.arange(self.stop - self.start, device=device) // self.head_dim


@dataclass
class HeadLayout:
    """The heads of one attention block, resolved against the model."""

    kind: str
    """Key of :data:`HEAD_RESOLVERS`: ``"mha"`` or ``"linear"``."""
    name: str
    """Module path of the attention block."""
    module: nn.Module = field(repr=False)
    """The attention block."""
    num_heads: int
    """Number of heads (units)."""
    head_dim: int
    """Width of one head."""
    slices: list[HeadSlice] = field(repr=False)
    """Every run of rows/columns that belongs to the heads."""
    projections: dict[str, str] = field(default_factory=dict)
    """Linear kind: role (``"q"``, ``"k"``, ``"v"``, ``"qkv"``, ``"o"``) -> child name."""


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


class _MhaHeads:
    """nn.MultiheadAttention and PrunedMultiheadAttention: packed in_proj rows q; k; v."""

    kind = "mha"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, (nn.MultiheadAttention, PrunedMultiheadAttention))

    def resolve(self, name: str, module: nn.Module) -> HeadLayout:
        what = f"attention block {name!r} ({type(module).__name__})"
        if isinstance(module, nn.MultiheadAttention):
            if not module._qkv_same_embed_dim:
                raise InputMismatchError(
                    f"{what} has kdim/vdim different from embed_dim (separate q/k/v weights); "
                    "head units support packed in_proj_weight only; exclude it")
            if module.bias_k is not None or module.add_zero_attn:
                raise InputMismatchError(
                    f"{what} uses add_bias_kv or add_zero_attn, which head units do not support; "
                    "exclude it")
        heads, inner = module.num_heads, module.out_proj.in_features
        dh = inner // heads
        p = _prefix(name)
        slices = [HeadSlice(f"{p}in_proj_weight", 0, i * inner, (i + 1) * inner, dh, role)
                  for i, role in enumerate("qkv")]
        if module.in_proj_bias is not None:
            slices += [HeadSlice(f"{p}in_proj_bias", 0, i * inner, (i + 1) * inner, dh, role)
                       for i, role in enumerate("qkv")]
        slices.append(HeadSlice(f"{p}out_proj.weight", 1, 0, inner, dh, "o"))
        return HeadLayout(self.kind, name, module, heads, dh, slices)


class _LinearHeads:
    """Blocks that declare their q/k/v(/qkv)/o nn.Linear children with a HeadSpec."""

    kind = "linear"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(getattr(module, HEADS_ATTR, None), HeadSpec)

    def resolve(self, name: str, module: nn.Module) -> HeadLayout:
        spec: HeadSpec = getattr(module, HEADS_ATTR)
        what = f"attention block {name!r} ({type(module).__name__})"
        fused = spec.qkv is not None
        if fused == any(getattr(spec, r) is not None for r in "qkv") or \
                (not fused and not all(getattr(spec, r) for r in "qkv")):
            raise InputMismatchError(f"{what}: HeadSpec needs either q, k and v, or qkv; got {spec}")
        if isinstance(spec.num_heads, bool) or not isinstance(spec.num_heads, int) or \
                spec.num_heads < 1:
            raise InputMismatchError(f"{what}: num_heads must be a positive integer, got "
                                     f"{spec.num_heads!r}")
        roles = {"qkv": spec.qkv} if fused else {r: getattr(spec, r) for r in "qkv"}
        roles["o"] = spec.o
        linears = {}
        for role, child in roles.items():
            try:
                sub = module.get_submodule(child)
            except AttributeError:
                raise InputMismatchError(f"{what}: HeadSpec.{role}={child!r} is not a submodule")
            if not isinstance(sub, nn.Linear):
                raise InputMismatchError(f"{what}: HeadSpec.{role}={child!r} is a "
                                         f"{type(sub).__name__}, not an nn.Linear")
            linears[role] = sub
        heads = spec.num_heads
        inner = linears["o"].in_features
        widths = ({linears["qkv"].out_features / 3} if fused
                  else {linears[r].out_features for r in "qkv"})
        if widths != {inner}:
            raise InputMismatchError(
                f"{what}: q/k/v widths {sorted(widths)} differ from the o-projection's input "
                f"width {inner}: declare_heads describes blocks whose q, k and v have the same "
                "width; grouped-query attention is found by tracing (leave it undeclared)")
        if inner % heads:
            raise InputMismatchError(
                f"{what}: num_heads={heads} does not divide the projection width {inner}")
        if spec.num_heads_attr is not None and getattr(module, spec.num_heads_attr, None) != heads:
            raise InputMismatchError(
                f"{what}: HeadSpec.num_heads_attr={spec.num_heads_attr!r} should hold the head "
                f"count {heads}, found {getattr(module, spec.num_heads_attr, None)!r}")
        dh = inner // heads
        p = _prefix(name)
        slices = []
        for role, child in roles.items():
            lin, cp = linears[role], f"{p}{child}."
            if role == "o":
                slices.append(HeadSlice(cp + "weight", 1, 0, inner, dh, "o"))
                continue
            runs = [(i * inner, r) for i, r in enumerate("qkv")] if fused else [(0, role)]
            for start, r in runs:
                slices.append(HeadSlice(cp + "weight", 0, start, start + inner, dh, r))
                if lin.bias is not None:
                    slices.append(HeadSlice(cp + "bias", 0, start, start + inner, dh, r))
        return HeadLayout(self.kind, name, module, heads, dh, slices, projections=roles)


HEAD_RESOLVERS = {"mha": _MhaHeads(), "linear": _LinearHeads()}
"""Kind -> resolver: ``matches(module)`` and ``resolve(name, module) -> HeadLayout``."""


def head_layout(name: str, module: nn.Module) -> Optional[HeadLayout]:
    """The heads of ``module`` if it is a recognised attention block, else None."""
    for resolver in HEAD_RESOLVERS.values():
        if resolver.matches(module):
            return resolver.resolve(name, module)
    return None


# --------------------------------------------------------------------------------------------
# Multi-head attention math (shared by the executor's batched reset, Wanda and the pruned MHA)
# --------------------------------------------------------------------------------------------

Projection = Callable[[Tensor], Tensor]


def _additive(mask: Optional[Tensor], dtype) -> Optional[Tensor]:
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)


def attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, *,
              attn_mask: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
              is_causal: bool = False, need_weights: bool = False,
              average_attn_weights: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """Scaled dot-product attention of projected ``(N, L, H*d)`` q and ``(N, S, H*d)`` k, v.

    Masks follow nn.MultiheadAttention: bool True (or -inf) = not attended; ``attn_mask`` is
    ``(L, S)`` or ``(N*H, L, S)``, ``key_padding_mask`` ``(N, S)``; ``is_causal`` without a mask
    builds the causal one. Returns the ``(N, L, H*d)`` head outputs (before the o-projection) and
    the attention weights when asked (averaged over heads by default).
    """
    n, length, inner = q.shape
    s = k.shape[1]
    dh = inner // num_heads
    qh = q.view(n, length, num_heads, dh).transpose(1, 2)
    kh = k.view(n, s, num_heads, dh).transpose(1, 2)
    vh = v.view(n, s, num_heads, dh).transpose(1, 2)
    scores = qh @ kh.transpose(-2, -1) / math.sqrt(dh)
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, s, dtype=torch.bool, device=q.device).triu(1)
    mask = _additive(attn_mask, scores.dtype)
    if mask is not None:
        scores = scores + (mask.view(n, num_heads, length, s) if mask.dim() == 3 else mask)
    pad = _additive(key_padding_mask, scores.dtype)
    if pad is not None:
        scores = scores + pad.view(n, 1, 1, s)
    weights = scores.softmax(-1)
    out = (weights @ vh).transpose(1, 2).reshape(n, length, inner)
    if not need_weights:
        return out, None
    return out, weights.mean(1) if average_attn_weights else weights


def mha_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                project_in: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]],
                project_out: Projection, *, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
    """nn.MultiheadAttention's forward with pluggable projections (batched inputs only).

    ``project_in(query, key, value)`` returns the projected q, k, v and ``project_out`` maps the
    head outputs; the executor plugs in masked resets, Wanda recording hooks, and
    :class:`PrunedMultiheadAttention` its plain Linears.
    """
    if query.dim() != 3:
        raise InputMismatchError(
            f"head units need batched attention inputs (3-d), got shape {tuple(query.shape)}")
    if not module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    q, k, v = project_in(query, key, value)
    out, weights = attention(q, k, v, module.num_heads, attn_mask=attn_mask,
                             key_padding_mask=key_padding_mask, is_causal=is_causal,
                             need_weights=need_weights, average_attn_weights=average_attn_weights)
    out = project_out(out)
    return (out if module.batch_first else out.transpose(0, 1)), weights


def packed_in_projection(module: nn.Module) -> Callable:
    """The plain q/k/v projection of a packed ``in_proj_weight`` (rows q; k; v)."""

    def project(query, key, value):
        w = module.in_proj_weight.chunk(3)
        b = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None,) * 3
        return tuple(F.linear(x, wi, bi) for x, wi, bi in zip((query, key, value), w, b))

    return project


class PrunedMultiheadAttention(nn.Module):
    """nn.MultiheadAttention with some heads removed (what a structured shrink leaves).

    Parameters keep nn.MultiheadAttention's names and layout (``in_proj_weight`` rows q; k; v,
    ``in_proj_bias``, ``out_proj``), but the inner width is ``num_heads * head_dim`` instead of
    ``embed_dim``, which nn.MultiheadAttention cannot express. Eval-mode forward only (no
    attention dropout), batched inputs; same call signature and return value.
    """

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, *, bias: bool = True,
                 batch_first: bool = False, device=None, dtype=None):
        super().__init__()
        inner = num_heads * head_dim
        kw = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first = batch_first
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, **kw))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner, **kw)) if bias else None
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias, **kw)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        return mha_forward(self, query, key, value, packed_in_projection(self), self.out_proj,
                           key_padding_mask=key_padding_mask, need_weights=need_weights,
                           attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                           is_causal=is_causal)


__all__ = ["HEAD_RESOLVERS", "HEADS_ATTR", "HeadLayout", "HeadSlice", "HeadSpec",
           "PrunedMultiheadAttention", "attention", "declare_heads", "head_layout",
           "mha_forward", "packed_in_projection"]
