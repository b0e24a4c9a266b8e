"""Self-checks of the blended_attention backends against the reference, at first use and on demand.

`check(name, fn, call)` runs a backend once on a small random case shaped like `call` (its device,
dtype, head dim, source form, stored-map dtype and mask) and compares it with the float64
reference: an exception, a NaN (the output is poisoned before the call, so an unwritten element
shows) or a relative error max|out - ref| / max|ref| above `TOLERANCES` (the bounds the tests use,
tests/attention_cases.py) is a failure, reported as one line. `ops.dispatch` runs it the first time
a (backend, call) combination is used in a process and caches the verdict; FATEZERO_FAST_SELFCHECK=0
turns that off. The case is 2 query frames over 3 key frames (R = 2, a duplicate), 2 heads, 80 query
rows and 48 keys per frame -- not multiples of any kernel's tiles -- and, with a source, a mask of
all-1, all-0 and fractional rows: a few milliseconds on a CPU.

`ops.selftest` runs every available backend over a fixed matrix (`fatezero-fast info --selftest`).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from . import reference
from .capabilities import FP8, Call
from .source import Source, SourceForm

# Relative error bounds against the float64 reference, by the input dtype (a float8 map is exact in
# the reference too, so it gets its input dtype's bound). The backend tests use these same numbers.
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

ENV_SWITCH = "FATEZERO_FAST_SELFCHECK"


def enabled() -> bool:
    """False when FATEZERO_FAST_SELFCHECK=0 (or off / false / no)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "off", "false", "no")


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCES[dtype]


def make_case(call: Call, seed: int = 0) -> dict:
    """Inputs of one small case shaped like `call`: q, k, v, kv_frames, source, mask, scale (on call.device)."""
    gen = torch.Generator().manual_seed(seed)
    b, frames, h, nq, nk, d = 2, 3, 2, 80, 48, call.head_dim
    dev, dtype = torch.device(call.device), call.dtype

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen)).to(device=dev, dtype=dtype)

    q, k, v = randn(b, h, nq, d, scale=1.5), randn(frames, h, nk, d), randn(frames, h, nk, d)
    kv_frames = torch.tensor([[2, 0], [1, 1]], device=dev)
    nk_total = kv_frames.shape[1] * nk
    source = None
    if call.form is SourceForm.QK:
        source = ("qk", randn(b, h, nq, d, scale=1.5), randn(frames, h, nk, d))
    elif call.form is SourceForm.PROBS:
        p = torch.softmax(2.0 * torch.randn(b, h, nq, nk_total, generator=gen), dim=-1)
        if call.row_scale:
            row_scale = p.amax(-1) / (448.0 if call.probs_dtype == FP8 else 1.0)
            source = ("probs", (p / row_scale[..., None]).to(dev, call.probs_dtype), row_scale.to(dev))
        else:
            source = ("probs", p.to(dev, call.probs_dtype))
    elif call.form is SourceForm.LOWRANK:
        rank = 5
        source = ("lowrank", (torch.rand(b, h, nq, rank, generator=gen) / rank).to(dev, dtype),
                  torch.softmax(torch.randn(b, h, rank, nk_total, generator=gen), -1).to(dev, dtype))
    mask = None
    if call.mask:
        mask = torch.rand(b, nq, generator=gen)
        mask[0, :16], mask[0, 16:32], mask[1, 40:] = 1.0, 0.0, (mask[1, 40:] > 0.5).float()
        mask = mask.to(dev)
    return dict(q=q, k=k, v=v, kv_frames=kv_frames, source=source, mask=mask, scale=d ** -0.5)


def _reference64(case: dict) -> torch.Tensor:
    src = Source.of(case["source"])
    if src.form is not SourceForm.NONE:  # every tensor of the source in float64 (fp8 maps are exact there)
        src = Source(src.form, *(None if t is None else t.double() for t in (src.a, src.b, src.row_scale)))
    return reference.blended_attention_reference(
        case["q"].double(), case["k"].double(), case["v"].double(), kv_frames=case["kv_frames"], source=src,
        mask=None if case["mask"] is None else case["mask"].double(), scale=case["scale"])


@dataclass
class Verdict:
    """A check's outcome: problem is None when it passed; error is the relative error when it ran."""

    problem: str | None
    error: float | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.problem is None


def check(fn, call: Call, seed: int = 0) -> Verdict:
    """Run `fn(q, k, v, kv_frames, source, mask, scale, out=...)` (a backend's entry) on a small case
    shaped like `call` and compare with the float64 reference."""
    case = make_case(call, seed)
    source = Source.of(case["source"])
    out = torch.full_like(case["q"], float("nan"))
    start = time.perf_counter()
    try:
        with torch.no_grad():
            result = fn(case["q"], case["k"], case["v"], case["kv_frames"], source, case["mask"], case["scale"],
                        out=out)
        if result is not None and result is not out:
            out.copy_(result)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
    except Exception as exc:  # noqa: BLE001  (any failure of the backend is the verdict)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return Verdict(f"raised {type(exc).__name__}: {first}"[:300], None, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    ref = _reference64(case)
    if not torch.isfinite(out).all():
        return Verdict("NaN or inf in the output (unwritten elements or a non-finite result)", None, seconds)
    err = ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    tol = tolerance(call.dtype)
    if not err <= tol:
        return Verdict(f"relative error {err:.3g} > {tol:g} against the reference", err, seconds)
    return Verdict(None, err, seconds)


# ---------------------------------------------------------------------------------------------
# fatezero-fast info --selftest


def environment() -> dict:
    """Device and versions, for JSON results."""
    import datetime
    import platform

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
           platform.machine(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    for name in ("triton", "diffusers"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001  (not installed or broken: recorded as absent)
            env[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(device=props.name, compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), gpu_memory_gib=round(props.total_memory / 2**30, 1))
    else:
        env["device"] = "cpu"
    return env
