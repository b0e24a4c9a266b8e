"""Which backend runs a blended_attention call: capabilities as data, a priority list, a self-check.

Each backend declares what it supports (`CAPABILITIES` in its module: devices, dtypes, head dims,
source forms, stored-map dtypes, masks) and says why it is unavailable (`load_error`). For
`backend="auto"`, `choose` walks the device's priority list and takes the first backend that is
available, supports the call and passes its self-check:

* cpu: cpu (the C++ kernel), sdpa, reference;
* cuda: the order measured by benchmarks/bench_attention.py on this GPU, when a result file for it is
  present (benchmarks/results/attention_cuda*.json next to the package, or the folder named by
  FATEZERO_FAST_RESULTS), fastest first; otherwise triton, cuda, sdpa; reference last.

The self-check (ops.selfcheck) runs the first time a (backend, call key) is used in a process: a
small random case against the float64 reference. A backend that raises or misses the test
tolerances gets one warning naming it and the problem, and the next backend in the list is used;
verdicts are cached for the process. FATEZERO_FAST_SELFCHECK=0 turns the check off. An explicitly
requested backend is checked too, and one that is unavailable, does not support the call or fails
its check is an error, never a fallback. `fatezero-fast info` prints the lists and the reasons.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import threading
import warnings
from dataclasses import dataclass

import torch

from . import reference, selfcheck
from .backends import cpu as _cpu
from .backends import cuda as _cuda
from .backends import sdpa as _sdpa
from .backends import triton as _triton
from .capabilities import FLOAT_DTYPES, Call, Capabilities, dtype_name


class BackendWarning(RuntimeWarning):
    """A backend failed its self-check (or nothing but the reference can run a call): the op goes on elsewhere."""


def _reference_run(q, k, v, kv_frames, source, mask, scale, out=None):
    result = reference.blended_attention_reference(q, k, v, kv_frames=kv_frames, source=source, mask=mask,
                                                   scale=scale)
    return result if out is None else out.copy_(result)


_ALL_FLOATS = FLOAT_DTYPES + (torch.float64,)
_REFERENCE_CAPS = Capabilities(dtypes={"cpu": _ALL_FLOATS, "cuda": _ALL_FLOATS},
                               probs_dtypes=tuple(dict.fromkeys(_ALL_FLOATS + _cpu.CAPABILITIES.probs_dtypes)))


@dataclass(frozen=True)
class Backend:
    name: str
    capabilities: Capabilities
    module: object = None  # None: the materialized reference

    def unavailable(self, device) -> str | None:
        """Why the backend cannot run on `device` in this installation (None when it can)."""
        if self.module is None:
            return None
        return self.module.load_error(device)

    def why_not(self, call: Call) -> str | None:
        """Why the backend cannot run `call` (unavailable here, or unsupported), None when it can."""
        return self.unavailable(call.device) or self.capabilities.why_not(call)

    def run(self, q, k, v, kv_frames, source, mask, scale, out=None):
        if self.module is None:
            return _reference_run(q, k, v, kv_frames, source, mask, scale, out=out)
        return self.module.blended_attention(q, k, v, kv_frames, source, mask, scale, out=out)


BACKENDS_BY_NAME = {
    "triton": Backend("triton", _triton.CAPABILITIES, _triton),
    "cuda": Backend("cuda", _cuda.CAPABILITIES, _cuda),
    "sdpa": Backend("sdpa", _sdpa.CAPABILITIES, _sdpa),
    "cpu": Backend("cpu", _cpu.CAPABILITIES, _cpu),
    "reference": Backend("reference", _REFERENCE_CAPS),
}
BACKEND_NAMES = tuple(BACKENDS_BY_NAME)
DEFAULT_ORDER = {"cuda": ("triton", "cuda", "sdpa"), "cpu": ("cpu", "sdpa")}  # reference always comes last

_lock = threading.RLock()
_choices: dict = {}     # (Call, self-check on) -> backend name
_verdicts: dict = {}    # (backend name, Call) -> selfcheck.Verdict
_measured: dict = {}    # (GPU name, dtype) -> (order, where from) or None
_warned_reference: set = set()
_required: set = set()  # (backend name, Call) requested by name that passed every check (self-check on)


def reset() -> None:
    """Forget the cached choices, self-check verdicts and measured orders (tests; after swapping a backend)."""
    with _lock:
        _choices.clear()
        _verdicts.clear()
        _measured.clear()
        _warned_reference.clear()
        _required.clear()


# ---------------------------------------------------------------------------------------------
# priority lists

def results_dir() -> str:
    """Where measured benchmark JSON is looked for: FATEZERO_FAST_RESULTS, else the checkout's benchmarks/results."""
    env = os.environ.get("FATEZERO_FAST_RESULTS")
    if env:
        return env
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "benchmarks", "results")


_OURS = re.compile(r"^ours\[(\w+)\]( \w+)?$")  # ours[<backend>] or ours[<backend>] <form>; not ours[...,direct]


def order_from_results(records, dtype: str | None = None) -> list[str]:
    """Our backends, fastest first, from bench_attention records (status ok, impl ours[<backend>]...).

    Per case (shape, index list, mode, form, dtype), each backend's median time over the fastest one's;
    a backend's score is the geometric mean of those ratios over the cases it ran (cases with at least
    two backends). Records of `dtype` only, when they rank any backends; else all records.
    """
    rows = [r for r in records if r.get("status") == "ok" and _OURS.match(str(r.get("impl", "")))]
    if dtype is not None:
        ranked = order_from_results([r for r in rows if r.get("dtype") == dtype])
        if ranked:
            return ranked
    cases: dict = {}
    for r in rows:
        name, form = _OURS.match(r["impl"]).groups()
        key = (r.get("shape"), r.get("index_name"), r.get("mode"), form, r.get("dtype"))
        cases.setdefault(key, {})[name] = min(r["median_ms"], cases.get(key, {}).get(name, math.inf))
    logs: dict = {}
    for times in cases.values():
        if len(times) < 2:
            continue
        best = min(times.values())
        for name, t in times.items():
            logs.setdefault(name, []).append(math.log(t / best))
    return sorted(logs, key=lambda n: (sum(logs[n]) / len(logs[n]), DEFAULT_ORDER["cuda"].index(n)
                                       if n in DEFAULT_ORDER["cuda"] else 99))


def measured_order(device: str, dtype: torch.dtype) -> tuple[list[str], str] | None:
    """(backends fastest first, where from) for this GPU and dtype from the result files, or None."""
    try:
        gpu = torch.cuda.get_device_name(torch.device(device))
    except (RuntimeError, AssertionError, ValueError):
        return None
    key = (gpu, dtype)
    if key not in _measured:
        found = None
        records, files = [], []
        for path in sorted(glob.glob(os.path.join(results_dir(), "attention_cuda*.json"))):
            try:
                with open(path) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                continue
            if data.get("environment", {}).get("device") == gpu:
                records += data.get("records", [])
                files.append(os.path.basename(path))
        order = [n for n in order_from_results(records, dtype_name(dtype)) if n in DEFAULT_ORDER["cuda"]]
        if order:
            found = (order, f"measured on {gpu} ({', '.join(files)})")
        _measured[key] = found
    return _measured[key]


def priority(device: str, dtype: torch.dtype) -> tuple[list[str], str]:
    """(the names auto tries on `device` for `dtype`, in order, reference last; where the order comes from)."""
    kind = torch.device(device).type
    default = list(DEFAULT_ORDER.get(kind, ()))
    order, origin = default, "default order"
    if kind == "cuda":
        measured = measured_order(device, dtype)
        if measured is not None:
            order = measured[0] + [n for n in default if n not in measured[0]]
            origin = measured[1]
    return order + ["reference"], origin


# ---------------------------------------------------------------------------------------------
# choosing

def _can_check(call: Call) -> bool:
    """The self-check runs eager code and synchronizes: not while a CUDA graph is captured or torch compiles."""
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)()
    capturing = call.device_type == "cuda" and torch.cuda.is_current_stream_capturing()
    return not (compiling or capturing)


def verify(name: str, call: Call) -> selfcheck.Verdict:
    """The backend's self-check verdict for `call`, run once per process and cached."""
    key = (name, call)
    with _lock:
        if key not in _verdicts:
            _verdicts[key] = selfcheck.check(BACKENDS_BY_NAME[name].run, call)
        return _verdicts[key]


def choose(call: Call) -> str:
    """The backend `auto` uses for `call` (cached per call key)."""
    check = selfcheck.enabled()
    key = (call, check)
    name = _choices.get(key)
    if name is not None:
        return name
    with _lock:
        order, _ = priority(call.device, call.dtype)
        passed_over = []
        cacheable = True
        for name in order:
            backend = BACKENDS_BY_NAME[name]
            reason = backend.why_not(call)
            if reason is not None:
                passed_over.append(f"{name}: {reason}")
                if name == "reference":
                    raise ValueError(f"no backend runs blended_attention on {call.describe()}: "
                                     f"{'; '.join(passed_over)}")
                continue
            if check and name != "reference":
                if not _can_check(call):
                    cacheable = False  # checked at the next call outside the capture
                else:
                    verdict = verify(name, call)
                    if not verdict.ok:
                        warnings.warn(f"fatezero_fast: the {name!r} backend failed its self-check on "
                                      f"{call.describe()}: {verdict.problem}; blended_attention uses the next "
                                      f"backend of {', '.join(order)}", BackendWarning, stacklevel=3)
                        passed_over.append(f"{name}: failed its self-check ({verdict.problem})")
                        continue
            break
        if name == "reference" and call not in _warned_reference:
            _warned_reference.add(call)
            hint = " The C++ CPU kernel comes with `pip install --no-build-isolation -e .`" \
                if call.device_type == "cpu" else ""
            warnings.warn(f"fatezero_fast: blended_attention on {call.describe()} falls back to the materialized "
                          f"reference (O(Nq x Nk) memory): {'; '.join(passed_over)}.{hint}", BackendWarning,
                          stacklevel=3)
        if cacheable:
            _choices[key] = name
    return name


def require(name: str, call: Call) -> None:
    """An explicitly requested backend: raise unless it is available, supports `call` and passes its check."""
    check = selfcheck.enabled()
    if check and (name, call) in _required:
        return
    backend = BACKENDS_BY_NAME[name]
    why = backend.unavailable(call.device)
    if why is not None:
        raise RuntimeError(f"backend {name!r} is not available on {call.device}: {why}")
    reason = backend.capabilities.why_not(call)
    if reason is not None:
        raise ValueError(f"backend {name!r} does not support {call.describe()}: it {reason}")
    if name != "reference" and check and _can_check(call):
        verdict = verify(name, call)
        if not verdict.ok:
            raise RuntimeError(f"backend {name!r} failed its self-check on {call.describe()}: {verdict.problem} "
                               "(backend='auto' would fall back to the next backend; "
                               f"{selfcheck.ENV_SWITCH}=0 turns the check off)")
        with _lock:
            _required.add((name, call))


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on `device` in this installation: auto's list first, then any other."""
    device = torch.device(device)
    order, _ = priority(str(device), torch.float16 if device.type == "cuda" else torch.float32)
    names = order + [n for n in BACKEND_NAMES if n not in order]
    return [n for n in names if BACKENDS_BY_NAME[n].unavailable(device) is None]


def explain(device: str | torch.device) -> list[str]:
    """Lines for `fatezero-fast info`: auto's order on `device` and, per backend, availability or the reason."""
    device = torch.device(device)
    name_dev = str(device) if device.type == "cpu" or device.index is not None else f"{device.type}:" \
        f"{torch.cuda.current_device()}"
    lines = []
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if device.type == "cuda" else (torch.float32,)
    for dtype in dtypes:
        order, origin = priority(name_dev, dtype)
        lines.append(f"blended_attention on {name_dev}, {dtype_name(dtype)}: auto tries {', '.join(order)} "
                     f"({origin})")
    for name in BACKEND_NAMES:
        backend = BACKENDS_BY_NAME[name]
        why = backend.unavailable(name_dev)
        in_list = any(name in priority(name_dev, dt)[0] for dt in dtypes)
        state = f"not available: {why}" if why else ("available" if in_list else "available, explicit only")
        lines.append(f"  {name:9} {state}")
        if not why and device.type in backend.capabilities.dtypes:
            lines.append(f"  {'':9} supports {backend.capabilities.describe()}")
    return lines
