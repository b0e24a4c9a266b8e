"""cuda backend of blended_attention: the hand-written kernel in csrc/blended_attention_cuda.cu(h).

What the kernel covers (anything else raises ValueError here, before the op is called):
  * a CUDA device of compute capability 8.0 or newer (Ampere, Ada, Hopper);
  * q, k, v (and q_s, k_s) in float16 or bfloat16 (k, v, q_s, k_s are cast to q's dtype when
    they differ); float32 inputs go to the triton or cpu backend;
  * head dims that are multiples of 8 up to 256;
  * sources: None, ("qk", q_s, k_s), ("probs", P_s[, row_scale]) with P_s in float32,
    float16, bfloat16 or float8_e4m3fn (float64 maps are cast to float32). Not ("lowrank", U, W):
    that form is the triton backend's.

Inputs are made contiguous and 16-byte aligned here (a copy only when they are not); `out` is
written in place when it is contiguous and aligned, else through a temporary.

The extension `fatezero_fast._C` is imported lazily: a missing or CPU-only build just makes
`available()` False.
"""
from __future__ import annotations

import torch

from ..source import Source, SourceForm

_OP_NAME = "fatezero_fast::blended_attention"
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
_PROBS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn)
_FORMS = (SourceForm.NONE, SourceForm.QK, SourceForm.PROBS)

_ext_state = None  # None: not tried yet; True / False: whether fatezero_fast._C imported
_ext_error = None


def _extension_loaded() -> bool:
    global _ext_state, _ext_error
    if _ext_state is None:
        try:
            import fatezero_fast._C  # noqa: F401  (registers torch.ops.fatezero_fast.*)
            _ext_state = True
        except (ImportError, OSError) as exc:
            _ext_state, _ext_error = False, f"{type(exc).__name__}: {exc}"
    return _ext_state


def load_error() -> str | None:
    """Why the CUDA kernel is unavailable (None when it is available)."""
    if not torch.cuda.is_available():
        return "torch has no usable CUDA device"
    if not _extension_loaded():
        return f"fatezero_fast._C does not import ({_ext_error})"
    if not _has_cuda_kernel():
        return "fatezero_fast._C was built without the CUDA kernel (torch without CUDA at build time?)"
    if not available():
        return "the current CUDA device is older than sm80"
    return None


def _has_cuda_kernel() -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(_OP_NAME, "CUDA"))
    except (RuntimeError, AttributeError):  # op not registered / API absent
        return False


def available(device=None) -> bool:
    """True when CUDA is usable, `device` (default: the current CUDA device) is sm80+, and
    fatezero_fast._C was built with the CUDA kernel registered."""
    if not torch.cuda.is_available():
        return False
    if device is not None:
        device = torch.device(device)
        if device.type != "cuda":
            return False
    if not (_extension_loaded() and _has_cuda_kernel()):
        return False
    try:
        index = None if device is None or device.index is None else device.index
        return torch.cuda.get_device_capability(index) >= (8, 0)
    except (RuntimeError, AssertionError):
        return False


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the kernel copies 16-byte chunks)."""
    t = t.contiguous()
    if t.data_ptr() % 16:
        t = t.clone()
    return t


def _operand(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return _aligned(t.to(device=device, dtype=dtype))


def blended_attention(q, k, v, kv_frames, source, mask, scale, out=None):
    """See fatezero_fast.ops.blended_attention (shapes validated there).

    Raises ValueError for what the CUDA kernel does not cover: float32/float64 q, the
    low-rank source, P_s dtypes other than float32/float16/bfloat16/float8_e4m3fn.
    """
    source = Source.of(source)
    if q.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"the cuda backend supports float16 and bfloat16 inputs, got {q.dtype}: "
                         "use the triton or cpu backend")
    if source.form not in _FORMS:
        raise ValueError(f"the cuda backend does not support the {source.form.label!r} source form: "
                         "use the triton backend")
    if q.device.type != "cuda":
        raise ValueError(f"the cuda backend needs CUDA tensors; q is on {q.device}")
    if q.shape[-1] % 8 != 0 or q.shape[-1] > 256:
        raise ValueError(f"head dim {q.shape[-1]} is not supported: use a multiple of 8 up to 256")
    dev, dtype = q.device, q.dtype
    q_, k_, v_ = _aligned(q), _operand(k, dtype, dev), _operand(v, dtype, dev)
    kv_frames = kv_frames.to(device=dev, dtype=torch.long).contiguous()
    src_a = src_b = row_scale = None
    if source.form is SourceForm.QK:
        src_a, src_b = _operand(source.a, dtype, dev), _operand(source.b, dtype, dev)
    elif source.form is SourceForm.PROBS:
        p_s = source.a
        if p_s.dtype == torch.float64:
            p_s = p_s.float()
        if p_s.dtype not in _PROBS_DTYPES:
            raise ValueError(f"the cuda backend takes P_s as float32, float16, bfloat16 or float8_e4m3fn; "
                             f"got {p_s.dtype}")
        src_a = p_s.to(dev).contiguous()
        if source.row_scale is not None:
            row_scale = source.row_scale.to(device=dev, dtype=torch.float32).contiguous()
    mask_ = None
    if source.form is not SourceForm.NONE and mask is not None:
        mask_ = mask.to(device=dev, dtype=torch.float32).contiguous()

    if out is None:
        target = torch.empty_like(q_)
    elif out.is_contiguous() and out.data_ptr() % 16 == 0:
        target = out
    else:
        target = torch.empty(q.shape, dtype=dtype, device=dev)
    torch.ops.fatezero_fast.blended_attention(q_, k_, v_, kv_frames, int(source.form), src_a, src_b, row_scale, mask_,
                                              float(scale), target)
    if out is None:
        return target
    if target is not out:
        out.copy_(target)
    return out
