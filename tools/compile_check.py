"""Compile every variant of the Triton blended_attention kernel for a GPU arch, without a GPU.

    python tools/compile_check.py                 # sm_90a (H100/H200), all variants
    python tools/compile_check.py --dtypes fp16 --head-dims 40,80 --forms plain,qk

For each dtype x head dim x source form it builds the launch exactly as `blended_attention_fwd`
would on a CUDA device (`pick_config`'s GPU tiles, `launch_args` on meta tensors of SD-1.4-like
shapes, with a blend mask for the source forms: HAS_MASK compiles every stream and branch),
compiles it with the installed Triton's `triton.compile` for `GPUTarget("cuda", arch, 32)`
(Triton's own bundled ptxas; no CUDA toolkit or driver needed) and prints registers, spills and
shared memory per variant from the ptxas log and the kernel's metadata. Exit status 1 when a
variant fails to compile or needs more shared memory than the arch gives one block.

Works with Triton 3.6 through 3.9 (only `triton.compile`, `ASTSource`, `GPUTarget`, the NVIDIA
backend's `get_ptxas` and the TRITON_* environment variables set below).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

# Before Triton is imported: compiled (not interpreted) kernels, a fresh cache so that ptxas runs
# for every variant, and ptxas's -v log printed by Triton (captured below).
os.environ["TRITON_INTERPRET"] = "0"
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fatezero-compile-check-")
atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

# This checkout's package and kernels, also where another copy of fatezero-fast is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fatezero_fast.ops.backends.triton import _load_kernels  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Triton's pointer type names of the tensors a launch passes.
POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
                 torch.float8_e4m3fn: "*fp8e4nv", torch.int64: "*i64"}
FORMS = ("plain", "qk", "probs", "probs-fp8", "lowrank")  # probs: map in the input dtype; -fp8: e4m3 + row scale
SEQ = {40: 4096, 64: 1024, 80: 1024, 160: 256}  # head dim -> tokens per frame (SD-1.4 at 512 x 512)
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # per block, opt-in maximum
FRAMES, HEADS, RANK = 8, 8, 4


def make_launch(kernels, dtype, d, form):
    """The (grid, args, kwargs) of one GPU launch, from meta tensors (no memory, real strides)."""
    n = SEQ.get(d, 1024)
    meta = dict(device="meta")
    q, k, v = (torch.empty(FRAMES, HEADS, n, d, dtype=dtype, **meta) for _ in range(3))
    kv_frames = torch.zeros(FRAMES, 2, dtype=torch.int64, **meta)  # R = 2 key frames, as [-1, "first"]
    nk_total = 2 * n
    source = None
    if form == "qk":
        source = ("qk", torch.empty_like(q), torch.empty_like(k))
    elif form == "probs":
        source = ("probs", torch.empty(FRAMES, HEADS, n, nk_total, dtype=dtype, **meta))
    elif form == "probs-fp8":
        source = ("probs", torch.empty(FRAMES, HEADS, n, nk_total, dtype=torch.float8_e4m3fn, **meta),
                  torch.empty(FRAMES, HEADS, n, dtype=torch.float32, **meta))
    elif form == "lowrank":
        source = ("lowrank", torch.empty(FRAMES, HEADS, n, RANK, dtype=dtype, **meta),
                  torch.empty(FRAMES, HEADS, RANK, nk_total, dtype=dtype, **meta))
    mask = torch.empty(FRAMES, n, dtype=torch.float32, **meta)
    cfg = kernels.pick_config(d, dtype, None if source is None else source[0], interpret=False)
    return kernels.launch_args(q, k, v, kv_frames, source, mask, None, torch.empty_like(q), cfg)


def ast_source(fn, args, kwargs):
    """ASTSource of a launch, specialized as Triton's launcher does: tensors are 16-byte aligned
    pointers, integers equal to 1 become constants, multiples of 16 get a divisibility hint."""
    params = fn.arg_names
    values = dict(zip(params, args))
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(params):
        if name in kwargs:
            signature[name] = "constexpr"
            constexprs[name] = kwargs[name]
            continue
        value = values[name]
        if isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)


def compile_variant(kernels, target, dtype, d, form):
    _, args, kwargs = make_launch(kernels, dtype, d, form)
    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages")}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ast_source(kernels._blended_attn_fwd, args, kwargs), target=target,
                                  options=options)
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spills is None:
        raise RuntimeError("no ptxas -v log captured:\n" + text)
    return dict(ptx_target=re.search(r"^\.target (\S+)", compiled.asm["ptx"], re.M).group(1),
                tile=f"{kwargs['BLOCK_M']}x{kwargs['BLOCK_N']}x{kwargs['BLOCK_D']}", warps=options["num_warps"],
                stages=options["num_stages"], regs=int(regs.group(1)), spill_st=int(spills.group(1)),
                spill_ld=int(spills.group(2)), smem=compiled.metadata.shared)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: sm_90a)")
    ap.add_argument("--smem-limit", type=int, default=None, help="bytes of shared memory per block "
                    "(default: the arch's opt-in maximum, 227 KB for sm_90)")
    ap.add_argument("--dtypes", default="fp16,bf16,fp32")
    ap.add_argument("--head-dims", default="40,64,80,160")
    ap.add_argument("--forms", default=",".join(FORMS))
    ap.add_argument("--verbose", action="store_true", help="print the traceback of a failed compile")
    opts = ap.parse_args(argv)
    smem_limit = opts.smem_limit or SMEM_LIMIT.get(opts.arch)
    if smem_limit is None:
        ap.error(f"no known shared-memory limit for arch {opts.arch}: pass --smem-limit")
    forms = opts.forms.split(",")
    if set(forms) - set(FORMS):
        ap.error(f"unknown forms {sorted(set(forms) - set(FORMS))}; known: {', '.join(FORMS)}")

    kernels = _load_kernels().blended_attention  # the module: launch_args and the jitted kernel
    target = GPUTarget("cuda", opts.arch, 32)
    ptxas = get_ptxas(opts.arch).path
    ptxas_version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"triton {triton.__version__}, torch {torch.__version__}, target cuda {opts.arch} "
          f"(shared-memory limit {smem_limit} B)\nptxas {ptxas}: {ptxas_version.splitlines()[-1]}")
    header = f"{'dtype':5} {'D':>4} {'form':10} {'tile MxNxD':>12} {'warps':>5} {'stages':>6} " \
             f"{'regs':>4} {'spill st/ld':>12} {'smem B':>7} {'s':>5}  status"
    print(header)
    print("-" * len(header))
    failures = 0
    ptx_targets = set()
    for dname in opts.dtypes.split(","):
        for d in (int(x) for x in opts.head_dims.split(",")):
            for form in forms:
                t0 = time.perf_counter()
                try:
                    r = compile_variant(kernels, target, DTYPES[dname], d, form)
                except Exception as exc:  # noqa: BLE001 - every failure is reported, the loop goes on
                    failures += 1
                    print(f"{dname:5} {d:>4} {form:10} {'':>12} {'':>5} {'':>6} {'':>4} {'':>12} {'':>7} "
                          f"{time.perf_counter() - t0:5.1f}  FAIL {type(exc).__name__}: {str(exc)[:200]}")
                    if opts.verbose:
                        traceback.print_exc()
                    continue
                ptx_targets.add(r["ptx_target"])
                status = "ok"
                if r["smem"] > smem_limit:
                    failures += 1
                    status = "FAIL shared memory over the limit"
                print(f"{dname:5} {d:>4} {form:10} {r['tile']:>12} {r['warps']:>5} {r['stages']:>6} {r['regs']:>4} "
                      f"{r['spill_st']:>5}/{r['spill_ld']:<6} {r['smem']:>7} {time.perf_counter() - t0:5.1f}  {status}")
    print(f"{failures} failure(s); PTX target(s): {', '.join(sorted(ptx_targets)) or '-'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
