"""Triton backend of blended_attention against the float64 reference oracle.

Without CUDA this file runs the kernels in Triton's CPU interpreter: TRITON_INTERPRET=1 is set
below, at import, before anything imports Triton's kernels (Triton decides interpreted vs compiled
when a kernel is decorated, i.e. when `fatezero_fast.kernels` / `kernels` is first imported, which
the backend does lazily on first use). Run it as `python -m pytest -q tests/test_ops_triton.py`;
run with other test files, nothing collected earlier may import the kernels first. In the
interpreter bf16 tl.dot is wrong, so bf16 is tested on the GPU only. With CUDA the same small
cases run compiled on the GPU, and the `gpu`-marked class adds SD-1.4-sized shapes.
"""
import os

import torch

if not torch.cuda.is_available():  # must precede the first import of the Triton kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytest.importorskip("triton")

from attention_cases import (  # noqa: E402
    HEAD_DIMS,
    INDEX_LISTS,
    SD14_SHAPES,
    TOL,
    check_sd14,
    check_strided,
    make_mask,
    make_qkv,
    make_source,
    reference64,
    rel_err,
    run_poisoned,
)

from fatezero_fast import ops  # noqa: E402
from fatezero_fast.ops import reference  # noqa: E402
from fatezero_fast.ops.backends import triton as triton_backend  # noqa: E402
from fatezero_fast.semantics.frames import resolve_frame_index  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

gpu = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _no_first_use_check(monkeypatch):
    """Every call here is compared with the reference already; the self-check at first use would repeat
    that, and in the CPU interpreter it costs seconds per new combination (tests/test_dispatch.py tests it)."""
    monkeypatch.setenv("FATEZERO_FAST_SELFCHECK", "0")


def _require_backend():
    assert "triton" in ops.available_backends(DEVICE), (
        "the triton backend is not available on %s: on CPU, TRITON_INTERPRET=1 must be set before the "
        "Triton kernels are first imported" % DEVICE)


def _make_source(form, b, h, nq, nk, d, n_ref, dtype, gen, probs_dtype=None, rank=5, device=DEVICE):
    """A random source of the given form; returns (source for the kernel, source for the oracle)."""
    return make_source(form, b, h, nq, nk, d, n_ref, dtype, gen=gen, device=device, probs_dtype=probs_dtype,
                       rank=rank)


def _run_case(d, dtype, form, mask_kind, index_list, *, probs_dtype=None, b=3, h=2, nq=20, nk=37,
              seed=0, scale=None, rank=5):
    _require_backend()
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(b, h, nq, nk, d, dtype, gen=gen, device=DEVICE)
    kv_frames = resolve_frame_index(index_list, b).to(DEVICE)
    n_ref = kv_frames.shape[1]
    source, source64 = _make_source(form, b, h, nq, nk, d, n_ref, dtype, gen, probs_dtype, rank=rank)
    mask = make_mask(mask_kind, b, nq, gen=gen, device=DEVICE)
    out = run_poisoned("triton", q, k, v, kv_frames, source, mask, scale)
    err = rel_err(out, reference64(q, k, v, kv_frames, source64, mask, scale))
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]:g}"


# Each feature at each head dim at least once, not the full cross product (the interpreter is slow).
# (dtype, form, mask kind, index list, probs dtype)
_SCENARIOS = [
    (torch.float32, None, None, 0, None),
    (torch.float16, None, None, 2, None),
    (torch.float32, "qk", "mixed", 2, None),
    (torch.float16, "qk", "fractional", 1, None),
    (torch.float32, "probs", "mixed", 1, torch.float32),
    (torch.float16, "probs", "fractional", 2, torch.float16),
    (torch.float32, "probs", "fractional", 0, torch.float8_e4m3fn),
    (torch.float16, "probs", "mixed", 1, torch.float8_e4m3fn),
    (torch.float32, "lowrank", "fractional", 1, None),
    (torch.float16, "lowrank", "mixed", 2, None),
]


def _scenario_id(s):
    dtype, form, mask_kind, idx, probs_dtype = s
    parts = [str(dtype).replace("torch.", ""), form or "plain", mask_kind or "nomask", f"idx{idx}"]
    if probs_dtype is not None:
        parts.append("P" + str(probs_dtype).replace("torch.", ""))
    return "-".join(parts)


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("scenario", _SCENARIOS, ids=_scenario_id)
def test_matches_reference(d, scenario):
    dtype, form, mask_kind, idx, probs_dtype = scenario
    # vary the tails across head dims too: Nq/Nk never a multiple of the 16-wide tiles
    nq, nk = ((20, 37), (37, 20), (20, 37), (37, 20))[HEAD_DIMS.index(d)]
    _run_case(d, dtype, form, mask_kind, INDEX_LISTS[idx], probs_dtype=probs_dtype, nq=nq, nk=nk,
              seed=zlib.crc32(f"{d}-{_scenario_id(scenario)}".encode()) % 1000)


# Uniform masks (all 0, all 1) and no mask (full source) for every source form; head dims rotate.
@pytest.mark.parametrize("form", ["qk", "probs", "lowrank"])
@pytest.mark.parametrize("mask_kind", ["zeros", "ones", None])
def test_uniform_and_absent_masks(form, mask_kind):
    d = HEAD_DIMS[(["qk", "probs", "lowrank"].index(form) + [None, "zeros", "ones"].index(mask_kind)) % 4]
    for dtype in (torch.float32, torch.float16):
        _run_case(d, dtype, form, mask_kind, [-1, "first"], probs_dtype=torch.float16, nq=37, nk=20, h=1)


def test_plain_attention_single_frame_and_custom_scale():
    # Nq, Nk below one tile; R = 1 (frame attends to itself); non-default scale.
    _run_case(40, torch.float32, None, None, [], b=2, h=1, nq=9, nk=11, scale=0.3)
    _run_case(64, torch.float16, "qk", "fractional", [0], b=2, h=1, nq=9, nk=11, scale=0.2)


def test_lowrank_rank_above_one_chunk():
    # rank 70 > the kernel's 64-wide rank chunks; rank 1 below the 16-wide minimum tile
    _run_case(40, torch.float32, "lowrank", "fractional", [-1, "first"], b=2, h=1, rank=70)
    _run_case(80, torch.float16, "lowrank", "mixed", ["mid"], b=2, h=1, rank=1)


def test_uniform_blocks_skip_the_unused_stream():
    """All-1 blocks never read the source, all-0 blocks never compute the edit's scores.

    The unused input is NaN: had the kernel touched it, the NaN would reach the output. The
    expected output is the oracle with the unused input replaced (it does not matter there).
    """
    _require_backend()
    gen = torch.Generator().manual_seed(7)
    b, h, nq, nk, d = 2, 1, 32, 20, 40
    kv_frames = resolve_frame_index([-1, "first"], b).to(DEVICE)
    q = torch.randn(b, h, nq, d, generator=gen).to(DEVICE)
    k = torch.randn(b, h, nk, d, generator=gen).to(DEVICE)
    v = torch.randn(b, h, nk, d, generator=gen).to(DEVICE)
    for form in ("qk", "probs", "lowrank"):
        source, source64 = _make_source(form, b, h, nq, nk, d, 2, torch.float32, gen, torch.float32)
        # all ones: the source is irrelevant -> poison it
        poisoned = (form,) + tuple(torch.full_like(t, float("nan")) for t in source[1:])
        ones = torch.ones(b, nq, device=DEVICE)
        out = ops.blended_attention(q, k, v, kv_frames=kv_frames, source=poisoned, mask=ones, backend="triton")
        ref = reference.blended_attention_reference(q.double(), k.double(), v.double(), kv_frames=kv_frames)
        assert not torch.isnan(out).any(), f"{form}: an all-1 block read the source"
        assert rel_err(out, ref) <= 1e-5
        # all zeros: the edit's scores are irrelevant -> poison q (V stays: P_s V uses the edit's V)
        zeros = torch.zeros(b, nq, device=DEVICE)
        q_nan = torch.full_like(q, float("nan"))
        out = ops.blended_attention(q_nan, k, v, kv_frames=kv_frames, source=source, mask=zeros, backend="triton")
        ref = reference.blended_attention_reference(q.double(), k.double(), v.double(), kv_frames=kv_frames,
                                                    source=source64, mask=zeros.double())
        assert not torch.isnan(out).any(), f"{form}: an all-0 block computed the edit stream"
        assert rel_err(out, ref) <= 1e-5
    # blocks differ: rows 0-15 all 1, rows 16-31 all 0 (16-row blocks in the interpreter);
    # poisoning either input would reach a mixed block, so here only check the values.
    if DEVICE.type == "cpu":
        mask = torch.cat([torch.ones(b, 16), torch.zeros(b, 16)], dim=1)
        source, source64 = _make_source("qk", b, h, nq, nk, d, 2, torch.float32, gen)
        out = ops.blended_attention(q, k, v, kv_frames=kv_frames, source=source, mask=mask, backend="triton")
        ref = reference.blended_attention_reference(q.double(), k.double(), v.double(), kv_frames=kv_frames,
                                                    source=source64, mask=mask.double())
        assert rel_err(out, ref) <= 1e-5


def test_strided_inputs_and_allocated_output():
    """Non-contiguous q/k/v (diffusers' (B, N, H, D) viewed as (B, H, N, D)), out=None, bool mask."""
    _require_backend()
    check_strided("triton", nq=20, nk=20, device=DEVICE, gen=torch.Generator().manual_seed(3), tol=1e-5)


def test_available():
    assert triton_backend.available("cuda") == torch.cuda.is_available()
    if DEVICE.type == "cpu":
        assert triton_backend.available("cpu")
        saved = os.environ.pop("TRITON_INTERPRET")
        try:
            assert not triton_backend.available("cpu")
        finally:
            os.environ["TRITON_INTERPRET"] = saved


def test_pick_config_gpu_tiles():
    from fatezero_fast.ops.backends.triton import _load_kernels
    kernels = _load_kernels()
    for d in (8, 40, 64, 80, 128, 160, 256):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for form in (None, "qk", "probs", "lowrank"):
                cfg = kernels.pick_config(d, dtype, form, interpret=False)
                for key in ("BLOCK_M", "BLOCK_N", "BLOCK_D"):
                    assert cfg[key] >= 16 and cfg[key] & (cfg[key] - 1) == 0
                assert cfg["BLOCK_D"] >= d
                # rough shared-memory budget of one stage set (Hopper: ~227 KB per block)
                size = torch.empty((), dtype=dtype).element_size()
                tiles = 3 if form in ("qk", "probs") else 2
                smem = (2 * cfg["BLOCK_M"] * cfg["BLOCK_D"] + cfg["num_stages"] * tiles * cfg["BLOCK_N"]
                        * cfg["BLOCK_D"]) * size
                assert smem <= 200 * 1024, (d, dtype, form, cfg, smem)
    assert kernels.pick_config(40, torch.float16, None, interpret=True)["BLOCK_M"] == 16


def test_compile_check_sm90():
    """The kernel compiles for sm_90a with the installed Triton and its bundled ptxas, no GPU needed
    (tools/compile_check.py, a subprocess: it needs compiled, not interpreted, kernels)."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    import subprocess

    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "compile_check.py")
    res = subprocess.run([sys.executable, tool, "--dtypes", "fp16", "--head-dims", "40", "--forms", "qk,lowrank"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 failure(s); PTX target(s): sm_90a" in res.stdout, res.stdout


# ---------------------------------------------------------------------------------------------
# GPU: SD-1.4 shapes (8 frames x 8 heads; 64x64, 32x32, 16x16 latents), fp16 and bf16.

@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
class TestGPU:
    SHAPES = SD14_SHAPES

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("nq,d", SHAPES)
    @pytest.mark.parametrize("form", [None, "qk", "probs", "probs8", "lowrank"])
    def test_sd14_shapes(self, dtype, nq, d, form):
        index_list = [-1, "first", "last"] if form == "probs8" else [-1, "first"]
        check_sd14("triton", form or "plain", nq, d, dtype, index_list=index_list,
                   tol=TOL[dtype] if form != "probs8" else 2e-2)


def test_pipeline_end_to_end_equals_the_reference_backend():
    """The tiny pipeline's edit on the Triton backend (what `auto` runs on CUDA), fed the processors'
    real tensors: chunks of 2 of 3 frames (anchor K/V gathered across chunks) and, with a blend
    threshold of 1, the recompute store's source Q/K replacing the controlled self-attention at
    step 0. Against the materialized reference backend, from the same inversion."""
    from fatezero_fast.edit.pipeline import FateZeroPipeline
    from fatezero_fast.unet.processors import VideoAttentionConfig

    _require_backend()
    pipe = FateZeroPipeline.tiny_random(seed=0, device=DEVICE, dtype="fp32",
                                        attention=VideoAttentionConfig(backend="reference"))
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    inversion = pipe.invert(None, "a red car driving down a road", 2, latents=latents, progress=False, chunk_size=2)
    results = {}
    for backend in ("triton", "reference"):
        pipe.state.config.backend = backend
        results[backend] = pipe.edit(inversion, "a blue car driving down a road", decode=False, progress=False,
                                     chunk_size=2, blend_words=[["car"], ["car"]], blend_self_attention=True,
                                     blend_th=(1.0, 1.0))
    assert results["reference"].masks["self_attention"].max() == 0  # step 0 takes the source in full
    assert rel_err(results["triton"].latents, results["reference"].latents) < 1e-5
