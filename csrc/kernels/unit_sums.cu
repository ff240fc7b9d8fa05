// subset_unit_sums: sums[u, :] = sum_k mask[k, u] * values[k, :] (the estimators' score update).
//
// One thread per unit and per group of kValues value columns. The unit hash and threshold are
// computed once per thread; the subset keys and values are staged in shared memory kChunk subsets
// at a time (one key hash per subset per block, not per thread). Masks are regenerated from the
// hash (or read from explicit bytes, coalesced across units): no K x units mask exists. Each output
// element is written by one thread, summing over k in order: deterministic, no atomics.
#include "common.cuh"

namespace bingo {
namespace {

constexpr int kThreads = 256, kChunk = 256, kValues = 8;

__global__ void __launch_bounds__(kThreads) unit_sums_kernel(UnitSumsArgs p) {
  __shared__ uint32_t keys[kChunk];
  __shared__ float vals[kChunk][kValues];
  const int64_t u = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t v0 = int64_t(blockIdx.y) * kValues;
  const bool active = u < p.U;
  const bool hashed = p.mask.explicit_masks == nullptr;
  uint32_t uh = 0;
  float threshold = 0.f;
  if (active && hashed) {
    uh = unit_hash(p.mask.unit_offset + static_cast<uint64_t>(u));
    threshold = inclusion_threshold(p.mask.prob != nullptr ? p.mask.prob[u] : p.mask.prob_scalar);
  }
  float acc[kValues] = {};
  for (int64_t k0 = 0; k0 < p.K; k0 += kChunk) {
    const int n = p.K - k0 < kChunk ? int(p.K - k0) : kChunk;
    __syncthreads();  // the previous chunk is no longer read
    for (int j = threadIdx.x; j < n; j += kThreads)
      keys[j] = subset_key(p.mask.key_base, p.mask.k_start, static_cast<uint32_t>(k0 + j));
    for (int idx = threadIdx.x; idx < n * kValues; idx += kThreads) {
      const int j = idx / kValues, v = idx % kValues;
      vals[j][v] = v0 + v < p.V ? p.values[(k0 + j) * p.V + v0 + v] : 0.f;
    }
    __syncthreads();
    if (!active) continue;
    for (int j = 0; j < n; ++j) {
      const bool in = hashed ? included(keys[j], uh, threshold)
                             : p.mask.explicit_masks[(k0 + j) * p.U + u] != 0;
      if (in) {
#pragma unroll
        for (int v = 0; v < kValues; ++v) acc[v] += vals[j][v];
      }
    }
  }
  if (!active) return;
#pragma unroll
  for (int v = 0; v < kValues; ++v)
    if (v0 + v < p.V) p.out[u * p.V + v0 + v] = acc[v];
}

}  // namespace

cudaError_t launch_subset_unit_sums(const UnitSumsArgs& args, cudaStream_t stream) {
  if (args.U == 0 || args.V == 0) return cudaSuccess;  // K == 0: the kernel writes zeros
  const int64_t value_groups = (args.V + kValues - 1) / kValues;
  if (value_groups > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const dim3 grid((args.U + kThreads - 1) / kThreads, value_groups);
  unit_sums_kernel<<<grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace bingo
