// pybind11 binding of the cuda backend: checks torch tensors, fills the launchers' plain structs
// (bingo_cuda.h) and launches on the current stream. Same flat signatures as the torch reference
// (bingo_kernels/reference.py); bingo_kernels/ops.py has already validated shapes and options,
// so the checks here only guard what the kernels assume (CUDA, dtypes, contiguity) and never
// silently reinterpret memory.
#include <optional>
#include <string>
#include <tuple>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "bingo_cuda.h"
#include "bingo_hash.cuh"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

bingo::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return bingo::DType::kFloat32;
    case at::kHalf: return bingo::DType::kFloat16;
    case at::kBFloat16: return bingo::DType::kBFloat16;
    case at::kDouble: return bingo::DType::kFloat64;
    default: TORCH_CHECK_TYPE(false, "the cuda backend does not support dtype ", t.scalar_type());
  }
}

void check_cuda(const Tensor& t, const Tensor& ref, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == ref.device(), "bingo cuda backend: ", name,
              " must be on ", ref.device(), ", got ", t.device());
}

uint32_t u32(int64_t value, const char* name) {
  TORCH_CHECK(value >= 0 && value <= 0xFFFFFFFFll, name, " must be in [0, 2**32), got ", value);
  return static_cast<uint32_t>(value);
}

void check_status(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "bingo cuda backend: launching ", op, " failed: ",
              cudaGetErrorString(status));
}

// The mask description; `keep` holds the contiguous copies the kernels read.
bingo::MaskArgs mask_args(const OptTensor& explicit_masks, const OptTensor& prob,
                          double prob_scalar, int64_t seed, int64_t search, int64_t k_start,
                          int64_t unit_offset, const Tensor& ref, std::vector<Tensor>& keep) {
  bingo::MaskArgs m;
  if (explicit_masks.has_value()) {
    check_cuda(*explicit_masks, ref, "explicit_masks");
    keep.push_back(explicit_masks->to(at::kBool).contiguous().view(at::kByte));
    m.explicit_masks = keep.back().data_ptr<uint8_t>();
    return m;
  }
  if (prob.has_value()) {
    check_cuda(*prob, ref, "prob");
    keep.push_back(prob->to(at::kFloat).contiguous());
    m.prob = keep.back().data_ptr<float>();
  }
  m.prob_scalar = static_cast<float>(prob_scalar);  // the spec's float32(p): round to nearest
  m.key_base = bingo::key_base(u32(seed, "seed"), u32(search, "search"));
  m.k_start = u32(k_start, "k_start");
  // The uint64 offset travels as the int64 with the same bits (bingo_kernels.hashing.offset_arg);
  // the conversion back is modulo 2**64, defined for every value.
  m.unit_offset = static_cast<uint64_t>(unit_offset);
  return m;
}

const void* optional_ptr(const OptTensor& t, const Tensor& ref, const char* name,
                         std::vector<Tensor>& keep) {
  if (!t.has_value()) return nullptr;
  check_cuda(*t, ref, name);
  TORCH_CHECK(t->scalar_type() == ref.scalar_type(), name, " has dtype ", t->scalar_type(),
              ", expected ", ref.scalar_type());
  keep.push_back(t->contiguous());
  return keep.back().data_ptr();
}

Tensor masked_reset_linear(const Tensor& x, const Tensor& weight, const OptTensor& init_weight,
                           const OptTensor& bias, const OptTensor& init_bias,
                           const OptTensor& explicit_masks, const OptTensor& prob,
                           double prob_scalar, int64_t seed, int64_t search, int64_t k_start,
                           int64_t num_subsets, int64_t unit_offset,
                           const std::string& granularity) {
  TORCH_CHECK(x.is_cuda(), "bingo cuda backend: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(granularity == "neuron" || granularity == "weight",
              "granularity must be 'neuron' or 'weight', got '", granularity, "'");
  TORCH_CHECK(!(granularity == "weight" && explicit_masks.has_value()),
              "explicit masks are neuron masks; weight masks must be hashed");
  TORCH_CHECK(weight.dim() == 2 && (x.dim() == 2 || x.dim() == 3), "x must be 2-D or 3-D and "
              "weight 2-D, got ", x.sizes(), " and ", weight.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  std::vector<Tensor> keep;
  bingo::LinearArgs a;
  const Tensor xc = x.contiguous(), wc = weight.contiguous();
  a.x = optional_ptr(xc, x, "x", keep);
  a.w = optional_ptr(wc, x, "weight", keep);
  a.w0 = optional_ptr(init_weight, x, "init_weight", keep);
  a.b = optional_ptr(bias, x, "bias", keep);
  a.b0 = a.w0 != nullptr ? optional_ptr(init_bias, x, "init_bias", keep) : nullptr;
  a.K = explicit_masks.has_value() ? explicit_masks->size(0) : num_subsets;
  a.M = x.size(-2);
  a.N = weight.size(0);
  a.IN = weight.size(1);
  TORCH_CHECK(x.size(-1) == a.IN && (x.dim() == 2 || x.size(0) == a.K),
              "x has shape ", x.sizes(), " for weight ", weight.sizes(), " and ", a.K, " subsets");
  a.x_shared = x.dim() == 2;
  a.weight_masks = granularity == "weight";
  a.mask = mask_args(explicit_masks, prob, prob_scalar, seed, search, k_start, unit_offset, x,
                     keep);
  Tensor out = at::empty({a.K, a.M, a.N}, x.options());
  a.out = out.data_ptr();
  Tensor y, y0;
  if (a.x_shared && !a.weight_masks) {  // scratch products of the two-pass shared-input path
    y = at::empty({a.M, a.N}, x.options());
    a.y = y.data_ptr();
    if (a.w0 != nullptr) {
      y0 = at::empty({a.M, a.N}, x.options());
      a.y0 = y0.data_ptr();
    }
  }
  check_status(bingo::launch_masked_reset_linear(dtype_of(x), a,
                                                 c10::cuda::getCurrentCUDAStream()),
               "masked_reset_linear");
  return out;
}

std::tuple<Tensor, Tensor> subset_metrics(const Tensor& logits, const Tensor& targets,
                                          int64_t ignore_index) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 3, "logits must be a (K, N, C) CUDA tensor");
  check_cuda(targets, logits, "targets");
  const c10::cuda::CUDAGuard guard(logits.device());
  const Tensor lc = logits.contiguous(), tc = targets.to(at::kLong).contiguous();
  bingo::MetricsArgs a;
  a.K = lc.size(0);
  a.N = lc.size(1);
  a.C = lc.size(2);
  a.logits = lc.data_ptr();
  a.targets = tc.data_ptr<int64_t>();
  a.ignore_index = ignore_index;
  // Zeros: with no classes every target is ignore_index (ops checks the range), nothing counts.
  Tensor nll = at::zeros({a.K, a.N}, logits.options().dtype(at::kFloat));
  Tensor hit = at::zeros_like(nll);
  a.nll = nll.data_ptr<float>();
  a.hit = hit.data_ptr<float>();
  check_status(bingo::launch_subset_metrics(dtype_of(logits), a,
                                            c10::cuda::getCurrentCUDAStream()),
               "subset_metrics");
  const Tensor count = tc.ne(ignore_index).sum().clamp_min(1).to(at::kFloat);
  return {nll.sum(1) / count, hit.sum(1) / count};
}

Tensor subset_unit_sums(const Tensor& values, const OptTensor& explicit_masks,
                        const OptTensor& prob, double prob_scalar, int64_t seed, int64_t search,
                        int64_t k_start, int64_t unit_offset, int64_t num_units) {
  TORCH_CHECK(values.is_cuda() && values.dim() == 2, "values must be a (K, V) CUDA tensor");
  const c10::cuda::CUDAGuard guard(values.device());
  std::vector<Tensor> keep;
  const Tensor vc = values.to(at::kFloat).contiguous();
  bingo::UnitSumsArgs a;
  a.K = vc.size(0);
  a.V = vc.size(1);
  a.U = num_units;
  a.values = vc.data_ptr<float>();
  a.mask = mask_args(explicit_masks, prob, prob_scalar, seed, search, k_start, unit_offset,
                     values, keep);
  Tensor out = at::zeros({a.U, a.V}, values.options().dtype(at::kFloat));
  a.out = out.data_ptr<float>();
  check_status(bingo::launch_subset_unit_sums(a, c10::cuda::getCurrentCUDAStream()),
               "subset_unit_sums");
  return out;
}

// For tests: the hash spec evaluated on the host by the same header the kernels use.
int64_t key_base(int64_t seed, int64_t search) {
  return bingo::key_base(u32(seed, "seed"), u32(search, "search"));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bingo_kernels cuda backend (csrc/): masked_reset_linear, subset_metrics, "
            "subset_unit_sums";
  m.def("masked_reset_linear", &masked_reset_linear);
  m.def("subset_metrics", &subset_metrics);
  m.def("subset_unit_sums", &subset_unit_sums);
  m.def("key_base", &key_base);
}
