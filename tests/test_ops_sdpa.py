"""The sdpa backend (torch's scaled_dot_product_attention composed) against the float64 reference.

Tested like the other backends (tests/attention_cases.py): outputs poisoned with NaN before every
call, Nq and Nk that are multiples of nothing, R = 1 to 3, every source form and stored-map dtype,
fractional and uniform masks, head dims 40/64/80/160, fp32 and fp16 (and bf16, float64 on the CPU),
plus fuzzed shapes. Runs on the CPU, and on CUDA when there is one (the `gpu` class adds SD-1.4 sizes).
"""
import zlib

import pytest
import torch
from attention_cases import (
    DTYPES,
    FORMS,
    HEAD_DIMS,
    INDEX_LISTS,
    MASKS,
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
from torch.utils import _pytree
from torch.utils._python_dispatch import TorchDispatchMode

from fatezero_fast import ops
from fatezero_fast.ops.backends import sdpa as sdpa_backend
from fatezero_fast.semantics.frames import resolve_frame_index

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
gpu = pytest.mark.gpu

if not sdpa_backend.available(DEVICE):
    pytest.skip(f"the sdpa backend is not available ({sdpa_backend.load_error(DEVICE)})", allow_module_level=True)


def run_case(d, dtype, form, mask_kind, index_list, *, probs_dtype=None, row_scale=False, b=3, h=2, nq=37, nk=70,
             seed=0, scale=None, rank=5, frames=None, device=DEVICE):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(b, h, nq, nk, d, dtype, frames=frames, gen=gen, device=device, q_scale=1.5)
    kv_frames = (resolve_frame_index(index_list, b) if frames is None else
                 torch.randint(0, frames, (b, len(index_list) or 1), generator=gen)).to(device)
    source, src64 = make_source(form, b, h, nq, nk, d, kv_frames.shape[1], dtype, gen=gen, device=device,
                                probs_dtype=probs_dtype, row_scale=row_scale, rank=rank, frames=frames)
    mask = None if form is None else make_mask(mask_kind, b, nq, gen=gen, device=device)
    out = run_poisoned("sdpa", q, k, v, kv_frames, source, mask, scale)
    err = rel_err(out, reference64(q, k, v, kv_frames, src64, mask, scale))
    tol = TOL.get(dtype, 1e-10)
    assert err <= tol, f"relative error {err:.3g} > {tol:g} ({dtype}, {form}, {mask_kind})"
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("form", (None,) + FORMS)
def test_every_form_head_dim_and_dtype(form, d, dtype):
    masks = ("none",) if form is None else MASKS
    for i, mask_kind in enumerate(masks):
        seed = zlib.crc32(f"{form}-{d}-{dtype}-{mask_kind}".encode()) % 10000
        run_case(d, dtype, form, mask_kind, INDEX_LISTS[(i + d) % 3], seed=seed,
                 nq=(37, 129, 70, 37)[HEAD_DIMS.index(d)], nk=(70, 37, 129, 70)[HEAD_DIMS.index(d)])


@pytest.mark.parametrize("probs_dtype,row_scale", [(torch.float32, False), (torch.float16, False),
                                                   (torch.bfloat16, True), (torch.float8_e4m3fn, True)],
                         ids=["fp32", "fp16", "bf16-scaled", "fp8-scaled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mask_kind", ["fractional", "none"])
def test_stored_map_dtypes(probs_dtype, row_scale, dtype, mask_kind):
    run_case(40, dtype, "probs", mask_kind, [-1, "first"], probs_dtype=probs_dtype, row_scale=row_scale,
             nq=300, nk=53, seed=11)  # 300 rows: several map blocks


# fuzzed shapes: Nq, Nk multiples of nothing, R of 1-3, every form and mask kind, fp32 and fp16
_FUZZ_RNG = torch.Generator().manual_seed(2024)
_FUZZ = []
for _i in range(40):
    def _pick(options, rng=_FUZZ_RNG):
        return options[int(torch.randint(len(options), (1,), generator=rng))]
    _FUZZ.append(dict(d=_pick(HEAD_DIMS), dtype=_pick([torch.float32, torch.float16]),
                      form=_pick([None] + list(FORMS)), mask_kind=_pick(MASKS), index_list=_pick(INDEX_LISTS),
                      nq=int(torch.randint(1, 260, (1,), generator=_FUZZ_RNG)),
                      nk=int(torch.randint(1, 200, (1,), generator=_FUZZ_RNG)),
                      b=int(torch.randint(1, 5, (1,), generator=_FUZZ_RNG)),
                      h=int(torch.randint(1, 4, (1,), generator=_FUZZ_RNG)),
                      probs_dtype=_pick([None, torch.float16, torch.float8_e4m3fn]), seed=_i))


@pytest.mark.parametrize("case", _FUZZ, ids=lambda c: "{form}-d{d}-{dt}-{mask_kind}-R{r}-nq{nq}-nk{nk}-b{b}h{h}".format(
    dt=str(c["dtype"])[6:], r=len(c["index_list"]), **{k: v for k, v in c.items() if k != "index_list"}))
def test_fuzzed_shapes(case):
    case = dict(case)
    run_case(case.pop("d"), case.pop("dtype"), case.pop("form"), case.pop("mask_kind"), case.pop("index_list"),
             **case)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="float64 and bf16 run on the CPU")
@pytest.mark.parametrize("form", (None,) + FORMS)
def test_float64_and_bf16_on_cpu(form):
    run_case(64, torch.float64, form, "fractional", [-1, "first"], seed=3, probs_dtype=torch.float64)
    run_case(80, torch.bfloat16, form, "mixed", [-2, -1, "last"], seed=4)


def test_more_kv_frames_than_query_frames_and_custom_scale():
    """k/v (and k_s) hold 5 frames, q 2 (chunked runs); kv_frames index k's first axis; scale honoured."""
    for form in (None,) + FORMS:
        run_case(40, torch.float32, form, "fractional", [-1, "first", 0], b=2, frames=5, nq=37, nk=70, scale=0.07,
                 seed=5)


def test_uniform_masks_run_only_the_needed_stream(monkeypatch):
    """All ones: only the edit stream runs (a NaN source never reaches the output); all zeros or no
    mask: only the source stream (a NaN q never does); mixed: both. Counted by the SDPA calls made."""
    calls = []
    real = sdpa_backend._sdpa

    def counting(q, k, v, scale):
        calls.append(q)
        return real(q, k, v, scale)

    monkeypatch.setattr(sdpa_backend, "_sdpa", counting)
    gen = torch.Generator().manual_seed(7)
    b, h, nq, nk, d = 2, 2, 45, 33, 40
    q, k, v = make_qkv(b, h, nq, nk, d, torch.float32, gen=gen, device=DEVICE)
    kv_frames = resolve_frame_index([-1, "first"], b).to(DEVICE)
    nan = float("nan")
    for form in FORMS:
        source, src64 = make_source(form, b, h, nq, nk, d, 2, torch.float32, gen=gen, device=DEVICE)
        poisoned = (form,) + tuple(torch.full_like(t, nan) for t in source[1:])
        calls.clear()
        out = run_poisoned("sdpa", q, k, v, kv_frames, poisoned, torch.ones(b, nq, device=DEVICE))
        assert len(calls) == 1 and rel_err(out, reference64(q, k, v, kv_frames)) <= TOL[torch.float32]
        for mask in (torch.zeros(b, nq, device=DEVICE), None):
            calls.clear()
            out = run_poisoned("sdpa", torch.full_like(q, nan), k, v, kv_frames, source, mask)
            assert len(calls) == (1 if form == "qk" else 0)
            ref = reference64(q, k, v, kv_frames, src64, None if mask is None else mask)
            assert rel_err(out, ref) <= TOL[torch.float32]
        calls.clear()
        mask = make_mask("mixed", b, nq, gen=gen, device=DEVICE)
        out = run_poisoned("sdpa", q, k, v, kv_frames, source, mask)
        assert len(calls) == (2 if form == "qk" else 1)
        assert rel_err(out, reference64(q, k, v, kv_frames, src64, mask)) <= TOL[torch.float32]


class _LargestTensor(TorchDispatchMode):
    """The largest tensor (elements) that a torch op creates while the mode is on."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("form", (None,) + FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_memory_is_linear_no_nq_by_nk_tensor(form, dtype):
    """No torch op inside the backend creates a tensor of Nq x R*Nk per frame and head, or anything
    bigger than the gathered K/V or one stored-map block (about the output's size): SDPA's fused
    kernels only (no math fallback), P_s V_e block by block, U (W V_e) for the low-rank form."""
    gen = torch.Generator().manual_seed(9)
    b, h, nq, nk, d = 2, 2, 600, 500, 40
    q, k, v = make_qkv(b, h, nq, nk, d, dtype, gen=gen, device=DEVICE)
    kv_frames = resolve_frame_index([-1, "first"], b).to(DEVICE)
    source, _ = make_source(form, b, h, nq, nk, d, 2, dtype, gen=gen, device=DEVICE)
    mask = None if form is None else make_mask("mixed", b, nq, gen=gen, device=DEVICE)
    with _LargestTensor() as mode:
        ops.blended_attention(q, k, v, kv_frames=kv_frames, source=source, mask=mask, backend="sdpa")
    gathered = b * h * 2 * nk * d
    block = b * h * sdpa_backend._block_rows(nq, d, 2 * nk) * 2 * nk
    assert mode.largest <= max(gathered, block, q.numel()), mode.largest
    assert mode.largest * 8 < b * h * nq * 2 * nk  # far below one map


def test_strided_inputs_bool_mask_and_strided_out():
    check_strided("sdpa", nq=45, nk=38, device=DEVICE, gen=torch.Generator().manual_seed(3))


def test_capabilities_and_errors():
    caps = sdpa_backend.CAPABILITIES
    assert set(caps.devices) == {"cpu", "cuda"} and torch.float64 in caps.dtypes["cpu"]
    assert torch.float64 not in caps.dtypes["cuda"]
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="at least one key"):
        sdpa_backend.blended_attention(q, q[:, :, :0], q[:, :, :0], torch.zeros(1, 1, dtype=torch.long), None, None,
                                       0.3)
    assert sdpa_backend.blended_attention(q[:, :, :0], q, q, torch.zeros(1, 1, dtype=torch.long), None, None,
                                          0.3).shape == (1, 1, 0, 8)


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("nq,d", SD14_SHAPES)
@pytest.mark.parametrize("form", ["plain", "qk", "probs", "probs8", "lowrank"])
def test_sd14_shapes(form, nq, d, dtype):
    check_sd14("sdpa", form, nq, d, dtype)


def test_cases_cover_the_issue():
    """Fuzzing reaches every form, R and mask kind, and shapes that are multiples of nothing."""
    assert {c["form"] for c in _FUZZ} == {None, *FORMS}
    assert {len(c["index_list"]) for c in _FUZZ} == {1, 2, 3}
    assert {c["mask_kind"] for c in _FUZZ} == set(MASKS)
    assert any(c["nq"] % 2 and c["nk"] % 2 for c in _FUZZ)
