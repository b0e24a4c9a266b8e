// CUDA kernel of fatezero_fast::blended_attention (sm80+, fp16/bf16 inputs, fp32 accumulation).
//
//   out = M * softmax(Q K_e^T s) V_e + (1 - M) * P_s V_e
//
// This header holds the kernel and a launcher that takes raw pointers (Params); it depends on
// the CUDA toolkit only, so it compiles with nvcc alone. The torch op (input checks, dtype
// dispatch, stream) is in blended_attention_cuda.cu.
//
// Work decomposition. One thread block = 4 warps = 64 query rows of one (frame b, head h);
// each warp owns 16 rows. Keys are walked in tiles of BN (64, or 32 for head dims > 160),
// frame by frame through kv_frames[b, :] (a tile never straddles two frames, so the gather is
// one base pointer per tile; a frame's last tile is masked when Nk % BN != 0). K/V tiles are
// copied to shared memory with cp.async (K of tile t+1 loads while P V of tile t runs, V of
// tile t+1 while the scores of tile t+1 run). Matrix products are mma.sync.m16n8k16 (fp16 or
// bf16 in, fp32 accumulate) fed by ldmatrix; the P operand of P V stays in registers (the
// accumulator layout of two 16x8 tiles is the A-operand layout of one 16x16 tile).
//
// Head dims: any multiple of 8 up to 256, padded with zeros in shared memory to a bucket
// D_PAD in {32, 48, 64, 80, 96, 128, 160, 192, 256} (a template parameter).
//
// Per query block the mask decides the mode (block-uniform branch):
//   mask all 1 (or no source)    EDIT         one online-softmax stream on (q, k): FA2 style
//   mask all 0 (or no mask)      SOURCE       qk: the same stream on (q_s, k_s)
//                                             probs: O = P_s V (no softmax), times row_scale
//   otherwise                    BLEND        two passes over the keys:
//       pass 1 (stats): row max m and sum l of the edit stream (and of the q_s k_s stream);
//       pass 2: P = M exp2(S_e - m_e) / l_e + (1 - M) P_s, with P_s = exp2(S_s - m_s) / l_s
//       (qk) or P_s * row_scale (probs), and one P V product: one fp32 accumulator per row
//       instead of two, so large head dims keep their registers. For probs the FLOPs equal
//       the one-pass two-accumulator scheme (QK^T twice, PV once instead of QK^T once, PV
//       twice); for qk it costs one extra pair of QK^T products on mixed blocks only.
// Scores are in log2 units (s * log2(e) folded into the scale) and exponentiated with ex2.
//
// P_s ("probs") arrives as fp32, fp16, bf16 or fp8 e4m3: its tiles are copied raw to shared
// memory (16-byte cp.async when rows are 16-byte aligned, element by element otherwise) and
// converted to fp32 while being read into the A-operand layout.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace fatezero_fast {
namespace cuda_kernel {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = kWarps * 16;  // query rows per block
// Blended probabilities (<= 1) are multiplied by this before the fp16 conversion so small
// probabilities stay out of fp16's subnormal range; the output is divided by it again.
constexpr float kBlendPScale = 256.f;

enum Form : int { kFormNone = 0, kFormQK = 1, kFormProbs = 2 };
enum PsKind : int { kPsF32 = 0, kPsF16 = 1, kPsBF16 = 2, kPsF8E4M3 = 3 };

// All tensors contiguous; q, k, v, q_s, k_s, out 16-byte aligned (checked by the caller).
struct Params {
  const void* q;      // (B, H, Nq, D)
  const void* k;      // (Bk, H, Nk, D)
  const void* v;      // (Bk, H, Nk, D)
  const void* q_s;    // (B, H, Nq, D), form qk
  const void* k_s;    // (Bk, H, Nk, D), form qk
  const void* p_s;    // (B, H, Nq, R * Nk), form probs, dtype ps_kind
  const float* row_scale;  // (B, H, Nq) or null
  const float* mask;       // (B, Nq) or null (= all zeros)
  const int64_t* kv_frames;  // (B, R), values in [0, Bk)
  void* out;          // (B, H, Nq, D), dtype of q
  int B, Bk, H, Nq, Nk, R, D;
  int form;           // Form
  int ps_kind;        // PsKind
  int ps_esize;       // bytes per P_s element
  int ps_vec;         // 1: P_s rows and frame boundaries are 16-byte aligned (cp.async path)
  float scale_log2;   // scale * log2(e)
  float ps_prescale;  // SOURCE probs blocks: P_s is multiplied by this before the conversion
};

inline int head_dim_bucket(int d) {
  if (d <= 32) return 32;
  if (d <= 48) return 48;
  if (d <= 64) return 64;
  if (d <= 80) return 80;
  if (d <= 96) return 96;
  if (d <= 128) return 128;
  if (d <= 160) return 160;
  if (d <= 192) return 192;
  return 256;
}

template <int D_PAD>
struct TileCfg {
  static_assert(D_PAD % 16 == 0 && D_PAD <= 256, "D_PAD must be a multiple of 16 up to 256");
  static constexpr int BN = D_PAD <= 160 ? 64 : 32;  // keys per tile
  static constexpr int LDS = D_PAD + 8;  // smem row stride in 16-bit elements (+16 B: no bank conflicts)
  static constexpr int NT = BN / 8;      // 16x8 score tiles per warp
  static constexpr int DT = D_PAD / 8;   // 16x8 output tiles per warp
  static constexpr int CPR = D_PAD / 8;  // 16-byte chunks per smem row
};

// Row stride of a raw P_s tile in shared memory: conflict-free fragment reads for every dtype.
__host__ __device__ inline int ps_row_bytes(int bn, int esize) { return bn * esize + (esize == 4 ? 32 : 16); }

inline size_t smem_bytes_for(int d_pad, int form, int ps_esize) {
  const int bn = d_pad <= 160 ? 64 : 32;
  const size_t row = static_cast<size_t>(d_pad + 8) * 2;
  size_t bytes = (kBlockM + 2 * bn) * row;  // Q, K, V
  if (form == kFormQK) bytes += (kBlockM + bn) * row;  // Q_s, K_s
  if (form == kFormProbs) bytes += static_cast<size_t>(kBlockM) * ps_row_bytes(bn, ps_esize);
  return bytes;
}

// Dynamic shared memory one launch needs (compare with cudaDevAttrMaxSharedMemoryPerBlockOptin).
inline size_t blended_attention_smem_bytes(int d, int form, int ps_esize) {
  return smem_bytes_for(head_dim_bucket(d), form, ps_esize);
}

// ---------------------------------------------------------------------------------------------
// PTX wrappers

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; zero-fills the destination when !pred (nothing is read).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool pred) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ float fast_exp2(float x) {  // 2^x; 2^-inf = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// Per-dtype pieces: packing two floats into the 32-bit register of an MMA operand, and the MMA.
// Fragment layouts (m16n8k16, g = lane / 4, t = lane % 4):
//   A (16x16): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8):  b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C (16x8):  c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1)
template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Two adjacent P_s elements in shared memory -> fp32.
template <int KIND>
__device__ __forceinline__ float2 ps_pair(const unsigned char* s) {
  if constexpr (KIND == kPsF32) {
    return *reinterpret_cast<const float2*>(s);
  } else if constexpr (KIND == kPsF16) {
    return __half22float2(*reinterpret_cast<const __half2*>(s));
  } else if constexpr (KIND == kPsBF16) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(s));
  } else {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(*reinterpret_cast<const __nv_fp8x2_storage_t*>(s), __NV_E4M3);
    return __half22float2(__half2(h));
  }
}

// ---------------------------------------------------------------------------------------------
// Block context and tile loaders

template <typename T>
struct BlockCtx {
  int b, h, m0;           // frame, head, first query row of the block
  int tid, warp, lane;    // thread, warp, lane
  int g, t4;              // lane / 4, lane % 4 (fragment coordinates)
  int64_t bh;             // b * H + h
  T* sQ;                  // kBlockM x LDS: q (or q_s on SOURCE qk blocks); the output staging too
  T* sK;                  // BN x LDS
  T* sV;                  // BN x LDS
  T* sQs;                 // kBlockM x LDS, form qk (BLEND blocks)
  T* sKs;                 // BN x LDS, form qk (BLEND blocks)
  unsigned char* sPs;     // kBlockM x ps_row_bytes, form probs (raw P_s tile)
  int ps_stride;          // bytes per row of sPs
};

// Rows [n0, n0 + ROWS) of a row-major (N, D) matrix -> smem tile (ROWS x LDS), zero-filled past
// row N and past column D (the padding up to D_PAD). Asynchronous: commit and wait by the caller.
template <typename T, int D_PAD, int ROWS>
__device__ __forceinline__ void load_rows_async(T* s, const T* __restrict__ g, int n0, int N, int D, int tid) {
  using C = TileCfg<D_PAD>;
#pragma unroll 2
  for (int c = tid; c < ROWS * C::CPR; c += kThreads) {
    const int r = c / C::CPR, cc = c % C::CPR;
    const int n = n0 + r;
    const bool ok = n < N && cc * 8 < D;
    const T* src = ok ? g + static_cast<int64_t>(n) * D + cc * 8 : g;
    cp_async_16(smem_addr(s + r * C::LDS + cc * 8), src, ok);
  }
}

// The raw P_s tile: rows [m0, m0 + kBlockM), columns r * Nk + [n0, n0 + BN), zero-filled outside.
template <int BN>
__device__ __forceinline__ void load_ps_tile(const Params& p, unsigned char* s, int stride, int64_t bh, int m0,
                                             int r, int n0, int tid) {
  const int es = p.ps_esize;
  const int64_t ncols = static_cast<int64_t>(p.R) * p.Nk;
  const unsigned char* base = static_cast<const unsigned char*>(p.p_s) +
                              ((bh * p.Nq + m0) * ncols + static_cast<int64_t>(r) * p.Nk + n0) * es;
  const int rows = min(kBlockM, p.Nq - m0), cols = min(BN, p.Nk - n0);
  if (p.ps_vec) {  // 16-byte chunks; a chunk is entirely inside or outside the frame (Nk*es % 16 == 0)
    const int epc = 16 / es, cpr = BN / epc;  // elements per chunk, chunks per row
    for (int c = tid; c < kBlockM * cpr; c += kThreads) {
      const int i = c / cpr, cc = c - i * cpr;
      const bool ok = i < rows && cc * epc < cols;
      const void* src = ok ? static_cast<const void*>(base + (i * ncols + cc * epc) * es) : p.p_s;
      cp_async_16(smem_addr(s + i * stride + cc * 16), src, ok);
    }
  } else {  // unaligned rows (odd Nk): element by element, synchronous
    for (int e = tid; e < kBlockM * BN; e += kThreads) {
      const int i = e / BN, j = e % BN;
      const bool ok = i < rows && j < cols;
      unsigned char* dst = s + i * stride + j * es;
      const unsigned char* src = base + (i * ncols + j) * es;
      if (es == 4) {
        *reinterpret_cast<uint32_t*>(dst) = ok ? *reinterpret_cast<const uint32_t*>(src) : 0u;
      } else if (es == 2) {
        *reinterpret_cast<uint16_t*>(dst) = ok ? *reinterpret_cast<const uint16_t*>(src) : uint16_t(0);
      } else {
        *dst = ok ? *src : static_cast<unsigned char>(0);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Warp-level tile math (each warp: 16 query rows; per thread rows g and g + 8)

// S = Q_w K^T for this warp's 16 rows and the BN keys of the tile (fp32, unscaled).
template <typename T, int D_PAD>
__device__ __forceinline__ void tile_scores(float (&S)[TileCfg<D_PAD>::NT][4], const T* sQ, const T* sK, int warp,
                                            int lane) {
  using C = TileCfg<D_PAD>;
#pragma unroll
  for (int nt = 0; nt < C::NT; ++nt) S[nt][0] = S[nt][1] = S[nt][2] = S[nt][3] = 0.f;
  // A (Q, 16x16 at k-step kk): lanes 0-15 address rows 0-15 at column 0, lanes 16-31 column 8.
  const uint32_t q_addr = smem_addr(sQ + (warp * 16 + (lane & 15)) * C::LDS + (lane >> 4) * 8);
  // B (K rows = keys): matrices (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15, d 0-7),
  // (keys 8-15, d 8-15) = b0, b1 of key tile 2j and b0, b1 of key tile 2j + 1.
  const uint32_t k_addr = smem_addr(sK + ((lane & 7) + ((lane >> 4) << 3)) * C::LDS + ((lane >> 3) & 1) * 8);
#pragma unroll
  for (int kk = 0; kk < D_PAD / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, q_addr + kk * 32);
#pragma unroll
    for (int j = 0; j < C::NT / 2; ++j) {
      uint32_t bf[4];
      ldmatrix_x4(bf, k_addr + (j * 16 * C::LDS + kk * 16) * 2);
      Mma<T>::mma(S[2 * j], a, bf[0], bf[1]);
      Mma<T>::mma(S[2 * j + 1], a, bf[2], bf[3]);
    }
  }
}

// S *= scale_log2; keys at or past `valid` (the frame's tail) -> -inf.
template <int NT>
__device__ __forceinline__ void scale_and_mask(float (&S)[NT][4], float scale_log2, int valid, int t4) {
  if (valid >= NT * 8) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) S[nt][e] *= scale_log2;
  } else {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + t4 * 2 + (e & 1);
        S[nt][e] = col < valid ? S[nt][e] * scale_log2 : neg_inf();
      }
  }
}

// Max over the 4 lanes of a quad (they share a row).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Online softmax step: m, l updated (l is this lane's partial sum), S -> exp2(S - m_new), and
// the accumulator O (if any) rescaled by exp2(m_old - m_new).
template <int NT, int DT, bool kRescaleO>
__device__ __forceinline__ void softmax_step(float (&S)[NT][4], float (&m)[2], float (&l)[2], float (&O)[DT][4]) {
  float mx[2] = {m[0], m[1]};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    mx[0] = fmaxf(mx[0], fmaxf(S[nt][0], S[nt][1]));
    mx[1] = fmaxf(mx[1], fmaxf(S[nt][2], S[nt][3]));
  }
  float alpha[2], sum[2] = {0.f, 0.f};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    mx[i] = quad_max(mx[i]);
    alpha[i] = fast_exp2(m[i] - mx[i]);  // 0 on the first tile (m = -inf)
    m[i] = mx[i];
  }
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      S[nt][e] = fast_exp2(S[nt][e] - mx[e >> 1]);
      sum[e >> 1] += S[nt][e];
    }
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) l[i] = l[i] * alpha[i] + sum[i];
  if constexpr (kRescaleO) {
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      O[dt][0] *= alpha[0];
      O[dt][1] *= alpha[0];
      O[dt][2] *= alpha[1];
      O[dt][3] *= alpha[1];
    }
  }
}

// O += P V: P (fp32, accumulator layout) is rounded to T and used as the A operand directly.
template <typename T, int D_PAD>
__device__ __forceinline__ void tile_pv(float (&O)[TileCfg<D_PAD>::DT][4], const float (&P)[TileCfg<D_PAD>::NT][4],
                                        const T* sV, int lane) {
  using C = TileCfg<D_PAD>;
  // B (V rows = keys, transposed load): matrices (keys 0-7, d 0-7), (keys 8-15, d 0-7),
  // (keys 0-7, d 8-15), (keys 8-15, d 8-15) = b0, b1 of d tile 2j and b0, b1 of d tile 2j + 1.
  const uint32_t v_addr = smem_addr(sV + ((lane & 7) + ((lane >> 3) & 1) * 8) * C::LDS + (lane >> 4) * 8);
#pragma unroll
  for (int ks = 0; ks < C::NT / 2; ++ks) {
    uint32_t a[4];
    a[0] = Mma<T>::pack(P[2 * ks][0], P[2 * ks][1]);
    a[1] = Mma<T>::pack(P[2 * ks][2], P[2 * ks][3]);
    a[2] = Mma<T>::pack(P[2 * ks + 1][0], P[2 * ks + 1][1]);
    a[3] = Mma<T>::pack(P[2 * ks + 1][2], P[2 * ks + 1][3]);
#pragma unroll
    for (int j = 0; j < C::DT / 2; ++j) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, v_addr + (ks * 16 * C::LDS + j * 16) * 2);
      Mma<T>::mma(O[2 * j], a, bf[0], bf[1]);
      Mma<T>::mma(O[2 * j + 1], a, bf[2], bf[3]);
    }
  }
}

// This warp's rows of the raw P_s tile -> fp32 in the accumulator layout.
template <int KIND, int NT>
__device__ __forceinline__ void ps_fragment_kind(float (&P)[NT][4], const unsigned char* sPs, int stride, int es,
                                                 int warp, int g, int t4) {
  const unsigned char* r0 = sPs + (warp * 16 + g) * stride + t4 * 2 * es;
  const unsigned char* r1 = r0 + 8 * stride;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const float2 x = ps_pair<KIND>(r0 + nt * 8 * es);
    const float2 y = ps_pair<KIND>(r1 + nt * 8 * es);
    P[nt][0] = x.x;
    P[nt][1] = x.y;
    P[nt][2] = y.x;
    P[nt][3] = y.y;
  }
}

template <int NT>
__device__ __forceinline__ void ps_fragment(float (&P)[NT][4], const Params& p, const unsigned char* sPs, int stride,
                                            int warp, int g, int t4) {
  switch (p.ps_kind) {
    case kPsF32: ps_fragment_kind<kPsF32>(P, sPs, stride, 4, warp, g, t4); break;
    case kPsF16: ps_fragment_kind<kPsF16>(P, sPs, stride, 2, warp, g, t4); break;
    case kPsBF16: ps_fragment_kind<kPsBF16>(P, sPs, stride, 2, warp, g, t4); break;
    default: ps_fragment_kind<kPsF8E4M3>(P, sPs, stride, 1, warp, g, t4); break;
  }
}

// Per-row state of this thread (rows g and g + 8 of its warp).
struct RowState {
  float m_e[2], l_e[2];  // edit stream: running max (log2 units) and partial sum
  float m_s[2], l_s[2];  // q_s k_s stream
  float c_e[2], c_s[2];  // BLEND pass 2: P = c_e exp2(S_e - m_e) + c_s (exp2(S_s - m_s) | P_s)
};

// ---------------------------------------------------------------------------------------------
// One walk over all key tiles of the block's gathered frames.

enum Pass : int {
  kPassSoftmax = 0,     // O += softmax-stream P V on (sQ, k_main); state m_e, l_e
  kPassProbs = 1,       // O += P_s V (times ps_prescale)
  kPassStatsEdit = 2,   // m_e, l_e of q k^T (no V)
  kPassStatsQK = 3,     // m_e, l_e of q k^T and m_s, l_s of q_s k_s^T (no V)
  kPassBlendQK = 4,     // O += (c_e exp2(S_e - m_e) + c_s exp2(S_s - m_s)) V
  kPassBlendProbs = 5,  // O += (c_e exp2(S_e - m_e) + c_s P_s) V
};

template <typename T, int D_PAD, int PASS>
__device__ __forceinline__ void run_pass(const Params& p, const BlockCtx<T>& c, const T* __restrict__ k_main,
                                         float (&O)[TileCfg<D_PAD>::DT][4], RowState& st) {
  using C = TileCfg<D_PAD>;
  constexpr int BN = C::BN;
  constexpr bool kUseK = PASS != kPassProbs;
  constexpr bool kUseKs = PASS == kPassStatsQK || PASS == kPassBlendQK;
  constexpr bool kUsePs = PASS == kPassProbs || PASS == kPassBlendProbs;
  constexpr bool kUseV = PASS != kPassStatsEdit && PASS != kPassStatsQK;

  const int tiles_per_frame = (p.Nk + BN - 1) / BN;
  const int num_tiles = p.R * tiles_per_frame;
  const int64_t frame_elems = static_cast<int64_t>(p.Nk) * p.D;
  const int64_t* frames = p.kv_frames + static_cast<int64_t>(c.b) * p.R;

  // Group 1 of tile t: what the first half of the iteration reads (K, K_s, P_s).
  auto issue_first = [&](int t) {
    const int r = t / tiles_per_frame, n0 = (t - r * tiles_per_frame) * BN;
    const int64_t off = (frames[r] * p.H + c.h) * frame_elems;
    if constexpr (kUseK) load_rows_async<T, D_PAD, BN>(c.sK, k_main + off, n0, p.Nk, p.D, c.tid);
    if constexpr (kUseKs)
      load_rows_async<T, D_PAD, BN>(c.sKs, static_cast<const T*>(p.k_s) + off, n0, p.Nk, p.D, c.tid);
    if constexpr (kUsePs) load_ps_tile<BN>(p, c.sPs, c.ps_stride, c.bh, c.m0, r, n0, c.tid);
    cp_async_commit();
  };
  // Group 2 of tile t: V (an empty group on the stats passes keeps the counting uniform).
  auto issue_second = [&](int t) {
    if constexpr (kUseV) {
      const int r = t / tiles_per_frame, n0 = (t - r * tiles_per_frame) * BN;
      const int64_t off = (frames[r] * p.H + c.h) * frame_elems;
      load_rows_async<T, D_PAD, BN>(c.sV, static_cast<const T*>(p.v) + off, n0, p.Nk, p.D, c.tid);
    }
    cp_async_commit();
  };

  issue_first(0);  // also completes any Q loads the caller issued before
  issue_second(0);
  for (int t = 0; t < num_tiles; ++t) {
    const int r = t / tiles_per_frame;
    const int valid = p.Nk - (t - r * tiles_per_frame) * BN;  // keys of this tile inside the frame (may be > BN)
    cp_async_wait<1>();  // group 1 of tile t has landed (V of tile t may still be in flight)
    __syncthreads();

    float P[C::NT][4];
    if constexpr (PASS == kPassSoftmax) {
      tile_scores<T, D_PAD>(P, c.sQ, c.sK, c.warp, c.lane);
      scale_and_mask(P, p.scale_log2, valid, c.t4);
      softmax_step<C::NT, C::DT, true>(P, st.m_e, st.l_e, O);
    } else if constexpr (PASS == kPassProbs) {
      ps_fragment(P, p, c.sPs, c.ps_stride, c.warp, c.g, c.t4);
#pragma unroll
      for (int nt = 0; nt < C::NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) P[nt][e] *= p.ps_prescale;
    } else if constexpr (PASS == kPassStatsEdit || PASS == kPassStatsQK) {
      tile_scores<T, D_PAD>(P, c.sQ, c.sK, c.warp, c.lane);
      scale_and_mask(P, p.scale_log2, valid, c.t4);
      softmax_step<C::NT, C::DT, false>(P, st.m_e, st.l_e, O);
      if constexpr (PASS == kPassStatsQK) {
        tile_scores<T, D_PAD>(P, c.sQs, c.sKs, c.warp, c.lane);
        scale_and_mask(P, p.scale_log2, valid, c.t4);
        softmax_step<C::NT, C::DT, false>(P, st.m_s, st.l_s, O);
      }
    } else {  // BLEND pass 2
      tile_scores<T, D_PAD>(P, c.sQ, c.sK, c.warp, c.lane);
      scale_and_mask(P, p.scale_log2, valid, c.t4);
#pragma unroll
      for (int nt = 0; nt < C::NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) P[nt][e] = fast_exp2(P[nt][e] - st.m_e[e >> 1]) * st.c_e[e >> 1];
      float S2[C::NT][4];
      if constexpr (PASS == kPassBlendQK) {
        tile_scores<T, D_PAD>(S2, c.sQs, c.sKs, c.warp, c.lane);
        scale_and_mask(S2, p.scale_log2, valid, c.t4);
#pragma unroll
        for (int nt = 0; nt < C::NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) P[nt][e] += fast_exp2(S2[nt][e] - st.m_s[e >> 1]) * st.c_s[e >> 1];
      } else {
        ps_fragment(S2, p, c.sPs, c.ps_stride, c.warp, c.g, c.t4);
#pragma unroll
        for (int nt = 0; nt < C::NT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) P[nt][e] += S2[nt][e] * st.c_s[e >> 1];
      }
    }

    cp_async_wait<0>();  // V of tile t has landed
    __syncthreads();     // ... and every warp is done with group 1's buffers
    if (t + 1 < num_tiles) issue_first(t + 1);
    if constexpr (kUseV) tile_pv<T, D_PAD>(O, P, c.sV, c.lane);
    __syncthreads();  // every warp is done with V
    if (t + 1 < num_tiles) issue_second(t + 1);
  }
  // Nothing is in flight here and every warp has passed the last barrier: the buffers are free.
}

// This warp's 16 rows of O * row_factor -> out, staged through the warp's own rows of sQ (no
// other warp reads them) for 16-byte coalesced stores.
template <typename T, int D_PAD>
__device__ __forceinline__ void store_output(const Params& p, const BlockCtx<T>& c,
                                             const float (&O)[TileCfg<D_PAD>::DT][4], const float (&factor)[2]) {
  using C = TileCfg<D_PAD>;
  T* s = c.sQ + c.warp * 16 * C::LDS;
#pragma unroll
  for (int dt = 0; dt < C::DT; ++dt) {
    *reinterpret_cast<uint32_t*>(s + c.g * C::LDS + dt * 8 + c.t4 * 2) =
        Mma<T>::pack(O[dt][0] * factor[0], O[dt][1] * factor[0]);
    *reinterpret_cast<uint32_t*>(s + (c.g + 8) * C::LDS + dt * 8 + c.t4 * 2) =
        Mma<T>::pack(O[dt][2] * factor[1], O[dt][3] * factor[1]);
  }
  __syncwarp();
  T* out = static_cast<T*>(p.out) + c.bh * p.Nq * p.D;
  for (int idx = c.lane; idx < 16 * C::CPR; idx += 32) {
    const int rr = idx / C::CPR, cc = idx % C::CPR;
    const int row = c.m0 + c.warp * 16 + rr;
    if (row < p.Nq && cc * 8 < p.D)
      *reinterpret_cast<uint4*>(out + static_cast<int64_t>(row) * p.D + cc * 8) =
          *reinterpret_cast<const uint4*>(s + rr * C::LDS + cc * 8);
  }
}

// ---------------------------------------------------------------------------------------------
// The kernel: grid (ceil(Nq / 64), H, B), 128 threads, dynamic smem smem_bytes_for(D_PAD, FORM, .).

template <typename T, int D_PAD, int FORM>
__global__ void __launch_bounds__(kThreads) blended_attention_kernel(const Params p) {
  using C = TileCfg<D_PAD>;
  extern __shared__ __align__(16) unsigned char smem[];

  BlockCtx<T> c;
  c.m0 = blockIdx.x * kBlockM;
  c.h = blockIdx.y;
  c.b = blockIdx.z;
  c.tid = threadIdx.x;
  c.warp = c.tid >> 5;
  c.lane = c.tid & 31;
  c.g = c.lane >> 2;
  c.t4 = c.lane & 3;
  c.bh = static_cast<int64_t>(c.b) * p.H + c.h;
  c.sQ = reinterpret_cast<T*>(smem);
  c.sK = c.sQ + kBlockM * C::LDS;
  c.sV = c.sK + C::BN * C::LDS;
  c.sQs = c.sV + C::BN * C::LDS;  // only with FORM == kFormQK
  c.sKs = c.sQs + kBlockM * C::LDS;
  c.sPs = reinterpret_cast<unsigned char*>(c.sV + C::BN * C::LDS);  // only with FORM == kFormProbs
  c.ps_stride = ps_row_bytes(C::BN, p.ps_esize);

  // Frame indices out of range (the Python layer validates them; this guards memory): NaN rows.
  bool bad_frame = false;
  for (int r = c.tid; r < p.R; r += kThreads) {
    const int64_t f = p.kv_frames[static_cast<int64_t>(c.b) * p.R + r];
    bad_frame |= f < 0 || f >= p.Bk;
  }
  if (__syncthreads_or(bad_frame)) {
    const float nan = __int_as_float(0x7fc00000);
    const float O_nan[2] = {nan, nan};
    float O[C::DT][4];
#pragma unroll
    for (int dt = 0; dt < C::DT; ++dt) O[dt][0] = O[dt][1] = O[dt][2] = O[dt][3] = nan;
    store_output<T, D_PAD>(p, c, O, O_nan);
    return;
  }

  // Mode of this block.
  enum { kEdit, kSource, kBlend };
  int mode = kEdit;
  if constexpr (FORM != kFormNone) {
    if (p.mask == nullptr) {
      mode = kSource;
    } else {
      bool ones = true, zeros = true;
      if (c.tid < kBlockM && c.m0 + c.tid < p.Nq) {
        const float mv = p.mask[static_cast<int64_t>(c.b) * p.Nq + c.m0 + c.tid];
        ones = mv == 1.f;
        zeros = mv == 0.f;
      }
      ones = __syncthreads_and(ones);
      zeros = __syncthreads_and(zeros);
      mode = ones ? kEdit : (zeros ? kSource : kBlend);
    }
  }

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const int64_t q_off = c.bh * p.Nq * p.D;

  float O[C::DT][4];
#pragma unroll
  for (int dt = 0; dt < C::DT; ++dt) O[dt][0] = O[dt][1] = O[dt][2] = O[dt][3] = 0.f;
  RowState st;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    st.m_e[i] = st.m_s[i] = neg_inf();
    st.l_e[i] = st.l_s[i] = 0.f;
    st.c_e[i] = st.c_s[i] = 0.f;
  }
  const int row0 = c.m0 + c.warp * 16 + c.g;  // this thread's rows: row0 and row0 + 8
  float factor[2] = {1.f, 1.f};

  if (mode == kEdit || (FORM == kFormQK && mode == kSource)) {
    // One online-softmax stream: (q, k), or (q_s, k_s) on SOURCE qk blocks.
    const bool src = FORM == kFormQK && mode == kSource;
    const T* qm = src ? static_cast<const T*>(p.q_s) : q;
    const T* km = src ? static_cast<const T*>(p.k_s) : k;
    load_rows_async<T, D_PAD, kBlockM>(c.sQ, qm + q_off, c.m0, p.Nq, p.D, c.tid);
    run_pass<T, D_PAD, kPassSoftmax>(p, c, km, O, st);
#pragma unroll
    for (int i = 0; i < 2; ++i) factor[i] = 1.f / quad_sum(st.l_e[i]);
  } else if constexpr (FORM == kFormProbs) {
    if (mode == kSource) {  // O = P_s V, no scores at all
      run_pass<T, D_PAD, kPassProbs>(p, c, k, O, st);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = row0 + 8 * i;
        const float rs = (p.row_scale != nullptr && row < p.Nq) ? p.row_scale[c.bh * p.Nq + row] : 1.f;
        factor[i] = rs / p.ps_prescale;
      }
    } else {  // BLEND
      load_rows_async<T, D_PAD, kBlockM>(c.sQ, q + q_off, c.m0, p.Nq, p.D, c.tid);
      run_pass<T, D_PAD, kPassStatsEdit>(p, c, k, O, st);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int row = row0 + 8 * i;
        const float mv = row < p.Nq ? p.mask[static_cast<int64_t>(c.b) * p.Nq + row] : 0.f;
        const float rs = (p.row_scale != nullptr && row < p.Nq) ? p.row_scale[c.bh * p.Nq + row] : 1.f;
        st.c_e[i] = mv / quad_sum(st.l_e[i]) * kBlendPScale;
        st.c_s[i] = (1.f - mv) * rs * kBlendPScale;
        factor[i] = 1.f / kBlendPScale;
      }
      run_pass<T, D_PAD, kPassBlendProbs>(p, c, k, O, st);
    }
  } else if constexpr (FORM == kFormQK) {  // BLEND
    load_rows_async<T, D_PAD, kBlockM>(c.sQ, q + q_off, c.m0, p.Nq, p.D, c.tid);
    load_rows_async<T, D_PAD, kBlockM>(c.sQs, static_cast<const T*>(p.q_s) + q_off, c.m0, p.Nq, p.D, c.tid);
    run_pass<T, D_PAD, kPassStatsQK>(p, c, k, O, st);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = row0 + 8 * i;
      const float mv = row < p.Nq ? p.mask[static_cast<int64_t>(c.b) * p.Nq + row] : 0.f;
      st.c_e[i] = mv / quad_sum(st.l_e[i]) * kBlendPScale;
      st.c_s[i] = (1.f - mv) / quad_sum(st.l_s[i]) * kBlendPScale;
      factor[i] = 1.f / kBlendPScale;
    }
    run_pass<T, D_PAD, kPassBlendQK>(p, c, k, O, st);
  }

  store_output<T, D_PAD>(p, c, O, factor);
}

// ---------------------------------------------------------------------------------------------
// Host launcher (raw pointers; the caller checked shapes, dtypes, alignment and smem limits).

template <typename T, int D_PAD, int FORM>
inline cudaError_t launch_form(const Params& p, cudaStream_t stream) {
  const size_t smem = smem_bytes_for(D_PAD, FORM, p.ps_esize);
  auto kernel = blended_attention_kernel<T, D_PAD, FORM>;
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid((p.Nq + kBlockM - 1) / kBlockM, p.H, p.B);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D_PAD>
inline cudaError_t launch_bucket(const Params& p, cudaStream_t stream) {
  switch (p.form) {
    case kFormNone: return launch_form<T, D_PAD, kFormNone>(p, stream);
    case kFormQK: return launch_form<T, D_PAD, kFormQK>(p, stream);
    case kFormProbs: return launch_form<T, D_PAD, kFormProbs>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

// T = __half or __nv_bfloat16. Nothing is launched when B, H or Nq is 0.
template <typename T>
inline cudaError_t launch_blended_attention(const Params& p, cudaStream_t stream) {
  if (p.B == 0 || p.H == 0 || p.Nq == 0) return cudaSuccess;
  if (p.D <= 0 || p.D % 8 != 0 || p.D > 256 || p.Nk <= 0 || p.R <= 0) return cudaErrorInvalidValue;
  switch (head_dim_bucket(p.D)) {
    case 32: return launch_bucket<T, 32>(p, stream);
    case 48: return launch_bucket<T, 48>(p, stream);
    case 64: return launch_bucket<T, 64>(p, stream);
    case 80: return launch_bucket<T, 80>(p, stream);
    case 96: return launch_bucket<T, 96>(p, stream);
    case 128: return launch_bucket<T, 128>(p, stream);
    case 160: return launch_bucket<T, 160>(p, stream);
    case 192: return launch_bucket<T, 192>(p, stream);
    default: return launch_bucket<T, 256>(p, stream);
  }
}

}  // namespace cuda_kernel
}  // namespace fatezero_fast
