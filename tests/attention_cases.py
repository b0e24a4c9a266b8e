"""Shared cases and tolerances of the blended_attention backend tests (test_ops_cpu, _triton, _cuda, _sdpa).

Every backend is held to the same bounds against the float64 reference, max |out - ref| / max |ref|:
`TOL` (fatezero_fast.ops.selfcheck.TOLERANCES: the self-check at first use applies the same ones).
`run_poisoned` calls the public op with an `out` pre-filled with NaN, so an element a kernel
forgets to write fails. Inputs come from a torch.Generator when one is given (else the global RNG).
"""
from __future__ import annotations

import math

import torch

from fatezero_fast import ops
from fatezero_fast.ops import reference
from fatezero_fast.ops.selfcheck import TOLERANCES
from fatezero_fast.semantics.frames import resolve_frame_index

TOL = {dtype: TOLERANCES[dtype] for dtype in (torch.float32, torch.float16, torch.bfloat16)}
DTYPES = list(TOL)
HEAD_DIMS = (40, 64, 80, 160)                               # SD-1.x: 40, 80, 160; SD-2.x: 64
INDEX_LISTS = (["mid"], [-1, "first"], [-2, -1, "last"])    # R = 1, 2, 3; duplicates and clipping
MASKS = ("none", "zeros", "ones", "mixed", "fractional")
FORMS = ("qk", "probs", "lowrank")


def _randn(shape, gen, device, dtype, scale=1.0):
    return (scale * torch.randn(*shape, generator=gen, device=None if gen is None else gen.device)).to(device, dtype)


def _rand(shape, gen, device):
    return torch.rand(*shape, generator=gen, device=None if gen is None else gen.device).to(device)


def make_qkv(b, h, nq, nk, d, dtype, *, frames=None, gen=None, device="cpu", q_scale=1.0):
    """q (B, H, Nq, D) and per-frame k, v (frames, H, Nk, D); frames defaults to B."""
    frames = b if frames is None else frames
    return (_randn((b, h, nq, d), gen, device, dtype, q_scale), _randn((frames, h, nk, d), gen, device, dtype),
            _randn((frames, h, nk, d), gen, device, dtype))


def make_mask(kind, b, nq, *, gen=None, device="cpu", block=16):
    """(B, Nq) float mask, or None for "none".

    "mixed": binary, uniform blocks of `block` rows beside mixed ones (a kernel's query tile): when Nq
    holds more than two blocks, the first block of every frame is all 1 and the second all 0; with 3
    or more frames the first frame is all 1 and the last all 0 (whole uniform frames). "fractional":
    uniform in [0, 1].
    """
    if kind in ("none", None):
        return None
    if kind == "zeros":
        return torch.zeros(b, nq, device=device)
    if kind == "ones":
        return torch.ones(b, nq, device=device)
    if kind == "fractional":
        return _rand((b, nq), gen, device)
    if kind == "mixed":
        m = (_rand((b, nq), gen, device) > 0.5).float()
        if nq > 2 * block:
            m[:, :block] = 1.0
            m[:, block:2 * block] = 0.0
        if b >= 3:
            m[0], m[-1] = 1.0, 0.0
        return m
    raise ValueError(kind)


def probs_map(b, h, nq, nk_total, *, gen=None, device="cpu", sharpness=2.0):
    """A realistic source map: rows of a softmax with sharp and flat regions, float32."""
    return torch.softmax(sharpness * _randn((b, h, nq, nk_total), gen, device, torch.float32), dim=-1)


def fp8_map(p):
    """(P_s / row_scale in float8_e4m3fn, row_scale): the fp8 store's per-row scaled map."""
    row_scale = (p.amax(-1) / 448.0).float()
    return (p / row_scale[..., None]).to(torch.float8_e4m3fn), row_scale


def make_source(form, b, h, nq, nk, d, n_ref, dtype, *, gen=None, device="cpu", probs_dtype=None,
                row_scale=False, rank=5, frames=None, q_scale=1.0):
    """A random source of `form` (None, "qk", "probs", "lowrank"): (source for the op, source in float64).

    probs: P_s in probs_dtype (default: dtype); float8_e4m3fn maps always carry a row scale, other
    dtypes one when row_scale=True (a random scale in [0.5, 1.5)).
    """
    if form is None:
        return None, None
    if form == "qk":
        frames = b if frames is None else frames
        q_s = _randn((b, h, nq, d), gen, device, dtype, q_scale)
        k_s = _randn((frames, h, nk, d), gen, device, dtype)
        return ("qk", q_s, k_s), ("qk", q_s.double(), k_s.double())
    if form == "probs":
        probs_dtype = dtype if probs_dtype is None else probs_dtype
        p = probs_map(b, h, nq, n_ref * nk, gen=gen, device=device)
        if probs_dtype == torch.float8_e4m3fn:
            p8, scale = fp8_map(p)
            return ("probs", p8, scale), ("probs", p8.double(), scale.double())
        p = p.to(probs_dtype)
        if row_scale:
            scale = _rand((b, h, nq), gen, device) + 0.5
            return ("probs", p, scale), ("probs", p.double(), scale.double())
        return ("probs", p), ("probs", p.double())
    if form == "lowrank":
        u = (_rand((b, h, nq, rank), gen, device) / rank).to(dtype)
        w = torch.softmax(_randn((b, h, rank, n_ref * nk), gen, device, torch.float32), dim=-1).to(dtype)
        return ("lowrank", u, w), ("lowrank", u.double(), w.double())
    raise ValueError(form)


def rel_err(out, ref):
    """max |out - ref| / max |ref| (in float64)."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def reference64(q, k, v, kv_frames, source64=None, mask=None, scale=None):
    """The materialized reference in float64."""
    return reference.blended_attention_reference(q.double(), k.double(), v.double(), kv_frames=kv_frames,
                                                 source=source64, mask=None if mask is None else mask.double(),
                                                 scale=scale)


def run_poisoned(backend, q, k, v, kv_frames, source=None, mask=None, scale=None):
    """ops.blended_attention(..., backend, out=NaN-filled): asserts the op wrote every element, returns out."""
    out = torch.full_like(q, float("nan"))
    result = ops.blended_attention(q, k, v, kv_frames=kv_frames, source=source, mask=mask, scale=scale,
                                   backend=backend, out=out)
    assert result.data_ptr() == out.data_ptr() and result.dtype == q.dtype
    if out.is_cuda:
        torch.cuda.synchronize(out.device)
    assert not torch.isnan(out).any(), "some output elements were never written (or are NaN)"
    return out


def assert_close_to_reference(out, ref, dtype, tol=None):
    tol = TOL[dtype] if tol is None else tol
    err = rel_err(out, ref)
    assert err <= tol, f"relative error {err:.3g} > {tol:g} ({dtype})"
    return err


def _slice_source(src64, b, h0, h1):
    if src64 is None:
        return None
    if src64[0] == "qk":  # k_s is per frame: all frames, the head slice
        return ("qk", src64[1][b:b + 1, h0:h1].double(), src64[2][:, h0:h1].double())
    return (src64[0],) + tuple(t[b:b + 1, h0:h1].double() for t in src64[1:])


def chunked_oracle_err(out, q, k, v, kv_frames, src64, mask, scale=None, head_chunk=8):
    """max |out - ref| / max |ref| with the float64 reference computed per (query frame, head chunk):
    bounded memory at SD sizes, where one full map would not fit."""
    err, top = 0.0, 0.0
    for b in range(q.shape[0]):
        for h0 in range(0, q.shape[1], head_chunk):
            h1 = min(h0 + head_chunk, q.shape[1])
            ref = reference.blended_attention_reference(
                q[b:b + 1, h0:h1].double(), k[:, h0:h1].double(), v[:, h0:h1].double(),
                kv_frames=kv_frames[b:b + 1], source=_slice_source(src64, b, h0, h1),
                mask=None if mask is None else mask[b:b + 1].double(), scale=scale)
            err = max(err, (out[b:b + 1, h0:h1].double() - ref).abs().max().item())
            top = max(top, ref.abs().max().item())
            del ref
    return err / max(top, 1e-30)


def sd_mask(b, nq, *, gen=None, device="cpu"):
    """A spatially coherent blend mask of a square latent: a disk (uniform and mixed blocks), frame 1
    fractional, frame 2 all 0, frame 3 all 1."""
    side = int(math.isqrt(nq))
    yy, xx = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    disk = ((xx - side / 2) ** 2 + (yy - side / 2) ** 2 < (side / 3) ** 2).float().reshape(1, nq)
    mask = disk.expand(b, nq).clone()
    mask[1] = _rand((nq,), gen, device)
    mask[2] = 0.0
    mask[3] = 1.0
    return mask


SD14_SHAPES = [(4096, 40), (1024, 80), (256, 160)]  # (Nq, head dim) at 64x64, 32x32, 16x16 latents


def sd14_case(form, nq, d, dtype, *, gen, device, index_list=None):
    """SD-1.4-sized inputs (8 frames x 8 heads, Nk = Nq): q, k, v, kv_frames, source, source64, mask.

    form: "plain", "qk", "probs" (P_s in dtype), "probs8" (fp8 map with row scale, > 2**31 elements at
    4096 tokens and R = 3: 64-bit offsets) or "lowrank" (rank 8).
    """
    b, h = 8, 8
    if index_list is None:
        index_list = {"plain": ["mid"], "probs8": [-2, -1, "last"]}.get(form, [-1, "first"])
    q, k, v = make_qkv(b, h, nq, nq, d, dtype, gen=gen, device=device, q_scale=1.5)
    kv_frames = resolve_frame_index(index_list, b).to(device)
    n_ref = kv_frames.shape[1]
    source = src64 = None
    if form == "qk":
        source, src64 = make_source("qk", b, h, nq, nq, d, n_ref, dtype, gen=gen, device=device)
    elif form in ("probs", "probs8"):  # one frame at a time: bounded temporaries
        pdtype = torch.float8_e4m3fn if form == "probs8" else dtype
        p_s = torch.empty(b, h, nq, n_ref * nq, dtype=pdtype, device=device)
        row_scale = torch.empty(b, h, nq, device=device) if form == "probs8" else None
        for i in range(b):
            p = probs_map(1, h, nq, n_ref * nq, gen=gen, device=device)[0]
            if form == "probs8":
                p_s[i], row_scale[i] = fp8_map(p)
            else:
                p_s[i] = p.to(pdtype)
            del p
        source = ("probs", p_s) if row_scale is None else ("probs", p_s, row_scale)
        src64 = source  # sliced and widened per chunk by chunked_oracle_err
    elif form == "lowrank":
        source = ("lowrank", (_rand((b, h, nq, 8), gen, device) / 8).to(dtype),
                  torch.softmax(_randn((b, h, 8, n_ref * nq), gen, device, torch.float32), -1).to(dtype))
        src64 = source
    mask = None if source is None else sd_mask(b, nq, gen=gen, device=device)
    return q, k, v, kv_frames, source, src64, mask


def check_sd14(backend, form, nq, d, dtype, *, index_list=None, tol=None):
    """One SD-1.4-sized case (sd14_case) on CUDA through `backend`, poisoned output, chunked float64 oracle."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(nq + d)
    q, k, v, kv_frames, source, src64, mask = sd14_case(form, nq, d, dtype, gen=gen, device=dev,
                                                        index_list=index_list)
    out = torch.full_like(q, float("nan"))
    ops.blended_attention(q, k, v, kv_frames=kv_frames, source=source, mask=mask, backend=backend, out=out)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), "some output elements were never written (or are NaN)"
    err = chunked_oracle_err(out, q, k, v, kv_frames, src64, mask, d ** -0.5, head_chunk=2)
    tol = TOL[dtype] if tol is None else tol
    assert err <= tol, f"relative error {err:.3g} > {tol:g}"


def check_strided(backend, *, nq, nk, dtype=torch.float32, device="cpu", gen=None, b=2, h=2, d=40, tol=None):
    """Non-contiguous q/k/v (diffusers' (B, N, H, D) viewed as (B, H, N, D)), a column-major P_s, a bool
    mask; out=None, then out given as a strided view (written in place)."""
    q = _randn((b, nq, h, d), gen, device, dtype).transpose(1, 2)
    kv = _randn((b, nk, 2, h, d), gen, device, dtype)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    kv_frames = resolve_frame_index(["first", -1], b).to(device)
    p = probs_map(b, h, nq, 2 * nk, gen=gen, device=device)
    p_t = p.transpose(-1, -2).contiguous().transpose(-1, -2)  # a column-major map
    mask = _rand((b, nq), gen, device) > 0.5
    ref = reference64(q, k, v, kv_frames, ("probs", p.double()), mask)
    tol = TOL[dtype] if tol is None else tol
    out = ops.blended_attention(q, k, v, kv_frames=kv_frames, source=("probs", p_t), mask=mask, backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) <= tol
    out_buf = torch.full((b, nq, h, d), float("nan"), device=device, dtype=dtype)
    out_view = out_buf.transpose(1, 2)
    ops.blended_attention(q, k, v, kv_frames=kv_frames, source=("probs", p_t), mask=mask, backend=backend,
                          out=out_view)
    assert not torch.isnan(out_buf).any()
    assert rel_err(out_view, ref) <= tol
