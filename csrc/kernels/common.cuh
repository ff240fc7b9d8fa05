// Device helpers shared by the kernels: dtype conversions and the per-unit mask test.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../bingo_cuda.h"
#include "../bingo_hash.cuh"

namespace bingo {

// Accumulation type: fp32 for fp16/bf16/fp32 inputs (as torch does), fp64 for fp64.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename AccType<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T> __device__ __forceinline__ T zero_value() { return from_acc<T>(0); }

// Whether local unit `local` of the layer is in subset `k` of the block (key = that subset's key;
// unused for explicit masks, whose row length is `units`).
__device__ __forceinline__ bool unit_in_subset(const MaskArgs& m, uint32_t key, int64_t k,
                                               int64_t units, int64_t local) {
  if (m.explicit_masks != nullptr) return m.explicit_masks[k * units + local] != 0;
  const float p = m.prob != nullptr ? m.prob[local] : m.prob_scalar;
  return included(key, unit_hash(m.unit_offset + static_cast<uint64_t>(local)),
                  inclusion_threshold(p));
}

template <typename T> struct TypeTag { using type = T; };

// Calls launch(TypeTag<T>{}) for the element type T of `dtype` (one switch for every launcher).
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& launch) {
  switch (dtype) {
    case DType::kFloat32: return launch(TypeTag<float>{});
    case DType::kFloat16: return launch(TypeTag<__half>{});
    case DType::kBFloat16: return launch(TypeTag<__nv_bfloat16>{});
    case DType::kFloat64: return launch(TypeTag<double>{});
  }
  return cudaErrorInvalidValue;
}

// Grids use blockIdx.z / blockIdx.y for subsets; launches are split into chunks of this many.
constexpr int64_t kMaxGridYZ = 65535;

}  // namespace bingo
