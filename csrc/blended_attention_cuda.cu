// CUDA implementation of fatezero_fast::blended_attention (schema in csrc/ops.cpp):
//
//   out = M * softmax(Q K_e^T * scale) V_e + (1 - M) * P_s V_e
//
// This file checks the inputs and dispatches on dtype; the kernel is in
// blended_attention_cuda.cuh. Supported here (anything else fails a TORCH_CHECK with a message):
//   * sm80 or newer; q, k, v (and q_s, k_s) fp16 or bf16, all the same dtype, contiguous, on
//     one CUDA device, 16-byte aligned; head dim a multiple of 8 up to 256;
//   * source_form 0 (none), 1 (qk), 2 (probs: P_s fp32/fp16/bf16/float8_e4m3fn, contiguous,
//     with an optional fp32 row_scale); 3 (low-rank) is not supported (the Triton kernel has it);
//   * mask fp32 (B, Nq) contiguous or absent; out contiguous, q's dtype and shape.
// kv_frames values must lie in [0, k.size(0)): not checked here (that would synchronize the
// stream; fatezero_fast.ops validates them). Out-of-range frames give NaN rows, never a fault.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "blended_attention_cuda.cuh"

namespace fatezero_fast {
namespace {

namespace ck = cuda_kernel;

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

void check_on_device(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.is_cuda(), "blended_attention (CUDA): ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == q.device(), "blended_attention (CUDA): ", name, " is on ", t.device(), " but q is on ",
              q.device());
  TORCH_CHECK(t.is_contiguous(), "blended_attention (CUDA): ", name, " must be contiguous");
}

// q-like operands of the matrix products: q's dtype, contiguous, 16-byte aligned (cp.async).
void check_operand(const at::Tensor& t, const char* name, const at::Tensor& q) {
  check_on_device(t, name, q);
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "blended_attention (CUDA): ", name, " has dtype ",
              t.scalar_type(), " but q has ", q.scalar_type(), " (all of q, k, v, q_s, k_s must share one dtype)");
  TORCH_CHECK(aligned16(t), "blended_attention (CUDA): ", name,
              " must be 16-byte aligned (e.g. not a view at an odd offset; .clone() it)");
}

int ps_kind_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ck::kPsF32;
    case at::kHalf: return ck::kPsF16;
    case at::kBFloat16: return ck::kPsBF16;
    case at::kFloat8_e4m3fn: return ck::kPsF8E4M3;
    default: return -1;
  }
}

int to_int(int64_t x, const char* what) {
  TORCH_CHECK(x >= 0 && x <= INT32_MAX, "blended_attention (CUDA): ", what, " = ", x, " does not fit in 32 bits");
  return static_cast<int>(x);
}

}  // namespace

void blended_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& kv_frames, int64_t source_form, const std::optional<at::Tensor>& src_a,
                            const std::optional<at::Tensor>& src_b, const std::optional<at::Tensor>& row_scale,
                            const std::optional<at::Tensor>& mask, double scale, const at::Tensor& out) {
  TORCH_CHECK(source_form >= 0 && source_form <= 3, "blended_attention (CUDA): unknown source_form ", source_form,
              " (0 none, 1 qk, 2 probs, 3 lowrank)");
  TORCH_CHECK(source_form != 3,
              "blended_attention (CUDA): the low-rank source form is not implemented in the CUDA kernel; "
              "use the triton backend for ('lowrank', U, W)");
  TORCH_CHECK(q.is_cuda(), "blended_attention (CUDA): q must be a CUDA tensor");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "blended_attention (CUDA): q, k, v must be float16 or bfloat16, got ", q.scalar_type(),
              " (use the triton or cpu backend for float32)");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "blended_attention (CUDA): q, k, v must be 4-D "
              "(B, H, N, D); got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  check_operand(q, "q", q);
  check_operand(k, "k", q);
  check_operand(v, "v", q);
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Bk = k.size(0), Nk = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes(), "blended_attention (CUDA): k and v must have the same shape; got ", k.sizes(),
              " and ", v.sizes());
  TORCH_CHECK(k.size(1) == H && k.size(3) == D, "blended_attention (CUDA): k/v must be (F, H, Nk, D) with q's H = ",
              H, " and D = ", D, "; got ", k.sizes());
  TORCH_CHECK(D > 0 && D % 8 == 0 && D <= 256, "blended_attention (CUDA): head dim ", D,
              " is not supported: use a multiple of 8 up to 256");
  TORCH_CHECK(Nk > 0, "blended_attention (CUDA): k/v have no tokens (Nk = 0)");

  check_on_device(kv_frames, "kv_frames", q);
  TORCH_CHECK(kv_frames.scalar_type() == at::kLong, "blended_attention (CUDA): kv_frames must be int64, got ",
              kv_frames.scalar_type());
  TORCH_CHECK(kv_frames.dim() == 2 && kv_frames.size(0) == B && kv_frames.size(1) > 0,
              "blended_attention (CUDA): kv_frames must be (B, R) with B = ", B, " and R >= 1; got ",
              kv_frames.sizes());
  const int64_t R = kv_frames.size(1);

  check_operand(out, "out", q);
  TORCH_CHECK(out.sizes() == q.sizes(), "blended_attention (CUDA): out must have q's shape ", q.sizes(), "; got ",
              out.sizes());
  TORCH_CHECK(B <= 65535 && H <= 65535, "blended_attention (CUDA): B = ", B, " and H = ", H,
              " must each be at most 65535 (grid dimensions)");

  ck::Params p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.kv_frames = kv_frames.data_ptr<int64_t>();
  p.out = out.data_ptr();
  p.B = to_int(B, "B");
  p.Bk = to_int(Bk, "k.size(0)");
  p.H = to_int(H, "H");
  p.Nq = to_int(Nq, "Nq");
  p.Nk = to_int(Nk, "Nk");
  p.R = to_int(R, "R");
  p.D = to_int(D, "D");
  to_int(R * Nk, "R * Nk");
  p.form = static_cast<int>(source_form);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  p.ps_kind = ck::kPsF16;
  p.ps_esize = 2;
  p.ps_prescale = 1.f;

  if (source_form == ck::kFormNone) {
    TORCH_CHECK(!mask.has_value(), "blended_attention (CUDA): a mask was given without a source (source_form 0)");
  } else if (source_form == ck::kFormQK) {
    TORCH_CHECK(src_a.has_value() && src_b.has_value(),
                "blended_attention (CUDA): source_form 1 (qk) needs src_a = q_s and src_b = k_s");
    check_operand(*src_a, "q_s (src_a)", q);
    check_operand(*src_b, "k_s (src_b)", q);
    TORCH_CHECK(src_a->sizes() == q.sizes(), "blended_attention (CUDA): q_s must be shaped like q ", q.sizes(),
                "; got ", src_a->sizes());
    TORCH_CHECK(src_b->sizes() == k.sizes(), "blended_attention (CUDA): k_s must be shaped like k ", k.sizes(),
                "; got ", src_b->sizes());
    p.q_s = src_a->data_ptr();
    p.k_s = src_b->data_ptr();
  } else {  // probs
    TORCH_CHECK(src_a.has_value(), "blended_attention (CUDA): source_form 2 (probs) needs src_a = P_s");
    const at::Tensor& ps = *src_a;
    check_on_device(ps, "P_s (src_a)", q);
    TORCH_CHECK(ps.dim() == 4 && ps.size(0) == B && ps.size(1) == H && ps.size(2) == Nq && ps.size(3) == R * Nk,
                "blended_attention (CUDA): P_s must be (B, H, Nq, R*Nk) = (", B, ", ", H, ", ", Nq, ", ", R * Nk,
                "); got ", ps.sizes());
    p.ps_kind = ps_kind_of(ps.scalar_type());
    TORCH_CHECK(p.ps_kind >= 0, "blended_attention (CUDA): P_s must be float32, float16, bfloat16 or "
                "float8_e4m3fn; got ", ps.scalar_type());
    p.ps_esize = static_cast<int>(ps.element_size());
    p.ps_vec = aligned16(ps) && (Nk * p.ps_esize) % 16 == 0;
    // SOURCE blocks convert P_s to q's dtype; fp32/bf16 probabilities into fp16 are scaled up
    // first (and the output down) so small ones do not become fp16 subnormals. Exact for
    // |P_s| < 255; fp16 and fp8 maps convert exactly and are not scaled.
    if (q.scalar_type() == at::kHalf && (p.ps_kind == ck::kPsF32 || p.ps_kind == ck::kPsBF16)) p.ps_prescale = 256.f;
    p.p_s = ps.data_ptr();
    if (row_scale.has_value()) {
      check_on_device(*row_scale, "row_scale", q);
      TORCH_CHECK(row_scale->scalar_type() == at::kFloat, "blended_attention (CUDA): row_scale must be float32, got ",
                  row_scale->scalar_type());
      TORCH_CHECK(row_scale->dim() == 3 && row_scale->size(0) == B && row_scale->size(1) == H &&
                      row_scale->size(2) == Nq,
                  "blended_attention (CUDA): row_scale must be (B, H, Nq) = (", B, ", ", H, ", ", Nq, "); got ",
                  row_scale->sizes());
      p.row_scale = row_scale->data_ptr<float>();
    }
  }
  if (source_form != ck::kFormNone && mask.has_value()) {
    check_on_device(*mask, "mask", q);
    TORCH_CHECK(mask->scalar_type() == at::kFloat, "blended_attention (CUDA): mask must be float32, got ",
                mask->scalar_type());
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == Nq,
                "blended_attention (CUDA): mask must be (B, Nq) = (", B, ", ", Nq, "); got ", mask->sizes());
    p.mask = mask->data_ptr<float>();
  }

  if (B == 0 || H == 0 || Nq == 0) return;

  const c10::cuda::CUDAGuard guard(q.device());
  const int dev = q.get_device();
  int major = 0, max_smem = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  TORCH_CHECK(major >= 8, "blended_attention (CUDA): needs an sm80 (Ampere) or newer GPU; device ", dev,
              " is sm", major, "x");
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  const size_t smem = ck::blended_attention_smem_bytes(p.D, p.form, p.ps_esize);
  TORCH_CHECK(smem <= static_cast<size_t>(max_smem), "blended_attention (CUDA): head dim ", D, " with source_form ",
              source_form, " needs ", smem, " bytes of shared memory per block; device ", dev, " allows ", max_smem,
              " (use the triton backend)");

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev).stream();
  cudaError_t err;
  if (q.scalar_type() == at::kHalf) {
    err = ck::launch_blended_attention<__half>(p, stream);
  } else {
    err = ck::launch_blended_attention<__nv_bfloat16>(p, stream);
  }
  TORCH_CHECK(err == cudaSuccess, "blended_attention (CUDA): kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace fatezero_fast

TORCH_LIBRARY_IMPL(fatezero_fast, CUDA, m) { m.impl("blended_attention", &fatezero_fast::blended_attention_cuda); }
