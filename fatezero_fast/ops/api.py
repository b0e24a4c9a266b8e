"""The fused ops, one dispatching entry each: triton | cuda | cpu | reference.

`blended_attention` computes FateZero's spatio-temporal self-attention with the source map
fused on the fly (docs/design.md, "The fused op"):

    out = M * softmax(Q_e K_e^T * s) V_e + (1 - M) * P_s V_e

with K/V gathered per query frame from `kv_frames` and P_s given as ("qk", q_s, k_s),
("probs", P_s[, row_scale]) or ("lowrank", U, W). The backends never build an Nq x Nk map
(the reference does: it is the oracle for tests).

`blend_mask` builds FateZero's binary blend mask (docs/semantics.md §7) with the fused
C++/CUDA op, bit for bit `reference.blend_mask_reference` (see backends/mask.py for the exact conditions).
"""
from __future__ import annotations

import warnings

import torch

from . import reference
from .backends import cpu as _cpu
from .backends import cuda as _cuda
from .backends import mask as _mask
from .backends import triton as _triton
from .source import Source, SourceForm

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")
BLEND_MASK_BACKENDS = ("auto", "cpu", "cuda", "reference")
_warned_fallback = False


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on `device` in this installation."""
    device = torch.device(device)
    names = []
    if device.type == "cuda":
        if _triton.available(device):
            names.append("triton")
        if _cuda.available():
            names.append("cuda")
    else:
        if _cpu.available():
            names.append("cpu")
        if _triton.available(device):
            names.append("triton")
    names.append("reference")
    return names


def _check_inputs(q, k, v, kv_frames, source, mask) -> Source:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[1] != q.shape[1] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k and v must be (B, H, Nk, D) matching q's heads and head dim; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, h, nq, d = q.shape
    if d % 8 != 0 or d > 256:
        raise ValueError(f"head dim {d} is not supported: use a multiple of 8 up to 256")
    if kv_frames.dim() != 2 or kv_frames.shape[0] != b:
        raise ValueError(f"kv_frames must be (B, R) with B={b}; got {tuple(kv_frames.shape)}")
    # bounds are checked for host tensors only: reading a GPU tensor's values would stall the stream
    # on every call (the processors build kv_frames from resolve_frame_index, in range by construction)
    if kv_frames.device.type == "cpu" and kv_frames.numel() and \
            (int(kv_frames.min()) < 0 or int(kv_frames.max()) >= k.shape[0]):
        raise ValueError(f"kv_frames must index k/v's first axis [0, {k.shape[0]}); got values "
                         f"in [{int(kv_frames.min())}, {int(kv_frames.max())}]")
    if mask is not None and tuple(mask.shape) != (b, nq):
        raise ValueError(f"mask must be (B, Nq) = {(b, nq)}; got {tuple(mask.shape)}")
    parsed = Source.of(source)
    if parsed.form is SourceForm.NONE and mask is not None:
        raise ValueError("a mask was given without a source: pass source=(...) or drop the mask")
    parsed.check(q, k, kv_frames)
    return parsed


def _pick_backend(device: torch.device, source) -> str:
    global _warned_fallback
    for name in available_backends(device):
        if name == "cuda" and source.form is SourceForm.LOWRANK:
            continue  # the CUDA kernel covers plain, qk and probs; Triton takes low-rank
        if name != "reference":
            return name
    if not _warned_fallback:
        warnings.warn("fatezero_fast._C is not built and no GPU kernel is available: blended_attention "
                      "falls back to the materialized reference (O(N^2) memory). Reinstall with "
                      "`pip install --no-build-isolation -e .` to get the C++ CPU kernel.")
        _warned_fallback = True
    return "reference"


def blended_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kv_frames: torch.Tensor,
                      source=None, mask: torch.Tensor | None = None, scale: float | None = None,
                      backend: str = "auto", out: torch.Tensor | None = None) -> torch.Tensor:
    """Spatio-temporal attention with an optional FateZero source map blended per query row.

    q: (B, H, Nq, D); k, v: (B, H, Nk, D), one entry per frame; kv_frames: (B, R) long, the frames
    each query frame attends to; source: None, ("qk", q_s, k_s), ("probs", P_s[, row_scale]) or
    ("lowrank", U, W); mask: (B, Nq) in [0, 1], 1 = edit attention, 0 = source (None with a source:
    full source). Returns (B, H, Nq, D) in q's dtype, written into `out` when given.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: use one of {BACKENDS}")
    source = _check_inputs(q, k, v, kv_frames, source, mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    kv_frames = kv_frames.to(device=q.device, dtype=torch.long)
    if backend == "auto":
        backend = _pick_backend(q.device, source)
    elif backend not in available_backends(q.device):
        raise RuntimeError(f"backend {backend!r} is not available on {q.device}: "
                           f"available here: {available_backends(q.device)}")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device):
        raise ValueError(f"out must be shaped, typed and placed like q {tuple(q.shape)} {q.dtype} {q.device}")
    if backend == "reference":
        result = reference.blended_attention_reference(q, k, v, kv_frames=kv_frames, source=source,
                                                       mask=mask, scale=scale)
        return result if out is None else out.copy_(result)
    impl = {"cpu": _cpu, "cuda": _cuda, "triton": _triton}[backend]
    return impl.blended_attention(q, k, v, kv_frames, source, mask, scale, out=out)


def blend_mask(token_maps: torch.Tensor, weights: torch.Tensor, threshold: float, size, use_pool: bool = True,
               backend: str = "auto", *, map_size: tuple[int, int] | None = None) -> torch.Tensor:
    """FateZero's blend mask (docs/semantics.md §7): (F, h, w) bool, as `reference.blend_mask_reference`.

    token_maps: (F, rh, rw, T) head- and layer-averaged cross maps, or (L, F, H, rh*rw, T) per
    layer and head (averaged here in torch first; map_size = (rh, rw), square by default);
    weights: (T,) token weights (0/1 for blend words); size: (h, w) of the mask. backend: "cpu" /
    "cuda" (the fused op, float32 maps on that device), "reference" (reference.blend_mask_reference) or
    "auto": the fused op when it is built for the maps' device and they are float32, else the
    reference.
    """
    if backend not in BLEND_MASK_BACKENDS:
        raise ValueError(f"unknown blend_mask backend {backend!r}: use one of {BLEND_MASK_BACKENDS}")
    maps = _mask.average_maps(token_maps, map_size)
    kind = maps.device.type
    if backend == "auto":
        use_op = kind in ("cpu", "cuda") and maps.dtype == torch.float32 and _mask.available(maps.device)
        backend = kind if use_op else "reference"
    elif backend != "reference":
        if kind != backend:
            raise ValueError(f"backend {backend!r} needs {backend} tensors; token_maps are on {maps.device}")
        if not _mask.available(maps.device):
            raise RuntimeError(f"the blend_mask op is not built for {backend} ({_mask.load_error() or 'no kernel'}): "
                               "rebuild with `pip install --no-build-isolation -e .`")
    if backend == "reference":
        return reference.blend_mask_reference(maps, weights, threshold, size, use_pool)
    return _mask.blend_mask(maps, weights, threshold, size, use_pool)
