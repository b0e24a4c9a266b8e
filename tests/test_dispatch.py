"""Dispatch as data: capabilities, auto's priority lists (default and measured), the self-check at
first use with its fallback, and explicit backends that fail (an error, never a fallback)."""
import json
import warnings

import pytest
import torch
from attention_cases import TOL, make_mask, make_qkv, make_source, reference64, rel_err

from fatezero_fast import ops
from fatezero_fast.io.cli import main
from fatezero_fast.ops import dispatch, selfcheck, selftest
from fatezero_fast.ops.backends import sdpa as sdpa_backend
from fatezero_fast.ops.capabilities import Call
from fatezero_fast.ops.dispatch import Backend, BackendWarning
from fatezero_fast.ops.source import Source, SourceForm
from fatezero_fast.semantics.frames import resolve_frame_index


@pytest.fixture(autouse=True)
def fresh_dispatch(monkeypatch):
    monkeypatch.delenv(selfcheck.ENV_SWITCH, raising=False)
    dispatch.reset()
    yield
    dispatch.reset()


class _Broken:
    """A backend module stand-in: available everywhere, wrong values (`mode="wrong"`) or an exception."""

    def __init__(self, mode, real=None):
        self.mode, self.real, self.calls = mode, real, 0

    def load_error(self, device=None):
        return None

    def blended_attention(self, q, k, v, kv_frames, source, mask, scale, out=None):
        self.calls += 1
        if self.mode == "raise":
            raise RuntimeError("illegal memory access (simulated)")
        result = self.real.blended_attention(q, k, v, kv_frames, source, mask, scale, out=out)
        return result.mul_(1.01)  # 1% off: far beyond every tolerance


def _install(monkeypatch, name, mode):
    """Replace backend `name` by a broken one; its wrong values are sdpa's result 1% off."""
    real = dispatch.BACKENDS_BY_NAME[name]
    broken = _Broken(mode, sdpa_backend)
    monkeypatch.setitem(dispatch.BACKENDS_BY_NAME, name, Backend(name, real.capabilities, broken))
    return broken


def _case(form="qk", dtype=torch.float32, d=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, h, nq, nk = 3, 2, 37, 29
    q, k, v = make_qkv(b, h, nq, nk, d, dtype, gen=gen)
    kv_frames = resolve_frame_index([-1, "first"], b)
    source, src64 = make_source(form, b, h, nq, nk, d, 2, dtype, gen=gen)
    mask = make_mask("fractional", b, nq, gen=gen) if form else None
    return (q, k, v, kv_frames, source, mask), reference64(q, k, v, kv_frames, src64, mask)


def _auto(q, k, v, kv_frames, source, mask, backend="auto"):
    return ops.blended_attention(q, k, v, kv_frames=kv_frames, source=source, mask=mask, backend=backend)


def test_default_order_on_cpu():
    order, origin = dispatch.priority("cpu", torch.float32)
    assert order == ["cpu", "sdpa", "reference"] and origin == "default order"
    assert dispatch.choose(Call("cpu", torch.float32, 40, SourceForm.QK, mask=True)) == \
        ("cpu" if dispatch.BACKENDS_BY_NAME["cpu"].unavailable("cpu") is None else "sdpa")
    # float64: the C++ kernel does not take it, sdpa does
    assert dispatch.choose(Call("cpu", torch.float64, 40, SourceForm.NONE)) == "sdpa"


@pytest.mark.parametrize("mode", ["wrong", "raise"])
def test_auto_falls_back_with_one_warning_and_still_equals_the_reference(monkeypatch, mode):
    broken = _install(monkeypatch, "cpu", mode)
    args, ref = _case()
    with pytest.warns(BackendWarning, match=r"'cpu' backend failed its self-check on cpu float32 d=40 qk") as rec:
        out = _auto(*args)
    assert len(rec) == 1
    assert ("relative error" if mode == "wrong" else "raised RuntimeError: illegal memory access") in str(rec[0].message)
    assert rel_err(out, ref) <= TOL[torch.float32]
    assert broken.calls == 1  # only the check ran it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cached for the process: no second check, no second warning
        assert rel_err(_auto(*args), ref) <= TOL[torch.float32]
    assert broken.calls == 1
    assert dispatch.choose(Call.of(args[0], Source.of(args[4]), args[5])) == "sdpa"


@pytest.mark.parametrize("mode", ["wrong", "raise"])
def test_an_explicit_backend_that_fails_is_an_error(monkeypatch, mode):
    _install(monkeypatch, "sdpa", mode)
    args, _ = _case("probs")
    with pytest.raises(RuntimeError, match=r"backend 'sdpa' failed its self-check on cpu float32 d=40 probs"):
        _auto(*args, backend="sdpa")


def test_selfcheck_switch_off(monkeypatch):
    """FATEZERO_FAST_SELFCHECK=0: no check, so a wrong first backend is used as it is (what the check prevents)."""
    broken = _install(monkeypatch, "cpu", "wrong")
    monkeypatch.setenv(selfcheck.ENV_SWITCH, "0")
    args, ref = _case()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _auto(*args)
    assert broken.calls == 1 and rel_err(out, ref) > 1e-3
    monkeypatch.setenv(selfcheck.ENV_SWITCH, "1")
    with pytest.warns(BackendWarning):
        assert rel_err(_auto(*args), ref) <= TOL[torch.float32]


def test_every_backend_failing_ends_at_the_reference_with_a_warning(monkeypatch):
    _install(monkeypatch, "cpu", "raise")
    _install(monkeypatch, "sdpa", "wrong")
    args, ref = _case("lowrank")
    with pytest.warns(BackendWarning) as rec:
        out = _auto(*args)
    messages = [str(r.message) for r in rec]
    assert any("'cpu' backend failed" in m for m in messages) and any("'sdpa' backend failed" in m for m in messages)
    assert any("falls back to the materialized reference" in m for m in messages)
    assert rel_err(out, ref) <= TOL[torch.float32]


def test_capabilities_give_one_line_reasons():
    cuda_caps = dispatch.BACKENDS_BY_NAME["cuda"].capabilities
    fp32 = Call("cuda:0", torch.float32, 40, SourceForm.QK, mask=True)
    assert "float32" in cuda_caps.why_not(fp32) and "\n" not in cuda_caps.why_not(fp32)
    assert "lowrank" in cuda_caps.why_not(Call("cuda:0", torch.float16, 40, SourceForm.LOWRANK))
    assert cuda_caps.why_not(Call("cuda:0", torch.float16, 40, SourceForm.PROBS, torch.float8_e4m3fn, True)) is None
    assert "cuda" in cuda_caps.why_not(Call("cpu", torch.float16, 40, SourceForm.NONE))
    triton_caps = dispatch.BACKENDS_BY_NAME["triton"].capabilities
    assert "interpreter" in triton_caps.why_not(Call("cpu", torch.bfloat16, 40, SourceForm.NONE))
    assert "head dim 44" in dispatch.BACKENDS_BY_NAME["sdpa"].capabilities.why_not(
        Call("cpu", torch.float32, 44, SourceForm.NONE))


def _pretend_cuda(monkeypatch, triton=True, cuda=True):
    """Backends report themselves available on a (non-existent) CUDA device; nothing runs there."""
    for name, ok in (("triton", triton), ("cuda", cuda), ("sdpa", True)):
        real = dispatch.BACKENDS_BY_NAME[name]
        fake = type("Fake", (), {"load_error": staticmethod(lambda device=None, ok=ok: None if ok else "absent")})
        monkeypatch.setitem(dispatch.BACKENDS_BY_NAME, name, Backend(name, real.capabilities, fake))
    monkeypatch.setenv(selfcheck.ENV_SWITCH, "0")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")


def test_cuda_order_default_and_capabilities(monkeypatch, tmp_path):
    monkeypatch.setenv("FATEZERO_FAST_RESULTS", str(tmp_path))  # no measurements there
    _pretend_cuda(monkeypatch)
    assert dispatch.priority("cuda:0", torch.float16) == (["triton", "cuda", "sdpa", "reference"], "default order")
    assert dispatch.choose(Call("cuda:0", torch.float16, 40, SourceForm.QK, mask=True)) == "triton"
    dispatch.reset()
    _pretend_cuda(monkeypatch, triton=False)
    # without Triton: fp16 takes the CUDA kernel; fp32 (which the CUDA kernel does not take) and low-rank take sdpa
    assert dispatch.choose(Call("cuda:0", torch.float16, 40, SourceForm.QK, mask=True)) == "cuda"
    assert dispatch.choose(Call("cuda:0", torch.float32, 40, SourceForm.QK, mask=True)) == "sdpa"
    assert dispatch.choose(Call("cuda:0", torch.float16, 40, SourceForm.LOWRANK, mask=True)) == "sdpa"


def _record(impl, ms, mode="plain", shape="64x64", dtype="float16"):
    return dict(impl=impl, median_ms=ms, mode=mode, shape=shape, index_name="mid", dtype=dtype, status="ok")


def test_cuda_order_from_measured_results(monkeypatch, tmp_path):
    records = [_record("ours[triton]", 2.0), _record("ours[cuda]", 1.0), _record("ours[sdpa]", 1.5),
               _record("ours[triton] qk", 4.0, "blend20"), _record("ours[cuda] qk", 2.5, "blend20"),
               _record("ours[sdpa] qk", 3.0, "blend20"), _record("ours[triton,direct]", 0.1),
               _record("sdpa[cudnn] pregathered", 0.5), _record("ours[sdpa]", 0.1, dtype="bfloat16")]
    (tmp_path / "attention_cuda.json").write_text(json.dumps({"environment": {"device": "Fake GPU"},
                                                              "records": records}))
    (tmp_path / "attention_cuda_other.json").write_text(json.dumps({"environment": {"device": "Other GPU"},
                                                                    "records": [_record("ours[triton]", 0.01)]}))
    monkeypatch.setenv("FATEZERO_FAST_RESULTS", str(tmp_path))
    _pretend_cuda(monkeypatch)
    order, origin = dispatch.priority("cuda:0", torch.float16)
    assert order == ["cuda", "sdpa", "triton", "reference"]
    assert "Fake GPU" in origin and "attention_cuda.json" in origin and "other" not in origin
    # bf16 has one backend per case there, which ranks nothing: the order of all dtypes pooled
    assert dispatch.order_from_results(records, "bfloat16") == ["cuda", "sdpa", "triton"]
    assert dispatch.priority("cuda:0", torch.bfloat16)[0] == ["cuda", "sdpa", "triton", "reference"]
    assert dispatch.choose(Call("cuda:0", torch.float16, 40, SourceForm.QK, mask=True)) == "cuda"
    # an unsupported call walks on: fp32 is not the CUDA kernel's
    assert dispatch.choose(Call("cuda:0", torch.float32, 40, SourceForm.QK, mask=True)) == "sdpa"


def test_selfcheck_verdicts():
    for name in ("sdpa",) + (("cpu",) if dispatch.BACKENDS_BY_NAME["cpu"].unavailable("cpu") is None else ()):
        for call in (Call("cpu", torch.float16, 64, SourceForm.PROBS, torch.float8_e4m3fn, True, False),
                     Call("cpu", torch.float32, 160, SourceForm.LOWRANK, mask=True),
                     Call("cpu", torch.bfloat16, 80, SourceForm.QK, mask=True)):
            verdict = selfcheck.check(dispatch.BACKENDS_BY_NAME[name].run, call)
            assert verdict.ok and verdict.error <= TOL[call.dtype], (name, call, verdict)

    def unwritten(q, k, v, kv_frames, source, mask, scale, out=None):
        return out  # never writes: the NaN poison stays

    verdict = selfcheck.check(unwritten, Call("cpu", torch.float32, 40, SourceForm.NONE))
    assert not verdict.ok and "NaN" in verdict.problem


def test_info_prints_order_and_reasons(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "blended_attention on cpu, float32: auto tries " in out and "reference (default order)" in out
    assert "cuda      not available: runs on cuda only" in out
    assert "self-check at first use: on" in out


def test_info_selftest_exit_codes(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter takes seconds per case
    monkeypatch.setattr(selftest, "SELFTEST_HEAD_DIMS", (40,))
    monkeypatch.setattr(selftest, "SELFTEST_DTYPES", (torch.float32,))
    path = tmp_path / "selftest.json"
    assert main(["info", "--selftest", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sdpa     cpu     float32     40 qk+mask         pass" in out
    result = json.loads(path.read_text())
    assert result["failed"] == 0 and result["passed"] == len(result["rows"]) >= 6
    assert {"backend", "status", "rel_err", "first_ms", "ms"} <= set(result["rows"][0])
    _install(monkeypatch, "sdpa", "wrong")
    assert main(["info", "--selftest"]) == 1
    assert "FAIL" in capsys.readouterr().out
