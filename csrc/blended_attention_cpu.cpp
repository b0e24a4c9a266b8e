// C++ CPU kernel of fatezero_fast::blended_attention (the CPU fallback users get).
//
//   out = M * softmax(Q K_e^T s) V_e + (1 - M) * P_s V_e                              (1)
//
// Flash-attention style: each task owns one (b, h, tile of BQ query rows) and walks the key
// tiles of the R gathered frames once, keeping an online softmax per stream
//
//   m' = max(m, max_j S_ij),  a = exp(m - m'),  l' = a l + sum_j exp(S_ij - m'),
//   acc' = a acc + exp(S - m') V                                                       (2)
//
// so that softmax(S) V = acc / l at the end. Everything is accumulated in fp32 whatever the
// input dtype; the extra memory is a few per-thread tiles (O(BQ * D + BK * D), BQ = BK = 64),
// never Nq x Nk.
// Scores are kept in log2 units (Q is pre-multiplied by s * log2(e)) so the exponential is a
// cheap vectorized exp2.
//
// Source streams, per query tile (mask exactly 0 on the whole tile: source only; exactly 1:
// edit only; otherwise both, blended per row by (1)):
//   qk       a second online softmax (2) on q_s k_s^T over the same V tiles;
//   probs    acc_s += P_s[:, tile] V_tile directly (fp16/bf16/fp8 converted on the fly),
//            times row_scale at the end;
//   lowrank  P_s V = U (W V): W V (r x D per (b, h)) is computed once up front, cheap.
//
// The three fp32 micro-kernels (scores, softmax step, P V) are compiled twice on x86-64
// (baseline and x86-64-v3 = AVX2/FMA, chosen at load time), so the binary runs on any x86-64.
#include "blended_attention.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors in the baseline clone: all inlined, no ABI
#endif

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define FZ_HAS_SHUFFLEVECTOR 1
#endif
#endif

// Vector helpers are force-inlined so the micro-kernels' AVX2 clones compile them with AVX2.
#define FZ_INLINE inline __attribute__((always_inline))

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FZ_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FZ_MULTIVERSION
#endif

namespace fatezero_fast {
namespace {

constexpr int64_t BQ = 64;  // query rows per task
constexpr int64_t BK = 64;  // keys per tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------------
// 8-lane fp32 vectors (GCC/Clang vector extensions; aligned(4) = unaligned loads are fine).
typedef float f32x8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t i32x8 __attribute__((vector_size(32), aligned(4)));

FZ_INLINE f32x8 load8(const float* p) {
  f32x8 x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
FZ_INLINE void store8(float* p, f32x8 x) { std::memcpy(p, &x, sizeof(x)); }
FZ_INLINE f32x8 splat8(float x) {  // one broadcast instruction (an initializer list gives 8 inserts)
#ifdef FZ_HAS_SHUFFLEVECTOR
  const f32x8 r = {x};
  return __builtin_shufflevector(r, r, 0, 0, 0, 0, 0, 0, 0, 0);
#else
  return f32x8{x, x, x, x, x, x, x, x};
#endif
}
FZ_INLINE float hmax8(f32x8 x) {
  float r = x[0];
  for (int i = 1; i < 8; ++i) r = std::max(r, x[i]);
  return r;
}
FZ_INLINE float hsum8(f32x8 x) {
  return ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
}

// 2^x for x <= 0, relative error ~1e-7; exactly 0 below -126 (so 2^-inf = 0).
// 2^x = 2^n 2^f with n = round(x), f in [-1/2, 1/2]; 2^f = e^(f ln2) by its Taylor series to t^7.
FZ_INLINE f32x8 exp2_neg(f32x8 x) {
  const f32x8 lo = splat8(-126.f), zero = splat8(0.f);
  const f32x8 xc = x < lo ? lo : (x > zero ? zero : x);
  const i32x8 n = __builtin_convertvector(xc - 0.5f, i32x8);  // truncation = round(xc), xc <= 0
  const f32x8 t = (xc - __builtin_convertvector(n, f32x8)) * 0.69314718055994531f;
  f32x8 p = splat8(1.f / 5040.f);
  p = p * t + 1.f / 720.f;
  p = p * t + 1.f / 120.f;
  p = p * t + 1.f / 24.f;
  p = p * t + 1.f / 6.f;
  p = p * t + 0.5f;
  p = p * t + 1.f;
  p = p * t + 1.f;
  const f32x8 two_n = (f32x8)((n + 127) << 23);
  return x < lo ? zero : p * two_n;
}

// ---------------------------------------------------------------------------------------------
// fp32 micro-kernels on fixed-size tiles (rows past the tile's end are zero-padded).

// S (BQ x BK) = Q (BQ x D) K^T, with K given transposed: kt (D x BK). Register block 4 x 16;
// column blocks outermost so that a (D x 16) slice of kt stays in L1 while all rows use it.
FZ_MULTIVERSION void scores_tile(const float* q, const float* kt, float* s, int64_t D) {
  for (int64_t j0 = 0; j0 < BK; j0 += 16) {
    for (int64_t i0 = 0; i0 < BQ; i0 += 4) {
      f32x8 c[4][2] = {};
      for (int64_t d = 0; d < D; ++d) {
        const f32x8 k0 = load8(kt + d * BK + j0), k1 = load8(kt + d * BK + j0 + 8);
        for (int r = 0; r < 4; ++r) {
          const f32x8 a = splat8(q[(i0 + r) * D + d]);
          c[r][0] += a * k0;
          c[r][1] += a * k1;
        }
      }
      for (int r = 0; r < 4; ++r) {
        store8(s + (i0 + r) * BK + j0, c[r][0]);
        store8(s + (i0 + r) * BK + j0 + 8, c[r][1]);
      }
    }
  }
}

// One step of the online softmax (2) on a score tile (log2 units) with `bk` valid columns:
// S becomes P = 2^(S - m') (0 past bk), m, l are updated and acc (BQ x D) is rescaled by a.
FZ_MULTIVERSION void softmax_tile(float* s, int64_t bk, float* m, float* l, float* acc, int64_t D) {
  for (int64_t i = 0; i < BQ; ++i) {
    float* row = s + i * BK;
    for (int64_t j = bk; j < BK; ++j) row[j] = kNegInf;
    f32x8 vmax = splat8(m[i]);
    for (int64_t j = 0; j < BK; j += 8) {
      const f32x8 x = load8(row + j);
      vmax = x > vmax ? x : vmax;
    }
    const float m_new = hmax8(vmax);
    f32x8 vsum = splat8(0.f);
    for (int64_t j = 0; j < BK; j += 8) {
      const f32x8 p = exp2_neg(load8(row + j) - m_new);
      store8(row + j, p);
      vsum += p;
    }
    const float alpha = exp2_neg(splat8(m[i] - m_new))[0];  // 0 on the first tile (m = -inf)
    l[i] = alpha * l[i] + hsum8(vsum);
    m[i] = m_new;
    if (alpha != 1.f) {
      float* a = acc + i * D;
      for (int64_t d = 0; d < D; d += 8) store8(a + d, load8(a + d) * alpha);
    }
  }
}

// acc (rows x D) += P (rows x BK) V (BK x D); rows is a multiple of 4 (BQ, or a rank chunk).
// Register block: 4 rows x 16 columns (x 8 for the last columns when D % 16 == 8).
template <int W>
FZ_INLINE void pv_block(const float* p0, const float* v, float* acc, int64_t D) {
  f32x8 c[4][W];
  for (int r = 0; r < 4; ++r)
    for (int w = 0; w < W; ++w) c[r][w] = load8(acc + r * D + 8 * w);
  for (int64_t j = 0; j < BK; ++j) {
    f32x8 vj[W];
    for (int w = 0; w < W; ++w) vj[w] = load8(v + j * D + 8 * w);
    for (int r = 0; r < 4; ++r) {
      const f32x8 p = splat8(p0[r * BK + j]);
      for (int w = 0; w < W; ++w) c[r][w] += p * vj[w];
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int w = 0; w < W; ++w) store8(acc + r * D + 8 * w, c[r][w]);
}

// Column blocks outermost so that the (BK x 16) slice of V stays in L1 while all rows use it.
FZ_MULTIVERSION void pv_tile(const float* p, const float* v, float* acc, int64_t rows, int64_t D) {
  int64_t d0 = 0;
  for (; d0 + 16 <= D; d0 += 16)
    for (int64_t i0 = 0; i0 < rows; i0 += 4) pv_block<2>(p + i0 * BK, v + d0, acc + i0 * D + d0, D);
  if (d0 < D)
    for (int64_t i0 = 0; i0 < rows; i0 += 4) pv_block<1>(p + i0 * BK, v + d0, acc + i0 * D + d0, D);
}

// ---------------------------------------------------------------------------------------------
// dtype conversion: any supported element type -> fp32, one contiguous run at a time.

enum class Elem { F32, F16, BF16, F8E4M3, F8E5M2 };

struct Fp8Tables {
  float e4m3[256], e5m2[256];
  Fp8Tables() {
    for (int b = 0; b < 256; ++b) {
      e4m3[b] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(b), c10::Float8_e4m3fn::from_bits()));
      e5m2[b] = static_cast<float>(c10::Float8_e5m2(static_cast<uint8_t>(b), c10::Float8_e5m2::from_bits()));
    }
  }
};
const Fp8Tables& fp8_tables() {
  static const Fp8Tables tables;
  return tables;
}

Elem elem_of(const at::Tensor& t, const char* name, bool allow_fp8) {
  switch (t.scalar_type()) {
    case at::kFloat: return Elem::F32;
    case at::kHalf: return Elem::F16;
    case at::kBFloat16: return Elem::BF16;
    case at::kFloat8_e4m3fn: if (allow_fp8) return Elem::F8E4M3; break;
    case at::kFloat8_e5m2: if (allow_fp8) return Elem::F8E5M2; break;
    default: break;
  }
  TORCH_CHECK(false, "fatezero_fast::blended_attention: ", name, " has dtype ", t.scalar_type(),
              "; use float32, float16 or bfloat16", allow_fp8 ? " (or float8_e4m3fn / float8_e5m2)" : "");
  return Elem::F32;
}

size_t elem_size(Elem e) {
  switch (e) {
    case Elem::F32: return 4;
    case Elem::F16: case Elem::BF16: return 2;
    default: return 1;
  }
}

// 8 fp16 / bf16 values -> fp32, with integer vector ops (no F16C needed, no denormal operands).
typedef uint16_t u16x8 __attribute__((vector_size(16), aligned(2)));

FZ_INLINE i32x8 load_u16x8(const uint16_t* p) {
  u16x8 h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, i32x8);  // zero-extended
}

FZ_INLINE f32x8 half8_to_float(const uint16_t* p) {
  const i32x8 h = load_u16x8(p), em = h & 0x7fff;  // exponent and mantissa bits
  const i32x8 normal = (em << 13) + (112 << 23);  // rebias the exponent 15 -> 127
  const i32x8 special = (em << 13) | 0x7f800000;  // inf / NaN
  const i32x8 subnormal = (i32x8)(__builtin_convertvector(em, f32x8) * 0x1p-24f);  // em * 2^-24, exact
  const i32x8 bits = em < 0x400 ? subnormal : (em >= 0x7c00 ? special : normal);
  return (f32x8)(bits | ((h & 0x8000) << 16));
}

FZ_INLINE f32x8 bfloat8_to_float(const uint16_t* p) { return (f32x8)(load_u16x8(p) << 16); }

// dst[i] = mul * src[i], i < n; `src` points at element 0 of the run.
FZ_MULTIVERSION void load_f32(const void* src, Elem e, int64_t n, float* dst, float mul = 1.f) {
  const int64_t n8 = n - n % 8;
  switch (e) {
    case Elem::F32: {
      const float* x = static_cast<const float*>(src);
      for (int64_t i = 0; i < n8; i += 8) store8(dst + i, load8(x + i) * mul);
      for (int64_t i = n8; i < n; ++i) dst[i] = mul * x[i];
      break;
    }
    case Elem::F16: {
      const uint16_t* x = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n8; i += 8) store8(dst + i, half8_to_float(x + i) * mul);
      const c10::Half* xh = static_cast<const c10::Half*>(src);
      for (int64_t i = n8; i < n; ++i) dst[i] = mul * static_cast<float>(xh[i]);
      break;
    }
    case Elem::BF16: {
      const uint16_t* x = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n8; i += 8) store8(dst + i, bfloat8_to_float(x + i) * mul);
      const c10::BFloat16* xb = static_cast<const c10::BFloat16*>(src);
      for (int64_t i = n8; i < n; ++i) dst[i] = mul * static_cast<float>(xb[i]);
      break;
    }
    case Elem::F8E4M3: case Elem::F8E5M2: {
      const float* table = e == Elem::F8E4M3 ? fp8_tables().e4m3 : fp8_tables().e5m2;
      const uint8_t* x = static_cast<const uint8_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = mul * table[x[i]];
      break;
    }
  }
}

// dst[i] = src[i] rounded to e (F32 / F16 / BF16), i < n.
void store_from_f32(const float* src, Elem e, int64_t n, void* dst) {
  switch (e) {
    case Elem::F32: std::memcpy(dst, src, n * sizeof(float)); break;
    case Elem::F16: {
      c10::Half* y = static_cast<c10::Half*>(dst);
      for (int64_t i = 0; i < n; ++i) y[i] = c10::Half(src[i]);
      break;
    }
    case Elem::BF16: {
      c10::BFloat16* y = static_cast<c10::BFloat16*>(dst);
      for (int64_t i = 0; i < n; ++i) y[i] = c10::BFloat16(src[i]);
      break;
    }
    default: TORCH_CHECK(false, "fatezero_fast::blended_attention: unsupported output dtype");
  }
}

// A tensor seen as raw bytes + element type, with row addressing in elements.
struct Buf {
  const char* data = nullptr;
  Elem elem = Elem::F32;
  const void* at(int64_t index) const { return data + index * elem_size(elem); }
};

Buf buf_of(const at::Tensor& t, const char* name, bool allow_fp8 = false) {
  return Buf{static_cast<const char*>(t.data_ptr()), elem_of(t, name, allow_fp8)};
}

// ---------------------------------------------------------------------------------------------
// The problem, as the kernel sees it (all tensors contiguous).
struct Problem {
  int64_t B, H, Nq, Nk, D, R, F;  // F: frames in k / v (kv_frames indexes them)
  int64_t form, rank = 0;
  Buf q, k, v, qs, ks, probs, u;
  const int64_t* kv_frames;
  const float* mask = nullptr;       // (B, Nq) or null
  const float* row_scale = nullptr;  // (B, H, Nq) or null
  const float* wv = nullptr;         // lowrank: W V_e, (B, H, rank, D) fp32
  float scale;
  char* out;
  Elem out_elem;

  int64_t kv_row(int64_t frame, int64_t h, int64_t j) const { return ((frame * H + h) * Nk + j) * D; }
  int64_t q_row(int64_t b, int64_t h, int64_t i) const { return ((b * H + h) * Nq + i) * D; }
};

// Per-thread tiles (fp32). Rows/columns past a tile's valid part are kept at zero.
struct Workspace {
  int64_t D;
  std::vector<float> qe, qs, kt, kst, v, se, ss, acc_e, acc_s, me, le, ms, ls, row, u;
  explicit Workspace(int64_t D_)
      : D(D_), qe(BQ * D), qs(BQ * D), kt(D * BK), kst(D * BK), v(BK * D), se(BQ * BK), ss(BQ * BK),
        acc_e(BQ * D), acc_s(BQ * D), me(BQ), le(BQ), ms(BQ), ls(BQ), row(8 * D) {}
};

// Q tile rows [i0, i0 + bq) of (b, h), times mul, zero-padded to BQ rows.
void load_q_tile(const Buf& src, const Problem& P, int64_t b, int64_t h, int64_t i0, int64_t bq, float mul,
                 float* dst) {
  for (int64_t i = 0; i < BQ; ++i) {
    if (i < bq) load_f32(src.at(P.q_row(b, h, i0 + i)), src.elem, P.D, dst + i * P.D, mul);
    else std::fill(dst + i * P.D, dst + (i + 1) * P.D, 0.f);
  }
}

// K tile (keys [j0, j0 + bk) of frame f, head h) transposed into kt (D x BK), zero-padded;
// 8 keys at a time through `rows` (8 x D scratch) so that kt is written 8 floats at a time.
void load_kt_tile(const Buf& src, const Problem& P, int64_t f, int64_t h, int64_t j0, int64_t bk, float* rows,
                  float* kt) {
  const int64_t D = P.D;
  for (int64_t jb = 0; jb < BK; jb += 8) {
    for (int64_t j = 0; j < 8; ++j) {
      if (jb + j < bk) load_f32(src.at(P.kv_row(f, h, j0 + jb + j)), src.elem, D, rows + j * D);
      else std::fill(rows + j * D, rows + (j + 1) * D, 0.f);
    }
    for (int64_t d = 0; d < D; ++d)
      for (int64_t j = 0; j < 8; ++j) kt[d * BK + jb + j] = rows[j * D + d];
  }
}

// V tile (BK x D), zero-padded past bk.
void load_v_tile(const Problem& P, int64_t f, int64_t h, int64_t j0, int64_t bk, float* v) {
  for (int64_t j = 0; j < bk; ++j) load_f32(P.v.at(P.kv_row(f, h, j0 + j)), P.v.elem, P.D, v + j * P.D);
  std::fill(v + bk * P.D, v + BK * P.D, 0.f);
}

// A (rows x BK) tile of a row-major matrix with `ld` columns: rows [0, nrows) starting at
// element `base`, columns [c0, c0 + bk); zero-padded to `rows` x BK. Used for P_s and W.
void load_p_tile(const Buf& src, int64_t base, int64_t ld, int64_t nrows, int64_t rows, int64_t c0, int64_t bk,
                 float* dst) {
  for (int64_t i = 0; i < rows; ++i) {
    float* d = dst + i * BK;
    if (i < nrows) {
      load_f32(src.at(base + i * ld + c0), src.elem, bk, d);
      std::fill(d + bk, d + BK, 0.f);
    } else {
      std::fill(d, d + BK, 0.f);
    }
  }
}

void start_stream(float* m, float* l, float* acc, int64_t D) {
  std::fill(m, m + BQ, kNegInf);
  std::fill(l, l + BQ, 0.f);
  std::fill(acc, acc + BQ * D, 0.f);
}

// One task: rows [i0, i0 + bq) of query frame b, head h. Implements (1) with streams (2).
void run_tile(const Problem& P, Workspace& ws, int64_t b, int64_t h, int64_t i0) {
  const int64_t D = P.D, bq = std::min(BQ, P.Nq - i0);
  const float* mask = P.mask ? P.mask + b * P.Nq + i0 : nullptr;

  // Which streams this tile needs: mask exactly 1 -> edit only, exactly 0 -> source only.
  bool need_edit = true, need_src = false;
  if (P.form != kSourceNone) {
    float lo = 0.f, hi = 0.f;  // no mask = all zeros = full source
    if (mask) {
      lo = *std::min_element(mask, mask + bq);
      hi = *std::max_element(mask, mask + bq);
    }
    need_edit = hi != 0.f;
    need_src = !(lo == 1.f && hi == 1.f);
  }
  const bool qk_src = need_src && P.form == kSourceQK, probs_src = need_src && P.form == kSourceProbs;

  const float qmul = P.scale * kLog2e;  // scores in log2 units
  if (need_edit) {
    load_q_tile(P.q, P, b, h, i0, bq, qmul, ws.qe.data());
    start_stream(ws.me.data(), ws.le.data(), ws.acc_e.data(), D);
  }
  if (qk_src) {
    load_q_tile(P.qs, P, b, h, i0, bq, qmul, ws.qs.data());
    start_stream(ws.ms.data(), ws.ls.data(), ws.acc_s.data(), D);
  }
  if (probs_src) std::fill(ws.acc_s.begin(), ws.acc_s.end(), 0.f);

  if (need_edit || qk_src || probs_src) {
    const int64_t nk_total = P.R * P.Nk, probs_base = ((b * P.H + h) * P.Nq + i0) * nk_total;
    for (int64_t r = 0; r < P.R; ++r) {
      const int64_t f = P.kv_frames[b * P.R + r];
      for (int64_t j0 = 0; j0 < P.Nk; j0 += BK) {
        const int64_t bk = std::min(BK, P.Nk - j0);
        load_v_tile(P, f, h, j0, bk, ws.v.data());
        if (need_edit) {  // edit stream: P_e = softmax(Q K_e^T s)
          load_kt_tile(P.k, P, f, h, j0, bk, ws.row.data(), ws.kt.data());
          scores_tile(ws.qe.data(), ws.kt.data(), ws.se.data(), D);
          softmax_tile(ws.se.data(), bk, ws.me.data(), ws.le.data(), ws.acc_e.data(), D);
          pv_tile(ws.se.data(), ws.v.data(), ws.acc_e.data(), BQ, D);
        }
        if (qk_src) {  // source stream: P_s = softmax(Q_s K_s,e^T s), same V_e tiles
          load_kt_tile(P.ks, P, f, h, j0, bk, ws.row.data(), ws.kst.data());
          scores_tile(ws.qs.data(), ws.kst.data(), ws.ss.data(), D);
          softmax_tile(ws.ss.data(), bk, ws.ms.data(), ws.ls.data(), ws.acc_s.data(), D);
          pv_tile(ws.ss.data(), ws.v.data(), ws.acc_s.data(), BQ, D);
        }
        if (probs_src) {  // stored map: acc_s += P_s[:, r*Nk + j0 ...] V_tile
          load_p_tile(P.probs, probs_base, nk_total, bq, BQ, r * P.Nk + j0, bk, ws.ss.data());
          pv_tile(ws.ss.data(), ws.v.data(), ws.acc_s.data(), BQ, D);
        }
      }
    }
  }

  // Finish each row: e = acc_e / l_e, s = (source term), out = m e + (1 - m) s.
  float* e_row = ws.row.data();
  if (P.form == kSourceLowRank && static_cast<int64_t>(ws.u.size()) < P.rank) ws.u.resize(P.rank);
  for (int64_t i = 0; i < bq; ++i) {
    float* o = e_row;
    if (need_edit) {
      const float inv = 1.f / ws.le[i];
      for (int64_t d = 0; d < D; ++d) e_row[d] = ws.acc_e[i * D + d] * inv;
    }
    if (need_src) {
      float* s_row = ws.acc_s.data() + i * D;  // source term, in place
      if (P.form == kSourceQK) {
        const float inv = 1.f / ws.ls[i];
        for (int64_t d = 0; d < D; ++d) s_row[d] *= inv;
      } else if (P.form == kSourceProbs) {
        if (P.row_scale) {
          const float rs = P.row_scale[(b * P.H + h) * P.Nq + i0 + i];
          for (int64_t d = 0; d < D; ++d) s_row[d] *= rs;
        }
      } else {  // lowrank: s = U[i, :] (W V_e)
        load_f32(P.u.at(((b * P.H + h) * P.Nq + i0 + i) * P.rank), P.u.elem, P.rank, ws.u.data());
        const float* wv = P.wv + (b * P.H + h) * P.rank * D;
        std::fill(s_row, s_row + D, 0.f);
        for (int64_t c = 0; c < P.rank; ++c) {
          const float uc = ws.u[c];
          for (int64_t d = 0; d < D; ++d) s_row[d] += uc * wv[c * D + d];
        }
      }
      if (need_edit) {
        const float mi = mask[i];
        for (int64_t d = 0; d < D; ++d) e_row[d] = mi * e_row[d] + (1.f - mi) * s_row[d];
      } else {
        o = s_row;
      }
    }
    store_from_f32(o, P.out_elem, D, P.out + P.q_row(b, h, i0 + i) * elem_size(P.out_elem));
  }
}

// lowrank: wv[b, h] = W[b, h] V_e (rank x D), rank rows BQ at a time through pv_tile.
void compute_wv(const Problem& P, Buf w, float* wv, Workspace& ws, int64_t b, int64_t h, int64_t c0) {
  const int64_t D = P.D, nk_total = P.R * P.Nk, rows = std::min(BQ, P.rank - c0);
  std::fill(ws.acc_s.begin(), ws.acc_s.end(), 0.f);
  const int64_t base = ((b * P.H + h) * P.rank + c0) * nk_total;
  for (int64_t r = 0; r < P.R; ++r) {
    const int64_t f = P.kv_frames[b * P.R + r];
    for (int64_t j0 = 0; j0 < P.Nk; j0 += BK) {
      const int64_t bk = std::min(BK, P.Nk - j0);
      load_v_tile(P, f, h, j0, bk, ws.v.data());
      load_p_tile(w, base, nk_total, rows, BQ, r * P.Nk + j0, bk, ws.ss.data());
      pv_tile(ws.ss.data(), ws.v.data(), ws.acc_s.data(), BQ, D);
    }
  }
  std::copy(ws.acc_s.begin(), ws.acc_s.begin() + rows * D, wv + ((b * P.H + h) * P.rank + c0) * D);
}

// Runs body(ws, task) for task in [0, n) on at::get_num_threads() OpenMP threads, each with
// its own workspace; dynamic schedule since tiles differ in cost (one or two streams).
template <typename Body>
void parallel_tasks(int64_t n, int64_t D, const Body& body) {
  if (n <= 0) return;
#ifdef _OPENMP
  const int threads = at::in_parallel_region() ? 1 : static_cast<int>(std::min<int64_t>(at::get_num_threads(), n));
#pragma omp parallel num_threads(threads)
  {
    Workspace ws(D);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < n; ++t) body(ws, t);
  }
#else
  Workspace ws(D);
  for (int64_t t = 0; t < n; ++t) body(ws, t);
#endif
}

// ---------------------------------------------------------------------------------------------
// Argument checks.

#define FZ_CHECK(cond, ...) TORCH_CHECK(cond, "fatezero_fast::blended_attention: ", __VA_ARGS__)

void check_tensor(const at::Tensor& t, const char* name, at::IntArrayRef shape) {
  FZ_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the CPU kernel, got ", t.device());
  FZ_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  FZ_CHECK(t.is_contiguous(), name, " must be contiguous (call .contiguous() first)");
}

const at::Tensor& require(const std::optional<at::Tensor>& t, const char* name, const char* form) {
  FZ_CHECK(t.has_value() && t->defined(), "source form '", form, "' needs ", name);
  return *t;
}

}  // namespace

void blended_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& kv_frames, int64_t source_form,
                           const std::optional<at::Tensor>& src_a, const std::optional<at::Tensor>& src_b,
                           const std::optional<at::Tensor>& row_scale, const std::optional<at::Tensor>& mask,
                           double scale, const at::Tensor& out) {
  FZ_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D (B, H, N, D); got ", q.sizes(),
           ", ", k.sizes(), ", ", v.sizes());
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t F = k.size(0), Nk = k.size(2);
  FZ_CHECK(D % 8 == 0 && D > 0 && D <= 256, "head dim ", D, " is not supported: use a multiple of 8 up to 256");
  FZ_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
           "q, k, v must have the same dtype; got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  check_tensor(q, "q", {B, H, Nq, D});
  check_tensor(k, "k", {F, H, Nk, D});
  check_tensor(v, "v", {F, H, Nk, D});
  FZ_CHECK(kv_frames.dim() == 2 && kv_frames.size(0) == B, "kv_frames must be (B, R) with B = ", B, ", got ",
           kv_frames.sizes());
  const int64_t R = kv_frames.size(1);
  check_tensor(kv_frames, "kv_frames", {B, R});
  FZ_CHECK(kv_frames.scalar_type() == at::kLong, "kv_frames must be int64, got ", kv_frames.scalar_type());
  FZ_CHECK(R > 0 && Nk > 0, "need at least one key frame and one key (R = ", R, ", Nk = ", Nk, ")");
  const int64_t* frames = kv_frames.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * R; ++i)
    FZ_CHECK(frames[i] >= 0 && frames[i] < F, "kv_frames values must index k/v's first axis [0, ", F, "), got ",
             frames[i]);
  check_tensor(out, "out", {B, H, Nq, D});
  FZ_CHECK(out.scalar_type() == q.scalar_type(), "out must have q's dtype ", q.scalar_type(), ", got ",
           out.scalar_type());
  FZ_CHECK(source_form >= kSourceNone && source_form <= kSourceLowRank,
           "source_form must be 0 (none), 1 (qk), 2 (probs) or 3 (lowrank), got ", source_form);
  FZ_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);

  Problem P;
  P.B = B; P.H = H; P.Nq = Nq; P.Nk = Nk; P.D = D; P.R = R; P.F = F;
  P.form = source_form;
  P.q = buf_of(q, "q");
  P.k = buf_of(k, "k");
  P.v = buf_of(v, "v");
  P.kv_frames = frames;
  P.scale = static_cast<float>(scale);
  P.out = static_cast<char*>(out.data_ptr());
  P.out_elem = P.q.elem;

  const int64_t nk_total = R * Nk;
  std::vector<float> wv;  // lowrank only: W V_e, (B, H, rank, D)
  if (source_form == kSourceNone) {
    FZ_CHECK(!mask.has_value() && !row_scale.has_value(), "mask / row_scale given without a source");
  } else {
    if (mask.has_value()) {
      check_tensor(*mask, "mask", {B, Nq});
      FZ_CHECK(mask->scalar_type() == at::kFloat, "mask must be float32, got ", mask->scalar_type());
      P.mask = mask->data_ptr<float>();
    }
    FZ_CHECK(!row_scale.has_value() || source_form == kSourceProbs, "row_scale is only used with source 'probs'");
    if (source_form == kSourceQK) {
      const at::Tensor& qs = require(src_a, "src_a = q_s (B, H, Nq, D)", "qk");
      const at::Tensor& ks = require(src_b, "src_b = k_s (F, H, Nk, D)", "qk");
      check_tensor(qs, "q_s", {B, H, Nq, D});
      check_tensor(ks, "k_s", {F, H, Nk, D});
      P.qs = buf_of(qs, "q_s");
      P.ks = buf_of(ks, "k_s");
    } else if (source_form == kSourceProbs) {
      const at::Tensor& ps = require(src_a, "src_a = P_s (B, H, Nq, R*Nk)", "probs");
      check_tensor(ps, "P_s", {B, H, Nq, nk_total});
      P.probs = buf_of(ps, "P_s", /*allow_fp8=*/true);
      if (row_scale.has_value()) {
        check_tensor(*row_scale, "row_scale", {B, H, Nq});
        FZ_CHECK(row_scale->scalar_type() == at::kFloat, "row_scale must be float32, got ",
                 row_scale->scalar_type());
        P.row_scale = row_scale->data_ptr<float>();
      }
    } else {
      const at::Tensor& u = require(src_a, "src_a = U (B, H, Nq, r)", "lowrank");
      const at::Tensor& w = require(src_b, "src_b = W (B, H, r, R*Nk)", "lowrank");
      FZ_CHECK(u.dim() == 4, "U must be (B, H, Nq, r), got ", u.sizes());
      P.rank = u.size(3);
      FZ_CHECK(P.rank > 0, "lowrank rank must be positive, got ", P.rank);
      check_tensor(u, "U", {B, H, Nq, P.rank});
      check_tensor(w, "W", {B, H, P.rank, nk_total});
      P.u = buf_of(u, "U");
      wv.resize(B * H * P.rank * D);
      const int64_t chunks = (P.rank + BQ - 1) / BQ;
      const Buf wbuf = buf_of(w, "W");
      float* wv_data = wv.data();
      parallel_tasks(B * H * chunks, D, [&](Workspace& ws, int64_t t) {
        compute_wv(P, wbuf, wv_data, ws, t / (H * chunks), (t / chunks) % H, (t % chunks) * BQ);
      });
      P.wv = wv_data;
    }
  }

  const int64_t tiles = (Nq + BQ - 1) / BQ;
  parallel_tasks(B * H * tiles, D, [&](Workspace& ws, int64_t t) {
    run_tile(P, ws, t / (H * tiles), (t / tiles) % H, (t % tiles) * BQ);
  });
}

}  // namespace fatezero_fast
