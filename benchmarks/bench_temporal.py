"""What a tuned checkpoint's temporal modules add to a UNet call, and chunked memory with them.

1. FLOPs of one UNet call of the random SD-1.4-shaped model, plain and with FateZero's temporal
   modules (temporal attention in every transformer block, LoRA temporal convs of rank 160),
   counted with torch.utils.flop_counter on meta tensors (no weights, nothing computed);
2. CPU time of that call, plain vs tuned (same random weights; the temporal output projections
   and LoRA up-convs random too, as after tuning), median of --reps;
3. peak memory of one UNet call of the tiny tuned model at --frames frames, unchunked vs chunked,
   each in a child process (peak RSS above the child's RSS after building the model);
4. temporal attention alone (F frames of attention at each of N token positions) at SD-1.4's three
   attention levels: torch's SDPA (what unet/temporal.py calls) against this project's
   blended_attention (each token position a "frame" attending to itself, no source) on every backend
   available on the device, same inputs, outputs checked against SDPA, median of --reps.

    python benchmarks/bench_temporal.py --out benchmarks/results/temporal_cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from an uninstalled checkout

from fatezero_fast.models.random import CONFIGS  # noqa: E402
from fatezero_fast.unet import temporal  # noqa: E402
from fatezero_fast.unet.processors import VideoAttentionConfig, install  # noqa: E402

_DOWN = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3


def _unet(kind: str, tuned: bool, device="cpu", seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, down_block_types=_DOWN, up_block_types=_UP,
                                    **CONFIGS[kind]["unet"])
        if tuned:
            temporal.attach(unet, temporal.TemporalSpec(attention="fatezero", conv="lora", rank=160))
    if tuned and device != "meta":
        from fatezero_fast.models.tuned import randomize_temporal

        randomize_temporal(unet, seed + 1)
    state = install(unet.eval(), VideoAttentionConfig(backend="reference" if device == "meta" else "auto"))
    return unet, state


def _call(model, frames, size, device="cpu", chunk=None):
    unet, state = model
    dim = unet.config.cross_attention_dim
    sample = torch.randn(frames, 4, size, size, device=device)
    context = torch.randn(frames, 77, dim, device=device)
    state.begin_call("plain", frames, (size, size))
    with torch.no_grad():
        if chunk is None:
            return unet(sample, 500, encoder_hidden_states=context).sample
        from fatezero_fast.unet.runner import streaming_unet

        return streaming_unet(unet, sample, 500, context, num_frames=frames, chunk_size=chunk, state=state)


def count_flops(frames: int, size: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for tuned in (False, True):
        unet = _unet("sd14", tuned, "meta")
        with FlopCounterMode(display=False) as counter:
            _call(unet, frames, size, "meta")
        out["tuned" if tuned else "plain"] = counter.get_total_flops()
    out["added_fraction"] = out["tuned"] / out["plain"] - 1
    return out


def cpu_time(frames: int, size: int, reps: int) -> dict:
    out = {}
    for tuned in (False, True):
        unet = _unet("sd14", tuned)
        _call(unet, frames, size)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            _call(unet, frames, size)
            times.append(time.perf_counter() - t0)
        out["tuned_s" if tuned else "plain_s"] = statistics.median(times)
        del unet
    out["added_fraction"] = out["tuned_s"] / out["plain_s"] - 1
    return out


# SD-1.4's attention levels at 512x512: (token positions, heads, head dim)
SD14_LEVELS = ((4096, 8, 40), (1024, 8, 80), (256, 8, 160))


def temporal_op_times(frames: list[int], reps: int, device: str = "cpu") -> list[dict]:
    """Seconds per temporal-attention call, SDPA vs blended_attention's backends, per level and F."""
    import torch.nn.functional as F

    from fatezero_fast.ops import available_backends, blended_attention

    dtype = torch.float32 if device == "cpu" else torch.float16
    backends = [b for b in available_backends(device) if b not in ("sdpa", "reference")]
    rows = []
    for f in frames:
        for tokens, heads, dim in SD14_LEVELS:
            g = torch.Generator(device).manual_seed(f * tokens)
            q, k, v = (torch.randn(tokens, heads, f, dim, generator=g, device=device, dtype=dtype) for _ in range(3))
            own = torch.arange(tokens, device=device)[:, None]  # each position attends to its own frames
            calls = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v)}
            calls.update({b: (lambda b=b: blended_attention(q, k, v, kv_frames=own, backend=b)) for b in backends})
            expected = calls["sdpa"]()
            row = {"frames": f, "tokens": tokens, "heads": heads, "head_dim": dim}
            for name, call in calls.items():
                err = float((call() - expected).abs().max())
                if err > (1e-4 if dtype == torch.float32 else 2e-2):
                    raise AssertionError(f"{name} differs from SDPA by {err:.2e} at {row}")
                times = []
                for _ in range(reps):
                    if device != "cpu":
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    call()
                    if device != "cpu":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - t0)
                row[f"{name}_s"] = statistics.median(times)
            rows.append(row)
    return rows


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_memory(frames: int, size: int, chunk: int | None) -> dict:
    """Run in a child: the tiny tuned model's UNet call; peak RSS above the RSS after building it."""
    unet = _unet("tiny", True)
    _call(unet, 1, size)  # libraries and kernels warmed up on one frame
    before = _rss_mb()
    t0 = time.perf_counter()
    _call(unet, frames, size, chunk=chunk)
    return {"chunk_size": chunk, "peak_rss_above_model_mb": _rss_mb() - before, "seconds": time.perf_counter() - t0}


def memory(frames: int, size: int, chunks: list) -> list:
    rows = []
    for chunk in chunks:
        args = [sys.executable, __file__, "--child", json.dumps([frames, size, chunk])]
        res = subprocess.run(args, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flops-frames", type=int, default=8)
    p.add_argument("--flops-size", type=int, default=64, help="latent size for the FLOP count (64: 512x512)")
    p.add_argument("--time-frames", type=int, default=2)
    p.add_argument("--time-size", type=int, default=32, help="latent size for the CPU timing (32: 256x256)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--frames", type=int, default=64, help="frames for the memory comparison")
    p.add_argument("--size", type=int, default=32, help="latent size for the memory comparison")
    p.add_argument("--chunks", default="none,8", help="chunk sizes for the memory comparison (none = unchunked)")
    p.add_argument("--op-frames", default="8,24", help="clip lengths F for the SDPA vs own-op comparison")
    p.add_argument("--device", default="cpu", help="device of the SDPA vs own-op comparison")
    p.add_argument("--only", help="comma-separated sections to run (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child")
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        frames, size, chunk = json.loads(args.child)
        print(json.dumps(child_memory(frames, size, chunk)))
        return
    chunks = [None if c == "none" else int(c) for c in args.chunks.split(",")]
    report = {
        "command": "python " + shlex.join(sys.argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": f"cpu ({platform.processor() or platform.machine()}), {args.threads} thread(s), "
                  f"load average {os.getloadavg()[0]:.1f} at start (a shared machine: times are noisy)",
        "torch": torch.__version__,
    }
    sections = (
        ("memory_tiny_tuned", lambda: {"frames": args.frames, "latent": args.size,
                                       "runs": memory(args.frames, args.size, chunks)}),
        ("flops_sd14_rank160", lambda: {"frames": args.flops_frames, "latent": args.flops_size,
                                        **count_flops(args.flops_frames, args.flops_size)}),
        ("cpu_time_sd14_rank160", lambda: {"frames": args.time_frames, "latent": args.time_size, "reps": args.reps,
                                           **cpu_time(args.time_frames, args.time_size, args.reps)}),
        ("temporal_attention_op", lambda: {"device": args.device, "reps": args.reps, "rows": temporal_op_times(
            [int(f) for f in args.op_frames.split(",")], args.reps, args.device)}),
    )
    only = set(args.only.split(",")) if args.only else None
    if args.out and only and Path(args.out).exists():  # a partial run adds its sections to the earlier ones
        report = {**json.loads(Path(args.out).read_text()), "device": report["device"], "torch": report["torch"]}
    for name, run in sections:  # each section is written as soon as it is measured, with its command
        if only and name not in only:
            continue
        report[name] = {"command": "python " + shlex.join(sys.argv),
                        "date": datetime.datetime.now().isoformat(timespec="seconds"), **run()}
        text = json.dumps(report, indent=2)
        if args.out:
            Path(args.out).write_text(text + "\n")
    print(text)

if __name__ == "__main__":
    main()
