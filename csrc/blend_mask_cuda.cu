// CUDA implementation of fatezero_fast::blend_mask (schema in csrc/ops.cpp; docs/semantics.md §7).
//
// The same arithmetic as csrc/blend_mask_cpu.cpp, which describes it: token sum in the order of
// torch's *CPU* sum kernel (W = blend_mask_sum_lanes() lanes, four interleaved accumulators),
// 3x3 max-pool (NaN wins), torch's nearest resize, per-frame maximum, float32 division and
// strictly-greater comparison with float(threshold). Every add, multiply and divide is an
// explicitly rounded intrinsic (__fadd_rn, __fmul_rn, __fdiv_rn) so nvcc cannot contract or
// approximate them. Hence this op equals the CPU op, and fatezero_fast.ops.reference.blend_mask_reference run
// on CPU tensors, bit for bit. Against control.blend_mask run on CUDA tensors (whose sum uses
// torch's CUDA reduction order) masks are equal whenever each pixel has at most two nonzero
// products x_t * w_t (e.g. 0/1 weights selecting one or two tokens), since every order gives
// the same float then; with more, a sum may differ in its last bits, which flips a mask bit
// only where the normalized value lies within a few ulp of the threshold.
//
// Two kernels: (1) one thread per (frame, pixel) computes the token sum into a float scratch
// (F * rh * rw floats); (2) one block per frame recomputes pool + resize per output pixel,
// reduces the frame's maximum in shared memory and writes the bool mask.
// Inputs: token_maps (F, rh, rw, T) float32 contiguous, weights (T,) float32 contiguous, out
// (F, out_h, out_w) bool contiguous, all on one CUDA device (any compute capability).
//
// Compile check without a CUDA torch: nvcc -std=c++17 -c with torch's include dirs (a CPU wheel
// lacks c10/cuda/impl/cuda_cmake_macros.h: a stub with `#define C10_CUDA_BUILD_SHARED_LIBS` on the
// include path stands in for it). -DFZ_BLEND_MASK_KERNELS_ONLY compiles the kernels and their
// host/device helpers alone (no torch), e.g. to run the helpers on the host in a check.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#ifndef FZ_BLEND_MASK_KERNELS_ONLY
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#endif

namespace fatezero_fast {
namespace blend_mask_cuda {

#define FZ_HD __host__ __device__ __forceinline__

FZ_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

FZ_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

FZ_HD float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

FZ_HD bool is_nan(float v) { return v != v; }

// max with NaN propagation (a NaN operand wins), as torch's max_pool2d and amax.
FZ_HD float max_nan(float a, float b) { return (is_nan(a) || !(b > a || is_nan(b))) ? a : b; }

FZ_HD int ceil_log2(int x) {
  int p = 0;
  while ((1LL << p) < x) ++p;
  return p;
}

// Sum of term(0..n-1) in the association order of torch's CPU row sum (see blend_mask_cpu.cpp).
template <typename Term>
FZ_HD float ordered_row_sum(int n, const Term& term) {
  const int rows = n / 4;
  const int level_power = ceil_log2(rows) / 4 > 4 ? ceil_log2(rows) / 4 : 4;
  const long long level_step = 1LL << level_power;
  const long long level_mask = level_step - 1;
  float acc[4][4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int k = 0; k < 4; ++k) acc[j][k] = 0.f;
  }
  long long i = 0;
  while (i + level_step <= rows) {
    for (long long j = 0; j < level_step; ++j, ++i) {
#pragma unroll
      for (int k = 0; k < 4; ++k) acc[0][k] = add_rn(acc[0][k], term(static_cast<int>(4 * i + k)));
    }
    for (int level = 1; level < 4; ++level) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        acc[level][k] = add_rn(acc[level][k], acc[level - 1][k]);
        acc[level - 1][k] = 0.f;
      }
      if ((i & (level_mask << (level * level_power))) != 0) break;
    }
  }
  for (; i < rows; ++i) {
#pragma unroll
    for (int k = 0; k < 4; ++k) acc[0][k] = add_rn(acc[0][k], term(static_cast<int>(4 * i + k)));
  }
  for (int level = 1; level < 4; ++level) {
#pragma unroll
    for (int k = 0; k < 4; ++k) acc[0][k] = add_rn(acc[0][k], acc[level][k]);
  }
  float sum = acc[0][0];
  for (int t = rows * 4; t < n; ++t) sum = add_rn(sum, term(t));
#pragma unroll
  for (int k = 1; k < 4; ++k) sum = add_rn(sum, acc[0][k]);
  return sum;
}

// torch's float32 CPU (x * w).sum() over a contiguous row of n tokens with `lanes`-wide vectors.
FZ_HD float torch_order_weighted_sum(const float* x, const float* w, int n, int lanes) {
  float sum = 0.f;
  if (n >= lanes) {
    const int vectors = n / lanes;
    for (int t = vectors * lanes; t < n; ++t) sum = add_rn(sum, mul_rn(x[t], w[t]));
    for (int l = 0; l < lanes; ++l) {
      sum = add_rn(sum, ordered_row_sum(vectors, [&](int m) { return mul_rn(x[m * lanes + l], w[m * lanes + l]); }));
    }
  } else {
    sum = ordered_row_sum(n, [&](int t) { return mul_rn(x[t], w[t]); });
  }
  return add_rn(0.f, sum);  // torch zero-fills the output, then accumulates into it
}

// torch's nearest source index; scale = float(in) / float(out), computed on the host.
FZ_HD int nearest_source(int dst, int in, int out, float scale) {
  if (out == in) return dst;
  if (out == 2 * in) return dst >> 1;
  const int src = static_cast<int>(floorf(mul_rn(static_cast<float>(dst), scale)));
  return src < in - 1 ? src : in - 1;
}

struct Params {
  const float* maps;     // (F, rh, rw, T)
  const float* weights;  // (T,)
  float* sums;           // (F, rh, rw) scratch
  bool* out;             // (F, out_h, out_w)
  int frames, rh, rw, tokens, out_h, out_w, lanes;
  float scale_h, scale_w, threshold;
  bool use_pool;
};

FZ_HD void sum_pixel(const Params& p, long long pixel) {
  p.sums[pixel] = torch_order_weighted_sum(p.maps + pixel * p.tokens, p.weights, p.tokens, p.lanes);
}

// Value of the pooled (or plain) sum map of frame f at output pixel (y, x) after the resize.
FZ_HD float resized_value(const Params& p, int f, int y, int x) {
  const int sy = nearest_source(y, p.rh, p.out_h, p.scale_h);
  const int sx = nearest_source(x, p.rw, p.out_w, p.scale_w);
  const float* s = p.sums + static_cast<long long>(f) * p.rh * p.rw;
  if (!p.use_pool) return s[sy * p.rw + sx];
  float best = -INFINITY;
  const int y0 = sy > 0 ? sy - 1 : 0, y1 = sy + 1 < p.rh ? sy + 1 : p.rh - 1;
  const int x0 = sx > 0 ? sx - 1 : 0, x1 = sx + 1 < p.rw ? sx + 1 : p.rw - 1;
  for (int yy = y0; yy <= y1; ++yy) {
    for (int xx = x0; xx <= x1; ++xx) {
      const float v = s[yy * p.rw + xx];
      if (v > best || is_nan(v)) best = v;
    }
  }
  return best;
}

FZ_HD bool mask_value(const Params& p, int f, int y, int x, float peak) {
  return div_rn(resized_value(p, f, y, x), peak) > p.threshold;
}

constexpr int kSumThreads = 128;
constexpr int kMaskThreads = 256;

__global__ void __launch_bounds__(kSumThreads) sums_kernel(Params p) {
  const long long pixel = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pixel < static_cast<long long>(p.frames) * p.rh * p.rw) sum_pixel(p, pixel);
}

__global__ void __launch_bounds__(kMaskThreads) mask_kernel(Params p) {
  __shared__ float red[kMaskThreads];
  const int f = blockIdx.x;
  const int n = p.out_h * p.out_w;
  float peak = -INFINITY;
  for (int i = threadIdx.x; i < n; i += blockDim.x) peak = max_nan(peak, resized_value(p, f, i / p.out_w, i % p.out_w));
  red[threadIdx.x] = peak;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) red[threadIdx.x] = max_nan(red[threadIdx.x], red[threadIdx.x + s]);
    __syncthreads();
  }
  peak = red[0];
  bool* o = p.out + static_cast<long long>(f) * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = mask_value(p, f, i / p.out_w, i % p.out_w, peak);
}

inline cudaError_t launch(const Params& p, cudaStream_t stream) {
  const long long pixels = static_cast<long long>(p.frames) * p.rh * p.rw;
  const unsigned sum_blocks = static_cast<unsigned>((pixels + kSumThreads - 1) / kSumThreads);
  sums_kernel<<<sum_blocks, kSumThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  mask_kernel<<<static_cast<unsigned>(p.frames), kMaskThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

#undef FZ_HD

}  // namespace blend_mask_cuda

#ifndef FZ_BLEND_MASK_KERNELS_ONLY

int64_t blend_mask_sum_lanes();  // csrc/blend_mask_cpu.cpp: lanes of torch's CPU sum kernel

namespace {

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& maps) {
  TORCH_CHECK(t.is_cuda(), "blend_mask (CUDA): ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == maps.device(), "blend_mask (CUDA): ", name, " is on ", t.device(),
              " but token_maps is on ", maps.device());
  TORCH_CHECK(t.is_contiguous(), "blend_mask (CUDA): ", name, " must be contiguous");
}

int to_int(int64_t x, const char* what) {
  TORCH_CHECK(x >= 0 && x <= INT32_MAX, "blend_mask (CUDA): ", what, " = ", x, " does not fit in 32 bits");
  return static_cast<int>(x);
}

}  // namespace

void blend_mask_cuda_op(const at::Tensor& token_maps, const at::Tensor& weights, double threshold, int64_t out_h,
                        int64_t out_w, bool use_pool, const at::Tensor& out) {
  check_cuda(token_maps, "token_maps", token_maps);
  check_cuda(weights, "weights", token_maps);
  check_cuda(out, "out", token_maps);
  TORCH_CHECK(token_maps.dim() == 4, "blend_mask (CUDA): token_maps must be (F, rh, rw, T), got ", token_maps.sizes());
  TORCH_CHECK(token_maps.scalar_type() == at::kFloat && weights.scalar_type() == at::kFloat,
              "blend_mask (CUDA): token_maps and weights must be float32, got ", token_maps.scalar_type(), " and ",
              weights.scalar_type());
  const int64_t F = token_maps.size(0), rh = token_maps.size(1), rw = token_maps.size(2), T = token_maps.size(3);
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == T, "blend_mask (CUDA): weights must be (T,) with T = ", T,
              ", got ", weights.sizes());
  TORCH_CHECK(rh >= 1 && rw >= 1, "blend_mask (CUDA): empty map ", token_maps.sizes());
  TORCH_CHECK(out_h >= 1 && out_w >= 1, "blend_mask (CUDA): output size must be positive, got (", out_h, ", ", out_w,
              ")");
  TORCH_CHECK(out.scalar_type() == at::kBool, "blend_mask (CUDA): out must be bool, got ", out.scalar_type());
  TORCH_CHECK(out.dim() == 3 && out.size(0) == F && out.size(1) == out_h && out.size(2) == out_w,
              "blend_mask (CUDA): out must be (F, out_h, out_w) = (", F, ", ", out_h, ", ", out_w, "), got ",
              out.sizes());
  if (F == 0) return;

  blend_mask_cuda::Params p{};
  p.frames = to_int(F, "frames");
  p.rh = to_int(rh, "rh");
  p.rw = to_int(rw, "rw");
  p.tokens = to_int(T, "tokens");
  p.out_h = to_int(out_h, "out_h");
  p.out_w = to_int(out_w, "out_w");
  to_int(F * rh * rw * T, "token_maps.numel()");
  to_int(F * out_h * out_w, "out.numel()");
  p.lanes = static_cast<int>(blend_mask_sum_lanes());
  p.scale_h = static_cast<float>(rh) / static_cast<float>(out_h);  // torch: float(in) / out
  p.scale_w = static_cast<float>(rw) / static_cast<float>(out_w);
  p.threshold = static_cast<float>(threshold);
  p.use_pool = use_pool;

  const c10::cuda::CUDAGuard guard(token_maps.device());
  at::Tensor sums = at::empty({F * rh * rw}, token_maps.options());
  p.maps = token_maps.data_ptr<float>();
  p.weights = weights.data_ptr<float>();
  p.sums = sums.data_ptr<float>();
  p.out = out.data_ptr<bool>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(token_maps.get_device()).stream();
  const cudaError_t err = blend_mask_cuda::launch(p, stream);
  TORCH_CHECK(err == cudaSuccess, "blend_mask (CUDA): kernel launch failed: ", cudaGetErrorString(err));
}

#endif  // FZ_BLEND_MASK_KERNELS_ONLY

}  // namespace fatezero_fast

#ifndef FZ_BLEND_MASK_KERNELS_ONLY
TORCH_LIBRARY_IMPL(fatezero_fast, CUDA, m) { m.impl("blend_mask", &fatezero_fast::blend_mask_cuda_op); }
#endif
