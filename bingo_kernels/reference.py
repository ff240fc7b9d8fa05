"""Pure-PyTorch implementations of the ops: the CPU fallback and the oracle for other backends.

Every function here has the flat signature of its custom op (tensors, ints, floats, strings only),
so that ``torch.library`` can dispatch to it and other backends can be swapped in. Argument
checking happens once, in :mod:`bingo_kernels.ops`, before dispatch.

Mask arguments shared by the ops (``MASK_ARGS``): either ``explicit_masks`` (bool, K x units) or
the hashed description ``prob`` (per-unit float32 tensor or None), ``prob_scalar`` (used when
``prob`` is None), ``seed``, ``search``, ``k_start``, ``num_subsets``, ``unit_offset`` (the uint64
offset as the int64 with the same bits: :func:`bingo_kernels.hashing.offset_arg`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .hashing import MASK32, offset_from_arg, subset_mask

# Bound on elements of blended weights the reference materialises at once (64 MiB of fp32).
_BLEND_ELEMENTS = 1 << 24


def _masks(explicit_masks, prob, prob_scalar, seed, search, k_start, num_subsets, unit_offset,
           num_units, device, k0=0, k1=None) -> torch.Tensor:
    """Bool masks for subsets [k0, k1) of the block, explicit or regenerated from the hash."""
    k1 = num_subsets if k1 is None else k1
    if explicit_masks is not None:
        return explicit_masks[k0:k1].to(device=device, dtype=torch.bool)
    p = prob if prob is not None else prob_scalar
    return subset_mask(seed, search, k_start + k0, k1 - k0, offset_from_arg(unit_offset), num_units,
                       p, device)


def _num_subsets(explicit_masks, num_subsets) -> int:
    return int(explicit_masks.shape[0]) if explicit_masks is not None else int(num_subsets)


def _reset_rows(init, like):
    """Replacement values of reset units: the initial tensor, or zeros (reset-to-zero)."""
    return init if init is not None else torch.zeros_like(like)


def masked_reset_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    init_weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    init_bias: Optional[torch.Tensor],
    explicit_masks: Optional[torch.Tensor],
    prob: Optional[torch.Tensor],
    prob_scalar: float,
    seed: int,
    search: int,
    k_start: int,
    num_subsets: int,
    unit_offset: int,
    granularity: str,
) -> torch.Tensor:
    """``y[k] = x[k] @ Wk.T + bk`` with ``Wk = where(mask_k, W0, W)``; output ``(K, N, out)``.

    ``x`` is ``(N, in)`` (shared by all subsets) or ``(K, N, in)``. ``init_weight=None`` resets to
    zero. Neuron masks select whole output rows (and their bias entries); weight masks select
    elements of W and leave the bias trained.
    """
    K = _num_subsets(explicit_masks, num_subsets)
    out_f, in_f = weight.shape
    shared = x.dim() == 2
    if granularity == "neuron":
        m = _masks(explicit_masks, prob, prob_scalar, seed, search, k_start, K, unit_offset,
                   out_f, x.device)
        # Two products and a per-column select: exact, and K times cheaper when x is shared.
        y = F.linear(x, weight, bias)
        if init_weight is not None:
            y0 = F.linear(x, init_weight, init_bias)
        else:
            y0 = torch.zeros((), dtype=y.dtype, device=y.device)
        if shared:
            y, y0 = y.unsqueeze(0), (y0.unsqueeze(0) if y0.dim() else y0)
        return torch.where(m[:, None, :], y0, y).expand(K, x.shape[-2], out_f).contiguous()

    out = torch.empty((K, x.shape[-2], out_f), dtype=x.dtype, device=x.device)
    w0 = _reset_rows(init_weight, weight)
    chunk = max(1, _BLEND_ELEMENTS // max(1, weight.numel()))
    for k0 in range(0, K, chunk):
        k1 = min(K, k0 + chunk)
        m = _masks(explicit_masks, prob, prob_scalar, seed, search, k_start, K, unit_offset,
                   weight.numel(), x.device, k0, k1).view(k1 - k0, out_f, in_f)
        blended_t = torch.where(m, w0, weight).transpose(1, 2)
        xk = x if shared else x[k0:k1]
        yk = torch.matmul(xk, blended_t)
        out[k0:k1] = yk if bias is None else yk + bias
    return out


def masked_reset_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    init_weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    init_bias: Optional[torch.Tensor],
    explicit_masks: Optional[torch.Tensor],
    prob: Optional[torch.Tensor],
    prob_scalar: float,
    seed: int,
    search: int,
    k_start: int,
    num_subsets: int,
    unit_offset: int,
    granularity: str,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
) -> torch.Tensor:
    """The Conv2d analogue of :func:`masked_reset_linear`; output ``(K, N, out, H', W')``.

    ``x`` is ``(N, C, H, W)`` (shared) or ``(K, N, C, H, W)``. Weight masks fold the subsets into
    the channel dimension and run one grouped convolution per block of subsets.
    """
    K = _num_subsets(explicit_masks, num_subsets)
    out_c = weight.shape[0]
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    shared = x.dim() == 4
    if granularity == "neuron":
        m = _masks(explicit_masks, prob, prob_scalar, seed, search, k_start, K, unit_offset,
                   out_c, x.device)
        xs = x if shared else x.reshape(-1, *x.shape[2:])
        y = F.conv2d(xs, weight, bias, groups=groups, **conv)
        if init_weight is not None:
            y0 = F.conv2d(xs, init_weight, init_bias, groups=groups, **conv)
        else:
            y0 = torch.zeros((), dtype=y.dtype, device=y.device)
        if shared:
            y, y0 = y.unsqueeze(0), (y0.unsqueeze(0) if y0.dim() else y0)
        else:
            y = y.view(K, -1, *y.shape[1:])
            y0 = y0.view(K, -1, *y0.shape[1:]) if y0.dim() else y0
        out = torch.where(m[:, None, :, None, None], y0, y)
        return out.expand(K, *out.shape[1:]).contiguous()

    w0 = _reset_rows(init_weight, weight)
    n = x.shape[-4]
    chunk = max(1, _BLEND_ELEMENTS // max(1, weight.numel()))
    outs = []
    for k0 in range(0, K, chunk):
        k1 = min(K, k0 + chunk)
        kc = k1 - k0
        m = _masks(explicit_masks, prob, prob_scalar, seed, search, k_start, K, unit_offset,
                   weight.numel(), x.device, k0, k1).view(kc, *weight.shape)
        blended = torch.where(m, w0, weight).reshape(kc * out_c, *weight.shape[1:])
        xk = x.unsqueeze(0).expand(kc, *x.shape) if shared else x[k0:k1]
        xk = xk.transpose(0, 1).reshape(n, kc * x.shape[-3], *x.shape[-2:])
        b = None if bias is None else bias.repeat(kc)
        y = F.conv2d(xk, blended, b, groups=groups * kc, **conv)
        outs.append(y.view(n, kc, out_c, *y.shape[-2:]).transpose(0, 1))
    return torch.cat(outs, 0).contiguous()


def _counted_targets(targets: torch.Tensor, ignore_index: int):
    """``(valid, safe, count)``: rows that count, targets with ignored ones set to class 0, and
    the number of counted rows (at least 1, so that all-ignored gives 0 rather than NaN)."""
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    return valid, safe, valid.sum().clamp_min(1).float()


def subset_metrics(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """Mean cross-entropy and accuracy per subset from ``(K, N, C)`` logits and ``(N,)`` targets.

    Rows whose target is ``ignore_index`` count in neither. Returns two float32 ``(K,)`` tensors;
    computed in float32 whatever the logits' dtype, as the kernels do.
    """
    K, N, C = logits.shape
    lf = logits.float()
    valid, safe, count = _counted_targets(targets, ignore_index)
    nll = torch.logsumexp(lf, dim=-1) - lf.gather(-1, safe.expand(K, N).unsqueeze(-1)).squeeze(-1)
    loss = (nll * valid).sum(-1) / count
    # First maximum wins, as torch.argmax does; kernels must use the same tie rule.
    correct = (lf.argmax(-1) == targets) & valid
    return loss, correct.sum(-1).float() / count


def subset_unit_sums(
    values: torch.Tensor,
    explicit_masks: Optional[torch.Tensor],
    prob: Optional[torch.Tensor],
    prob_scalar: float,
    seed: int,
    search: int,
    k_start: int,
    unit_offset: int,
    num_units: int,
) -> torch.Tensor:
    """``sums[u, :] = sum_k mask[k, u] * values[k, :]``: per-unit statistics of a search, float32.

    ``values`` is ``(K, V)`` float32 (for example a column of ones, the per-subset metric change and
    its square). Masks are regenerated block by block over units, so memory stays O(K x block).
    """
    K, V = values.shape
    out = torch.empty((num_units, V), dtype=torch.float32, device=values.device)
    block = max(1, (1 << 22) // max(1, K))
    vals = values.float()
    for u0 in range(0, num_units, block):
        u1 = min(num_units, u0 + block)
        if explicit_masks is not None:
            m = explicit_masks[:, u0:u1]
        else:
            p = prob[u0:u1] if prob is not None else prob_scalar
            m = subset_mask(seed, search, k_start, K, offset_from_arg(unit_offset) + u0, u1 - u0, p,
                            values.device)
        out[u0:u1] = m.float().t() @ vals
    return out


# Bound on logits the fused reference holds at once (one (subsets, rows, classes) tile: 64 MiB of
# fp32), and the smallest class chunk it picks by itself (bigger chunks amortise the slicing).
_LOGIT_ELEMENTS = 1 << 24
_MIN_AUTO_CHUNK = 256


def _class_chunk(chunk: int, num_classes: int, rows: int) -> int:
    """Classes per chunk: ``chunk`` if positive, else as many as the logit budget allows."""
    if chunk <= 0:
        chunk = max(_MIN_AUTO_CHUNK, _LOGIT_ELEMENTS // max(1, rows))
    return max(1, min(chunk, num_classes))


def subset_linear_metrics(
    h: torch.Tensor,
    weight: torch.Tensor,
    init_weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    init_bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    explicit_masks: Optional[torch.Tensor],
    prob: Optional[torch.Tensor],
    prob_scalar: float,
    seed: int,
    search: int,
    k_start: int,
    num_subsets: int,
    unit_offset: int,
    granularity: str,
    ignore_index: int,
    chunk: int,
):
    """``subset_metrics(masked_reset_linear(h, ...), targets)`` without the ``(K, B, C)`` logits.

    The classes (rows of ``weight``) are walked in chunks of ``chunk`` (``<= 0``: picked from a
    memory budget), and the subsets in blocks, so that at most a ``(K_block, B, chunk)`` tile of
    logits exists: each tile is :func:`masked_reset_linear` on a row slice of the layer (the
    slice's units start at ``unit_offset + c0`` for neuron masks and ``unit_offset + c0 * in``
    for weight masks, whose units are the weight's row-major elements), and feeds an online
    log-sum-exp, the target logit and a running first-maximum argmax (a later chunk's equal
    maximum does not win, as in ``torch.argmax``). A subset block's first index wraps mod 2**32,
    as subset indices do in the spec. Returns float32 ``(loss, accuracy)``, ``(K,)``.
    """
    K = _num_subsets(explicit_masks, num_subsets)
    C, in_f = weight.shape
    B = h.shape[-2]
    valid, safe, count = _counted_targets(targets, ignore_index)
    chunk = _class_chunk(chunk, C, K * B)
    k_block = max(1, _LOGIT_ELEMENTS // max(1, B * chunk))
    unit_stride = 1 if granularity == "neuron" else in_f  # units per class (weight row)
    loss = torch.empty(K, dtype=torch.float32, device=h.device)
    accuracy = torch.empty_like(loss)
    for k0 in range(0, K, k_block):
        k1 = min(K, k0 + k_block)
        hk = h if h.dim() == 2 else h[k0:k1]
        lse = torch.full((k1 - k0, B), float("-inf"), dtype=torch.float32, device=h.device)
        target_logit = torch.zeros_like(lse)
        best = torch.full_like(lse, float("-inf"))
        best_idx = torch.zeros((k1 - k0, B), dtype=torch.int64, device=h.device)
        for c0 in range(0, C, chunk):
            c1 = min(C, c0 + chunk)
            rows = slice(c0, c1)
            units = slice(c0 * unit_stride, c1 * unit_stride)
            tile = masked_reset_linear(
                hk, weight[rows], None if init_weight is None else init_weight[rows],
                None if bias is None else bias[rows],
                None if init_bias is None else init_bias[rows],
                None if explicit_masks is None else explicit_masks[k0:k1, rows],
                None if prob is None else prob[units], prob_scalar, seed, search,
                (k_start + k0) & MASK32, k1 - k0, unit_offset + c0 * unit_stride,
                granularity).float()
            lse = torch.logaddexp(lse, torch.logsumexp(tile, dim=-1))
            local = (safe - c0).clamp(0, c1 - c0 - 1)
            picked = tile.gather(-1, local.expand(k1 - k0, B).unsqueeze(-1)).squeeze(-1)
            target_logit = torch.where((safe >= c0) & (safe < c1), picked, target_logit)
            chunk_idx = tile.argmax(dim=-1)  # first maximum within the chunk
            chunk_best = tile.gather(-1, chunk_idx.unsqueeze(-1)).squeeze(-1)
            better = chunk_best > best  # strictly: an equal later maximum does not win
            best = torch.where(better, chunk_best, best)
            best_idx = torch.where(better, chunk_idx + c0, best_idx)
        loss[k0:k1] = torch.where(valid, lse - target_logit, 0.0).sum(-1) / count
        accuracy[k0:k1] = ((best_idx == targets) & valid).sum(-1).float() / count
    return loss, accuracy
