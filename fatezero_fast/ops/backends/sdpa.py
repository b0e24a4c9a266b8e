"""sdpa backend of blended_attention: composed from torch's own fused attention.

`torch.nn.functional.scaled_dot_product_attention` picks flash, cuDNN or memory-efficient attention
on GPUs and its fused flash kernel on CPUs; the materializing math fallback is switched off
(`sdpa_kernel`), so a call that none of the fused kernels takes raises instead of building an
Nq x Nk map. The composition:

* the edit stream is one SDPA call over the gathered K/V (K_e, V_e: each query frame's R frames
  joined, (B, H, R*Nk, D));
* ("qk", q_s, k_s): the source stream is a second SDPA call, (q_s, K_s,e, V_e);
* ("probs", P_s[, row_scale]): P_s V_e block by block over query rows, each block converted from the
  stored dtype (fp8 too) and scaled on its own, so that no tensor of Nq x R*Nk beyond one block exists;
  a block holds about as many elements as the output (at least 16 rows);
* ("lowrank", U, W): U (W V_e) in float32, which never forms an Nq x R*Nk tensor at all;
* then the row-mask blend, M out_e + (1 - M) out_s, in float32. A mask that is all ones (all zeros)
  over the whole call runs only the edit (source) stream; finding that out reads the mask's min and
  max, one device-to-host copy per call.

Memory is O(N): the gathered K/V (and K_s), 2 x R x Nk x D per query frame and head (3 x with "qk"),
one output-sized tensor per stream, the float32 blend and one map block; SDPA's own kernels keep
O(Nq) statistics. benchmarks/bench_attention.py measures it (`ours[sdpa]`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..capabilities import FLOAT_DTYPES, PROBS_DTYPES, Capabilities
from ..source import Source, SourceForm

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover - older torch: the backend reports itself unavailable
    SDPBackend = sdpa_kernel = None

CAPABILITIES = Capabilities(
    dtypes={"cpu": FLOAT_DTYPES + (torch.float64,), "cuda": FLOAT_DTYPES},
    probs_dtypes=PROBS_DTYPES + (torch.float64,),
)


def _fused_kernels(device: torch.device):
    """The SDPA implementations allowed on `device`: every fused one, never the math fallback."""
    if device.type == "cuda":
        return [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    return [SDPBackend.FLASH_ATTENTION]  # on CPU: torch's fused flash kernel (fp32/fp16/bf16/fp64)


def load_error(device=None) -> str | None:
    """Why the backend cannot run on `device` (None when it can)."""
    if sdpa_kernel is None:
        return f"torch {torch.__version__} has no torch.nn.attention.sdpa_kernel (needs torch >= 2.3)"
    kind = torch.device("cpu" if device is None else device).type
    if kind == "cuda" and not torch.cuda.is_available():
        return "torch has no usable CUDA device"
    if kind not in ("cpu", "cuda"):
        return f"runs on cpu and cuda only, not {kind}"
    return None


def available(device=None) -> bool:
    return load_error(device) is None


def gather_frames(x: torch.Tensor, kv_frames: torch.Tensor) -> torch.Tensor:
    """Per-frame (F, H, N, D) -> (B, H, R*N, D): each query frame's R frames joined along the tokens."""
    b, r = kv_frames.shape
    picked = x.index_select(0, kv_frames.reshape(-1))                      # (B*R, H, N, D)
    return picked.view(b, r, *x.shape[1:]).transpose(1, 2).reshape(b, x.shape[1], r * x.shape[2], x.shape[3])


def _sdpa(q, k, v, scale):
    with sdpa_kernel(_fused_kernels(q.device)):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _block_rows(nq: int, d: int, nk_total: int) -> int:
    """Query rows per stored-map block: about as many elements as the output (Nq x D), >= 16 rows."""
    return max(16, min(nq, (nq * d) // max(nk_total, 1)))


def _probs_term(p_s, row_scale, v_e, out_dtype):
    """P_s V_e block by block over query rows; (B, H, Nq, D) in float32 (or v_e's dtype on CUDA)."""
    b, h, nq, nk_total = p_s.shape
    d = v_e.shape[-1]
    # CUDA: the map blocks in the input dtype (cuBLAS accumulates fp16/bf16 products in fp32); CPU and
    # fp32/fp64 inputs: float32 (or float64) products
    compute = v_e.dtype if v_e.is_cuda and v_e.dtype in (torch.float16, torch.bfloat16) else \
        (torch.float64 if out_dtype == torch.float64 else torch.float32)
    v_c = v_e.to(compute)
    result = torch.empty(b, h, nq, d, dtype=compute, device=v_e.device)
    rows = _block_rows(nq, d, nk_total)
    for r0 in range(0, nq, rows):
        r1 = min(nq, r0 + rows)
        result[:, :, r0:r1] = torch.matmul(p_s[:, :, r0:r1].to(device=v_e.device, dtype=compute), v_c)
    if row_scale is not None:  # an fp8 map's per-row scale, applied to the product: (P * s) V = (P V) * s
        result = result.float() if compute != torch.float64 else result
        result.mul_(row_scale.to(device=result.device, dtype=result.dtype)[..., None])
    return result


def _lowrank_term(u, w, v_e, out_dtype):
    """U (W V_e) in float32 (float64 for float64 inputs): (B, H, Nq, r) @ (B, H, r, D)."""
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    return torch.matmul(u.to(compute), torch.matmul(w.to(compute), v_e.to(compute)))


def _uniform_mask(mask: torch.Tensor) -> float | None:
    """1.0 or 0.0 when the whole mask is that value, else None (one device-to-host copy)."""
    lo, hi = torch.stack(torch.aminmax(mask)).tolist()
    return lo if lo == hi and lo in (0.0, 1.0) else None


def blended_attention(q, k, v, kv_frames, source, mask, scale, out=None):
    """out = M softmax(Q K_e^T s) V_e + (1 - M) P_s V_e with SDPA; inputs validated and `source` parsed by ops.api."""
    source = Source.of(source)  # parsed by ops.api; a tuple or None when called directly
    if sdpa_kernel is None:
        raise RuntimeError(load_error())
    dtype, dev = q.dtype, q.device
    if q.numel() == 0:
        return torch.empty_like(q) if out is None else out
    if kv_frames.shape[1] == 0 or k.shape[2] == 0:
        raise ValueError("blended_attention needs at least one key: kv_frames has no frames or k has Nk = 0")
    kv_frames = kv_frames.to(device=dev, dtype=torch.long)
    form = source.form
    run_edit, run_src, m = True, form is not SourceForm.NONE, None
    if run_src:
        if mask is None:
            run_edit = False  # no mask with a source: the source in full
        else:
            m = mask.to(device=dev, dtype=torch.float32)
            uniform = _uniform_mask(m)
            if uniform == 1.0:
                run_src = False
            elif uniform == 0.0:
                run_edit = False
    v_e = gather_frames(v.to(dtype), kv_frames)
    out_e = _sdpa(q, gather_frames(k.to(dtype), kv_frames), v_e, scale) if run_edit else None
    out_s = None
    if run_src:
        if form is SourceForm.QK:
            out_s = _sdpa(source.a.to(dtype), gather_frames(source.b.to(dtype), kv_frames), v_e, scale)
        elif form is SourceForm.PROBS:
            out_s = _probs_term(source.a, source.row_scale, v_e, dtype)
        else:
            out_s = _lowrank_term(source.a, source.b, v_e, dtype)
    del v_e
    if out_s is None:
        result = out_e
    elif out_e is None:
        result = out_s
    else:  # M out_e + (1 - M) out_s, in float32 (float64 for float64 inputs)
        blend = torch.float64 if dtype == torch.float64 else torch.float32
        result = out_s.to(blend).lerp_(out_e.to(blend), m.to(blend)[:, None, :, None])
    if out is None:
        return result if result.dtype == dtype else result.to(dtype)
    return out.copy_(result)
