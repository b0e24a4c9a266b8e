"""Quality benchmark on the toy world: what edits look like, scored from the generator's ground truth.

    python benchmarks/bench_quality.py [--clips 4] [--steps 15] [--frames 8] [--threads 2]
        [--out benchmarks/results/quality_cpu.json]

Runs the trained toy-world model (fatezero_fast/toyworld/model) on N generated clips with fixed
seeds (seeds 100.., never used in training: it used seeds 1_000_000..), kinds car, ball, box, boat
in turn. Every row edits every clip's object colour ("a red car ..." -> "a blue car ...", blend
word = the object); the ablation rows also make the shape edit ("car" -> "ball", latent blend)
and the reconstruction (target = source prompt). Metrics (fatezero_fast.toyworld.metrics):
  colour_acc    frames whose object body is nearest the target palette colour
  shape_rate    frames where a blob of the target kind sits where the object was (shape edits)
  bg_psnr/ssim  outside the ground-truth object mask grown by 2 px, edit against source
  temporal_err  mean |edit's frame-to-frame change - source's| (0-255; lower is steadier)
  recon_psnr    the reconstruction (same prompt) against the input clip
  mask_*        the self-attention blend mask against the ground-truth mask (recall, IoU)
  time_s        inversion + attribute edit; peak_rss_mb: peak resident memory above the row's start
  store_mb      the attention store's bytes
Rows: FateZero in full (recompute store, unchunked, index [-1, 'first']); without self-attention
blending; without attention fusion (plain DDIM inversion + regeneration, the paper's ablation);
each store form; chunked (2 frames at a time); index ['mid']. Writes JSON, a PNG plot and a
Markdown table (beside the JSON).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from fatezero_fast.unet.processors import VideoAttentionConfig  # noqa: E402
from fatezero_fast.stores import make_store  # noqa: E402

from fatezero_fast.edit.pipeline import FateZeroPipeline  # noqa: E402
from fatezero_fast.toyworld import edits as E  # noqa: E402
from fatezero_fast.toyworld import metrics, world  # noqa: E402
from fatezero_fast.toyworld.model import load_components  # noqa: E402

KINDS = ("car", "ball", "box", "boat")
FULL_INDEX = [-1, "first"]
# name, index list, store form (+ rank), chunk size, edit variant
ROWS = [
    ("fatezero", FULL_INDEX, ("recompute", None), None, "full"),
    ("no self-attn blend", FULL_INDEX, ("recompute", None), None, "no_self_blend"),
    ("no fusion (inversion + regeneration)", FULL_INDEX, ("recompute", None), None, "no_fusion"),
    ("store qk", FULL_INDEX, ("qk", None), None, "attribute"),
    ("store full (fp32 maps)", FULL_INDEX, ("full", None), None, "attribute"),
    ("store fp16", FULL_INDEX, ("fp16", None), None, "attribute"),
    ("store fp8", FULL_INDEX, ("fp8", None), None, "attribute"),
    ("store lowrank r=8", FULL_INDEX, ("lowrank", 8), None, "attribute"),
    ("store lowrank r=16", FULL_INDEX, ("lowrank", 16), None, "attribute"),
    ("chunked (2 frames)", FULL_INDEX, ("recompute", None), 2, "attribute"),
    ("index ['mid']", ["mid"], ("recompute", None), None, "attribute"),
]


def benchmark_clips(n: int, frames: int) -> list[world.Clip]:
    return [world.make_clip(100 + i, num_frames=frames, kind=KINDS[i % len(KINDS)]) for i in range(n)]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Peak resident memory above the start, sampled every 2 ms in a thread (Linux)."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, _rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.base) / 2 ** 20


def edit_frames(pipe, inversion, edit: E.Edit, guidance: float, chunk):
    options = dict(edit.options, **({} if guidance is None else dict(guidance_scale=guidance)))
    result = pipe.edit(inversion, edit.prompt, progress=False, chunk_size=chunk, **options)
    return metrics.to_uint8(result.frames), result


def run_row(components, row, clips, steps, guidance) -> dict:
    name, index, (form, rank), chunk, variant = row
    # a fresh copy of the model per pipeline: a pipeline installs its processors and norms in the UNet
    pipe = FateZeroPipeline(**copy.deepcopy(components), attention=VideoAttentionConfig(sparse_causal_index=index), device="cpu",
                            chunk_size=chunk)
    per_clip = []
    for clip in clips:
        scene = clip.scene
        attribute = E.attribute(scene)
        if variant == "no_self_blend":
            attribute.options["blend_self_attention"] = False
        if variant == "no_fusion":
            attribute = E.no_fusion(attribute)
        store = make_store(form, rank=rank) if form == "lowrank" else make_store(form)
        with PeakRSS() as mem:
            t = time.perf_counter()
            inversion = pipe.invert(clip.tensor(), clip.caption, steps, seed=0, store=store, progress=False)
            t_inv = time.perf_counter() - t
            edited, result = edit_frames(pipe, inversion, attribute, guidance, chunk)
            t_total = time.perf_counter() - t
        scores = metrics.score_edit(clip, edited, target_colour=attribute.target_colour,
                                    masks=result.masks.get("self_attention"))
        scores.update(time_s=t_total, invert_s=t_inv, peak_rss_mb=mem.extra_mb, store_mb=store.nbytes() / 2 ** 20)
        if variant in ("full", "no_self_blend", "no_fusion") and scene.kind != "boat":
            shape = E.shape(scene)
            if variant == "no_self_blend":
                shape.options["blend_self_attention"] = False
            if variant == "no_fusion":
                shape = E.no_fusion(shape)
            shaped, result = edit_frames(pipe, inversion, shape, guidance, chunk)
            s = metrics.score_edit(clip, shaped, target_kind=shape.target_kind)
            scores.update(shape_rate=s["shape_rate"], shape_bg_psnr=s["bg_psnr"])
        if variant in ("full", "no_fusion"):
            recon = E.reconstruct(scene) if variant == "full" else E.no_fusion(E.reconstruct(scene))
            frames, _ = edit_frames(pipe, inversion, recon, guidance, chunk)
            scores["recon_psnr"] = metrics.psnr(clip.frames, frames)
        per_clip.append(dict(seed_caption=clip.caption, target=attribute.prompt, **scores))
        print(f"  {name}: {clip.caption!r} -> colour {scores['colour_acc']:.2f} bg {scores['bg_psnr']:.1f} dB "
              f"({t_total:.1f} s)", flush=True)
    keys = sorted({k for c in per_clip for k, v in c.items() if isinstance(v, (int, float))})
    mean = {k: float(np.mean([c[k] for c in per_clip if k in c])) for k in keys}
    return dict(row=name, index=index, store=form if rank is None else f"{form} r={rank}", chunk_size=chunk,
                variant=variant, mean=mean, clips=per_clip)


def vae_psnr(components, clips) -> float:
    vae = components["vae"]
    values = []
    with torch.no_grad():
        for clip in clips:
            rec = vae.decode(vae.encode(clip.tensor()).latent_dist.mean).sample
            values.append(metrics.psnr(clip.frames, metrics.to_uint8(rec)))
    return float(np.mean(values))


COLUMNS = [("colour_acc", "colour edit acc", "{:.0%}"), ("bg_psnr", "bg PSNR dB", "{:.1f}"),
           ("bg_ssim", "bg SSIM", "{:.3f}"), ("temporal_err", "temporal err", "{:.2f}"),
           ("shape_rate", "shape edit rate", "{:.0%}"), ("recon_psnr", "recon PSNR dB", "{:.1f}"),
           ("mask_recall", "mask recall", "{:.2f}"), ("mask_iou", "mask IoU", "{:.2f}"),
           ("time_s", "time s", "{:.1f}"), ("peak_rss_mb", "peak RSS MB", "{:.0f}"), ("store_mb", "store MB", "{:.2f}")]


def markdown(result) -> str:
    head = "| row | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for r in result["rows"]:
        cells = [c[2].format(r["mean"][c[0]]) if c[0] in r["mean"] else "" for c in COLUMNS]
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result, path: Path) -> None:
    """Bars of colour-edit accuracy and background PSNR per row (PIL; no matplotlib here)."""
    from PIL import Image, ImageDraw

    rows = result["rows"]
    W, bar_h, left = 900, 18, 260
    H = 60 + len(rows) * (2 * bar_h + 8)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), f"toy-world quality ({result['meta']['clips']} clips, {result['meta']['steps']} steps): "
                    f"blue = colour edit accuracy (0-100%), orange = background PSNR (0-50 dB)", fill="black")
    span = W - left - 20
    for i, r in enumerate(rows):
        y = 40 + i * (2 * bar_h + 8)
        d.text((10, y + bar_h // 2), r["row"], fill="black")
        acc, bg = r["mean"].get("colour_acc", 0), r["mean"].get("bg_psnr", 0)
        d.rectangle([left, y, left + span * acc, y + bar_h - 2], fill=(50, 90, 200))
        d.text((left + span * acc + 4, y + 2), f"{acc:.0%}", fill="black")
        d.rectangle([left, y + bar_h, left + span * min(bg, 50) / 50, y + 2 * bar_h - 2], fill=(240, 140, 40))
        d.text((left + span * min(bg, 50) / 50 + 4, y + bar_h + 2), f"{bg:.1f} dB", fill="black")
    img.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the edits' (edits.GUIDANCE)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model", default=None, help="toy-world model folder (default: the shipped one)")
    p.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    p.add_argument("--out", default="benchmarks/results/quality_cpu.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    components = load_components(args.model)
    clips = benchmark_clips(args.clips, args.frames)
    rows = ROWS if not args.rows else [r for r in ROWS if r[0] in args.rows.split(",")]
    t0 = time.perf_counter()
    result = dict(meta=dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                            machine=platform.machine(), threads=torch.get_num_threads(), torch=torch.__version__,
                            clips=args.clips, steps=args.steps, frames=args.frames, size=world.SIZE,
                            guidance_scale=args.guidance_scale or E.GUIDANCE, vae_psnr=vae_psnr(components, clips),
                            command=" ".join(["python", "benchmarks/bench_quality.py"] + (argv or sys.argv[1:]))),
                  rows=[])
    for row in rows:
        print(f"{row[0]}", flush=True)
        result["rows"].append(run_row(components, row, clips, args.steps, args.guidance_scale))
    result["meta"]["total_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    out.with_suffix(".md").write_text(table)
    plot(result, out.with_suffix(".png"))
    print(table)
    print(f"VAE-only reconstruction PSNR {result['meta']['vae_psnr']:.1f} dB; wrote {out}, "
          f"{out.with_suffix('.md')}, {out.with_suffix('.png')} in {result['meta']['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
