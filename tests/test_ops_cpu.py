"""The C++ CPU kernel (fatezero_fast._C) against the float64 reference oracle.

Every call goes through fatezero_fast.ops.blended_attention(..., backend="cpu", out=poisoned):
the out tensor is pre-filled with NaN, so an element the kernel forgets to write fails.
Sizes are deliberately not multiples of the kernel's tiles (32 query rows, 64 keys).
"""
import itertools

import pytest
import torch
from attention_cases import (
    DTYPES,
    HEAD_DIMS,
    INDEX_LISTS,
    MASKS,
    TOL,
    fp8_map,
    make_mask,
    make_qkv,
    probs_map,
    reference64,
    rel_err,
    run_poisoned,
)

from fatezero_fast import ops
from fatezero_fast.ops.backends import cpu as cpu_backend
from fatezero_fast.ops.reference import gather_frames
from fatezero_fast.semantics.frames import resolve_frame_index

if not cpu_backend.available():
    pytest.skip(f"fatezero_fast._C is not built ({cpu_backend.load_error()}): "
                "run `pip install --no-build-isolation -e .`", allow_module_level=True)


def qkv(b, h, nq, nk, d, dtype, frames=None):
    return make_qkv(b, h, nq, nk, d, dtype, frames=frames)


def run_cpu(q, k, v, kv_frames, source=None, mask=None, scale=None):
    return run_poisoned("cpu", q, k, v, kv_frames, source, mask, scale)


def check(q, k, v, kv_frames, source=None, mask=None, scale=None):
    out = run_cpu(q, k, v, kv_frames, source, mask, scale)
    expected = reference64(q, k, v, kv_frames, source, mask, scale)
    err = rel_err(out, expected)
    assert err <= TOL[q.dtype], f"relative error {err:.3g} > {TOL[q.dtype]:g} ({q.dtype})"
    return out


@pytest.mark.parametrize("dtype,d,index_list", list(itertools.product(DTYPES, HEAD_DIMS, INDEX_LISTS)))
def test_plain_attention(dtype, d, index_list):
    torch.manual_seed(d + len(index_list))
    nq, nk = {40: (37, 70), 64: (129, 37), 80: (70, 129), 160: (37, 129)}[d]
    b, h = 4, 2
    q, k, v = qkv(b, h, nq, nk, d, dtype)
    check(q, k, v, resolve_frame_index(index_list, b))


@pytest.mark.parametrize("dtype,mask_kind", list(itertools.product(DTYPES, MASKS)))
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_qk_source(dtype, mask_kind, d):
    torch.manual_seed(1 + d)
    b, h, nq, nk = 3, 2, 70, 37 if d == 160 else 129
    q, k, v = qkv(b, h, nq, nk, d, dtype)
    q_s, k_s, _ = qkv(b, h, nq, nk, d, dtype)
    kv_frames = resolve_frame_index(INDEX_LISTS[d % 3], b)
    check(q, k, v, kv_frames, ("qk", q_s, k_s), make_mask(mask_kind, b, nq))


@pytest.mark.parametrize("p_dtype", ["float32", "float16", "bfloat16", "float8_e4m3fn"])
@pytest.mark.parametrize("dtype,mask_kind", list(itertools.product(DTYPES, MASKS)))
def test_probs_source(p_dtype, dtype, mask_kind):
    torch.manual_seed(2)
    b, h, nq, nk, d = 3, 2, 129, 70, 80 if dtype == torch.float16 else 40
    q, k, v = qkv(b, h, nq, nk, d, dtype)
    kv_frames = resolve_frame_index([-1, "first"], b)
    p_s = probs_map(b, h, nq, kv_frames.shape[1] * nk, sharpness=3.0)
    if p_dtype == "float8_e4m3fn":  # per-row scaled fp8, as the fp8 store keeps it
        source = ("probs", *fp8_map(p_s))
    else:
        source = ("probs", p_s.to(getattr(torch, p_dtype)))
    check(q, k, v, kv_frames, source, make_mask(mask_kind, b, nq))


@pytest.mark.parametrize("nk", [64, 60])  # 60: the last 4 columns of each row take the scalar path
@pytest.mark.parametrize("p_dtype", ["float16", "bfloat16", "float8_e4m3fn"])
def test_probs_conversion_is_exact(p_dtype, nk):
    """Every finite value of the stored map's dtype (subnormals included) is converted exactly:
    with V = identity and mask 0, out = P_s V_e = P_s."""
    torch.manual_seed(7)
    p_dtype = getattr(torch, p_dtype)
    if torch.finfo(p_dtype).bits == 16:
        values = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(p_dtype)
    else:
        values = torch.arange(256).to(torch.uint8).view(p_dtype)
    values = values[torch.isfinite(values.float())]
    nq = -(-values.numel() // nk)
    p_s = torch.zeros(nq * nk, dtype=p_dtype)
    p_s[:values.numel()] = values
    p_s = p_s.view(1, 1, nq, nk)
    d = 64
    q = torch.randn(1, 1, nq, d)
    k = torch.randn(1, 1, nk, d)
    v = torch.eye(d)[:nk].view(1, 1, nk, d)
    out = run_cpu(q, k, v, torch.zeros(1, 1, dtype=torch.long), ("probs", p_s), torch.zeros(1, nq))
    assert torch.equal(out[..., :nk], p_s.float()) and not out[..., nk:].any()


@pytest.mark.parametrize("rank", [5, 40])  # 40 > one tile of low-rank rows
@pytest.mark.parametrize("dtype,mask_kind", list(itertools.product(DTYPES, MASKS)))
def test_lowrank_source(rank, dtype, mask_kind):
    torch.manual_seed(3 + rank)
    b, h, nq, nk, d = 3, 2, 37, 70, 64
    q, k, v = qkv(b, h, nq, nk, d, dtype)
    kv_frames = resolve_frame_index([-2, -1, "last"], b)
    u = torch.randn(b, h, nq, rank).to(dtype)
    w = (torch.rand(b, h, rank, kv_frames.shape[1] * nk) / (rank * nk)).to(dtype)
    check(q, k, v, kv_frames, ("lowrank", u, w), make_mask(mask_kind, b, nq))


@pytest.mark.parametrize("dtype", DTYPES)
def test_uniform_masks_match_single_streams(dtype):
    """Mask all ones == plain attention; all zeros == P_s V_e; a mixed mask's 0/1 rows match both."""
    torch.manual_seed(4)
    b, h, nq, nk, d = 3, 2, 129, 70, 40
    q, k, v = qkv(b, h, nq, nk, d, dtype)
    q_s, k_s, _ = qkv(b, h, nq, nk, d, dtype)
    kv_frames = resolve_frame_index([-1, "first"], b)
    source = ("qk", q_s, k_s)
    plain = run_cpu(q, k, v, kv_frames)
    source_only = run_cpu(q_s, k_s, v, kv_frames)  # softmax(Q_s K_s^T s) V_e
    assert torch.equal(run_cpu(q, k, v, kv_frames, source, torch.ones(b, nq)), plain)
    assert torch.equal(run_cpu(q, k, v, kv_frames, source, torch.zeros(b, nq)), source_only)
    assert torch.equal(run_cpu(q, k, v, kv_frames, source, None), source_only)

    mask = make_mask("mixed", b, nq)
    mixed = run_cpu(q, k, v, kv_frames, source, mask)
    rows = mask.bool()[:, None, :].expand(b, h, nq)
    torch.testing.assert_close(mixed[rows], plain[rows], rtol=0, atol=0)
    torch.testing.assert_close(mixed[~rows], source_only[~rows], rtol=0, atol=0)

    # stored maps: mask all zeros is exactly P_s V_e
    p_s = probs_map(b, h, nq, kv_frames.shape[1] * nk, sharpness=3.0)
    expected = p_s.double() @ gather_frames(v, kv_frames).double()
    for m in (None, torch.zeros(b, nq)):
        out = run_cpu(q, k, v, kv_frames, ("probs", p_s), m)
        assert rel_err(out, expected) <= TOL[dtype]
    assert torch.equal(run_cpu(q, k, v, kv_frames, ("probs", p_s), torch.ones(b, nq)), plain)


def test_more_kv_frames_than_query_frames_and_custom_scale():
    """k/v may hold more frames than q (kv_frames indexes k's first axis); scale is honoured.

    The expected value is materialized here with an explicit per-frame concatenation:
    reference.gather_frames assumes k has as many frames as q.
    """
    torch.manual_seed(5)
    b, h, nq, nk, d = 2, 3, 37, 70, 40
    q, k, v = qkv(b, h, nq, nk, d, torch.float32, frames=5)
    q_s, k_s, _ = qkv(b, h, nq, nk, d, torch.float32, frames=5)
    kv_frames = torch.tensor([[4, 0, 4], [2, 2, 1]])

    def gather(x):  # (F, H, N, D) -> (B, H, R*N, D)
        return torch.stack([torch.cat([x[f] for f in row.tolist()], dim=1) for row in kv_frames]).double()

    def softmax_v(qq, kk, scale):
        return torch.softmax(qq.double() @ gather(kk).transpose(-1, -2) * scale, dim=-1) @ gather(v)

    out = run_cpu(q, k, v, kv_frames, scale=0.3)
    assert rel_err(out, softmax_v(q, k, 0.3)) <= 1e-5
    mask = make_mask("fractional", b, nq)
    out = run_cpu(q, k, v, kv_frames, ("qk", q_s, k_s), mask, scale=0.05)
    m = mask.double()[:, None, :, None]
    assert rel_err(out, m * softmax_v(q, k, 0.05) + (1 - m) * softmax_v(q_s, k_s, 0.05)) <= 1e-5


def test_noncontiguous_inputs_and_out():
    torch.manual_seed(6)
    b, h, nq, nk, d = 3, 2, 37, 70, 40
    q = torch.randn(b, nq, h, d).transpose(1, 2)  # (B, H, Nq, D) views, as diffusers hands them over
    k = torch.randn(b, nk, h, d).transpose(1, 2)
    v = torch.randn(b, nk, h, d).transpose(1, 2)
    kv_frames = resolve_frame_index([-1, "first"], b)
    out = torch.full((b, nq, h, d), float("nan")).transpose(1, 2)
    result = ops.blended_attention(q, k, v, kv_frames=kv_frames, backend="cpu", out=out)
    assert result is out and not torch.isnan(out).any()
    assert rel_err(out, reference64(q, k, v, kv_frames)) <= 1e-5
    assert cpu_backend.blended_attention(q, k, v, kv_frames, None, None, d ** -0.5).is_contiguous()


def test_bad_arguments_raise_clear_errors():
    torch.manual_seed(8)
    op = torch.ops.fatezero_fast.blended_attention
    q = torch.randn(2, 1, 8, 16)
    kv_frames = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="dtype"):
        op(q.double(), q.double(), q.double(), kv_frames, 0, None, None, None, None, 0.25, q.double())
    with pytest.raises(RuntimeError, match="kv_frames values"):
        op(q, q, q, kv_frames + 7, 0, None, None, None, None, 0.25, torch.empty_like(q))
    with pytest.raises(RuntimeError, match="head dim"):
        x = torch.randn(2, 1, 8, 12)
        op(x, x, x, kv_frames, 0, None, None, None, None, 0.25, torch.empty_like(x))
    with pytest.raises(RuntimeError, match="needs"):
        op(q, q, q, kv_frames, 1, None, None, None, None, 0.25, torch.empty_like(q))
    with pytest.raises(RuntimeError, match="P_s"):
        op(q, q, q, kv_frames, 2, torch.rand(2, 1, 8, 9), None, None, None, 0.25, torch.empty_like(q))
    with pytest.raises(RuntimeError, match="out"):
        op(q, q, q, kv_frames, 0, None, None, None, None, 0.25, torch.empty(2, 1, 8, 8))
