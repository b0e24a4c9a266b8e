"""Plain-PyTorch, materialized FateZero attention: the oracle every fast path is tested against.

Nothing here is fast or memory-efficient on purpose: every Nq x Nk map is built in full,
exactly as the official code builds it (video_diffusion/prompt_attention/attention_register.py).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from .errors import InputError

IndexEntry = Union[int, str]

_NAMED_FRAMES = ("first", "last", "mid", "middle")


def resolve_frame_index(index_list: Sequence[IndexEntry], num_frames: int) -> torch.Tensor:
    """Sparse-causal index list -> (num_frames, R) long tensor of key/value frames per query frame.

    Each entry is resolved per frame: an int is a relative offset clipped to [0, F-1];
    'first' is 0, 'last' is F-1, 'mid'/'middle' is (F-1)//2. Entries are concatenated in order
    (duplicates kept, as the official code concatenates them). An empty list means plain
    per-frame attention: each frame attends to itself.
    """
    if num_frames <= 0:
        raise InputError(f"num_frames must be positive, got {num_frames}")
    frames = torch.arange(num_frames)
    if len(index_list) == 0:
        return frames[:, None].clone()
    columns = []
    for entry in index_list:
        if isinstance(entry, bool) or not isinstance(entry, (int, str)):
            raise InputError(f"unknown sparse-causal index entry {entry!r}: use an int offset or one of {_NAMED_FRAMES}")
        if isinstance(entry, int):
            columns.append((frames + entry).clamp(0, num_frames - 1))
        elif entry == "first":
            columns.append(torch.zeros_like(frames))
        elif entry == "last":
            columns.append(torch.full_like(frames, num_frames - 1))
        elif entry in ("mid", "middle"):
            columns.append(torch.full_like(frames, (num_frames - 1) // 2))
        else:
            raise InputError(f"unknown sparse-causal index entry {entry!r}: use an int offset or one of {_NAMED_FRAMES}")
    return torch.stack(columns, dim=1)


def gather_frames(x: torch.Tensor, kv_frames: torch.Tensor) -> torch.Tensor:
    """Per-frame (Bk, H, N, D) -> (B, H, R*N, D): for each of kv_frames' B rows, its R frames concatenated."""
    gathered = x[kv_frames.to(x.device).long()]  # (B, R, H, N, D)
    return gathered.permute(0, 2, 1, 3, 4).flatten(2, 3)


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) over the last axis, materialized."""
    return torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)


def source_probs(source, kv_frames: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Materialize the source map P_s (B, H, Nq, R*Nk) from any source form."""
    form = source[0]
    if form == "qk":
        _, q_s, k_s = source
        return attention_probs(q_s.to(dtype), gather_frames(k_s, kv_frames).to(dtype), scale)
    if form == "probs":
        p_s = source[1].to(dtype)
        if len(source) == 3:  # fp8 map with a per-row scale
            p_s = p_s * source[2].to(dtype)[..., None]
        return p_s
    if form == "lowrank":
        _, u, w = source
        return torch.matmul(u.to(dtype), w.to(dtype))
    raise ValueError(f"unknown source form {form!r}: use 'qk', 'probs' or 'lowrank'")


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
    if source is None:
        probs = p_edit
    else:
        p_src = source_probs(source, kv_frames, scale, compute_dtype)
        m = torch.zeros(q.shape[0], q.shape[2], dtype=compute_dtype, device=q.device) if mask is None \
            else mask.to(compute_dtype)
        m = m[:, None, :, None]
        probs = m * p_edit + (1 - m) * p_src
    return torch.matmul(probs, v_e).to(q.dtype)


def ddim_inversion_step(eps: torch.Tensor, timestep: int, latent: torch.Tensor, alphas_cumprod: torch.Tensor,
                        final_alpha_cumprod: torch.Tensor, num_train_timesteps: int,
                        num_inference_steps: int) -> torch.Tensor:
    """One DDIM inversion step z_i -> z_{i+1} at `timestep`, as the official code computes it.

    z_{i+1} = sqrt(a_next) (z_i - sqrt(1 - a_cur) eps) / sqrt(a_cur) + sqrt(1 - a_next) eps,
    a_next = alphas_cumprod[t], a_cur = alphas_cumprod[t - 1000/T] (final_alpha_cumprod when negative).
    """
    t = int(timestep)
    prev_t = min(t - num_train_timesteps // num_inference_steps, num_train_timesteps - 1)
    a_cur = alphas_cumprod[prev_t] if prev_t >= 0 else final_alpha_cumprod
    a_next = alphas_cumprod[t]
    x0 = (latent - (1 - a_cur) ** 0.5 * eps) / a_cur ** 0.5
    return a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps
