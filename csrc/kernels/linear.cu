// masked_reset_linear: y[k] = x[k] @ where(M_k, W0, W).T + b_k for K subsets (see
// bingo_kernels/reference.py), masks regenerated in-kernel from bingo_hash.cuh. Three modes, the
// structure of the Triton backend (bingo_kernels/triton/linear.py):
//
// * kPair (shared x, neuron masks): both products x W^T + b and x W0^T + b0 in one pass, each x
//   tile read once and fed to both; then select_kernel writes out[k] = where(m_k, y0, y) column
//   by column. The K-fold work is only the output write, not K matmuls.
// * kRowSelect (per-subset x, neuron masks): a reset output row is row n of W0, so the B tile's
//   rows are loaded from W or W0 (none at all for reset-to-zero): no blend, no extra bytes.
// * kBlend (weight masks): each B tile element is hashed (unit = offset + n * IN + i, the weight's
//   row-major index) and taken from W or W0 (or zero) while the tile is staged in shared memory.
//
// GEMM core: 64x64 output tiles, 128 threads, the reduction in steps of BK staged in shared
// memory. fp16/bf16 run on tensor cores (WMMA m16n16k16, fp32 accumulators: each of the 4 warps
// owns a 32x32 sub-tile = 2x2 fragments). fp32 uses a tiled FMA path (8x4 outputs per thread):
// tensor cores would mean TF32, whose 10-bit mantissa breaks agreement with the torch backend
// (1e-5 relative; torch keeps fp32 matmuls in full precision by default). fp64 uses the same FMA
// path in double. Single-buffered (no cp.async pipeline): see docs/kernels.md for what that costs.
#include <mma.h>

#include "common.cuh"

namespace bingo {
namespace {

constexpr int BM = 64, BN = 64, THREADS = 128;
enum Mode { kPair = 0, kRowSelect = 1, kBlend = 2 };

// Tiled FMA engine (fp32 / fp64, and the fallback type set of the template).
template <typename T>
struct FmaEngine {
  using A = typename AccType<T>::type;
  static constexpr int BK = sizeof(T) == 8 ? 16 : 32;  // fp64: keeps static smem under 48 KiB
  static constexpr int LDS = BK + 1;                   // +1: rows land in different banks
  static constexpr int kScratchBytes = 0;
  struct Accum { A v[8][4]; };

  __device__ static void zero(Accum& c) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) c.v[i][j] = A(0);
  }
  // c += As (BM x BK) * Bs (BN x BK)^T; thread (ty, tx) owns rows ty + 8i, columns tx + 16j.
  __device__ static void mma(Accum& c, const T* As, const T* Bs) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll 4
    for (int kk = 0; kk < BK; ++kk) {
      A a[8], b[4];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = to_acc(As[(ty + 8 * i) * LDS + kk]);
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = to_acc(Bs[(tx + 16 * j) * LDS + kk]);
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) c.v[i][j] = fma(a[i], b[j], c.v[i][j]);
    }
  }
  // write(row, col, value) for every element of the tile; consecutive threads: consecutive cols.
  template <typename F>
  __device__ static void store(const Accum& c, A* /*scratch*/, F&& write) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) write(ty + 8 * i, tx + 16 * j, c.v[i][j]);
  }
};

// Tensor-core engine (fp16, bf16): WMMA 16x16x16 fragments, fp32 accumulation.
template <typename T>
struct WmmaEngine {
  using A = float;
  static constexpr int BK = 32;
  static constexpr int LDS = BK + 8;  // a multiple of 8 elements (WMMA), skewed against conflicts
  static constexpr int LDC = BN + 4;  // fp32 scratch row stride (a multiple of 4, WMMA)
  static constexpr int kScratchBytes = BM * LDC * sizeof(float);
  struct Accum { nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> f[2][2]; };

  __device__ static void zero(Accum& c) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(c.f[i][j], 0.f);
  }
  // Warp w owns the 32x32 sub-tile (rows 32 * (w / 2), cols 32 * (w % 2)). Bs holds rows of W
  // (n, i), i.e. W^T in column-major order: WMMA's col_major matrix_b with ldm = LDS.
  __device__ static void mma(Accum& c, const T* As, const T* Bs) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], As + (wm * 32 + i * 16) * LDS + kk, LDS);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], Bs + (wn * 32 + j * 16) * LDS + kk, LDS);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(c.f[i][j], a[i], b[j], c.f[i][j]);
    }
  }
  // Fragments have an opaque register layout: go through shared memory to reach (row, col).
  template <typename F>
  __device__ static void store(const Accum& c, float* scratch, F&& write) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(scratch + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, c.f[i][j],
                                LDC, wmma::mem_row_major);
    __syncthreads();
    for (int idx = threadIdx.x; idx < BM * BN; idx += THREADS)
      write(idx / BN, idx % BN, scratch[(idx / BN) * LDC + idx % BN]);
    __syncthreads();
  }
};

template <typename T> struct EngineFor { using type = FmaEngine<T>; };
template <> struct EngineFor<__half> { using type = WmmaEngine<__half>; };
template <> struct EngineFor<__nv_bfloat16> { using type = WmmaEngine<__nv_bfloat16>; };

// Grid: (N tiles, M tiles, subsets k_first .. k_first + gridDim.z) for kRowSelect / kBlend;
// kPair has gridDim.z = 1 and writes the (M, N) products y (and y0).
template <typename T, int MODE>
__global__ void __launch_bounds__(THREADS) linear_kernel(LinearArgs p, int64_t k_first) {
  using E = typename EngineFor<T>::type;
  using A = typename E::A;
  constexpr int BK = E::BK, LDS = E::LDS, NB = MODE == kPair ? 2 : 1;
  constexpr int kTileBytes = (BM + NB * BN) * LDS * sizeof(T);
  __shared__ __align__(128) unsigned char smem[kTileBytes + E::kScratchBytes];
  __shared__ bool reset_row[BN];
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + BM * LDS;
  A* scratch = reinterpret_cast<A*>(smem + kTileBytes);

  const int64_t n0 = int64_t(blockIdx.x) * BN, m0 = int64_t(blockIdx.y) * BM;
  const int64_t k = k_first + blockIdx.z;
  const int64_t M = p.M, N = p.N, IN = p.IN;
  const bool has_init = p.w0 != nullptr;
  const T* x = static_cast<const T*>(p.x) + (p.x_shared ? 0 : k * M * IN);
  const T* w = static_cast<const T*>(p.w);
  const T* w0 = static_cast<const T*>(p.w0);
  const uint32_t key = subset_key(p.mask.key_base, p.mask.k_start, static_cast<uint32_t>(k));

  if (MODE == kRowSelect) {  // which of the tile's output rows subset k resets
    for (int r = threadIdx.x; r < BN; r += THREADS)
      reset_row[r] = n0 + r < N && unit_in_subset(p.mask, key, k, N, n0 + r);
    __syncthreads();
  }

  typename E::Accum acc, acc0;
  E::zero(acc);
  E::zero(acc0);
  for (int64_t i0 = 0; i0 < IN; i0 += BK) {
    // Stage the x tile: consecutive threads read consecutive features (coalesced).
    for (int idx = threadIdx.x; idx < BM * BK; idx += THREADS) {
      const int r = idx / BK, c = idx % BK;
      const int64_t m = m0 + r, i = i0 + c;
      As[r * LDS + c] = (m < M && i < IN) ? x[m * IN + i] : zero_value<T>();
    }
    // Stage the weight tile(s), rows n0.., where the masks decide what each element is.
    for (int idx = threadIdx.x; idx < BN * BK; idx += THREADS) {
      const int r = idx / BK, c = idx % BK;
      const int64_t n = n0 + r, i = i0 + c;
      const bool valid = n < N && i < IN;
      const int64_t off = n * IN + i;
      T v = zero_value<T>();
      if (MODE == kPair) {
        if (valid) v = w[off];
        if (has_init) Bs[BN * LDS + r * LDS + c] = valid ? w0[off] : zero_value<T>();
      } else if (MODE == kRowSelect) {
        if (valid) {
          if (!reset_row[r]) v = w[off];
          else if (has_init) v = w0[off];
        }
      } else if (valid) {  // kBlend
        if (!unit_in_subset(p.mask, key, k, N * IN, off)) v = w[off];
        else if (has_init) v = w0[off];
      }
      Bs[r * LDS + c] = v;
    }
    __syncthreads();
    E::mma(acc, As, Bs);
    if (MODE == kPair && has_init) E::mma(acc0, As, Bs + BN * LDS);
    __syncthreads();
  }

  const T* b = static_cast<const T*>(p.b);
  const T* b0 = static_cast<const T*>(p.b0);
  T* out = MODE == kPair ? static_cast<T*>(p.y) : static_cast<T*>(p.out) + k * M * N;
  E::store(acc, scratch, [&](int r, int c, A v) {
    const int64_t m = m0 + r, n = n0 + c;
    if (m >= M || n >= N) return;
    if (MODE == kRowSelect && reset_row[c]) {
      v += b0 != nullptr ? to_acc(b0[n]) : A(0);  // reset-to-zero resets the bias entry too
    } else if (b != nullptr) {
      v += to_acc(b[n]);  // weight masks never reset the bias
    }
    out[m * N + n] = from_acc<T>(v);
  });
  if (MODE == kPair && has_init) {
    T* y0 = static_cast<T*>(p.y0);
    E::store(acc0, scratch, [&](int r, int c, A v) {
      const int64_t m = m0 + r, n = n0 + c;
      if (m >= M || n >= N) return;
      if (b0 != nullptr) v += to_acc(b0[n]);
      y0[m * N + n] = from_acc<T>(v);
    });
  }
}

// out[k, m, n] = m_k[n] ? y0[m, n] : y[m, n] (y0 = 0 for reset-to-zero). Block (32, 8): a thread
// owns one column and kRows rows, loads its y / y0 once and writes them for kSubsets subsets;
// the unit hash and threshold are computed once per thread, one key hash per subset.
constexpr int kSelectRows = 4, kSelectSubsets = 8;

template <typename T>
__global__ void __launch_bounds__(256) select_kernel(LinearArgs p, int64_t k_first) {
  const int64_t n = int64_t(blockIdx.x) * 32 + threadIdx.x;
  const int64_t m_first = (int64_t(blockIdx.y) * 8 + threadIdx.y) * kSelectRows;
  if (n >= p.N) return;
  const T* y = static_cast<const T*>(p.y);
  const T* y0 = static_cast<const T*>(p.y0);
  T keep[kSelectRows], reset[kSelectRows];
#pragma unroll
  for (int r = 0; r < kSelectRows; ++r) {
    const int64_t m = m_first + r;
    keep[r] = m < p.M ? y[m * p.N + n] : zero_value<T>();
    reset[r] = (m < p.M && y0 != nullptr) ? y0[m * p.N + n] : zero_value<T>();
  }
  T* out = static_cast<T*>(p.out);
  for (int s = 0; s < kSelectSubsets; ++s) {
    const int64_t k = k_first + int64_t(blockIdx.z) * kSelectSubsets + s;
    if (k >= p.K) break;
    const uint32_t key = subset_key(p.mask.key_base, p.mask.k_start, static_cast<uint32_t>(k));
    const bool m_k = unit_in_subset(p.mask, key, k, p.N, n);
#pragma unroll
    for (int r = 0; r < kSelectRows; ++r) {
      const int64_t m = m_first + r;
      if (m < p.M) out[(k * p.M + m) * p.N + n] = m_k ? reset[r] : keep[r];
    }
  }
}

template <typename T>
cudaError_t launch_typed(const LinearArgs& p, cudaStream_t stream) {
  const dim3 tiles((p.N + BN - 1) / BN, (p.M + BM - 1) / BM);
  if (tiles.y > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  if (!p.weight_masks && p.x_shared) {
    linear_kernel<T, kPair><<<tiles, THREADS, 0, stream>>>(p, 0);
    const dim3 block(32, 8);
    const int64_t rows_per_block = 8 * kSelectRows;
    const int64_t grid_y = (p.M + rows_per_block - 1) / rows_per_block;
    if (grid_y > kMaxGridYZ) return cudaErrorInvalidConfiguration;
    const int64_t k_span = kMaxGridYZ * kSelectSubsets;
    for (int64_t k0 = 0; k0 < p.K; k0 += k_span) {
      const int64_t kc = p.K - k0 < k_span ? p.K - k0 : k_span;
      const dim3 grid((p.N + 31) / 32, grid_y, (kc + kSelectSubsets - 1) / kSelectSubsets);
      select_kernel<T><<<grid, block, 0, stream>>>(p, k0);
    }
    return cudaGetLastError();
  }
  for (int64_t k0 = 0; k0 < p.K; k0 += kMaxGridYZ) {
    const dim3 grid(tiles.x, tiles.y, p.K - k0 < kMaxGridYZ ? p.K - k0 : kMaxGridYZ);
    if (p.weight_masks) linear_kernel<T, kBlend><<<grid, THREADS, 0, stream>>>(p, k0);
    else linear_kernel<T, kRowSelect><<<grid, THREADS, 0, stream>>>(p, k0);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_masked_reset_linear(DType dtype, const LinearArgs& args, cudaStream_t stream) {
  if (args.K == 0 || args.M == 0 || args.N == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    return launch_typed<typename decltype(tag)::type>(args, stream);
  });
}

}  // namespace bingo
