// The subset-mask specification of bingo_kernels/hashing.py (normative), as __host__ __device__
// functions: the CUDA kernels regenerate their masks with these, the pybind11 binding computes
// the per-search key base on the host with the same code, and tests/test_cuda_ext.py compiles a
// small *host* program from this header (no GPU needed) and compares its masks bit for bit with
// bingo_kernels.hashing on fresh random seeds, unit offsets past 2**32 and wrapping subset indices.
//
// Only uint32_t arithmetic (wrapping multiply, xor, logical shift: all defined for unsigned types
// in C++) and one float comparison that is exact in IEEE 754 (a 24-bit integer against p * 2**24).
// Plain C++ when not compiled by nvcc, so g++ can build the host check too.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define BINGO_HD __host__ __device__ __forceinline__
#else
#define BINGO_HD inline
#endif

namespace bingo {

constexpr uint32_t kMixMul1 = 0x7FEB352Du;
constexpr uint32_t kMixMul2 = 0x846CA68Bu;
constexpr uint32_t kSeedSalt = 0x9E3779B9u;
constexpr uint32_t kUnitHiSalt = 0x85EBCA6Bu;
constexpr float kProbScale = 16777216.0f;  // 2**24: the inclusion test's fixed-point scale

// lowbias32 (C. Wellons): x ^= x >> 16; x *= M1; x ^= x >> 15; x *= M2; x ^= x >> 16 (mod 2**32).
BINGO_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMixMul1;
  x ^= x >> 15;
  x *= kMixMul2;
  x ^= x >> 16;
  return x;
}

// mix32(mix32(seed ^ SEED_SALT) ^ search): the part of the subset keys shared by one search.
BINGO_HD uint32_t key_base(uint32_t seed, uint32_t search) {
  return mix32(mix32(seed ^ kSeedSalt) ^ search);
}

// Key of subset k_start + k; the subset index wraps mod 2**32 as in the spec.
BINGO_HD uint32_t subset_key(uint32_t base, uint32_t k_start, uint32_t k) {
  return mix32(base ^ (k_start + k));
}

// uh(u) = mix32(lo32(u) ^ mix32(hi32(u) ^ UNIT_HI_SALT)) for a global (64-bit) unit index u.
BINGO_HD uint32_t unit_hash(uint64_t u) {
  const uint32_t lo = static_cast<uint32_t>(u);
  const uint32_t hi = static_cast<uint32_t>(u >> 32);
  return mix32(lo ^ mix32(hi ^ kUnitHiSalt));
}

// The threshold float32(p) * 2**24 (exact: a power-of-two scale).
BINGO_HD float inclusion_threshold(float p) { return p * kProbScale; }

// Whether the unit with hash uh is in the subset with key `key`: float32(h >> 8) < threshold.
BINGO_HD bool included(uint32_t key, uint32_t uh, float threshold) {
  return static_cast<float>(mix32(key ^ uh) >> 8) < threshold;
}

}  // namespace bingo
