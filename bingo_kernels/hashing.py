"""The subset-mask specification: which units subset k of search s resets.

This module is the single source of truth. Every backend (torch, Triton, CUDA) must regenerate
these masks bit for bit, so the whole definition uses only 32-bit unsigned integer arithmetic
(wrap-around multiply, xor, logical shift) and one float32 comparison that is exact in IEEE 754.
Two implementations of the spec live here, both checked against a pure-Python transcription of it
in the tests: native uint32 in numpy for CPU tensors (fast), and uint32 emulated in int64 torch
tensors for any other device, written so that no int64 product ever overflows (it does not rely
on undefined signed overflow).

The unit index is uint64: a layer's units ``[unit_offset, unit_offset + num_units)`` must lie in
``[0, 2**64)`` (:func:`check_units`). The ops carry the offset through ``torch.library`` (whose
ints are int64) as the int64 with the same 64 bits (:func:`offset_arg`; :func:`offset_from_arg`
reads it back), so offsets past 2**63 reach every backend unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import InputMismatchError

MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1
MIX_MUL1 = 0x7FEB352D
MIX_MUL2 = 0x846CA68B
SEED_SALT = 0x9E3779B9
UNIT_HI_SALT = 0x85EBCA6B
PROB_SCALE = 16777216.0  # 2**24: the mask compares the top 24 bits of the hash with p * 2**24.

# Bounds the int64 temporaries of the torch implementation (8 bytes each, a few alive at once).
_BLOCK_ELEMENTS = 1 << 16  # 512 KiB: stays in cache and avoids allocator churn (measured)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 ``x`` in [0, 2**32) and a constant ``c`` in [0, 2**32).

    The constant is split into 16-bit halves so that no product exceeds 2**48.
    """
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The ``lowbias32`` integer finaliser (C. Wellons) on int64 tensors holding uint32 values.

    ``x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16`` (mod 2**32).
    A bijection on 32-bit integers with near-ideal avalanche.
    """
    x = x ^ (x >> 16)
    x = _mul32(x, MIX_MUL1)
    x = x ^ (x >> 15)
    x = _mul32(x, MIX_MUL2)
    return x ^ (x >> 16)


def mix32_int(x: int) -> int:
    """``mix32`` on a Python int (for scalars computed on the host)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MIX_MUL1) & MASK32
    x ^= x >> 15
    x = (x * MIX_MUL2) & MASK32
    return x ^ (x >> 16)


def check_u32(name: str, value: int) -> int:
    """Seeds, search indices and subset indices are uint32 in the spec; reject anything else."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MASK32:
        raise InputMismatchError(f"{name} must be an integer in [0, 2**32), got {value!r}")
    return value


def check_units(unit_offset: int, num_units: int) -> None:
    """A layer's global unit indices ``[unit_offset, unit_offset + num_units)`` must be uint64."""
    for name, value in (("unit_offset", unit_offset), ("num_units", num_units)):
        if isinstance(value, bool) or not hasattr(value, "__index__") or value < 0:
            raise InputMismatchError(f"{name} must be a non-negative integer, got {value!r}")
    if unit_offset > MASK64 or int(unit_offset) + int(num_units) > MASK64 + 1:
        raise InputMismatchError(
            f"unit indices are uint64: unit_offset={unit_offset} with {num_units} units goes past "
            "2**64")


def offset_arg(unit_offset: int) -> int:
    """The uint64 ``unit_offset`` as the int64 with the same bits (an op argument)."""
    return unit_offset - (1 << 64) if unit_offset > MASK64 >> 1 else unit_offset


def offset_from_arg(value: int) -> int:
    """The uint64 unit offset an op argument from :func:`offset_arg` carries."""
    return value & MASK64


def subset_key_int(seed: int, search: int, k: int) -> int:
    """The 32-bit stream key of subset ``k`` of search ``search`` (see :func:`subset_mask`)."""
    return mix32_int(mix32_int(mix32_int(seed ^ SEED_SALT) ^ search) ^ k)


def subset_keys(seed: int, search: int, k_start: int, num_subsets: int, device=None) -> torch.Tensor:
    """Stream keys of subsets ``k_start .. k_start+num_subsets-1`` as an int64 tensor."""
    base = mix32_int(mix32_int(seed ^ SEED_SALT) ^ search)
    # Subset indices wrap mod 2**32, as in the spec and the numpy/Triton paths.
    k = torch.arange(k_start, k_start + num_subsets, dtype=torch.int64, device=device) & MASK32
    return mix32(k ^ base)


def unit_hashes(unit_offset: int, num_units: int, device=None) -> torch.Tensor:
    """Per-unit hashes ``mix32(lo32(u) ^ mix32(hi32(u) ^ UNIT_HI_SALT))`` for global indices u.

    ``u = unit_offset + i`` is uint64, which int64 cannot hold: the halves are added separately,
    with the carry, so every temporary stays below 2**33.
    """
    lo = torch.arange(num_units, dtype=torch.int64, device=device) + (unit_offset & MASK32)
    hi = ((lo >> 32) + (unit_offset >> 32)) & MASK32
    return mix32((lo & MASK32) ^ mix32(hi ^ UNIT_HI_SALT))


def inclusion_threshold(prob, num_units: int, device=None) -> torch.Tensor:
    """``float32(p) * 2**24`` for a scalar or per-unit probability, as a float32 tensor.

    Multiplying by a power of two is exact in float32, so every backend gets the same threshold.
    """
    if isinstance(prob, torch.Tensor):
        p = prob.detach().to(device=device, dtype=torch.float32).reshape(-1)
        if p.numel() != num_units:
            raise InputMismatchError(
                f"per-unit inclusion probability has {p.numel()} values for {num_units} units"
            )
    else:
        p = torch.full((num_units,), float(prob), dtype=torch.float32, device=device)
    return p * PROB_SCALE


def subset_mask(
    seed: int,
    search: int,
    k_start: int,
    num_subsets: int,
    unit_offset: int,
    num_units: int,
    prob,
    device=None,
) -> torch.Tensor:
    """Boolean masks ``(num_subsets, num_units)``: True where subset k resets unit u.

    **Specification** (normative; every backend implements exactly this). All integers are
    uint32 and arithmetic wraps mod 2**32, except the unit index, which is uint64.

    * ``mix32(x)``: ``x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16``
      (``>>`` is a logical shift).
    * Subset key of subset ``k`` (0-based, global within the search) of search ``s`` (0-based count
      of searches run so far) under ``seed``:
      ``key(seed, s, k) = mix32(mix32(mix32(seed ^ 0x9E3779B9) ^ s) ^ k)``.
    * Unit hash of global unit index ``u`` (the unit's offset in the model's unit layout plus its
      row-major index inside its layer): ``uh(u) = mix32(lo32(u) ^ mix32(hi32(u) ^ 0x85EBCA6B))``.
    * ``h(k, u) = mix32(key(seed, s, k) ^ uh(u))``.
    * Unit u is in subset k iff ``float32(h >> 8) < float32(p_u) * 2**24``, where ``p_u`` is the
      inclusion probability (one scalar for all units, or one float32 value per unit). Both sides
      are exact in float32 (a 24-bit integer; a multiplication by a power of two), so the test is
      bit-reproducible everywhere. p = 0 includes no unit, p = 1 every unit.

    Masks depend on nothing else: not on the chunking over k or units, the device, or the order of
    evaluation, so a backend may generate any tile of them in-kernel. This function is the torch
    reference; it materialises only the block it is asked for.
    """
    for name, value in (("seed", seed), ("search", search), ("k_start", k_start)):
        check_u32(name, value)
    check_units(unit_offset, num_units)
    if num_subsets < 0:
        raise InputMismatchError(f"num_subsets must be non-negative, got {num_subsets}")
    device = torch.device("cpu") if device is None else torch.device(device)
    thresholds = inclusion_threshold(prob, num_units, device)
    if device.type == "cpu":
        return _subset_mask_numpy(seed, search, k_start, num_subsets, unit_offset, thresholds)
    return _subset_mask_torch(seed, search, k_start, num_subsets, unit_offset, thresholds)


def _subset_mask_torch(seed, search, k_start, num_subsets, unit_offset, thresholds):
    """The spec with uint32 emulated in int64 tensors (any device)."""
    device, num_units = thresholds.device, thresholds.numel()
    keys = subset_keys(seed, search, k_start, num_subsets, device)
    out = torch.empty((num_subsets, num_units), dtype=torch.bool, device=device)
    block = max(1, _BLOCK_ELEMENTS // max(1, num_subsets))
    for u0 in range(0, num_units, block):
        u1 = min(num_units, u0 + block)
        uh = unit_hashes(unit_offset + u0, u1 - u0, device)
        h = mix32(keys[:, None] ^ uh[None, :])
        out[:, u0:u1] = (h >> 8).to(torch.float32) < thresholds[None, u0:u1]
    return out


def _mix32_numpy_(x: np.ndarray) -> np.ndarray:
    """In-place ``mix32`` on a uint32 array (numpy's uint32 multiply wraps, as the spec says)."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(MIX_MUL1)
    x ^= x >> np.uint32(15)
    x *= np.uint32(MIX_MUL2)
    x ^= x >> np.uint32(16)
    return x


def _subset_mask_numpy(seed, search, k_start, num_subsets, unit_offset, thresholds):
    """The spec in native uint32 on the CPU: about 10x faster than the int64 emulation."""
    num_units = thresholds.numel()
    base = mix32_int(mix32_int(seed ^ SEED_SALT) ^ search)
    k = np.arange(k_start, k_start + num_subsets, dtype=np.uint64).astype(np.uint32)
    keys = _mix32_numpy_(k ^ np.uint32(base))
    thr = thresholds.numpy()
    out = np.empty((num_subsets, num_units), dtype=bool)
    block = max(1, _BLOCK_ELEMENTS // max(1, num_subsets))
    for u0 in range(0, num_units, block):
        u1 = min(num_units, u0 + block)
        u = np.arange(unit_offset + u0, unit_offset + u1, dtype=np.uint64)
        hi = _mix32_numpy_((u >> np.uint64(32)).astype(np.uint32) ^ np.uint32(UNIT_HI_SALT))
        uh = _mix32_numpy_((u & np.uint64(MASK32)).astype(np.uint32) ^ hi)
        h = _mix32_numpy_(keys[:, None] ^ uh[None, :])
        out[:, u0:u1] = (h >> np.uint32(8)).astype(np.float32) < thr[None, u0:u1]
    return torch.from_numpy(out)
