#!/usr/bin/env python
"""Speed and memory benchmark of `fatezero_fast.ops.blended_attention` against its baselines.

A benchmark, not a test: it measures, prints a table and writes JSON; it asserts nothing.

Cases (issue 3): SD-1.4 at 512x512, self-attention at the three UNet resolutions
    64x64 (Nq 4096, head dim 40), 32x32 (Nq 1024, d 80), 16x16 (Nq 256, d 160),
with B frames and H heads (8 and 8 on the GPU; fewer on the CPU and with --quick, see --frames
and --heads), sparse-causal index lists ['mid'] (R = 1) and [-1, 'first'] (R = 2), and modes
    plain    softmax(Q K_e^T s) V_e
    replace  the source map only: P_s V_e (FateZero's full replace)
    blendX   M P_e V_e + (1 - M) P_s V_e with X% of the (frame, query block) pairs "mixed"
             (their rows alternate 0, 1, 0, 1, ...) and the other blocks uniform, half all-0
             and half all-1. A block is --mask-block rows (default 128): every kernel tile that
             is a power of two <= 128 rows and aligned (Triton 32/64/128, C++ 64) sees the same
             mixed/uniform split, so the fraction of two-stream tiles is the same for every backend.

Implementations, all in one run on the same inputs:
    ours[<backend>] qk       fatezero_fast.ops.blended_attention, source=("qk", q_s, k_s)
    ours[<backend>] probs    same, source=("probs", P_s fp16)    (replace only)
    ours[<backend>]          plain (source=None)
    ours[triton,direct] ...  (GPU only) the backend entry without ops.py's validation, to show
                             what the public entry's checks cost
    fatezero_materialized    the official FateZero path: K/V concatenated with torch.cat, baddbmm
                             + softmax (+ .to(dtype)), the stored fp16 map P_s .to(dtype), blend
                             M*P_e + (1-M)*P_s materialized, bmm with V
    sdpa[default]            torch SDPA (default backend choice) on concatenated K/V; blend = two
                             calls + torch.lerp; replace = one call on (q_s, k_s)
    sdpa[cudnn]              same under sdpa_kernel(CUDNN_ATTENTION) (CUDA only, when supported)
    sdpa[...] pregathered    plain only: one SDPA call on K/V concatenated beforehand (the
                             "one plain SDPA call" of the targets: no gather counted)
    xformers                 xformers.ops.memory_efficient_attention where it imports

Usage:
    python benchmarks/bench_attention.py [--device cuda|cpu] [--dtype fp16|bf16|fp32]
        [--shapes 64,32,16] [--quick] [--out benchmarks/results/attention_<device>.json]
See benchmarks/README.md for the columns, the FLOP convention and the targets.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
import weakref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:  # an installed package (pip install -e .) first; else the checkout's
    import fatezero_fast  # noqa: F401
except ImportError:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils import _pytree  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from fatezero_fast import ops  # noqa: E402
from fatezero_fast.ops.reference import blended_attention_reference  # noqa: E402
from fatezero_fast.semantics.frames import resolve_frame_index  # noqa: E402

SHAPES = {64: (4096, 40), 32: (1024, 80), 16: (256, 160)}  # latent side -> (Nq, head dim)
INDEX_LISTS = {"mid": ["mid"], "-1,first": [-1, "first"]}
MODES = {"plain": None, "replace": None, "blend0": 0.0, "blend20": 0.2, "blend50": 0.5}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
MIB = 1 << 20
FUSED = ("triton", "cuda", "cpu")  # our fused kernels; "sdpa" is composed from torch's SDPA


# ----------------------------------------------------------------------------------------------
# environment

def _version(mod_name):
    try:
        mod = __import__(mod_name)
        return getattr(mod, "__version__", "unknown")
    except Exception as exc:  # noqa: BLE001  (any import failure means "not available")
        return None if isinstance(exc, ImportError) else f"import failed: {type(exc).__name__}: {exc}"


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit():
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device):
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + shlex.join(sys.argv),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "xformers": _version("xformers"),
        "git_commit": _git_commit(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "fatezero_fast_backends": ops.available_backends(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), sm_count=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   compute_capability=f"{props.major}.{props.minor}")
    else:
        env["device"] = "cpu: " + env["cpu"]
    return env


def loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------
# timing and memory

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, warmup, reps, nsets, min_time):
    """(wall ms per call, CPU ms per call or None). GPU: one CUDA event pair per call, after warm-up;
    inputs rotate over `nsets` copies so that small cases are not timed out of L2. CPU: perf_counter for
    wall time, and process_time (CPU time of all threads of this process, less sensitive to other jobs
    taking the cores) beside it."""
    for i in range(warmup):
        fn(i % nsets)
    sync(device)
    # One synchronized call to size the run: at least `reps` calls and, for short calls, enough of
    # them to fill `min_time` seconds (at most 20 x reps), so that millisecond-scale cases are not
    # decided by a few scheduler hiccups.
    t0 = time.perf_counter()
    fn(0)
    sync(device)
    est = max(time.perf_counter() - t0, 1e-6)
    reps = max(reps, min(20 * reps, math.ceil(min_time / est)))
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for i, (start, end) in enumerate(events):
            start.record()
            fn(i % nsets)
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
        return times, None
    cpu_times = []
    for i in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        fn(i % nsets)
        times.append((time.perf_counter() - t0) * 1e3)
        cpu_times.append((time.process_time() - c0) * 1e3)
    return times, cpu_times


class _LiveTensorBytes(TorchDispatchMode):
    """CPU peak-memory estimate: bytes of storages created by torch ops during the call and alive
    at the same time (weakref-tracked). Storages of the inputs are not counted. Scratch memory a
    kernel allocates internally (not as a tensor it returns) is invisible here."""

    def __init__(self, preexisting_ptrs, track_live=True):
        super().__init__()
        self.pre = preexisting_ptrs
        self.track_live = track_live
        self.live = {}  # storage data_ptr -> [nbytes, tracked tensors alive]
        self.cur = 0
        self.peak = 0
        self.largest = 0  # elements of the largest tensor a torch op created (any device)

    def _release(self, ptr):
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.cur -= entry[0]
            del self.live[ptr]

    def _track(self, t):
        if t.device.type != "cpu" or t.is_sparse:
            return
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or ptr in self.pre:
            return
        entry = self.live.get(ptr)
        if entry is None:
            self.live[ptr] = [nbytes, 1]
            self.cur += nbytes
            self.peak = max(self.peak, self.cur)
        else:
            entry[1] += 1
        weakref.finalize(t, self._release, ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                if t.untyped_storage().data_ptr() not in self.pre:  # not a view of an input
                    self.largest = max(self.largest, t.numel())
                if self.track_live:
                    self._track(t)
        return out


def peak_extra_bytes(fn, device, inputs):
    """(bytes, method, elements of the largest tensor created) of the memory one call needs beyond its
    inputs, output included."""
    pre = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
    if device.type == "cuda":
        mode = _LiveTensorBytes(pre, track_live=False)  # only the largest tensor; the allocator has the peak
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with mode:
            out = fn(0)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak, "torch.cuda.max_memory_allocated - memory_allocated before the call", mode.largest
    mode = _LiveTensorBytes(pre)
    with mode:
        out = fn(0)
    del out
    return mode.peak, "live bytes of tensors created by torch ops during the call (TorchDispatchMode)", mode.largest


# ----------------------------------------------------------------------------------------------
# inputs

def make_mask(b, nq, frac, block):
    """(B, Nq) float32 0/1 mask with round(frac * blocks) mixed blocks (rows 0,1,0,1,...), spread
    evenly over all (frame, block) pairs; the other blocks uniform, alternately all-0 and all-1."""
    nblk = math.ceil(nq / block)
    total = b * nblk
    n_mixed = int(round(frac * total))
    mixed = {min(total - 1, int((j + 0.5) * total / n_mixed)) for j in range(n_mixed)} if n_mixed else set()
    mask = torch.empty(b, nq)
    alt = (torch.arange(block) % 2).float()
    uniform_seen = 0
    mixed_rows = 0
    for t in range(total):
        fb, blk = divmod(t, nblk)
        lo, hi = blk * block, min(nq, (blk + 1) * block)
        if t in mixed:
            mask[fb, lo:hi] = alt[:hi - lo]
            mixed_rows += hi - lo
        else:
            mask[fb, lo:hi] = float(uniform_seen % 2)
            uniform_seen += 1
    info = dict(mask_block=block, blocks=total, mixed_blocks=n_mixed, mixed_block_frac=n_mixed / total,
                mixed_row_frac=mixed_rows / (b * nq), edit_row_frac=float(mask.mean()))
    return mask, info, mixed_rows


def gather_cat(x, kv_frames):
    """FateZero's concatenation: torch.cat of the R per-frame K (or V) along the token axis."""
    return torch.cat([x[kv_frames[:, r]] for r in range(kv_frames.shape[1])], dim=2)


def make_inputs(b, h, nq, d, kv_frames, dtype, device, nsets, seed):
    """nsets independent input sets: q, k, v, q_s, k_s (per frame) and the fp16 stored map P_s."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    scale = d ** -0.5
    sets = []
    for _ in range(nsets):
        t = {name: torch.randn(b, h, nq, d, generator=gen).to(device=device, dtype=dtype)
             for name in ("q", "k", "v", "q_s", "k_s")}
        # P_s = softmax(q_s K_s,e^T s) stored in fp16 (as FateZero stores maps), built frame by frame.
        ks_cat = gather_cat(t["k_s"], kv_frames)
        p_s = torch.empty(b, h, nq, ks_cat.shape[2], dtype=torch.float16, device=device)
        for fb in range(b):
            p_s[fb] = torch.softmax(torch.matmul(t["q_s"][fb].float(), ks_cat[fb].float().transpose(-1, -2)) * scale,
                                    dim=-1).half()
        del ks_cat
        t["p_s"] = p_s
        sets.append(t)
    return sets


# ----------------------------------------------------------------------------------------------
# implementations: each returns fn(i) -> output (B, H, Nq, D) for input set i

def impl_ours(sets, kv_frames, mode, mask, backend, form, direct=False):
    def source(t):
        if mode == "plain":
            return None
        return ("qk", t["q_s"], t["k_s"]) if form == "qk" else ("probs", t["p_s"])
    m = mask if mode.startswith("blend") else None
    scale = sets[0]["q"].shape[-1] ** -0.5
    if direct:
        from fatezero_fast.ops.backends import triton as tb

        def fn(i):
            t = sets[i]
            return tb.blended_attention(t["q"], t["k"], t["v"], kv_frames, source(t), m, scale)
    else:
        def fn(i):
            t = sets[i]
            return ops.blended_attention(t["q"], t["k"], t["v"], kv_frames=kv_frames, source=source(t), mask=m,
                                         backend=backend)
    return fn


def impl_fatezero(sets, kv_frames, mode, mask):
    """The official materialized path (diffusers 0.11 CrossAttention.get_attention_scores, FateZero's
    SparseCausalAttention concatenation and AttentionControlEdit.replace_self_attention)."""
    m4 = None if mask is None else mask[:, None, :, None]

    def fn(i):
        t = sets[i]
        q, k, v = t["q"], t["k"], t["v"]
        b, h, nq, d = q.shape
        key = gather_cat(k, kv_frames)
        value = gather_cat(v, kv_frames)
        nk = key.shape[2]
        query, key, value = q.reshape(b * h, nq, d), key.reshape(b * h, nk, d), value.reshape(b * h, nk, d)
        scores = torch.baddbmm(torch.empty(b * h, nq, nk, dtype=q.dtype, device=q.device), query,
                               key.transpose(-1, -2), beta=0, alpha=d ** -0.5)
        probs = scores.softmax(dim=-1)
        del scores
        probs = probs.to(value.dtype)
        if mode == "replace":  # returns attn_base (the stored map) in place of the edit's map
            probs = t["p_s"].to(value.device, dtype=value.dtype).reshape(b * h, nq, nk)
        elif mode.startswith("blend"):
            base = t["p_s"].to(value.device, dtype=value.dtype)
            probs = (m4 * probs.view(b, h, nq, nk) + (1 - m4) * base).reshape(b * h, nq, nk)
        return torch.bmm(probs, value).view(b, h, nq, d)
    return fn


def _sdpa_ctx(kind):
    if kind == "default":
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])


def impl_sdpa(sets, kv_frames, mode, mask, kind, pregathered=False):
    ctx = _sdpa_ctx(kind)
    m4 = None if mask is None else mask[:, None, :, None]
    pre = [(gather_cat(t["k"], kv_frames), gather_cat(t["v"], kv_frames)) for t in sets] if pregathered else None

    def body(i):
        t = sets[i]
        if pregathered:
            k_e, v_e = pre[i]
            return F.scaled_dot_product_attention(t["q"], k_e, v_e)
        v_e = gather_cat(t["v"], kv_frames)
        if mode == "replace":
            return F.scaled_dot_product_attention(t["q_s"], gather_cat(t["k_s"], kv_frames), v_e)
        out_e = F.scaled_dot_product_attention(t["q"], gather_cat(t["k"], kv_frames), v_e)
        if mode == "plain":
            return out_e
        out_s = F.scaled_dot_product_attention(t["q_s"], gather_cat(t["k_s"], kv_frames), v_e)
        return torch.lerp(out_s, out_e, m4)

    if ctx is None:
        return body

    def fn(i):
        with ctx():
            return body(i)
    return fn


def impl_xformers(sets, kv_frames, mode, mask):
    import xformers.ops as xops
    m4 = None if mask is None else mask[:, None, :, None]

    def mea(q, k, v):  # xformers wants (B, M, H, K)
        return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               scale=q.shape[-1] ** -0.5).transpose(1, 2)

    def fn(i):
        t = sets[i]
        v_e = gather_cat(t["v"], kv_frames)
        if mode == "replace":
            return mea(t["q_s"], gather_cat(t["k_s"], kv_frames), v_e)
        out_e = mea(t["q"], gather_cat(t["k"], kv_frames), v_e)
        if mode == "plain":
            return out_e
        out_s = mea(t["q_s"], gather_cat(t["k_s"], kv_frames), v_e)
        return torch.lerp(out_s, out_e, m4)
    return fn


# ----------------------------------------------------------------------------------------------

def case_impls(mode, args, device, our_backends, xformers_ok):
    """[(name, kind, factory kwargs)] of the implementations run for one mode."""
    impls = []
    forms = [None] if mode == "plain" else (["qk", "probs"] if mode == "replace" else ["qk"])
    for backend in our_backends:
        for form in forms:
            impls.append((f"ours[{backend}]" + (f" {form}" if form else ""), "ours",
                          dict(backend=backend, form=form)))
            if backend == "triton" and device.type == "cuda":
                impls.append(("ours[triton,direct]" + (f" {form}" if form else ""), "ours",
                              dict(backend=backend, form=form, direct=True)))
    impls.append(("fatezero_materialized", "fatezero", {}))
    sdpa_kinds = ["default"] + (["cudnn"] if device.type == "cuda" else [])
    for kind in sdpa_kinds:
        impls.append((f"sdpa[{kind}]" + (" x2+lerp" if mode.startswith("blend") else ""), "sdpa", dict(kind=kind)))
    if mode == "plain":
        for kind in sdpa_kinds:
            impls.append((f"sdpa[{kind}] pregathered", "sdpa", dict(kind=kind, pregathered=True)))
    if xformers_ok:
        impls.append(("xformers" + (" x2+lerp" if mode.startswith("blend") else ""), "xformers", {}))
    return impls


def build(kind, sets, kv_frames, mode, mask, mask_c, kw):
    """mask: float32 (B, Nq) for our op; mask_c: the same in the run dtype for the baselines."""
    if kind == "ours":
        return impl_ours(sets, kv_frames, mode, mask, **kw)
    if kind == "fatezero":
        return impl_fatezero(sets, kv_frames, mode, mask_c)
    if kind == "sdpa":
        return impl_sdpa(sets, kv_frames, mode, mask_c, **kw)
    return impl_xformers(sets, kv_frames, mode, mask_c)


def reference_head0(t, kv_frames, mode, mask):
    """fp32 reference of head 0 (all frames), source = ("qk", q_s, k_s): the exact math."""
    sl = lambda x: x[:, :1]  # noqa: E731
    source = None if mode == "plain" else ("qk", sl(t["q_s"]), sl(t["k_s"]))
    m = mask if mode.startswith("blend") else None
    return blended_attention_reference(sl(t["q"]), sl(t["k"]), sl(t["v"]), kv_frames=kv_frames, source=source,
                                       mask=m, compute_dtype=torch.float32).float()


def run(args):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    gpu = device.type == "cuda"
    frames = args.frames or (8 if gpu and not args.quick else 2)
    heads = args.heads or (8 if gpu and not args.quick else (1 if args.quick and not gpu else 2))
    # CPU: no separate warm-up by default, the (untimed) accuracy-check call before the timing is one.
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 0)
    reps = args.reps or ((10 if args.quick else 30) if gpu else (5 if args.quick else 7))
    min_time = args.min_time if args.min_time is not None else (0.2 if gpu else (0.5 if args.quick else 1.0))
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [int(s) for s in args.shapes.split(",")]
    for s in shapes:
        if s not in SHAPES:
            print(f"error: unknown shape {s}: use some of {sorted(SHAPES)}", file=sys.stderr)
            return 2
    modes = args.modes.split(",") if args.modes else list(MODES)
    if any(m not in MODES for m in modes):
        print(f"error: unknown mode in {modes}: use some of {','.join(MODES)}", file=sys.stderr)
        return 2
    available = [b for b in ops.available_backends(device) if b != "reference"]
    if device.type == "cpu" and not args.backends:
        available = [b for b in available if b != "triton"]  # the interpreter is not a performance path
    our_backends = args.backends.split(",") if args.backends else available
    xformers_ok = device.type == "cuda" and _version("xformers") is not None and \
        not str(_version("xformers")).startswith("import failed")
    out_path = args.out or os.path.join(ROOT, "benchmarks", "results", f"attention_{device.type}.json")

    env = environment(device)
    env["loadavg_start"] = loadavg()
    config = dict(dtype=args.dtype or str(dtype).replace("torch.", ""), frames=frames, heads=heads,
                  shapes={f"{s}x{s}": dict(nq=SHAPES[s][0], nk_per_frame=SHAPES[s][0], head_dim=SHAPES[s][1])
                          for s in shapes},
                  index_lists=INDEX_LISTS, modes=modes, our_backends=our_backends, warmup=warmup, reps=reps,
                  min_time_s=min_time, threads=torch.get_num_threads(),
                  mask_block=args.mask_block, quick=args.quick, p_s_dtype="float16")
    print(f"# device {env['device']} | torch {env['torch']} | triton {env['triton']} | xformers {env['xformers']}")
    print(f"# dtype {dtype} | frames {frames} | heads {heads} | warmup {warmup} | reps {reps} (min {min_time} s) | "
          f"loadavg {env['loadavg_start']} | our backends {our_backends}")
    if not our_backends:
        print("# warning: no fatezero_fast backend is available on this device (build the extension?)")

    records = []
    header = f"{'shape':6} {'index':9} {'mode':8} {'impl':34} {'ms':>9} {'TFLOP/s':>8} {'peakMiB':>9} {'relerr':>8}"
    if not gpu:
        header += f" {'min_ms':>9} {'cpu_ms':>9}"
    print(header)
    for s in shapes:
        nq, d = SHAPES[s]
        for index_name, index_list in INDEX_LISTS.items():
            kv_frames = resolve_frame_index(index_list, frames).to(device)
            r = kv_frames.shape[1]
            nk_total = r * nq
            elem = torch.empty((), dtype=dtype).element_size()
            set_bytes = 5 * frames * heads * nq * d * elem + frames * heads * nq * nk_total * 2
            nsets = 1 if device.type != "cuda" else max(1, min(4, math.ceil(200 * MIB / set_bytes)))
            torch.manual_seed(0)
            sets = make_inputs(frames, heads, nq, d, kv_frames, dtype, device, nsets, seed=1000 * s + r)
            inputs_flat = [x for t in sets for x in t.values()]
            out_bytes = frames * heads * nq * d * elem
            map_elements = frames * heads * nq * nk_total
            map_bytes = map_elements * elem
            for mode in modes:
                mask, mask_c, mask_info, mixed_rows = (None, None, None, 0)
                if mode.startswith("blend"):
                    mask, mask_info, mixed_rows = make_mask(frames, nq, MODES[mode], args.mask_block)
                    mask = mask.to(device)
                    mask_c = mask.to(dtype)
                not_new = inputs_flat + [kv_frames] + [x for x in (mask, mask_c) if x is not None]
                one_stream = 4 * heads * nq * nk_total * d * frames
                if mode.startswith("blend"):  # two streams on the rows of mixed blocks only
                    flops = 4 * heads * nk_total * d * (frames * nq + mixed_rows)
                else:
                    flops = one_stream
                ref = reference_head0(sets[0], kv_frames, mode, mask)
                for name, kind, kw in case_impls(mode, args, device, our_backends, xformers_ok):
                    # ("probs" replace does only P_s V: half a stream)
                    case_flops = flops // 2 if kw.get("form") == "probs" else flops
                    rec = dict(shape=f"{s}x{s}", latent=s, frames=frames, heads=heads, nq=nq, nk_per_frame=nq,
                               head_dim=d, index=index_list, index_name=index_name, R=r, nk_total=nk_total,
                               mode=mode, impl=name, dtype=str(dtype).replace("torch.", ""), flops=case_flops,
                               out_bytes=out_bytes, map_bytes=map_bytes, input_sets=nsets)
                    if mask_info:
                        rec.update(mask_info)
                    try:
                        fn = build(kind, sets, kv_frames, mode, mask, mask_c, kw)
                        out = fn(0)
                        sync(device)
                        diff = out[:, :1].float() - ref
                        rec["rel_err_head0"] = float(diff.norm() / ref.norm())
                        del out, diff
                        times, cpu_times = time_fn(fn, device, warmup, reps, nsets, min_time)
                        peak, method, largest = peak_extra_bytes(fn, device, not_new)
                        med = statistics.median(times)
                        if cpu_times is not None:
                            rec.update(cpu_median_ms=statistics.median(cpu_times),
                                       cpu_times_ms=[round(x, 3) for x in cpu_times])
                        rec.update(status="ok", median_ms=med, min_ms=min(times), max_ms=max(times), reps=len(times),
                                   times_ms=[round(x, 4) for x in times],
                                   tflops=case_flops / (med * 1e-3) / 1e12, peak_extra_bytes=int(peak),
                                   peak_method=method, peak_over_out=peak / out_bytes,
                                   largest_alloc_elements=int(largest),
                                   largest_alloc_over_map=largest / map_elements,
                                   no_nq_nk_alloc=bool(largest < map_elements))
                    except Exception as exc:  # noqa: BLE001  (a baseline that cannot run is recorded, not fatal)
                        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
                        rec.update(status="error: " + msg)
                        if args.verbose:
                            traceback.print_exc()
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    records.append(rec)
                    print(format_row(rec), flush=True)
            del sets, inputs_flat
            if device.type == "cuda":
                torch.cuda.empty_cache()

    env["loadavg_end"] = loadavg()
    env["torch_threads"] = torch.get_num_threads()
    summary = summarize(records, "median_ms")
    result = dict(environment=env, config=config, flop_convention=FLOP_CONVENTION, targets=TARGETS,
                  records=records, summary=summary)
    print()
    print_summary(summary, "medians")
    if not gpu:  # shared, loaded CPUs: the fastest of the repetitions is the steadier estimate
        result["summary_from_min"] = summarize(records, "min_ms")
        print_summary(result["summary_from_min"], "minima (best of the repetitions)")
        result["summary_from_cpu_time"] = summarize(records, "cpu_median_ms")
        print_summary(result["summary_from_cpu_time"], "CPU-time medians (process time: what other jobs on "
                                                       "the cores do not inflate, with one thread)")
    print(f"# loadavg start {env['loadavg_start']} end {env['loadavg_end']}")
    if out_path != "-":
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"# wrote {out_path}")
    return 0


FLOP_CONVENTION = ("useful FLOPs, the same for every implementation of a case: 4*B*H*Nq*Nk_total*D per "
                   "softmax stream actually needed (QK^T and PV, 2 FLOPs per multiply-add); plain and replace: "
                   "one stream; blend: one stream on rows of uniform blocks plus two on rows of mixed blocks; "
                   "replace with a stored map ('probs'): 2*B*H*Nq*Nk_total*D (PV only). Softmax exps, the "
                   "blend and the work baselines do beyond this (a second full stream) are not counted.")
TARGETS = {"blend20_vs_one_plain_sdpa": "<= 1.3 (time ratio; fused backends: triton, cuda, cpu)",
           "plain_vs_cudnn_sdpa_throughput": ">= 0.85 (fused backends)",
           "speedup_vs_fatezero_materialized_blend_64x64": ">= 10 (fused backends)",
           "sdpa_blend20_vs_one_plain_sdpa": "<= 2.2 (the sdpa backend)",
           "no_nq_nk_alloc": "no tensor created during a call of ours holds as many elements as the B x H x Nq x "
                             "Nk_total map; fused backends: peak extra memory <= 2 x output bytes + 1 MiB"}


def format_row(rec):
    if rec.get("status") != "ok":
        return f"{rec['shape']:6} {rec['index_name']:9} {rec['mode']:8} {rec['impl']:34} {rec.get('status', '')}"
    row = (f"{rec['shape']:6} {rec['index_name']:9} {rec['mode']:8} {rec['impl']:34} {rec['median_ms']:9.3f} "
           f"{rec['tflops']:8.3f} {rec['peak_extra_bytes'] / MIB:9.1f} {rec['rel_err_head0']:8.1e}")
    if "cpu_median_ms" in rec:
        row += f" {rec['min_ms']:9.3f} {rec['cpu_median_ms']:9.1f}"
    return row


def summarize(records, key="median_ms"):
    """Ratios per (shape, index): the targets of issue 3, from each record's `key` time."""
    ok = [r for r in records if r.get("status") == "ok"]
    out = []
    keys = sorted({(r["latent"], r["index_name"]) for r in ok}, key=lambda k: (-k[0], k[1]))
    for latent, index_name in keys:
        rs = [r for r in ok if r["latent"] == latent and r["index_name"] == index_name]

        def t(mode, pred):
            c = [r for r in rs if r["mode"] == mode and pred(r["impl"])]
            return min(c, key=lambda r: r[key]) if c else None

        def ours(form=None, backends=FUSED):
            return lambda n: (n.startswith("ours[") and ",direct" not in n and n[5:].split("]")[0] in backends
                              and (form is None or n.endswith(" " + form)))
        sdpa_one = t("plain", lambda n: n.startswith("sdpa[") and n.endswith("pregathered"))
        cudnn = t("plain", lambda n: n == "sdpa[cudnn] pregathered") or \
            t("plain", lambda n: n == "sdpa[default] pregathered")
        row = dict(shape=f"{latent}x{latent}", index_name=index_name)
        plain = t("plain", ours())
        if plain and cudnn:
            row["plain_vs_sdpa_throughput"] = cudnn[key] / plain[key]
            row["plain_vs_sdpa_ref"] = f"{plain['impl']} vs {cudnn['impl']}"
        for mode in ("blend0", "blend20", "blend50"):
            b = t(mode, ours("qk"))
            if b and sdpa_one:
                row[f"{mode}_vs_one_plain_sdpa"] = b[key] / sdpa_one[key]
            b = t(mode, ours("qk", ("sdpa",)))
            if b and sdpa_one:
                row[f"sdpa_{mode}_vs_one_plain_sdpa"] = b[key] / sdpa_one[key]
        row["one_plain_sdpa_ref"] = sdpa_one["impl"] if sdpa_one else None
        for mode in ("replace", "blend0", "blend20", "blend50"):
            fz = t(mode, lambda n: n == "fatezero_materialized")
            for form in (("qk", "probs") if mode == "replace" else ("qk",)):
                o = t(mode, ours(form))
                if o and fz:
                    row[f"speedup_vs_fatezero_{mode}" + ("_" + form if mode == "replace" else "")] = \
                        fz[key] / o[key]
        mine = [r for r in rs if r["impl"].startswith("ours[")]
        if mine:
            row["ours_no_nq_nk_alloc"] = all(r["no_nq_nk_alloc"] for r in mine)
            fused = [r for r in mine if r["impl"][5:].split("]")[0].split(",")[0] in FUSED]
            if fused:
                row["ours_max_peak_over_out"] = max(r["peak_over_out"] for r in fused)
            sdpa_mine = [r for r in mine if r["impl"].startswith("ours[sdpa]")]
            if sdpa_mine:
                row["sdpa_max_peak_over_out"] = max(r["peak_over_out"] for r in sdpa_mine)
        fzs = [r for r in rs if r["impl"] == "fatezero_materialized"]
        if fzs:
            row["fatezero_max_peak_mib"] = max(r["peak_extra_bytes"] for r in fzs) / MIB
        row["max_rel_err_ours"] = max((r["rel_err_head0"] for r in mine), default=None)
        out.append(row)
    return out


def print_summary(summary, what):
    cols = [("shape", "shape", "{}"), ("index", "index_name", "{}"),
            ("plain/sdpa thr", "plain_vs_sdpa_throughput", "{:.2f}"),
            ("b0/sdpa1", "blend0_vs_one_plain_sdpa", "{:.2f}"), ("b20/sdpa1", "blend20_vs_one_plain_sdpa", "{:.2f}"),
            ("b50/sdpa1", "blend50_vs_one_plain_sdpa", "{:.2f}"),
            ("x FZ repl qk", "speedup_vs_fatezero_replace_qk", "{:.1f}"),
            ("x FZ repl probs", "speedup_vs_fatezero_replace_probs", "{:.1f}"),
            ("x FZ b20", "speedup_vs_fatezero_blend20", "{:.1f}"),
            ("x FZ b50", "speedup_vs_fatezero_blend50", "{:.1f}"),
            ("sdpa b20/sdpa1", "sdpa_blend20_vs_one_plain_sdpa", "{:.2f}"),
            ("ours peak/out", "ours_max_peak_over_out", "{:.2f}"), ("sdpa peak/out", "sdpa_max_peak_over_out", "{:.1f}"),
            ("no NqxNk", "ours_no_nq_nk_alloc", "{}"), ("FZ peak MiB", "fatezero_max_peak_mib", "{:.0f}")]
    print(f"# summary (time ratios from {what}; sdpa1 = one plain SDPA call on pre-concatenated K/V)")
    print(" | ".join(c[0] for c in cols))
    for row in summary:
        print(" | ".join(c[2].format(row[c[1]]) if row.get(c[1]) is not None else "-" for c in cols))
    if summary:
        print(f"# plain/sdpa compares with: {summary[0].get('plain_vs_sdpa_ref')}; "
              f"sdpa1 = {summary[0].get('one_plain_sdpa_ref')}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--shapes", default="64,32,16", help="latent sides, of 64,32,16")
    p.add_argument("--modes", default=None, help=f"comma list of {','.join(MODES)} (default: all)")
    p.add_argument("--backends", default=None,
                   help="our backends to run (default: every available one; on cpu not the triton interpreter)")
    p.add_argument("--quick", action="store_true",
                   help="2 frames, 2 heads on cuda / 1 head on cpu, fewer repetitions")
    p.add_argument("--frames", type=int, default=None, help="frames B (default 8 on cuda, 2 on cpu or with --quick)")
    p.add_argument("--heads", type=int, default=None,
                   help="heads H (default 8 on cuda, 2 on cpu, --quick: 2 on cuda, 1 on cpu)")
    p.add_argument("--warmup", type=int, default=None,
                   help="warm-up calls after the untimed accuracy-check call (default 5 cuda, 0 cpu)")
    p.add_argument("--reps", type=int, default=None, help="timed calls (default cuda 30 / quick 10; cpu 7 / quick 5)")
    p.add_argument("--min-time", type=float, default=None,
                   help="time short cases for at least this many seconds, up to 20 x reps calls "
                        "(default 0.2 cuda; cpu 1.0, quick 0.5)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (cpu; default: torch's)")
    p.add_argument("--mask-block", type=int, default=128, help="query rows per mask block (default 128)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attention_<device>.json; "
                                               "'-' writes none)")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing implementations")
    args = p.parse_args(argv)
    with torch.inference_mode():
        return run(args)


if __name__ == "__main__":
    sys.exit(main())
