#!/usr/bin/env python
"""The last step of benchmarks/gpu_check.sh: one JSON (gpu_check[_rehearsal].json) and one table of every step.

Reads the steps' table (name, exit code, seconds, limit, command) and the JSON each step wrote, and
gathers the figures the README's GPU tables need: build time, the selftest's verdicts, the GPU tests'
counts, the attention summary (ms and TFLOP/s of ours, cuDNN SDPA, FateZero's materialized attention)
and the end-to-end edit (seconds per phase, peak GPU memory and host RSS). Exit code 1 when a step failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _environment(device):
    env = {}
    try:
        import torch

        from fatezero_fast.ops import dispatch, selfcheck
        env = selfcheck.environment()
        env["backends"] = {kind: dispatch.available_backends(kind) for kind in ("cpu",) + (
            ("cuda",) if torch.cuda.is_available() else ())}
        env["auto_order"] = dispatch.explain(device if device == "cpu" or torch.cuda.is_available() else "cpu")
    except Exception as exc:  # noqa: BLE001  (the summary is written whatever broke)
        env["error"] = f"{type(exc).__name__}: {exc}"
    try:
        env["git_commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                                           timeout=10).stdout.strip() or os.environ.get("GPU_CHECK_COMMIT")
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = os.environ.get("GPU_CHECK_COMMIT")
    if device == "cuda":
        try:
            env["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
            env["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True,
                                         timeout=20).stdout.strip().splitlines()[-1]
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return env


def _selftest(data):
    if not data:
        return None
    rows = data.get("rows", [])
    per_backend = {}
    for r in rows:
        b = per_backend.setdefault(r["backend"], {"cases": 0, "failed": 0, "max_rel_err": 0.0, "max_ms": 0.0})
        b["cases"] += 1
        b["failed"] += r["status"] != "pass"
        b["max_rel_err"] = max(b["max_rel_err"], r["rel_err"] or 0.0)
        b["max_ms"] = max(b["max_ms"], r["ms"] or 0.0)
    return {"passed": data.get("passed"), "failed": data.get("failed"), "per_backend": per_backend,
            "failures": [r for r in rows if r["status"] != "pass"][:40]}


def _pytest(data):
    if not data:
        return None
    budget = [t["test"] for t in data["tests"] if t["outcome"] == "skipped" and "time budget" in (t["message"] or "")]
    return {"counts": data["counts"], "elapsed_s": data["elapsed_s"], "budget_s": data.get("budget_s"),
            "not_run_for_the_budget": len(budget),
            "failures": [t for t in data["tests"] if t["outcome"] == "failed"],
            "slowest": sorted((t for t in data["tests"] if t["outcome"] == "passed"),
                              key=lambda t: -t["seconds"])[:10]}


def _attention(data):
    if not data:
        return None
    keep = ("shape", "index", "mode", "impl", "median_ms", "tflops", "peak_extra_bytes", "no_nq_nk_alloc",
            "rel_err_head0", "status")
    return {"summary": data.get("summary"), "targets": data.get("targets"),
            "records": [{k: r.get(k) for k in keep} for r in data.get("records", [])]}


def _pipeline(data):
    if not data:
        return None
    keep = ("frames", "chunk_size", "chunk_used", "store", "steps", "size", "dtype", "status", "seconds",
            "edit_s_per_frame_step", "inversion_s_per_frame_step", "edit_vs_bare", "inversion_vs_bare",
            "peak_gpu_allocated_bytes", "peak_gpu_reserved_bytes", "peak_rss_bytes")
    return [{k: r.get(k) for k in keep} for r in data.get("records", [])]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--suffix", default="")
    p.add_argument("--start", type=float, default=None)
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    res, dev, sfx = args.results, args.device, args.suffix

    steps = []
    with open(args.steps) as f:
        for line in f:
            name, rc, secs, limit, command = line.rstrip("\n").split("\t", 4)
            status = "not run" if rc == "not run" else ("ok" if rc == "0" else
                                                        ("timeout" if rc in ("124", "137") else f"exit {rc}"))
            steps.append({"step": name, "status": status, "seconds": float(secs), "limit_s": int(limit),
                          "command": command})
    files = {"selftest": f"selftest_{dev}{sfx}.json", "pytest": f"pytest_gpu{sfx}.json",
             "attention": f"attention_{dev}_quick{sfx}.json",
             "e2e-recompute": f"pipeline_{dev}_e2e_recompute{sfx}.json", "e2e-qk": f"pipeline_{dev}_e2e_qk{sfx}.json",
             "temporal": f"temporal_{dev}{sfx}.json"}
    result = {
        "what": "benchmarks/gpu_check.sh" + (" --rehearsal" if sfx else ""),
        "total_s": round(time.time() - args.start, 1) if args.start else None,
        "environment": _environment(dev),
        "steps": steps,
        "files": files,
        "build_s": next((s["seconds"] for s in steps if s["step"] == "build"), None),
        "selftest": _selftest(_load(os.path.join(res, files["selftest"]))),
        "pytest": _pytest(_load(os.path.join(res, files["pytest"]))),
        "attention": _attention(_load(os.path.join(res, files["attention"]))),
        "e2e": {store: _pipeline(_load(os.path.join(res, files[f"e2e-{store}"]))) for store in ("recompute", "qk")},
        "temporal_attention": (_load(os.path.join(res, files["temporal"])) or {}).get("temporal_attention_op"),
    }
    out = os.path.join(res, f"gpu_check{sfx}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)

    print(f"\n# gpu check{' rehearsal' if sfx else ''}: {result['environment'].get('device')} | "
          f"torch {result['environment'].get('torch')} | triton {result['environment'].get('triton')} | "
          f"total {result['total_s']} s")
    for s in steps:
        print(f"{s['step']:14} {s['status']:8} {s['seconds']:7.1f} s (limit {s['limit_s']} s)")
    if result["selftest"]:
        print(f"selftest: {result['selftest']['passed']} passed, {result['selftest']['failed']} failed")
    if result["pytest"]:
        print(f"pytest -m gpu: {result['pytest']['counts']} in {result['pytest']['elapsed_s']} s "
              f"({result['pytest']['not_run_for_the_budget']} left for the budget)")
    for store, records in result["e2e"].items():
        for r in records or []:
            print(f"e2e {store:9} frames {r['frames']} chunk {r['chunk_size']}: {r['status']} "
                  f"{ {k: round(v, 2) for k, v in (r['seconds'] or {}).items()} } "
                  f"peak GPU {r.get('peak_gpu_allocated_bytes')} RSS {r.get('peak_rss_bytes')}")
    print(f"# wrote {out}")
    return 1 if any(s["status"] != "ok" for s in steps) else 0


if __name__ == "__main__":
    sys.exit(main())
