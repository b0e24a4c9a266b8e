// The one registration file of fatezero_fast._C: op schemas (TORCH_LIBRARY) and the CPU impls.
// The CUDA impls register themselves in their own .cu files with
// TORCH_LIBRARY_IMPL(fatezero_fast, CUDA, m) against exactly these schemas.
#include <Python.h>
#include <torch/library.h>

#include "blended_attention.h"

namespace fatezero_fast {
// csrc/blend_mask_cpu.cpp
void blend_mask_cpu(const at::Tensor& token_maps, const at::Tensor& weights, double threshold, int64_t out_h,
                    int64_t out_w, bool use_pool, const at::Tensor& out);
}  // namespace fatezero_fast

// out = M * softmax(Q K_e^T * scale) V_e + (1 - M) * P_s V_e; see csrc/blended_attention.h.
TORCH_LIBRARY(fatezero_fast, m) {
  m.def("blended_attention(Tensor q, Tensor k, Tensor v, Tensor kv_frames, int source_form, Tensor? src_a, "
        "Tensor? src_b, Tensor? row_scale, Tensor? mask, float scale, Tensor(a!) out) -> ()");
  // FateZero's blend mask (docs/semantics.md §7), bit for bit fatezero_fast.ops.reference.blend_mask_reference:
  // token_maps (F, rh, rw, T) float32, weights (T,) float32 -> out (F, out_h, out_w) bool.
  m.def("blend_mask(Tensor token_maps, Tensor weights, float threshold, int out_h, int out_w, bool use_pool, "
        "Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(fatezero_fast, CPU, m) {
  m.impl("blended_attention", &fatezero_fast::blended_attention_cpu);
  m.impl("blend_mask", &fatezero_fast::blend_mask_cpu);
}

// `import fatezero_fast._C` loads this library, which runs the registrations above; the Python
// module itself is empty (the ops live under torch.ops.fatezero_fast).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                                      "fatezero_fast C++/CUDA ops (registered in torch.ops.fatezero_fast)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
