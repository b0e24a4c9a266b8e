"""Time of one FateZero edit step with the recompute store, against a plain classifier-free step.

    python benchmarks/bench_edit_step.py --model sd14 --size 512 --frames 2 --device cpu --threads 2

One UNet call each, same model, latents and timestep, timed in the same process (median of
--repeats after a warm-up call):

- plain_cfg: FateZero's video UNet (sparse-causal attention, clip-wide GroupNorm) on two
  branches [uncond, target], nothing fused: the step an unedited video denoiser runs;
- stock_cfg: the stock 2D UNet (per-frame attention and GroupNorm) on the same two branches;
- recompute_full_source: the edit step [source, uncond, target] with the source branch run
  through the whole UNet (what the pipeline did before fatezero_fast.source_branch);
- recompute: the edit step as the pipeline runs it, the source branch dropped after the last
  controlled layer (fatezero_fast.source_branch);
- the controlled cross-attention layers of the recompute step: their time as run (fusion in
  plain torch) and as plain SDPA on the same rows, which bounds what a fused kernel could save;
- and the average step of a whole edit with the official style config's schedule
  (cross_replace_steps 0.2, self_replace_steps 0.5: the source is left out at half the steps).

The issue 4 target: recompute within 1.45x of a plain two-branch classifier-free step.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the checkout's package when it is not installed (the device machine)
    sys.path.insert(0, str(REPO))

from fatezero_fast.edit.pipeline import FateZeroPipeline  # noqa: E402
from fatezero_fast.models import random_components  # noqa: E402
from fatezero_fast.semantics.plan import EditOptions, EditPlan  # noqa: E402
from fatezero_fast.stores import make_store  # noqa: E402
from fatezero_fast.unet.processors import (  # noqa: E402
    FateZeroCrossAttnProcessor,
    VideoAttentionConfig,
)
from fatezero_fast.unet.source_exit import source_exit_block  # noqa: E402

SOURCE, TARGET = "a red car driving down a road", "watercolor painting of a red car driving down a road"
EVERY_STEP = dict(cross_replace_steps=0.8, self_replace_steps=1.0, eq_params={"words": ["watercolor"], "values": [5]})
STYLE_SCHEDULE = dict(cross_replace_steps=0.2, self_replace_steps=0.5, eq_params={"words": ["watercolor"], "values": [5]})


def timed(variants: dict, repeats: int, device: torch.device) -> dict:
    """Median seconds of each variant's call: one warm-up call each, then `repeats` rounds that
    call every variant once (interleaved, so that drift in the machine's load hits all alike)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in variants.values():
        fn()
    seconds = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def cross_fusion_cost(pipe, edit_step, repeats: int) -> dict:
    """Seconds the edit step spends in its controlled (fused, plain torch) cross-attention layers,
    and what the same calls cost as plain SDPA (the floor a fused cross-attention kernel could
    reach): their difference bounds what fusing the cross-attention could save."""
    seconds = {"fused": 0.0, "as_sdpa": 0.0}
    original = FateZeroCrossAttnProcessor.__call__

    def clocked(fn):
        start = time.perf_counter()
        out = fn()
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        return out, time.perf_counter() - start

    def instrumented(self, attn, hidden_states, *args, **kwargs):
        st = self.state
        out, spent = clocked(lambda: original(self, attn, hidden_states, *args, **kwargs))
        if st.mode == "edit" and st.controls(hidden_states.shape[1]):
            seconds["fused"] += spent
            st.mode = "plain"  # the same layer on the same rows, through SDPA
            try:
                seconds["as_sdpa"] += clocked(lambda: original(self, attn, hidden_states, *args, **kwargs))[1]
            finally:
                st.mode = "edit"
        return out

    FateZeroCrossAttnProcessor.__call__ = instrumented
    try:
        for _ in range(repeats):
            edit_step()
    finally:
        FateZeroCrossAttnProcessor.__call__ = original
    return {name: value / repeats for name, value in seconds.items()}


def source_branch_flops(model: str, size: int, max_control_tokens: int) -> dict:
    """FLOPs of one UNet pass per frame and the share the source branch skips with the early exit
    (counted by torch's FlopCounterMode on the meta device, stock per-frame attention: the
    sparse-causal attention's extra key frames are not counted)."""
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from fatezero_fast.models.random import _DOWN, _UP, CONFIGS
    from fatezero_fast.unet.processors import FateZeroState

    with torch.device("meta"):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, down_block_types=_DOWN, up_block_types=_UP,
                                    **CONFIGS[model]["unet"])
        sample = torch.randn(1, 4, size // 8, size // 8)
        context = torch.randn(1, 77, unet.config.cross_attention_dim)
    counter = FlopCounterMode(display=False)
    with counter:
        unet(sample, torch.tensor(500), encoder_hidden_states=context)
    state = FateZeroState(VideoAttentionConfig(max_control_tokens=max_control_tokens))
    state.begin_call("edit", 1, (size // 8, size // 8))
    block = source_exit_block(unet, state)
    counts = counter.get_flop_counts()
    skipped = [f"UNet2DConditionModel.up_blocks.{i}" for i in range(block or len(unet.up_blocks), len(unet.up_blocks))]
    skipped += ["UNet2DConditionModel.conv_norm_out", "UNet2DConditionModel.conv_out"] if block is not None else []
    total = counter.get_total_flops()
    share = sum(sum(counts.get(name, {}).values()) for name in skipped) / total
    return {"unet_gflop_per_frame": total / 1e9, "source_exit_block": block, "skipped_share": share,
            "ideal_recompute_vs_plain_cfg": (2 + 1 - share) / 2}


@torch.no_grad()
def measure(args) -> dict:
    attention = VideoAttentionConfig(max_control_tokens=args.max_control_tokens)
    pipe = FateZeroPipeline(**random_components(args.model, seed=0), device=args.device, dtype=args.dtype,
                            chunk_size=args.chunk_size, attention=attention)
    f, latent = args.frames, (args.size // 8, args.size // 8)
    z = torch.randn(f, 4, *latent, generator=torch.Generator().manual_seed(0)).to(pipe.device, pipe.dtype)
    src, unc, tgt = (pipe.encode_prompt(p) for p in (SOURCE, "", TARGET))
    t = pipe.scheduler.config.num_train_timesteps // 2
    plan = EditPlan.build(EditOptions(**EVERY_STEP), SOURCE, TARGET, 10, pipe.tokenizer)
    store = make_store("recompute")
    chunk = args.chunk_size

    def plain():
        pipe.state.begin_call("plain", f, latent)
        pipe._unet([z, z], [unc, tgt], t, chunk)

    def edit(exit_early: bool):
        def run():
            pipe.state.begin_call("edit", f, latent, plan=plan, step=0, store=store, store_step=0)
            block = source_exit_block(pipe.unet, pipe.state) if exit_early else None
            pipe._unet([z, z, z], [src, unc, tgt], t, chunk, drop_first_branch_at=block)
        return run

    def stock():
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        pipe.state.begin_call("plain", 1, latent)  # GroupNorm per frame: the stock 2D UNet
        try:
            pipe.unet(torch.cat([z, z]), t, encoder_hidden_states=torch.cat([unc.expand(f, -1, -1),
                                                                           tgt.expand(f, -1, -1)]))
        finally:
            pipe.unet.set_attn_processor(dict(fatezero))  # it empties the dict it is given

    fatezero = pipe.unet.attn_processors
    pipe.state.begin_call("edit", f, latent, plan=plan, step=0, store=store)
    result = {"source_exit_block": source_exit_block(pipe.unet, pipe.state),
              "flops": source_branch_flops(args.model, args.size, args.max_control_tokens)}
    result.update(timed({"plain_cfg": plain, "recompute_full_source": edit(False), "recompute": edit(True),
                         "stock_cfg": stock}, args.repeats, pipe.device))

    result["cross_fusion"] = cross_fusion_cost(pipe, edit(True), args.repeats)
    if args.schedule_steps:
        inversion = pipe.invert(None, SOURCE, args.schedule_steps, latents=z, progress=False)
        start = time.perf_counter()
        pipe.edit(inversion, TARGET, decode=False, progress=False, **STYLE_SCHEDULE)
        result["style_schedule_edit_step"] = (time.perf_counter() - start) / args.schedule_steps
    result["cross_fusion_saving_bound_vs_recompute"] = \
        (result["cross_fusion"]["fused"] - result["cross_fusion"]["as_sdpa"]) / result["recompute"]
    for name in ("recompute_full_source", "recompute", "style_schedule_edit_step"):
        if name in result:
            result[f"{name}_vs_plain_cfg"] = result[name] / result["plain_cfg"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "sd14"])
    parser.add_argument("--size", type=int, default=128, help="frame width and height in pixels")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-control-tokens", type=int, default=32 * 32,
                        help="controlled layers have at most this many query tokens (256 at --size 256 "
                             "controls the levels that 1024 controls at 512)")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--schedule-steps", type=int, default=0,
                        help="also time a whole edit of this many steps with the style config's schedule")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    result = measure(args)
    for name, value in result.items():
        if isinstance(value, dict):
            unit = "s" if name == "cross_fusion" else ""
            value = ", ".join(f"{k} {v:.3f}{unit}" if isinstance(v, float) else f"{k} {v}" for k, v in value.items())
        elif isinstance(value, float):
            value = f"{value:.3f}" + ("" if "_vs_" in name else "s")
        print(f"{name:40s} {value}")
    device = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"cpu ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    report = {"command": " ".join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "device": device, "torch": torch.__version__, "settings": vars(args),
              "loadavg_start_end": [load_start, os.getloadavg()], "seconds": result}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
