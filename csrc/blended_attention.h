// fatezero_fast::blended_attention: the one fused op (docs/design.md, "The fused op").
//
//   out = M * softmax(Q K_e^T * scale) V_e + (1 - M) * P_s V_e
//
// with K_e / V_e the frames kv_frames[b, 0..R-1] of k / v, gathered by the kernel (never
// concatenated in memory), and P_s given by `source_form`:
//   0 none     out = softmax(Q K_e^T * scale) V_e (src_a, src_b, row_scale, mask unused)
//   1 qk       src_a = q_s (B,H,Nq,D), src_b = k_s (F,H,Nk,D): P_s = softmax(q_s K_s,e^T * scale)
//   2 probs    src_a = P_s (B,H,Nq,R*Nk) fp32/fp16/bf16/fp8, row_scale (B,H,Nq) fp32 optional
//   3 lowrank  src_a = U (B,H,Nq,r), src_b = W (B,H,r,R*Nk): P_s = U W
// mask (B,Nq) fp32 in [0,1], 1 = edit; absent with a source = all zeros (full source).
// out (B,H,Nq,D) has q's dtype and is written in full.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fatezero_fast {

// The codes of fatezero_fast.ops.source.SourceForm, which defines them (tests/test_source_form.py checks).
enum SourceForm : int64_t { kSourceNone = 0, kSourceQK = 1, kSourceProbs = 2, kSourceLowRank = 3 };

// The CPU implementation (csrc/blended_attention_cpu.cpp), registered in csrc/ops.cpp.
void blended_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const at::Tensor& kv_frames, int64_t source_form,
                           const std::optional<at::Tensor>& src_a, const std::optional<at::Tensor>& src_b,
                           const std::optional<at::Tensor>& row_scale, const std::optional<at::Tensor>& mask,
                           double scale, const at::Tensor& out);

}  // namespace fatezero_fast
