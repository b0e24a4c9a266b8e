"""Plain-PyTorch, materialized FateZero attention: the oracle every fast path is tested against.

Nothing here is fast or memory-efficient on purpose: every Nq x Nk map is built in full,
exactly as the official code builds it (docs/semantics.md §3, §7): the blended attention and the
blend mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .source import Source, SourceForm


def gather_frames(x: torch.Tensor, kv_frames: torch.Tensor) -> torch.Tensor:
    """Per-frame (Bk, H, N, D) -> (B, H, R*N, D): for each of kv_frames' B rows, its R frames concatenated."""
    gathered = x[kv_frames.to(x.device).long()]  # (B, R, H, N, D)
    return gathered.permute(0, 2, 1, 3, 4).flatten(2, 3)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) over the last axis, materialized."""
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)


def source_probs(source, kv_frames: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Materialize the source map P_s (B, H, Nq, R*Nk) from any source form (tuple or Source)."""
    src = Source.of(source)
    if src.form is SourceForm.QK:
        return attention_probs(src.a.to(dtype), gather_frames(src.b, kv_frames).to(dtype), scale)
    if src.form is SourceForm.PROBS:
        p_s = src.a.to(dtype)
        if src.row_scale is not None:  # fp8 map with a per-row scale
            p_s = p_s * src.row_scale.to(dtype)[..., None]
        return p_s
    if src.form is SourceForm.LOWRANK:
        return torch.matmul(src.a.to(dtype), src.b.to(dtype))
    raise ValueError("source_probs needs a source, got None")


def blended_attention_reference(q, k, v, *, kv_frames, source=None, mask=None, scale=None,
                                compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """out = M * softmax(Q_e K_e^T s) V_e + (1 - M) * P_s V_e, K/V gathered per query frame.

    q: (B, H, Nq, D); k, v: (B, H, Nk, D) per frame; kv_frames: (B, R) frame indices into k/v's
    first axis; mask: (B, Nq) in [0, 1] (1 = edit, 0 = source); source None = plain attention.
    Computed in compute_dtype (default: float32, float64 stays float64), returned in q's dtype.
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k_e = gather_frames(k, kv_frames).to(compute_dtype)
    v_e = gather_frames(v, kv_frames).to(compute_dtype)
    p_edit = attention_probs(q.to(compute_dtype), k_e, scale)
    if Source.of(source).form is SourceForm.NONE:
        probs = p_edit
    else:
        p_src = source_probs(source, kv_frames, scale, compute_dtype)
        m = torch.zeros(q.shape[0], q.shape[2], dtype=compute_dtype, device=q.device) if mask is None \
            else mask.to(compute_dtype)
        m = m[:, None, :, None]
        probs = m * p_edit + (1 - m) * p_src
    return torch.matmul(probs, v_e).to(q.dtype)


def blend_mask_reference(token_maps: torch.Tensor, weights: torch.Tensor, threshold: float, size: tuple[int, int],
               use_pool: bool = True) -> torch.Tensor:
    """Binary mask (F, h, w) from head- and layer-averaged cross maps (F, rh, rw, 77) (§7).

    Weighted token sum, 3x3 max-pool (stride 1, pad 1), nearest resize to `size`, division by
    each frame's maximum, threshold (strictly greater). A frame with no attention on the words
    gives 0/0 and so an all-zero mask, as in the official code.
    """
    maps = (token_maps * weights.to(token_maps)).sum(-1)[None]  # (1, F, rh, rw)
    if use_pool:
        maps = F.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
    maps = F.interpolate(maps, size=size)
    maps = maps / maps.amax(dim=(-2, -1), keepdim=True)
    return maps.gt(threshold)[0]
