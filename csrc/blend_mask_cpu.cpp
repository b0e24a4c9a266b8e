// C++ CPU kernel of fatezero_fast::blend_mask (schema in csrc/ops.cpp; docs/semantics.md §7).
//
// The oracle is fatezero_fast.ops.reference.blend_mask_reference, in torch:
//
//   maps = (token_maps * weights).sum(-1)[None]                  (1, F, rh, rw)
//   maps = max_pool2d(maps, 3, stride 1, padding 1)              (when use_pool)
//   maps = interpolate(maps, size=(out_h, out_w))                (mode 'nearest')
//   mask = (maps / maps.amax((-2, -1), keepdim=True)) > threshold
//
// and this kernel reproduces it bit for bit (for float32 inputs), one frame per task (OpenMP):
//
// * Token sum. A float32 sum depends on the association order, so the sum is computed in
//   exactly the order torch's CPU sum kernel (aten/src/ATen/native/cpu/SumKernel.cpp) uses for
//   a contiguous inner reduction of length T: T/W vectors of W lanes, each lane summed with
//   four interleaved accumulators (and cascade levels of 16 for very long rows), the T % W tail
//   summed first, then the W lanes in order, then added to the zero-filled output. W is the lane
//   count of at::vec::Vectorized<float> in the kernel torch dispatches to: 8 on x86-64 (DEFAULT
//   and AVX2; the sum kernel has no AVX512 variant, torch falls back to AVX2), 4 on aarch64
//   NEON, 8 with SVE256. Rows shorter than W use the scalar four-accumulator order. The
//   products x * w are rounded separately (fp-contract off below), as torch's mul does.
//   With 0/1 weights the zero terms cannot change a sum, so only the order of the selected
//   tokens matters; with one or two of them every order gives the same float.
// * Max-pool: maximum over the in-range 3x3 neighbours (the -inf padding never wins); a NaN
//   wins, as in torch.
// * Nearest resize: src = floor(dst * (float(in) / out)) in float32, clamped to in - 1, with
//   torch's special cases out == in (src = dst) and out == 2 in (src = dst >> 1).
// * Per-frame maximum over the resized map (NaN propagates), float32 division, comparison with
//   float(threshold) (torch compares a float32 tensor with a Python float in float32). A frame
//   whose maximum is 0 gives 0/0 = NaN, hence all False.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// Every product must be rounded before it is added, as in torch (setup.py builds with
// -ffp-contract=fast, which would let an FMA-capable target fuse them).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace fatezero_fast {

// Lanes of the Vectorized<float> that torch's CPU sum kernel runs with on this machine.
int64_t blend_mask_sum_lanes() {
#if defined(__aarch64__)
  static const int64_t lanes = at::get_cpu_capability() == "SVE256" ? 8 : 4;
  return lanes;
#else
  return 8;  // x86-64 DEFAULT/AVX2 (AVX512 falls back to AVX2 for sum), VSX, ZVECTOR: 32-byte vectors
#endif
}

namespace {

int64_t ceil_log2(int64_t x) {
  int64_t p = 0;
  while ((int64_t(1) << p) < x) ++p;
  return p;
}

// Sum of term(0), ..., term(n - 1) in the association order of torch's CPU row sum: the row read
// as (n/4, 4), four running sums over its columns (cascaded every 16^k rows), the n % 4 leftover
// terms added to the first sum, then the four sums added left to right.
template <typename Term>
float ordered_row_sum(int64_t n, const Term& term) {
  const int64_t rows = n / 4;
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(rows) / 4);
  const int64_t level_step = int64_t(1) << level_power;
  const int64_t level_mask = level_step - 1;
  float acc[4][4] = {};
  int64_t i = 0;
  while (i + level_step <= rows) {
    for (int64_t j = 0; j < level_step; ++j, ++i) {
      for (int k = 0; k < 4; ++k) acc[0][k] += term(4 * i + k);
    }
    for (int level = 1; level < 4; ++level) {
      for (int k = 0; k < 4; ++k) {
        acc[level][k] += acc[level - 1][k];
        acc[level - 1][k] = 0.f;
      }
      if ((i & (level_mask << (level * level_power))) != 0) break;
    }
  }
  for (; i < rows; ++i) {
    for (int k = 0; k < 4; ++k) acc[0][k] += term(4 * i + k);
  }
  for (int level = 1; level < 4; ++level) {
    for (int k = 0; k < 4; ++k) acc[0][k] += acc[level][k];
  }
  float sum = acc[0][0];
  for (int64_t t = rows * 4; t < n; ++t) sum += term(t);
  for (int k = 1; k < 4; ++k) sum += acc[0][k];
  return sum;
}

// torch's float32 (x * w).sum() over a contiguous row of n tokens, bit for bit.
float torch_order_weighted_sum(const float* x, const float* w, int64_t n, int64_t lanes) {
  float sum = 0.f;
  if (n >= lanes) {
    const int64_t vectors = n / lanes;
    for (int64_t t = vectors * lanes; t < n; ++t) sum += x[t] * w[t];
    for (int64_t l = 0; l < lanes; ++l) {
      const float* xl = x + l;
      const float* wl = w + l;
      sum += ordered_row_sum(vectors, [&](int64_t m) { return xl[m * lanes] * wl[m * lanes]; });
    }
  } else {
    sum = ordered_row_sum(n, [&](int64_t t) { return x[t] * w[t]; });
  }
  return 0.f + sum;  // the output is zero-filled, then accumulated into
}

// Source index of output index dst for torch's nearest resize (upsample_nearest2d, no scale given).
int64_t nearest_source(int64_t dst, int64_t in, int64_t out) {
  if (out == in) return dst;
  if (out == 2 * in) return dst >> 1;
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  return std::min(static_cast<int64_t>(std::floor(static_cast<float>(dst) * scale)), in - 1);
}

void check_inputs(const at::Tensor& maps, const at::Tensor& weights, int64_t out_h, int64_t out_w,
                  const at::Tensor& out) {
  TORCH_CHECK(maps.dim() == 4, "blend_mask: token_maps must be (F, rh, rw, T), got ", maps.sizes());
  TORCH_CHECK(maps.scalar_type() == at::kFloat && weights.scalar_type() == at::kFloat,
              "blend_mask: token_maps and weights must be float32, got ", maps.scalar_type(), " and ",
              weights.scalar_type());
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == maps.size(3), "blend_mask: weights must be (T,) with T = ",
              maps.size(3), ", got ", weights.sizes());
  TORCH_CHECK(maps.size(1) >= 1 && maps.size(2) >= 1, "blend_mask: empty map ", maps.sizes());
  TORCH_CHECK(out_h >= 1 && out_w >= 1, "blend_mask: output size must be positive, got (", out_h, ", ", out_w, ")");
  TORCH_CHECK(out.scalar_type() == at::kBool, "blend_mask: out must be bool, got ", out.scalar_type());
  TORCH_CHECK(out.dim() == 3 && out.size(0) == maps.size(0) && out.size(1) == out_h && out.size(2) == out_w,
              "blend_mask: out must be (F, out_h, out_w) = (", maps.size(0), ", ", out_h, ", ", out_w, "), got ",
              out.sizes());
  TORCH_CHECK(maps.is_contiguous() && weights.is_contiguous() && out.is_contiguous(),
              "blend_mask: token_maps, weights and out must be contiguous");
}

}  // namespace

void blend_mask_cpu(const at::Tensor& token_maps, const at::Tensor& weights, double threshold, int64_t out_h,
                    int64_t out_w, bool use_pool, const at::Tensor& out) {
  TORCH_CHECK(token_maps.device().is_cpu() && weights.device().is_cpu() && out.device().is_cpu(),
              "blend_mask (CPU): all tensors must be on the CPU");
  check_inputs(token_maps, weights, out_h, out_w, out);
  const int64_t F = token_maps.size(0), rh = token_maps.size(1), rw = token_maps.size(2), T = token_maps.size(3);
  if (F == 0) return;
  const float* maps = token_maps.data_ptr<float>();
  const float* w = weights.data_ptr<float>();
  bool* dst = out.data_ptr<bool>();
  const float th = static_cast<float>(threshold);
  const int64_t lanes = blend_mask_sum_lanes();

  std::vector<int64_t> src_y(out_h), src_x(out_w);
  for (int64_t y = 0; y < out_h; ++y) src_y[y] = nearest_source(y, rh, out_h);
  for (int64_t x = 0; x < out_w; ++x) src_x[x] = nearest_source(x, rw, out_w);

  auto frame = [&](int64_t f, std::vector<float>& sums, std::vector<float>& pooled) {
    const float* m = maps + f * rh * rw * T;
    for (int64_t p = 0; p < rh * rw; ++p) sums[p] = torch_order_weighted_sum(m + p * T, w, T, lanes);
    const float* map = sums.data();
    if (use_pool) {
      for (int64_t y = 0; y < rh; ++y) {
        for (int64_t x = 0; x < rw; ++x) {
          float best = -std::numeric_limits<float>::infinity();
          for (int64_t yy = std::max<int64_t>(y - 1, 0); yy <= std::min(y + 1, rh - 1); ++yy) {
            for (int64_t xx = std::max<int64_t>(x - 1, 0); xx <= std::min(x + 1, rw - 1); ++xx) {
              const float v = sums[yy * rw + xx];
              if (v > best || std::isnan(v)) best = v;
            }
          }
          pooled[y * rw + x] = best;
        }
      }
      map = pooled.data();
    }
    float peak = -std::numeric_limits<float>::infinity();
    for (int64_t y = 0; y < out_h && !std::isnan(peak); ++y) {
      const float* row = map + src_y[y] * rw;
      for (int64_t x = 0; x < out_w; ++x) {
        const float v = row[src_x[x]];
        if (std::isnan(v)) {
          peak = v;
          break;
        }
        peak = std::max(peak, v);
      }
    }
    bool* o = dst + f * out_h * out_w;
    for (int64_t y = 0; y < out_h; ++y) {
      const float* row = map + src_y[y] * rw;
      for (int64_t x = 0; x < out_w; ++x) o[y * out_w + x] = (row[src_x[x]] / peak) > th;
    }
  };

  // Frames are independent; threads only pay off when there is some work per frame.
  const int64_t work = F * (rh * rw * (T + 9) + out_h * out_w);
#ifdef _OPENMP
  const int threads = (at::in_parallel_region() || work < (int64_t(1) << 16))
                          ? 1
                          : static_cast<int>(std::min<int64_t>(at::get_num_threads(), F));
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> sums(rh * rw), pooled(use_pool ? rh * rw : 0);
#pragma omp for schedule(static)
    for (int64_t f = 0; f < F; ++f) frame(f, sums, pooled);
  }
#else
  (void)work;
  std::vector<float> sums(rh * rw), pooled(use_pool ? rh * rw : 0);
  for (int64_t f = 0; f < F; ++f) frame(f, sums, pooled);
#endif
}

}  // namespace fatezero_fast
