// subset_metrics: per-row NLL and argmax hit of (K, N, C) logits (the binding sums the rows).
//
// One warp per (subset, row): lanes stride over the classes (coalesced) with an online
// log-sum-exp (running max, rescaled sum) and a running first-maximum argmax, then combine across
// the warp with shuffles. Semantics of bingo_kernels/reference.py: float32 whatever the logits'
// dtype; rows whose target is ignore_index count in neither metric; equal maxima go to the lowest
// class index (torch.argmax's rule). NaN logits: loss NaN, argmax unspecified (as in triton).
// Per-row outputs rather than atomics: deterministic, and the (K, N) buffer is C times smaller
// than the logits.
#include "common.cuh"

namespace bingo {
namespace {

constexpr int kWarpsPerBlock = 8;

struct RowState {
  float max, sum, best;
  int64_t best_idx;
};

// Folds another lane's state into s: log-sum-exp of the union and the first maximum.
__device__ __forceinline__ void combine(RowState& s, const RowState& o) {
  const float new_max = fmaxf(s.max, o.max);
  // An empty side (sum 0, max -inf) contributes nothing; exp(-inf - -inf) would be NaN.
  const float a = s.sum == 0.f ? 0.f : s.sum * expf(s.max - new_max);
  const float b = o.sum == 0.f ? 0.f : o.sum * expf(o.max - new_max);
  s.max = new_max;
  s.sum = a + b;
  if (o.best > s.best || (o.best == s.best && o.best_idx < s.best_idx)) {
    s.best = o.best;
    s.best_idx = o.best_idx;
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) metrics_kernel(MetricsArgs p, int64_t k_first) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t k = k_first + blockIdx.y;
  if (row >= p.N) return;
  const T* logits = static_cast<const T*>(p.logits) + (k * p.N + row) * p.C;

  RowState s{-INFINITY, 0.f, -INFINITY, INT64_MAX};
  for (int64_t c = lane; c < p.C; c += 32) {  // increasing c: strict > keeps the first maximum
    const float v = to_acc(logits[c]);
    if (v > s.best) {
      s.best = v;
      s.best_idx = c;
    }
    if (v > s.max) {
      s.sum = (s.sum == 0.f ? 0.f : s.sum * expf(s.max - v)) + 1.f;
      s.max = v;
    } else {
      s.sum += expf(v - s.max);
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    RowState o;
    o.max = __shfl_xor_sync(0xffffffffu, s.max, offset);
    o.sum = __shfl_xor_sync(0xffffffffu, s.sum, offset);
    o.best = __shfl_xor_sync(0xffffffffu, s.best, offset);
    o.best_idx = __shfl_xor_sync(0xffffffffu, s.best_idx, offset);
    combine(s, o);
  }
  if (lane != 0) return;
  const int64_t target = p.targets[row];
  const bool counted = target != p.ignore_index;
  const int64_t out = k * p.N + row;
  p.nll[out] = counted ? s.max + logf(s.sum) - to_acc(logits[target]) : 0.f;
  p.hit[out] = (counted && s.best_idx == target) ? 1.f : 0.f;
}

template <typename T>
cudaError_t launch_typed(const MetricsArgs& p, cudaStream_t stream) {
  const int64_t blocks = (p.N + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  for (int64_t k0 = 0; k0 < p.K; k0 += kMaxGridYZ) {
    const dim3 grid(blocks, p.K - k0 < kMaxGridYZ ? p.K - k0 : kMaxGridYZ);
    metrics_kernel<T><<<grid, kWarpsPerBlock * 32, 0, stream>>>(p, k0);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_subset_metrics(DType dtype, const MetricsArgs& args, cudaStream_t stream) {
  if (args.K == 0 || args.N == 0 || args.C == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    return launch_typed<typename decltype(tag)::type>(args, stream);
  });
}

}  // namespace bingo
