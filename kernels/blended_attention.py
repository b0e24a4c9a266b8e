"""Triton kernel of `blended_attention`: FateZero's spatio-temporal attention, source map fused.

    out = M * softmax(Q K_e^T * scale) V_e + (1 - M) * P_s V_e

One program handles BLOCK_M query rows of one (batch, head). It walks the key/value frames
of its query frame (kv_frames[b, 0..R-1], duplicates allowed) tile by tile -- the frames are
gathered on the fly, no concatenated K/V and no Nq x Nk map is ever built -- and keeps up to
two accumulators:

* edit stream: online softmax (exp2, log2(e) folded into the scale) of Q K^T, times V;
* source stream, by source form:
    "qk"      a second online softmax of Q_s K_s^T over the same gathered frames, same V tiles;
    "probs"   the stored map's tile (fp32/fp16/bf16/fp8, optional per-row scale) times V;
    "lowrank" P_s = U W, so P_s V_e = U (W V_e); W V_e (r x D per batch/head, fp32) is
              computed beforehand by the caller and the product with U happens in the epilogue.

`_blended_attn_fwd` reads top to bottom in five stages: 1. load the query block; 2. read the
block's blend mask and decide which streams run -- all 1 only the edit stream, all 0 only the
source (a runtime `if` on the block's min/max), mixed or fractional blocks both; 3. run the one
inner loop `_kv_loop` over the gathered K/V tiles, specialized to those streams; 4. epilogue:
normalise and blend; 5. store. Head dims are padded to a power of two with masked loads, Nq and
Nk tails are masked. fp32 inputs use IEEE fp32 dots (no TF32) so they match the fp32 oracle.

Block sizes: `pick_config` chooses per head dim / dtype / source form for Hopper-class GPUs,
and small 16 x 16 tiles under TRITON_INTERPRET=1 (the CPU interpreter, used by the tests).

One source for Triton 3.6 (the GPU machines' torch 2.11) through 3.9: the interpreter tests pass
and every variant compiles for sm_90a on both (tools/compile_check.py, benchmarks/README.md).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fatezero_fast.ops.source import (  # absolute: this folder may be imported as `kernels`
    Source,
    SourceForm,
)

__all__ = ["INTERPRET", "blended_attention_fwd", "launch_args", "lowrank_wv", "pick_config"]

LOG2E = 1.4426950408889634


def _interpret_mode() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        try:
            return bool(knobs.runtime.interpret)
        except AttributeError:
            pass
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Whether the kernels below were decorated as interpreted functions (decided at import time).
INTERPRET = _interpret_mode()


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 operands: IEEE fp32 products (tl.dot would use TF32 on the GPU by default).
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _online_softmax_step(acc, l_i, m_i, qk, v, IEEE: tl.constexpr):
    # One key tile of softmax(qk) V, in base 2: m = running row max, l = running sum of 2^(qk - m),
    # acc = running sum of 2^(qk - m) v; earlier terms are rescaled by 2^(m_old - m_new).
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return acc, l_i, m_new


@triton.jit
def _kv_loop(acc, l_i, m_i, q, kv, offs_n, offs_d, row_ok, qk_scale,
             HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SOURCE: tl.constexpr,
             DO_EDIT: tl.constexpr, DO_SRC: tl.constexpr, IEEE: tl.constexpr):
    """The inner loop: walk the R gathered key frames tile by tile, updating the edit stream (DO_EDIT)
    and/or the source stream of "qk" or "probs" (DO_SRC). acc, l_i, m_i and q are (edit, source)
    pairs; kv = (k, v, k_s, p_s, kv_frames, Nk, R) as the kernel builds it."""
    acc_e, l_e, m_e = acc[0], l_i[0], m_i[0]  # edit stream
    acc_s, l_s, m_s = acc[1], l_i[1], m_i[1]  # source stream
    q_e, q_s = q
    k, v, ks, p_s, kv_frames, NK, R = kv
    k_ptr, stride_kf, stride_kn, stride_kd = k
    v_ptr, stride_vf, stride_vn, stride_vd = v
    ks_ptr, stride_ksf, stride_ksn, stride_ksd = ks
    p_rows, stride_pn = p_s
    dtype = q_e.dtype
    d_ok = offs_d < HEAD_DIM
    n_blocks = tl.cdiv(NK, BLOCK_N)
    for j in range(0, R * n_blocks):
        r = j // n_blocks  # frame slot r of kv_frames, key tile j - r * n_blocks of that frame
        start_n = (j - r * n_blocks) * BLOCK_N
        frame = tl.load(kv_frames + r).to(tl.int64)
        cols = start_n + offs_n
        col_ok = cols < NK
        v_tile = tl.load(v_ptr + frame * stride_vf + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                         mask=col_ok[:, None] & d_ok[None, :], other=0.0).to(dtype)
        if DO_EDIT:
            kt = tl.load(k_ptr + frame * stride_kf + offs_d[:, None] * stride_kd + cols[None, :] * stride_kn,
                         mask=d_ok[:, None] & col_ok[None, :], other=0.0).to(dtype)
            qk = _dot(q_e, kt, IEEE) * qk_scale
            qk = tl.where(col_ok[None, :], qk, -float("inf"))
            acc_e, l_e, m_e = _online_softmax_step(acc_e, l_e, m_e, qk, v_tile, IEEE)
        if DO_SRC:
            if SOURCE == 1:  # P_s = softmax(Q_s K_s^T * scale), against the same V tile
                kst = tl.load(ks_ptr + frame * stride_ksf + offs_d[:, None] * stride_ksd
                              + cols[None, :] * stride_ksn,
                              mask=d_ok[:, None] & col_ok[None, :], other=0.0).to(dtype)
                qk_s = _dot(q_s, kst, IEEE) * qk_scale
                qk_s = tl.where(col_ok[None, :], qk_s, -float("inf"))
                acc_s, l_s, m_s = _online_softmax_step(acc_s, l_s, m_s, qk_s, v_tile, IEEE)
            else:  # SOURCE == 2: the stored map's columns r * Nk + cols
                p = tl.load(p_rows + (r * NK + cols)[None, :] * stride_pn,
                            mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                acc_s += _dot(p.to(tl.float32).to(dtype), v_tile, IEEE)
    return (acc_e, acc_s), (l_e, l_s), (m_e, m_s)


@triton.jit
def _blended_attn_fwd(
        Q, K, V, QS, KS, PS, RS, U, WV, MASK, KVF, OUT,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kf, stride_kh, stride_kn, stride_kd,
        stride_vf, stride_vh, stride_vn, stride_vd,
        stride_qsb, stride_qsh, stride_qsm, stride_qsd,
        stride_ksf, stride_ksh, stride_ksn, stride_ksd,
        stride_pb, stride_ph, stride_pm, stride_pn,
        stride_rb, stride_rh, stride_rm,
        stride_ub, stride_uh, stride_um, stride_ur,
        stride_wb, stride_wh, stride_wr, stride_wd,
        stride_mb, stride_mm,
        stride_ob, stride_oh, stride_om, stride_od,
        qk_scale, H, NQ, NK, R, RANK,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr, SOURCE: tl.constexpr, HAS_MASK: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
        IEEE: tl.constexpr):
    # This program: query rows offs_m of batch item (query frame) b, head h.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < NQ
    d_ok = offs_d < HEAD_DIM
    q_mask = row_ok[:, None] & d_ok[None, :]

    # 1. The query block, and for "qk" the source's queries (cast to the edit's dtype).
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    qs = q
    if SOURCE == 1:
        qs = tl.load(QS + b * stride_qsb + h * stride_qsh + offs_m[:, None] * stride_qsm
                     + offs_d[None, :] * stride_qsd, mask=q_mask, other=0.0).to(q.dtype)

    # What the loop walks. Per-frame tensors as (pointer at head h, frame stride, token stride,
    # channel stride), the map P_s as (pointer at this block's rows, column stride).
    kv = ((K + h * stride_kh, stride_kf, stride_kn, stride_kd),
          (V + h * stride_vh, stride_vf, stride_vn, stride_vd),
          (KS + h * stride_ksh, stride_ksf, stride_ksn, stride_ksd),
          (PS + b * stride_pb + h * stride_ph + offs_m[:, None] * stride_pm, stride_pn),
          KVF + b * R, NK, R)
    # Online-softmax state, as (edit stream, source stream) pairs.
    acc = (tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32))
    l_i = (tl.zeros([BLOCK_M], dtype=tl.float32), tl.zeros([BLOCK_M], dtype=tl.float32))
    m_i = (tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf"),
           tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf"))

    # 2. The streams this block runs. With a mask M (weight of the edit stream per row): all valid rows
    # exactly 0 skip the edit stream, all exactly 1 skip the source. Without one, plain attention
    # runs the edit stream and a source replaces it everywhere.
    if HAS_MASK:
        m_row = tl.load(MASK + b * stride_mb + offs_m * stride_mm, mask=row_ok, other=0.0).to(tl.float32)
        m_max = tl.max(tl.where(row_ok, m_row, 0.0), 0)
        m_min = tl.min(tl.where(row_ok, m_row, 0.0), 0)
        m_max1 = tl.max(tl.where(row_ok, m_row, 1.0), 0)
        m_min1 = tl.min(tl.where(row_ok, m_row, 1.0), 0)
        run_edit = (m_max != 0.0) | (m_min != 0.0)
        run_src = (m_max1 != 1.0) | (m_min1 != 1.0)
    else:
        run_edit = SOURCE == 0
        run_src = SOURCE != 0

    # 3. One walk over the gathered K/V tiles, the loop specialized to the streams that run.
    if (SOURCE == 1) | (SOURCE == 2):  # "qk", "probs": the source stream runs in the loop too
        if run_edit & run_src:
            acc, l_i, m_i = _kv_loop(acc, l_i, m_i, (q, qs), kv, offs_n, offs_d, row_ok, qk_scale,
                                     HEAD_DIM, BLOCK_N, SOURCE, True, True, IEEE)
        elif run_edit:
            acc, l_i, m_i = _kv_loop(acc, l_i, m_i, (q, qs), kv, offs_n, offs_d, row_ok, qk_scale,
                                     HEAD_DIM, BLOCK_N, SOURCE, True, False, IEEE)
        else:
            acc, l_i, m_i = _kv_loop(acc, l_i, m_i, (q, qs), kv, offs_n, offs_d, row_ok, qk_scale,
                                     HEAD_DIM, BLOCK_N, SOURCE, False, True, IEEE)
    elif run_edit:  # plain attention, or "lowrank" (its source is added in the epilogue)
        acc, l_i, m_i = _kv_loop(acc, l_i, m_i, (q, qs), kv, offs_n, offs_d, row_ok, qk_scale,
                                 HEAD_DIM, BLOCK_N, SOURCE, True, False, IEEE)

    # 4. Epilogue: normalise each stream (a skipped one stays exactly 0) and blend,
    # out = M o_e + (1 - M) o_s.
    acc_e, acc_s = acc
    l_e, l_s = l_i
    if SOURCE == 0:
        o = acc_e / l_e[:, None]
    else:
        o_e = acc_e / tl.where(l_e > 0.0, l_e, 1.0)[:, None]
        if SOURCE == 1:
            o_s = acc_s / tl.where(l_s > 0.0, l_s, 1.0)[:, None]
        elif SOURCE == 2:
            o_s = acc_s
            if HAS_ROW_SCALE:  # fp8 map: P_s = row_scale * stored map
                rs = tl.load(RS + b * stride_rb + h * stride_rh + offs_m * stride_rm, mask=row_ok, other=0.0)
                o_s = o_s * rs.to(tl.float32)[:, None]
        else:  # SOURCE == 3: P_s V_e = U (W V_e), W V_e computed by the launcher
            o_s = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            if run_src:  # (BLOCK_M x r) @ (r x D) in fp32, r in chunks of BLOCK_R
                offs_r = tl.arange(0, BLOCK_R)
                u_rows = U + b * stride_ub + h * stride_uh + offs_m[:, None] * stride_um
                wv_cols = WV + b * stride_wb + h * stride_wh + offs_d[None, :] * stride_wd
                for r0 in range(0, RANK, BLOCK_R):
                    rr = r0 + offs_r
                    r_ok = rr < RANK
                    u = tl.load(u_rows + rr[None, :] * stride_ur, mask=row_ok[:, None] & r_ok[None, :],
                                other=0.0).to(tl.float32)
                    wv = tl.load(wv_cols + rr[:, None] * stride_wr, mask=r_ok[:, None] & d_ok[None, :],
                                 other=0.0).to(tl.float32)
                    o_s += tl.dot(u, wv, input_precision="ieee")
        if HAS_MASK:
            o = m_row[:, None] * o_e + (1.0 - m_row)[:, None] * o_s
        else:  # a source without a mask replaces the edit everywhere
            o = o_s

    # 5. Store.
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             o.to(OUT.dtype.element_ty), mask=q_mask)


def pick_config(head_dim: int, dtype: torch.dtype, source_form, device: torch.device | None = None,
                interpret: bool | None = None) -> dict:
    """Tile sizes and launch parameters for one call.

    Interpreter: 16 x 16 tiles (fast on CPU, the smallest tl.dot allows). GPU: chosen for Hopper
    (H100, ~227 KB shared memory per block, 255 registers per thread) so that the sm_90a build of
    every (head dim, dtype, source form) combination fits shared memory (tools/compile_check.py;
    its registers and spills per variant are in benchmarks/README.md: "lowrank" and the fp32
    two-stream builds spill; not yet timed on a GPU). Two streams
    ("qk": two score tiles and two accumulators; "probs": the map tile and a second accumulator)
    get narrower tiles than one. fp32 runs IEEE fp32 dots (FMA, no tensor cores): small tiles.
    """
    interpret = INTERPRET if interpret is None else interpret
    block_d = max(16, triton.next_power_of_2(head_dim))
    if interpret or (device is not None and torch.device(device).type != "cuda"):
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=block_d, num_warps=4, num_stages=1)
    two_streams = SourceForm.named(source_form) in (SourceForm.QK, SourceForm.PROBS)
    if torch.empty((), dtype=dtype).element_size() >= 4:  # fp32
        if block_d <= 64:
            bm, bn, warps, stages = 32, 32, 4, 2
        elif block_d <= 128:
            bm, bn, warps, stages = 32, 16, 4, 2
        else:
            bm, bn, warps, stages = 32, 16, 8, 2
    elif block_d <= 64:
        bm, bn, warps, stages = (128, 32, 8, 3) if two_streams else (128, 64, 4, 3)
    elif block_d <= 128:
        bm, bn, warps, stages = (64, 32, 8, 2) if two_streams else (128, 64, 8, 2)
    else:
        bm, bn, warps, stages = (32, 32, 8, 2) if two_streams else (64, 32, 8, 2)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps, num_stages=stages)


def lowrank_wv(w: torch.Tensor, v: torch.Tensor, kv_frames: torch.Tensor) -> torch.Tensor:
    """W @ V_e in fp32, (B, H, r, D), without concatenating V: one (r x Nk) @ (Nk x D) per frame slot.

    w: (B, H, r, R*Nk); v: (F, H, Nk, D) per frame; kv_frames: (B, R). Memory: one gathered frame
    of V (B, H, Nk, D) and one W slice at a time.
    """
    b, h, rank, _ = w.shape
    nk, d = v.shape[2], v.shape[3]
    wv = torch.zeros(b, h, rank, d, dtype=torch.float32, device=v.device)
    for r in range(kv_frames.shape[1]):
        v_r = v[kv_frames[:, r]].to(torch.float32)                     # (B, H, Nk, D)
        w_r = w[..., r * nk:(r + 1) * nk].to(torch.float32)            # (B, H, r, Nk)
        wv.add_(torch.matmul(w_r, v_r))
    return wv


def _strides(t: torch.Tensor | None, n: int):
    return tuple(t.stride()) if t is not None else (0,) * n


def blended_attention_fwd(q, k, v, kv_frames, source=None, mask=None, scale=None, out=None, *,
                          block_m=None, block_n=None, num_warps=None, num_stages=None):
    """Launch the fused kernel. Arguments as `fatezero_fast.ops.blended_attention` (validated there).

    The keyword-only launch parameters override `pick_config` (for tuning and benchmarks).
    Returns `out` (allocated like q when None).
    """
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.numel() == 0:
        return out
    source = Source.of(source)
    cfg = pick_config(q.shape[3], q.dtype, source.form, q.device)
    for key, value in (("BLOCK_M", block_m), ("BLOCK_N", block_n), ("num_warps", num_warps),
                       ("num_stages", num_stages)):
        if value is not None:
            cfg[key] = value
    grid, args, kwargs = launch_args(q, k, v, kv_frames, source, mask, scale, out, cfg)
    _blended_attn_fwd[grid](*args, **kwargs)
    return out


def launch_args(q, k, v, kv_frames, source, mask, scale, out, cfg):
    """(grid, positional arguments, keyword arguments) of one `_blended_attn_fwd` launch.

    cfg: BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages (as `pick_config` returns them). Works on
    meta tensors too, which is how tools/compile_check.py builds a launch's exact signature.
    """
    b, h, nq, d = q.shape
    nk = k.shape[2]
    scale = d ** -0.5 if scale is None else float(scale)
    kv_frames = kv_frames.to(device=q.device, dtype=torch.int64).contiguous()
    n_frames = kv_frames.shape[1]
    if n_frames == 0 or nk == 0:
        raise ValueError("blended_attention needs at least one key: kv_frames has no frames or k has Nk = 0")

    source = Source.of(source)
    form = source.form
    qs = ks = ps = rs = u = wv = None
    rank = 0
    if form is SourceForm.QK:
        qs, ks = source.a, source.b
    elif form is SourceForm.PROBS:
        ps, rs = source.a, source.row_scale
    elif form is SourceForm.LOWRANK:
        u = source.a
        rank = u.shape[3]
        wv = lowrank_wv(source.b, v, kv_frames)
    if mask is not None and not mask.is_floating_point():
        mask = mask.to(torch.float32)
    if form is SourceForm.NONE:
        mask = None
    block_r = max(16, min(64, triton.next_power_of_2(max(rank, 1))))

    dummy = q
    grid = (triton.cdiv(nq, cfg["BLOCK_M"]), b * h)
    args = (
        q, k, v,
        qs if qs is not None else dummy, ks if ks is not None else dummy,
        ps if ps is not None else dummy, rs if rs is not None else dummy,
        u if u is not None else dummy, wv if wv is not None else dummy,
        mask if mask is not None else dummy, kv_frames, out,
        *q.stride(), *k.stride(), *v.stride(),
        *_strides(qs, 4), *_strides(ks, 4), *_strides(ps, 4), *_strides(rs, 3),
        *_strides(u, 4), *_strides(wv, 4), *_strides(mask, 2), *out.stride(),
        scale * LOG2E, h, nq, nk, n_frames, rank,
    )
    kwargs = dict(
        HEAD_DIM=d, BLOCK_D=cfg["BLOCK_D"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_R=block_r,
        SOURCE=int(form), HAS_MASK=mask is not None, HAS_ROW_SCALE=rs is not None,
        IEEE=q.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return grid, args, kwargs
