"""Attention-store benchmark: bytes per form against the official store, accuracy and time per form.

    python benchmarks/bench_store.py [--steps 10] [--frames 4] [--out benchmarks/results/store_cpu.json]

1. Bytes for SD-1.4 at 512x512, 50 steps, 8/32/128 frames, ['mid'] and [-1, 'first']: every
   form by `estimate_store_bytes` (exact: tests/test_store.py checks it against the measured
   bytes of each form), the official store (fp32 maps; an fp16 run keeps half), and what an
   Inversion keeps besides its store (the latents of every step in fp16 and the per-token
   16x16 mask maps in fp32).
2. On the random tiny model (fp32, CPU): relative error of the final edited latents and PSNR of
   the decoded frames against the `full` store, for fp16, fp8 and lowrank at several ranks,
   with the store's measured bytes; and the time of one edit step per form, against a plain
   two-branch classifier-free step of the same UNet.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from fatezero_fast.edit.pipeline import FateZeroPipeline
from fatezero_fast.io.video import make_sample_clip
from fatezero_fast.models import CONFIGS
from fatezero_fast.stores import estimate_store_bytes, make_store, official_store_bytes

SD14 = dict(CONFIGS["sd14"]["unet"])
FORMS = ("recompute", "qk", "full", "fp16", "fp8", "lowrank")
SOURCE, TARGET = "a red car driving down a road", "watercolor painting of a red car driving down a road"
OPTIONS = dict(cross_replace_steps=0.8, self_replace_steps=1.0, eq_params={"words": ["watercolor"], "values": [5]})


def inversion_overhead_bytes(frames: int, steps: int, latent: int = 64, mask_level: int = 16) -> int:
    """Latents of every step (fp16) plus the per-token mask-level maps (fp32) an Inversion keeps."""
    return (steps + 1) * frames * 4 * latent * latent * 2 + steps * frames * mask_level * mask_level * 77 * 4


def sizes_table(steps: int = 50) -> list[dict]:
    rows = []
    for index in (["mid"], [-1, "first"]):
        for frames in (8, 32, 128):
            official = official_store_bytes(SD14, 512, 512, frames, steps, index)
            row = {"index": index, "frames": frames, "steps": steps, "official_fp32": official,
                   "official_fp16_run": official // 2, "inversion_overhead": inversion_overhead_bytes(frames, steps)}
            for form in FORMS:
                row[form] = estimate_store_bytes(form, SD14, 512, 512, frames, steps, index, model_bytes=2)
            row["recompute_total_vs_official"] = (row["recompute"] + row["inversion_overhead"]) / official
            row["qk_vs_official"] = row["qk"] / official
            rows.append(row)
    return rows


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) / 2).pow(2).mean().item()  # frames in [-1, 1] -> [0, 1]
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def accuracy_and_time(frames: int, steps: int) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    pipe = FateZeroPipeline.tiny_random(seed=0, device="cpu", dtype="fp32")
    clip = make_sample_clip(frames, 128, 128)
    latents = pipe.encode_video(clip, torch.Generator().manual_seed(0))
    variants = [("full", {}), ("recompute", {}), ("qk", {}), ("fp16", {}), ("fp8", {})] + \
        [(f"lowrank r={r}", {"rank": r}) for r in (4, 8, 16, 32)] + [("lowrank err<=0.02", {"error_budget": 0.02})]
    results, reference = [], None
    for name, kwargs in variants:
        store = make_store(name.split()[0], **kwargs)
        inversion = pipe.invert(None, SOURCE, steps, latents=latents, store=store, progress=False)
        start = time.perf_counter()
        result = pipe.edit(inversion, TARGET, progress=False, **OPTIONS)
        seconds = time.perf_counter() - start
        if reference is None:
            reference = result
        rel = ((result.latents - reference.latents).abs().max() / reference.latents.abs().max()).item()
        record = {"store": name, "bytes": store.nbytes(), "latents_rel_err_vs_full": rel,
                  "psnr_vs_full_db": psnr(result.frames, reference.frames), "edit_seconds": seconds,
                  "edit_step_seconds": seconds / steps}
        if hasattr(store, "errors") and store.errors:
            record["max_map_rel_err"] = max(store.errors.values())
        results.append(record)
        print(f"{name:18s} {store.nbytes() / 1e6:9.2f} MB  rel err {rel:.2e}  PSNR {record['psnr_vs_full_db']:.1f} dB"
              f"  {record['edit_step_seconds'] * 1e3:.0f} ms/step", flush=True)

    # a plain classifier-free step of the same UNet, two branches, no FateZero processors
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = pipe.unet
    saved = unet.attn_processors
    unet.set_attn_processor(AttnProcessor2_0())
    pipe.state.begin_call("plain", 1, tuple(latents.shape[-2:]))  # GroupNorm per frame: a stock 2D UNet
    sample = torch.cat([latents, latents])
    context = torch.randn(2 * frames, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        unet(sample, 500, context)
        start = time.perf_counter()
        for _ in range(steps):
            unet(sample, 500, context)
    plain = {"plain_cfg_step_seconds": (time.perf_counter() - start) / steps}
    unet.set_attn_processor(saved)
    return results, plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/store_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = sizes_table()
    for row in sizes:
        print(f"{str(row['index']):16s} {row['frames']:4d} frames: official {row['official_fp32'] / 1e9:8.1f} GB, "
              f"qk {row['qk'] / 1e9:6.2f} GB ({row['qk_vs_official']:.3f}), recompute keeps "
              f"{row['inversion_overhead'] / 1e6:7.1f} MB ({row['recompute_total_vs_official']:.1e})")
    accuracy, plain = accuracy_and_time(args.frames, args.steps)
    print(f"plain classifier-free step: {plain['plain_cfg_step_seconds'] * 1e3:.0f} ms")
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    report = {"command": " ".join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": f"cpu ({platform.processor() or platform.machine()}), {args.threads} threads",
              "torch": torch.__version__, "load_average": load,
              "sd14_512_sizes": sizes,
              "tiny_model": {"frames": args.frames, "steps": args.steps, "size": "128x128 (16x16 latents)",
                             "options": OPTIONS, "per_store": accuracy, **plain}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
