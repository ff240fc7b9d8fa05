// Launchers of the CUDA kernels (csrc/kernels/*.cu), in plain C++ types: the kernels compile with
// nvcc alone (no torch headers), which is what CI's compile check relies on. csrc/binding.cpp
// validates torch tensors and fills these structs. All tensors are contiguous (the binding makes
// them so); sizes are int64 and element offsets are computed in 64 bits.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace bingo {

enum class DType { kFloat32, kFloat16, kBFloat16, kFloat64 };

// A block of subset masks: explicit bytes, or the hash spec's description of them.
struct MaskArgs {
  const uint8_t* explicit_masks = nullptr;  // (K, units) 0/1 bytes, or null: hashed
  const float* prob = nullptr;              // per-unit inclusion probability, or null: scalar
  float prob_scalar = 0.f;                  // float32(p) when prob is null
  uint32_t key_base = 0;                    // key_base(seed, search), computed on the host
  uint32_t k_start = 0;                     // global index of the block's first subset
  uint64_t unit_offset = 0;                 // global index of the layer's first unit
};

struct LinearArgs {
  const void* x = nullptr;   // (M, IN) shared by all subsets, or (K, M, IN)
  const void* w = nullptr;   // (N, IN)
  const void* w0 = nullptr;  // (N, IN) or null: reset to zero
  const void* b = nullptr;   // (N,) or null
  const void* b0 = nullptr;  // (N,) or null (null whenever w0 is null or b is null)
  void* out = nullptr;       // (K, M, N)
  void* y = nullptr;         // (M, N) scratch: shared x with neuron masks only
  void* y0 = nullptr;        // (M, N) scratch, only when w0 is given
  int64_t K = 0, M = 0, N = 0, IN = 0;
  bool x_shared = true;
  bool weight_masks = false;  // false: neuron units (output rows); true: elements of W
  MaskArgs mask;
};

struct MetricsArgs {
  const void* logits = nullptr;     // (K, N, C)
  const int64_t* targets = nullptr; // (N,)
  float* nll = nullptr;             // (K, N): per-row NLL, 0 where not counted
  float* hit = nullptr;             // (K, N): 1 where counted and argmax == target
  int64_t K = 0, N = 0, C = 0;
  int64_t ignore_index = -100;
};

struct UnitSumsArgs {
  const float* values = nullptr;  // (K, V)
  float* out = nullptr;           // (U, V)
  int64_t K = 0, U = 0, V = 0;
  MaskArgs mask;
};

cudaError_t launch_masked_reset_linear(DType dtype, const LinearArgs& args, cudaStream_t stream);
cudaError_t launch_subset_metrics(DType dtype, const MetricsArgs& args, cudaStream_t stream);
cudaError_t launch_subset_unit_sums(const UnitSumsArgs& args, cudaStream_t stream);

}  // namespace bingo
