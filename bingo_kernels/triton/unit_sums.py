"""``subset_unit_sums`` in Triton: ``sums[u, :] = sum_k mask[k, u] * values[k, :]``.

The estimators' score update: for each unit, the sum of a few per-subset values (a count, the
metric change, its square) over the subsets that contain the unit. One program owns a block of
units and walks the K subsets, regenerating each subset's mask bits for its units from the hash
(the unit hashes and thresholds are computed once per program, the subset key once per k), so
memory traffic is the (tiny) values and the output, never a ``K x units`` mask. Every output
element is written by exactly one program, in a fixed order over k: no atomics, deterministic
results. Explicit ``(K, units)`` bool masks are read as given.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..errors import InputMismatchError
from ._launch import config, launcher
from .hashing import included, mask_kernel_args, subset_key, thresholds, unit_hash


@triton.jit(do_not_specialize=["base", "k_start", "off_lo", "off_hi"])
def _unit_sums_kernel(values_ptr, out_ptr, masks_ptr, smk, smu, prob_ptr, prob_scalar,
                      base, k_start, off_lo, off_hi, K, U, V, svk, svv,
                      EXPLICIT: tl.constexpr, PER_UNIT: tl.constexpr, BLOCK_U: tl.constexpr,
                      BLOCK_V: tl.constexpr):
    ru = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    rv = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    u_valid, v_valid = ru < U, rv < V
    if not EXPLICIT:
        uh = unit_hash(off_lo, off_hi, ru)
        thr = thresholds(prob_ptr, ru, u_valid, prob_scalar, PER_UNIT)
    acc = tl.zeros((BLOCK_U, BLOCK_V), dtype=tl.float32)
    for k in range(0, K):
        if EXPLICIT:
            row = masks_ptr + tl.cast(k, tl.int64) * smk  # K * U may exceed 2**31
            m = tl.load(row + ru.to(tl.int64) * smu, mask=u_valid, other=0) != 0
        else:
            m = included(subset_key(base, k_start, k), uh, thr)
        vals = tl.load(values_ptr + k * svk + rv * svv, mask=v_valid, other=0.0)
        acc += tl.where(m[:, None], vals[None, :], 0.0)
    out = out_ptr + ru.to(tl.int64)[:, None] * V + rv[None, :]
    tl.store(out, acc, mask=u_valid[:, None] & v_valid[None, :])


_unit_sums = launcher(
    _unit_sums_kernel,
    [config(BLOCK_U=128, num_warps=4, num_stages=1),
     config(BLOCK_U=256, num_warps=4, num_stages=1),
     config(BLOCK_U=512, num_warps=4, num_stages=1),
     config(BLOCK_U=1024, num_warps=8, num_stages=1)],
    key=["K", "U", "V"],
    interpreter_meta=dict(BLOCK_U=1024))


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
    """The Triton implementation; same flat signature and semantics as the torch reference."""
    K, V = values.shape
    out = torch.zeros((num_units, V), dtype=torch.float32, device=values.device)
    if K == 0 or V == 0 or num_units == 0:
        return out
    if num_units >= 2**31:
        raise InputMismatchError("the triton backend indexes units with int32 (< 2**31 per layer)")
    values = values.float()
    mk = mask_kernel_args(explicit_masks, prob, prob_scalar, seed, search, k_start, unit_offset,
                          out)
    # The few values per subset fit one tile; wider V is split over a second grid axis.
    block_v = min(16, triton.next_power_of_2(V))
    _unit_sums(lambda meta: (triton.cdiv(num_units, meta["BLOCK_U"]), triton.cdiv(V, block_v)),
               values, out, mk["masks"], mk["smk"], mk["smn"], mk["prob"], mk["scalar"],
               *mk["hashed"], K, num_units, V, values.stride(0), values.stride(1),
               EXPLICIT=mk["explicit"], PER_UNIT=mk["per_unit"] and not mk["explicit"],
               BLOCK_V=block_v)
    return out
