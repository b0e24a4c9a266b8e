"""The CUDA kernel (csrc/blended_attention_cuda.cu) against the float64 reference oracle.

GPU tests (marked `gpu`) are skipped unless CUDA is usable and fatezero_fast._C was built with
the CUDA kernel. Every kernel call writes into an `out` pre-filled with NaN, so an element the
kernel forgets to write fails. Error = max |out - ref| / max |ref| against the float64 oracle:
2e-3 for fp16 and 2e-2 for bf16 inputs (a float8 P_s is exact in either, so it gets its
input dtype's bound). Small shapes are deliberately not multiples of the kernel's tiles
(64 query rows, 64 or 32 keys); SD-1.4 shapes are 8 frames x 8 heads at 64x64, 32x32 and 16x16
latents, where the float8 map at 4096 tokens and R = 3 has more than 2**31 elements.

The CPU-only tests check `available()` and the ValueErrors of what the kernel does not cover.
"""
import zlib

import pytest
import torch
from attention_cases import (
    INDEX_LISTS,
    MASKS,
    SD14_SHAPES,
    TOL,
    check_sd14,
    check_strided,
    chunked_oracle_err,
    make_mask,
    make_qkv,
    make_source,
    reference64,
    rel_err,
    run_poisoned,
)

from fatezero_fast import ops
from fatezero_fast.ops.backends import cuda as cuda_backend
from fatezero_fast.semantics.frames import resolve_frame_index

TOL = {dtype: TOL[dtype] for dtype in (torch.float16, torch.bfloat16)}  # the kernel takes fp16 and bf16
# (form, P_s dtype, with row scale)
SOURCES = (
    (None, None, False),
    ("qk", None, False),
    ("probs", torch.float16, False),
    ("probs", torch.float8_e4m3fn, True),
    ("probs", torch.float32, False),
    ("probs", torch.bfloat16, True),
)

_HAVE_KERNEL = torch.cuda.is_available() and cuda_backend.available()
gpu = pytest.mark.gpu
needs_kernel = pytest.mark.skipif(not _HAVE_KERNEL, reason=f"the CUDA kernel is not available "
                                  f"({cuda_backend.load_error() if not _HAVE_KERNEL else ''})")


# ---------------------------------------------------------------------------------------------
# helpers

def _run_case(d, dtype, source_spec, mask_kind, index_list, *, b=3, h=2, nq=37, nk=70, seed=0, scale=None,
              head_chunk=8):
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(seed)
    form, pdtype, with_scale = source_spec
    q, k, v = make_qkv(b, h, nq, nk, d, dtype, gen=gen, device=dev, q_scale=1.5)
    kv_frames = resolve_frame_index(index_list, b).to(dev)
    n_ref = kv_frames.shape[1]
    source, src64 = make_source(form, b, h, nq, nk, d, n_ref, dtype, gen=gen, device=dev, probs_dtype=pdtype,
                                row_scale=with_scale, q_scale=1.5)
    mask = None if form is None else make_mask(mask_kind, b, nq, gen=gen, device=dev, block=64)
    out = run_poisoned("cuda", q, k, v, kv_frames, source, mask, scale)
    tol = TOL[dtype]
    err = chunked_oracle_err(out, q, k, v, kv_frames, src64, mask, d ** -0.5 if scale is None else scale,
                             head_chunk)
    assert err <= tol, f"relative error {err:.3g} > {tol:g}"


def _source_id(s):
    form, pdtype, with_scale = s
    if form is None:
        return "plain"
    if form == "qk":
        return "qk"
    return "probs-" + str(pdtype).replace("torch.", "") + ("-rs" if with_scale else "")


# ---------------------------------------------------------------------------------------------
# CPU-only checks

def test_available_is_a_bool_and_false_without_cuda():
    assert isinstance(cuda_backend.available(), bool)
    assert cuda_backend.available("cpu") is False
    if not torch.cuda.is_available():
        assert cuda_backend.available() is False
        assert "cuda" not in ops.available_backends("cuda")
        assert cuda_backend.load_error()


def test_unsupported_inputs_raise_value_error():
    q = torch.zeros(1, 1, 4, 40, dtype=torch.float32)
    kv = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="float16 and bfloat16"):
        cuda_backend.blended_attention(q, q, q, kv, None, None, 0.1)
    h = q.half()
    lowrank = ("lowrank", torch.zeros(1, 1, 4, 2, dtype=torch.float16), torch.zeros(1, 1, 2, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="triton"):
        cuda_backend.blended_attention(h, h, h, kv, lowrank, None, 0.1)


# ---------------------------------------------------------------------------------------------
# GPU: small shapes with tails, every source form, mask kind, head-dim bucket and dtype

@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("source_spec", SOURCES, ids=_source_id)
@pytest.mark.parametrize("d", [8, 40, 64, 80, 104, 160, 200, 256])
def test_small_odd_shapes(d, source_spec, dtype):
    masks = ("none",) if source_spec[0] is None else MASKS
    for i, mask_kind in enumerate(masks):
        seed = zlib.crc32(f"{d}-{_source_id(source_spec)}-{dtype}-{mask_kind}".encode()) % 10000
        _run_case(d, dtype, source_spec, mask_kind, INDEX_LISTS[(i + d) % 3], nq=37, nk=70, seed=seed)


@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("source_spec", SOURCES, ids=_source_id)
@pytest.mark.parametrize("nq,nk", [(150, 128), (130, 64), (70, 200), (64, 16)])
def test_several_blocks_and_aligned_maps(nq, nk, source_spec, dtype):
    """Several query blocks (uniform and mixed), several key tiles per frame, and Nk * size % 16
    == 0 (the 16-byte P_s copy path; Nk = 70 above takes the element-wise one)."""
    for i, d in enumerate((40, 80, 160, 256)):
        mask_kind = "none" if source_spec[0] is None else ("mixed", "fractional", "zeros", "ones")[i]
        _run_case(d, dtype, source_spec, mask_kind, INDEX_LISTS[i % 3], b=2, h=2, nq=nq, nk=nk,
                  seed=zlib.crc32(f"{nq}-{nk}-{d}-{_source_id(source_spec)}-{dtype}".encode()) % 10000)


@gpu
@needs_kernel
def test_custom_scale_single_frame_and_more_kv_frames_than_queries():
    _run_case(40, torch.float16, (None, None, False), "none", [], b=2, h=1, nq=9, nk=11, scale=0.3)
    _run_case(64, torch.float16, ("qk", None, False), "fractional", [0], b=2, h=1, nq=9, nk=11, scale=0.2)
    # k/v hold 5 frames, q only the first 2 (chunked long videos)
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(5)
    q = torch.randn(2, 2, 70, 48, generator=gen, device=dev).half()
    k = torch.randn(5, 2, 64, 48, generator=gen, device=dev).half()
    v = torch.randn(5, 2, 64, 48, generator=gen, device=dev).half()
    kv_frames = torch.tensor([[4, 0], [1, 3]], device=dev)
    q_s, k_s = torch.randn_like(q), torch.randn_like(k)
    mask = (torch.rand(2, 70, generator=gen, device=dev) > 0.5).float()
    out = torch.full_like(q, float("nan"))
    ops.blended_attention(q, k, v, kv_frames=kv_frames, source=("qk", q_s, k_s), mask=mask, backend="cuda", out=out)
    ref = reference64(q, k, v, kv_frames, ("qk", q_s.double(), k_s.double()), mask)
    assert rel_err(out, ref) <= TOL[torch.float16]


@gpu
@needs_kernel
def test_uniform_blocks_skip_the_unused_stream():
    """All-1 blocks never read the source; all-0 blocks never read q (nor k with 'probs')."""
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(7)
    b, h, nq, nk, d = 2, 2, 130, 70, 40
    kv_frames = resolve_frame_index([-1, "first"], b).to(dev)
    q = torch.randn(b, h, nq, d, generator=gen, device=dev).half()
    k = torch.randn(b, h, nk, d, generator=gen, device=dev).half()
    v = torch.randn(b, h, nk, d, generator=gen, device=dev).half()
    ones, zeros = torch.ones(b, nq, device=dev), torch.zeros(b, nq, device=dev)
    nan = float("nan")
    # all ones: a NaN source must not reach the output
    ref = reference64(q, k, v, kv_frames)
    for source in (("qk", torch.full_like(q, nan), torch.full_like(k, nan)),
                   ("probs", torch.full((b, h, nq, 2 * nk), nan, device=dev))):
        out = ops.blended_attention(q, k, v, kv_frames=kv_frames, source=source, mask=ones, backend="cuda")
        assert not torch.isnan(out).any(), f"{source[0]}: an all-1 block read the source"
        assert rel_err(out, ref) <= TOL[torch.float16]
    # all zeros: the edit's q (and k) are irrelevant
    q_s, k_s = torch.randn_like(q), torch.randn_like(k)
    p_s = torch.softmax(torch.randn(b, h, nq, 2 * nk, generator=gen, device=dev), -1)
    for source, k_in in ((("qk", q_s, k_s), k), (("probs", p_s), torch.full_like(k, nan))):
        out = ops.blended_attention(torch.full_like(q, nan), k_in, v, kv_frames=kv_frames, source=source,
                                    mask=zeros, backend="cuda")
        src64 = (source[0],) + tuple(t.double() for t in source[1:])
        ref = reference64(q, k, v, kv_frames, src64, zeros)
        assert not torch.isnan(out).any(), f"{source[0]}: an all-0 block computed the edit stream"
        assert rel_err(out, ref) <= TOL[torch.float16]


@gpu
@needs_kernel
def test_strided_inputs_bool_mask_and_strided_out():
    """Non-contiguous q/k/v, out=None, bool mask, a column-major P_s and an out given as a strided view."""
    dev = torch.device("cuda")
    check_strided("cuda", nq=70, nk=70, dtype=torch.float16, device=dev,
                  gen=torch.Generator(device=dev).manual_seed(3))


@gpu
@needs_kernel
def test_op_checks_and_bad_frames():
    """The C++ op's own checks (the Python layer normally stops these first), and NaN rows
    (never a memory fault) for a query frame whose kv_frames are out of range."""
    dev = torch.device("cuda")
    q = torch.randn(2, 1, 70, 40, device=dev).half()
    kv_frames = torch.tensor([[0, 1], [1, 7]], device=dev)
    out = torch.zeros_like(q)
    op = torch.ops.fatezero_fast.blended_attention
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        op(q.float(), q.float(), q.float(), kv_frames, 0, None, None, None, None, 0.1, out.float())
    with pytest.raises(RuntimeError, match="triton"):
        op(q, q, q, kv_frames, 3, None, None, None, None, 0.1, out)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(q.transpose(2, 3).contiguous().transpose(2, 3), q, q, kv_frames, 0, None, None, None, None, 0.1, out)
    op(q, q, q, kv_frames, 0, None, None, None, None, 0.1, out)
    torch.cuda.synchronize()
    assert torch.isfinite(out[0]).all()
    assert torch.isnan(out[1]).all()


# ---------------------------------------------------------------------------------------------
# GPU: SD-1.4 shapes (8 frames x 8 heads; 64x64, 32x32, 16x16 latents)

@gpu
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("nq,d", SD14_SHAPES)
@pytest.mark.parametrize("form", ["plain", "qk", "probs", "probs8"])
def test_sd14_shapes(form, nq, d, dtype):
    check_sd14("cuda", form, nq, d, dtype)
