"""The subset-mask specification: an independent pure-Python oracle, determinism, rates, independence."""

import math

import pytest
import torch

from bingo_kernels import InputMismatchError, SubsetMasks, subset_mask
from bingo_kernels import hashing
from bingo_kernels.hashing import subset_key_int

M = 0xFFFFFFFF


def _mix(x: int) -> int:
    # Written from the docstring's spec, independently of the tensor code under test.
    x &= M
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M
    x ^= x >> 15
    x = (x * 0x846CA68B) & M
    x ^= x >> 16
    return x


def _oracle(seed, search, k, u, p) -> bool:
    key = _mix(_mix(_mix(seed ^ 0x9E3779B9) ^ search) ^ k)
    uh = _mix((u & M) ^ _mix((u >> 32) ^ 0x85EBCA6B))
    h = _mix(key ^ uh)
    p32 = torch.tensor(p, dtype=torch.float32)
    return float(h >> 8) < float(p32 * 16777216.0)


@pytest.mark.parametrize("seed,search,k_start,offset,p", [
    (0, 0, 0, 0, 0.05), (123456789, 7, 100, 5_000, 0.5), (2**32 - 1, 2**32 - 1, 2**31, 2**40, 0.3),
])
def test_matches_pure_python_spec(seed, search, k_start, offset, p):
    K, U = 5, 300
    m = subset_mask(seed, search, k_start, K, offset, U, p)
    expected = torch.tensor([[_oracle(seed, search, k_start + k, offset + u, p) for u in range(U)]
                             for k in range(K)])
    assert torch.equal(m, expected)
    assert subset_key_int(seed, search, k_start) == _mix(_mix(_mix(seed ^ 0x9E3779B9) ^ search)
                                                         ^ k_start)


@pytest.mark.parametrize("impl", [hashing._subset_mask_numpy, hashing._subset_mask_torch])
@pytest.mark.parametrize("offset", [2**63 - 150, 2**64 - 300])
def test_unit_indices_are_uint64(impl, offset):
    """The spec's unit index is uint64: past 2**63 (where int64 ends) and up to 2**64 - 1."""
    K, U = 3, 300
    got = impl(7, 3, 0, K, offset, hashing.inclusion_threshold(0.4, U))
    expected = torch.tensor([[_oracle(7, 3, k, offset + u, 0.4) for u in range(U)]
                             for k in range(K)])
    assert torch.equal(got, expected)


def test_unit_range_past_2_64_is_refused():
    subset_mask(0, 0, 0, 2, 2**64 - 5, 5, 0.5)  # the last five uint64 indices
    with pytest.raises(InputMismatchError, match="2\\*\\*64"):
        subset_mask(0, 0, 0, 2, 2**64 - 5, 6, 0.5)
    with pytest.raises(InputMismatchError, match="unit_offset"):
        SubsetMasks(0, 0, 0, 2, 2**64, 0.5)
    with pytest.raises(InputMismatchError, match="unit_offset"):
        SubsetMasks(0, 0, 0, 2, -1, 0.5)


def test_op_offset_argument_round_trips_every_uint64():
    for offset in (0, 1, 2**31, 2**63 - 1, 2**63, 2**64 - 1):
        arg = hashing.offset_arg(offset)
        assert -2**63 <= arg < 2**63 and hashing.offset_from_arg(arg) == offset


@pytest.mark.parametrize("impl", [hashing._subset_mask_numpy, hashing._subset_mask_torch])
@pytest.mark.parametrize("prob", [0.3, "per-unit"])
def test_both_implementations_match_the_oracle(impl, prob):
    """The numpy (CPU) and int64-emulation (other devices) paths are the same spec."""
    K, U, offset = 6, 700, 2**33 + 5
    p = torch.rand(U) if prob == "per-unit" else prob
    thresholds = hashing.inclusion_threshold(p, U)
    pv = p.tolist() if prob == "per-unit" else [p] * U
    # k_start = 2**32 - 3: subset indices wrap mod 2**32 inside the block.
    for k_start in (40, 2**32 - 3):
        got = impl(99, 12, k_start, K, offset, thresholds)
        expected = torch.tensor([[_oracle(99, 12, (k_start + k) & M, offset + u, pv[u])
                                  for u in range(U)] for k in range(K)])
        assert torch.equal(got, expected), k_start


def test_deterministic_and_tiling_invariant():
    full = subset_mask(3, 4, 0, 32, 10, 1000, 0.1)
    assert torch.equal(full, subset_mask(3, 4, 0, 32, 10, 1000, 0.1))
    # Any tile of (k, unit) regenerates the same bits.
    assert torch.equal(full[8:20, 300:700], subset_mask(3, 4, 8, 12, 310, 400, 0.1))
    assert not torch.equal(full, subset_mask(4, 4, 0, 32, 10, 1000, 0.1))
    assert not torch.equal(full, subset_mask(3, 5, 0, 32, 10, 1000, 0.1))


@pytest.mark.parametrize("p", [0.01, 0.05, 0.3, 0.9])
def test_inclusion_rate(p):
    K, U = 256, 4000
    rate = subset_mask(11, 2, 0, K, 0, U, p).double().mean().item()
    sd = math.sqrt(p * (1 - p) / (K * U))
    assert abs(rate - p) < 6 * sd


def test_extreme_probabilities():
    assert not subset_mask(0, 0, 0, 8, 0, 500, 0.0).any()
    assert subset_mask(0, 0, 0, 8, 0, 500, 1.0).all()


def test_independence_across_subsets_and_units():
    K, U, p = 200, 3000, 0.2
    m = subset_mask(5, 0, 0, K, 0, U, p).double()
    # Pairwise correlation between subsets (and between units) should be ~0 with sd 1/sqrt(n).
    centered = m - p
    corr_k = (centered @ centered.T) / (U * p * (1 - p))
    off = corr_k[~torch.eye(K, dtype=torch.bool)]
    assert off.abs().max() < 6 / math.sqrt(U)
    corr_u = (centered[:, :300].T @ centered[:, :300]) / (K * p * (1 - p))
    off_u = corr_u[~torch.eye(300, dtype=torch.bool)]
    assert off_u.abs().mean() < 2.5 / math.sqrt(K)
    # Subset sizes are binomial, not constant (no hidden coupling between units).
    sizes = m.sum(1)
    assert abs(sizes.var().item() - U * p * (1 - p)) < 0.35 * U * p * (1 - p)


def test_per_unit_probability():
    U = 4000
    p = torch.rand(U)
    p[:100] = 0.0
    p[100:200] = 1.0
    m = subset_mask(9, 1, 0, 512, 0, U, p)
    assert not m[:, :100].any() and m[:, 100:200].all()
    empirical = m.double().mean(0)
    assert (empirical - p.double()).abs().max() < 6 * math.sqrt(0.25 / 512)
    # The scalar and a constant per-unit vector are the same masks.
    assert torch.equal(subset_mask(9, 1, 0, 16, 0, U, 0.37),
                       subset_mask(9, 1, 0, 16, 0, U, torch.full((U,), 0.37)))


def test_bad_arguments_named():
    with pytest.raises(InputMismatchError, match="seed"):
        subset_mask(-1, 0, 0, 1, 0, 1, 0.5)
    with pytest.raises(InputMismatchError, match="search"):
        subset_mask(0, 2**32, 0, 1, 0, 1, 0.5)
    with pytest.raises(InputMismatchError, match="per-unit"):
        subset_mask(0, 0, 0, 1, 0, 3, torch.ones(4))
    with pytest.raises(InputMismatchError, match=r"\[0, 1\]"):
        SubsetMasks(0, 0, 0, 4, 0, 1.5, "neuron")
    with pytest.raises(ValueError, match="granularity"):
        SubsetMasks(0, 0, 0, 4, 0, 0.5, "row")
