"""`fatezero-fast info --selftest`: every available backend over a fixed matrix, one row per case.

The matrix: SD-1.x (40, 80, 160), SD-2.x (64) and video-transformer (128) head dims; fp32, fp16,
bf16; every source form, with and without a mask. Each case is `selfcheck.check`, twice.
"""
from __future__ import annotations

import torch

from . import dispatch, selfcheck
from .capabilities import FP8, Call, dtype_name
from .source import SourceForm

# SD-1.x (40, 80, 160), SD-2.x (64), and 128 (video diffusion transformers such as Wan 2.1 and HunyuanVideo)
SELFTEST_HEAD_DIMS = (40, 64, 80, 128, 160)
SELFTEST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (label, form, stored-map dtype (None: q's), row scale, mask)
SELFTEST_SOURCES = (
    ("plain", SourceForm.NONE, None, False, False),
    ("qk+mask", SourceForm.QK, None, False, True),
    ("qk full", SourceForm.QK, None, False, False),
    ("probs+mask", SourceForm.PROBS, None, False, True),
    ("probs-fp8 full", SourceForm.PROBS, "fp8", True, False),
    ("lowrank+mask", SourceForm.LOWRANK, None, False, True),
)


def selftest_calls(device: str):
    """(label, Call) of the fixed matrix on `device`."""
    for d in SELFTEST_HEAD_DIMS:
        for dtype in SELFTEST_DTYPES:
            for label, form, pdtype, row_scale, mask in SELFTEST_SOURCES:
                if pdtype == "fp8" and FP8 is None:
                    continue  # a torch without float8
                if form is SourceForm.PROBS:
                    pdtype = FP8 if pdtype == "fp8" else dtype
                yield label, Call(device, dtype, d, form, pdtype, row_scale, mask)


# the quick backends first, Triton (a compilation per new variant on a GPU) last
SELFTEST_ORDER = ("sdpa", "cuda", "cpu", "triton")


def selftest(devices=None, backends=SELFTEST_ORDER, report=print, on_row=None) -> list[dict]:
    """Every available backend of `backends` over the fixed matrix on each device; one row per case.

    A row: backend, device, dtype, head_dim, source, status ("pass" / "FAIL: ..."), rel_err, first_ms
    (the first call, compilation included) and ms (a second call). Cases a backend does not support are
    left out and counted per reason. Returns the rows; `report` gets each printed line, `on_row` the rows
    so far after each case. Devices: the current CUDA device first when there is one, then the CPU.
    """
    if devices is None:
        devices = ([f"cuda:{torch.cuda.current_device()}"] if torch.cuda.is_available() else []) + ["cpu"]
    rows = []
    report(f"{'backend':8} {'device':7} {'dtype':9} {'d':>4} {'source':15} {'status':6} {'rel err':>9} "
           f"{'first ms':>9} {'ms':>8}")
    for device in devices:
        for name in backends:
            backend = dispatch.BACKENDS_BY_NAME[name]
            why = backend.unavailable(device)
            if why is not None:
                report(f"{name:8} {device:7} not available: {why}")
                continue
            skipped: dict[str, int] = {}
            for label, call in selftest_calls(device):
                reason = backend.capabilities.why_not(call)
                if reason is not None:
                    skipped[reason] = skipped.get(reason, 0) + 1
                    continue
                first = selfcheck.check(backend.run, call)
                second = selfcheck.check(backend.run, call, seed=1) if first.ok else None
                verdict = first if second is None or not second.ok else second
                row = dict(backend=name, device=device, dtype=dtype_name(call.dtype), head_dim=call.head_dim,
                           source=label, status="pass" if verdict.ok else f"FAIL: {verdict.problem}",
                           rel_err=verdict.error, first_ms=first.seconds * 1e3,
                           ms=None if second is None else second.seconds * 1e3)
                rows.append(row)
                if on_row is not None:
                    on_row(rows)
                err = "-" if row["rel_err"] is None else f"{row['rel_err']:.2e}"
                ms = "-" if row["ms"] is None else f"{row['ms']:.2f}"
                report(f"{name:8} {device:7} {row['dtype']:9} {call.head_dim:>4} {label:15} "
                       f"{'pass' if verdict.ok else 'FAIL':6} {err:>9} {row['first_ms']:9.2f} {ms:>8}"
                       + ("" if verdict.ok else f"  {verdict.problem}"))
            for reason, count in skipped.items():
                report(f"{name:8} {device:7} {count} case(s) left out: {reason}")
    return rows
