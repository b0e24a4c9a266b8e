"""Frames split over ranks: communication per UNet call against compute, and CPU gloo wall time.

    python benchmarks/bench_distributed.py [--frames 1024] [--ranks 8] [--out benchmarks/results/distributed_cpu.json]

1. Bytes each rank sends per UNet call (unet/shard.py `exchange_bytes`, which tests/test_distributed.py
   checks against the bytes a real gloo run counts), for SD-1.4's UNet (meta device, fp16) at
   512x512, plain and with FateZero's temporal layers (temporal attention in every transformer
   block, a LoRA temporal conv after every 3x3 conv), against the FLOPs the rank computes in that
   call (torch's FlopCounterMode, one frame, times the rank's frames and branches; plus, tuned,
   the temporal attention's F x F scores and weighted sums over the rank's share of the tokens).
   The rank that sends the most is reported.
2. Wall time of a tiny-model inversion + edit on this CPU with 1 rank and with 2 gloo ranks.
3. A projected speed-up on N GPUs from those figures, for link bandwidths stated in the output:
   projected, not measured, until a multi-GPU run measures it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fatezero_fast.models.random import _DOWN, _UP, CONFIGS  # noqa: E402
from fatezero_fast.unet import levels, temporal  # noqa: E402
from fatezero_fast.unet.processors import VideoAttentionConfig, install  # noqa: E402
from fatezero_fast.unet.shard import exchange_bytes, module_level  # noqa: E402

LINKS = {"NVLink 4 (450 GB/s)": 450e9, "PCIe 5 x16 (64 GB/s)": 64e9, "100 Gb/s network (12.5 GB/s)": 12.5e9}
# A sustained fp16 rate to turn FLOPs into seconds for the projection (an assumption, stated as such).
ASSUMED_FLOPS = 400e12


def communication(frames: int, ranks: int, size: int = 512) -> list[dict]:
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    latent = (size // 8, size // 8)
    rows = []
    for model, index_list in (("SD", [-1, "first"]), ("SD", ["mid"]), ("FateZero tuned", [-1, "first"])):
        with torch.device("meta"):
            unet = UNet2DConditionModel(in_channels=4, out_channels=4, down_block_types=_DOWN, up_block_types=_UP,
                                        **CONFIGS["sd14"]["unet"]).half()
            if model != "SD":
                temporal.attach(unet, temporal.TemporalSpec(attention="fatezero", conv="lora", rank=16))
            unet.half()
            sample = torch.randn(1, 4, *latent, dtype=torch.half)
            context = torch.randn(1, 77, unet.config.cross_attention_dim, dtype=torch.half)
        temporal.install_hooks(unet, SimpleNamespace(num_frames=1))  # one frame's temporal layers
        counter = FlopCounterMode(display=False)
        with counter:
            unet(sample, torch.tensor(500), encoder_hidden_states=context)
        flops_per_frame = counter.get_total_flops()
        install(unet, VideoAttentionConfig(sparse_causal_index=index_list))
        per_rank = -(-frames // ranks)
        for call, branches, captured in (("inversion", 1, 5), ("edit, qk store (uncond + target)", 2, 5)):
            sent = max(exchange_bytes(unet, latent, frames, ranks, r, branches, captured) for r in range(ranks))
            flops = (flops_per_frame * per_rank + temporal_scores_flops(unet, latent, frames, ranks)) * branches
            rows.append(dict(model=model, index_list=index_list, call=call, branches=branches, frames=frames,
                             ranks=ranks, bytes_sent_per_rank=sent, flops_per_rank=flops,
                             bytes_per_gflop=sent / (flops / 1e9)))
    return rows


def temporal_scores_flops(unet, latent, frames: int, ranks: int) -> int:
    """FLOPs of one branch's temporal attention scores and weighted sums on a rank (its 1/ranks of the
    tokens, all frames): 2 * 2 * F^2 * n * C per block; one frame's FlopCounterMode count misses them."""
    tokens = [n for _, n in levels.unet_levels(unet.config, latent)]
    return sum(4 * frames ** 2 * -(-tokens[module_level(name, len(tokens))] // ranks) * block.attn1.to_q.in_features
               for name, block in unet.named_modules() if hasattr(block, "_fz_temporal_names"))


def _timed_rank(rank, world, init, queue):
    import copy

    import torch.distributed as dist

    from fatezero_fast.edit.pipeline import FateZeroPipeline
    from fatezero_fast.models import random_components

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    pipe = FateZeroPipeline(**copy.deepcopy(random_components("tiny", seed=0)), device="cpu")
    if world > 1:
        pipe.distribute()
    torch.manual_seed(0)
    latents = torch.randn(8, 4, 16, 16)
    start = time.perf_counter()
    inversion = pipe.invert(None, "a red car driving down a road", 5, latents=latents, progress=False)
    pipe.edit(inversion, "a blue car driving down a road", progress=False, decode=False)
    queue.put((rank, time.perf_counter() - start))
    if world > 1:
        dist.destroy_process_group()


def wall_times() -> dict:
    import torch.multiprocessing as mp

    times = {}
    ctx = mp.get_context("spawn")
    for world in (1, 2):
        queue = ctx.Queue()
        with tempfile.TemporaryDirectory() as tmp:
            procs = [ctx.Process(target=_timed_rank, args=(r, world, f"file://{tmp}/init", queue)) for r in range(world)]
            for p in procs:
                p.start()
            results = [queue.get() for _ in procs]
            for p in procs:
                p.join()
        times[world] = max(t for _, t in results)
    return {"tiny model, 8 frames of 128x128, 5 steps: inversion + edit, one thread per rank": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1024)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "distributed_cpu.json"))
    args = parser.parse_args()
    rows = communication(args.frames, args.ranks)
    for row in rows:
        comm = {link: row["bytes_sent_per_rank"] / bw for link, bw in LINKS.items()}
        compute = row["flops_per_rank"] / ASSUMED_FLOPS
        row["projected"] = {link: dict(comm_s=c, compute_s=compute, speedup=args.ranks * compute / (compute + c))
                            for link, c in comm.items()}
        print(f"{row['model']:15} {str(row['index_list']):16} {row['call']:34} {row['bytes_sent_per_rank'] / 1e6:9.1f} MB sent/rank "
              f"{row['flops_per_rank'] / 1e12:8.1f} TFLOP/rank  " +
              "  ".join(f"{link.split(' (')[0]}: x{p['speedup']:.2f}" for link, p in row["projected"].items()))
    walls = wall_times()
    for what, times in walls.items():
        print(f"{what}: " + ", ".join(f"{w} rank(s) {t:.1f} s" for w, t in times.items()))
    record = dict(command="benchmarks/bench_distributed.py " + " ".join(sys.argv[1:]),
                  environment=dict(device=f"CPU ({os.cpu_count()} cores)", platform=platform.platform(),
                                   torch=torch.__version__, load_average_1min=os.getloadavg()[0]),
                  assumed_sustained_flops=ASSUMED_FLOPS, links=LINKS, communication=rows, cpu_wall_s=walls,
                  note="speed-ups are projected from counted bytes and FLOPs under the stated link bandwidths "
                       "and sustained rate; no multi-GPU run has measured them yet")
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
