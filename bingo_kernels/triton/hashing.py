"""The subset-mask specification (:func:`bingo_kernels.hashing.subset_mask`) as Triton functions.

Every kernel of the backend regenerates its masks with these ``@triton.jit`` helpers, so they must
match the torch reference bit for bit. Things that are easy to get wrong in Triton:

* All hash arithmetic is on ``tl.uint32`` values so that ``>>`` is a *logical* shift and ``*``
  wraps mod 2**32 (an unsigned LLVM multiply, numpy's wrapping uint32 under the interpreter).
  The multipliers are materialised as uint32 constants: a bare literal above 2**31 would be typed
  by Triton's literal rules rather than ours.
* 32-bit host values (subset-key base, ``k_start``, halves of the unit offset) travel as *signed*
  int32 kernel arguments (:func:`as_i32`) and are bit-cast back to uint32 inside. Passing them as
  Python ints in [2**31, 2**32) would make Triton type them int64 (and 1 as a constexpr), i.e. a
  different signature, and a recompile, per value; the launchers also list them in
  ``do_not_specialize``.
* The unit index is 64-bit in the spec. The kernels receive the layer's offset as (lo, hi) uint32
  halves and add the local index (< 2**31) to the low half with an explicit carry into the high
  half, so no 64-bit arithmetic is needed.
* The inclusion test compares ``float32(h >> 8)`` (exact: 24 bits) with ``float32(p) * 2**24``
  (exact: a power-of-two scale), so it is the same comparison on every device.

:func:`materialize_masks` (a tiny kernel writing the bool masks) exists for the tests only: it is
how the bit-for-bit agreement with :mod:`bingo_kernels.hashing` is checked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..hashing import (MASK32, PROB_SCALE, SEED_SALT, inclusion_threshold, mix32_int,
                       offset_from_arg)

# Spec constants (see bingo_kernels.hashing); repeated as constexprs for the jitted code.
MIX_MUL1: tl.constexpr = tl.constexpr(0x7FEB352D)
MIX_MUL2: tl.constexpr = tl.constexpr(0x846CA68B)
UNIT_HI_SALT: tl.constexpr = tl.constexpr(0x85EBCA6B)
SCALE: tl.constexpr = tl.constexpr(PROB_SCALE)


def as_i32(value: int) -> int:
    """A uint32 value reinterpreted as a signed int32 (the kernels bit-cast it back)."""
    value &= MASK32
    return value - (1 << 32) if value >= (1 << 31) else value


def key_base(seed: int, search: int) -> int:
    """``mix32(mix32(seed ^ SEED_SALT) ^ search)``: the part shared by a search's subset keys."""
    return mix32_int(mix32_int(seed ^ SEED_SALT) ^ search)


def hash_args(seed: int, search: int, k_start: int, unit_offset: int) -> tuple[int, int, int, int]:
    """The four int32 kernel arguments describing a block of hashed masks (``unit_offset``: the
    uint64 offset, or the op argument carrying it)."""
    offset = offset_from_arg(unit_offset)
    return (as_i32(key_base(seed, search)), as_i32(k_start), as_i32(offset & MASK32),
            as_i32(offset >> 32))


@triton.jit
def u32(x):
    """Reinterpret an int32 scalar argument as uint32."""
    return x.to(tl.uint32, bitcast=True)


@triton.jit
def mix32(x):
    """lowbias32 on uint32 values (logical shifts, wrapping multiplies)."""
    x ^= x >> 16
    x *= tl.full((), MIX_MUL1, tl.uint32)
    x ^= x >> 15
    x *= tl.full((), MIX_MUL2, tl.uint32)
    x ^= x >> 16
    return x


@triton.jit
def subset_key(base, k_start, k):
    """Key of subset ``k_start + k`` (``base``, ``k_start``: int32 args; ``k``: int index)."""
    return mix32(u32(base) ^ (u32(k_start) + tl.cast(k, tl.uint32)))


@triton.jit
def unit_hash(off_lo, off_hi, local):
    """``uh(u)`` for global units ``u = offset + local`` (``local``: int32 index tensor >= 0)."""
    lo0 = u32(off_lo)
    lo = lo0 + local.to(tl.uint32)
    hi = u32(off_hi) + (lo < lo0).to(tl.uint32)  # carry of the 64-bit add
    return mix32(lo ^ mix32(hi ^ tl.full((), UNIT_HI_SALT, tl.uint32)))


@triton.jit
def included(key, uh, threshold):
    """Whether the unit with hash ``uh`` is in the subset with ``key`` (threshold = p * 2**24)."""
    h = mix32(key ^ uh)
    return (h >> 8).to(tl.float32) < threshold


@triton.jit
def thresholds(prob_ptr, local, valid, prob_scalar, PER_UNIT: tl.constexpr):
    """float32 ``p * 2**24`` for the units ``local``: per-unit from ``prob_ptr`` or the scalar."""
    if PER_UNIT:
        p = tl.load(prob_ptr + local, mask=valid, other=0.0)
        return p * SCALE
    else:
        return tl.zeros(local.shape, dtype=tl.float32) + prob_scalar * SCALE


# --- test helper ------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["base", "k_start", "off_lo", "off_hi"])
def _materialize_kernel(out_ptr, prob_ptr, prob_scalar, base, k_start, off_lo, off_hi, U,
                        PER_UNIT: tl.constexpr, BLOCK: tl.constexpr):
    k = tl.program_id(0)
    local = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = local < U
    thr = thresholds(prob_ptr, local, valid, prob_scalar, PER_UNIT)
    inc = included(subset_key(base, k_start, k), unit_hash(off_lo, off_hi, local), thr)
    tl.store(out_ptr + k.to(tl.int64) * U + local, inc.to(tl.int8), mask=valid)


def materialize_masks(seed: int, search: int, k_start: int, num_subsets: int, unit_offset: int,
                      num_units: int, prob, device) -> torch.Tensor:
    """Bool masks ``(num_subsets, num_units)`` from the Triton hash (tests only).

    Same arguments as :func:`bingo_kernels.hashing.subset_mask`; the kernels never call this.
    """
    device = torch.device(device)
    out = torch.empty((num_subsets, num_units), dtype=torch.int8, device=device)
    if num_subsets == 0 or num_units == 0:
        return out.bool()
    per_unit = isinstance(prob, torch.Tensor)
    # Thresholds come from the reference's helper (validation); the kernel rescales p itself.
    inclusion_threshold(prob, num_units, device)
    prob_t = (prob.detach().to(device=device, dtype=torch.float32).reshape(-1).contiguous()
              if per_unit else out)
    scalar = 0.0 if per_unit else float(torch.tensor(float(prob), dtype=torch.float32))
    block = 128
    grid = (num_subsets, triton.cdiv(num_units, block))
    _materialize_kernel[grid](out, prob_t, scalar, *hash_args(seed, search, k_start, unit_offset),
                              num_units, PER_UNIT=per_unit, BLOCK=block)
    return out.bool()


def mask_kernel_args(explicit_masks, prob, prob_scalar, seed, search, k_start, unit_offset,
                      dummy):
    """Kernel arguments of the mask description (explicit bool masks are read as bytes)."""
    per_unit = prob is not None
    if explicit_masks is not None:
        masks = explicit_masks.to(torch.bool).view(torch.uint8)  # bytes, same strides
        smk, smn = masks.stride()
        hashed = (0, 0, 0, 0)
    else:
        masks, smk, smn = dummy, 0, 0
        hashed = hash_args(seed, search, k_start, unit_offset)
    prob_t = prob.to(torch.float32).contiguous() if per_unit else dummy
    # The scalar probability rounded to float32 first, as the spec's float32(p).
    scalar = 0.0 if per_unit else float(torch.tensor(prob_scalar, dtype=torch.float32))
    return dict(masks=masks, smk=smk, smn=smn, prob=prob_t, scalar=scalar, hashed=hashed,
                explicit=explicit_masks is not None, per_unit=per_unit)
