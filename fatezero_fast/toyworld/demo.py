"""The toy-world demo: three FateZero edits of a built-in toy-world clip with the trained toy model.

    python -m fatezero_fast.toyworld.demo --output out/demo     (what `make demo` runs)

Edits "a red car driving on a road under a blue sky" three ways: an attribute edit with blend words
(red -> blue car), a global change (the same scene at night), and a shape edit (car -> ball, with
latent blend). Writes into --output:
  <edit>.mp4 / .gif      source | edit, side by side (frames upscaled 4x from 48x48)
  <edit>_masks.png       rows: source, edit, the blend mask FateZero used (or, with no blend words,
                         the source cross-attention map of the changed word), one column per frame
  still.png              source | edit | mask of the attribute edit, middle frame (the README's picture)
  frames/<edit>/*.png    the frames at their own size (source in frames/source)
  summary.json/.txt      the scores (fatezero_fast.toyworld.metrics) against the clip's ground truth
Runs on the CPU in well under two minutes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from fatezero_fast.io.video import save_frames, save_video

from . import edits as E
from . import metrics, world
from .model import toyworld_pipeline

DEMO_SCENE = dict(kind="car", colour="red", ground="road", sky="blue", motion="crossing")
DEMO_SEED = 7
UPSCALE = 4


def demo_clip(num_frames: int = 8) -> world.Clip:
    """The built-in toy clip: "a red car driving on a road under a blue sky"."""
    return world.make_clip(DEMO_SEED, num_frames=num_frames, **DEMO_SCENE)


def demo_edits(scene: world.Scene) -> list[E.Edit]:
    return [E.attribute(scene, "blue"), E.style(scene, "night"), E.shape(scene, "ball")]


def _up(images: np.ndarray, factor: int = UPSCALE) -> np.ndarray:
    return images.repeat(factor, axis=-3).repeat(factor, axis=-2)


def mask_rows(result, inversion, edit: E.Edit, tokenizer, size: int) -> tuple[np.ndarray, str]:
    """(F, H, W) float in [0, 1]: the blend mask FateZero used, averaged over steps, or the source
    cross-attention map of the changed word when the edit has no blend mask."""
    masks = result.masks.get("self_attention")
    if masks is None:
        masks = result.masks.get("latents")
    if masks is not None:
        m = masks.float().mean(0)[:, None]
        label = "blend mask"
    else:
        from fatezero_fast.semantics.tokens import word_token_indices

        word = "sky" if edit.kind == "style" else edit.target.kind
        inds = word_token_indices(inversion.source_prompt, word, tokenizer)
        maps = inversion.token_maps[:].float().mean(0)[..., inds].sum(-1)  # (F, rh, rw)
        m = (maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-8))[:, None]
        label = f"attention of '{word}'"
    m = torch.nn.functional.interpolate(m, size=(size, size), mode="nearest")[:, 0]
    return m.clamp(0, 1).numpy(), label


def mask_picture(source: np.ndarray, edited: np.ndarray, mask: np.ndarray, title: str, path: Path) -> None:
    rows = [source, edited, np.repeat((mask[..., None] * 255).round().astype(np.uint8), 3, -1)]
    grid = np.concatenate([np.concatenate(list(_up(r)), axis=1) for r in rows], axis=0)
    pad = 14
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + pad), "white")
    canvas.paste(Image.fromarray(grid), (0, pad))
    ImageDraw.Draw(canvas).text((2, 1), title, fill="black")
    canvas.save(path)


def still(source: np.ndarray, edited: np.ndarray, mask: np.ndarray, path: Path, frame: int) -> None:
    m = np.repeat((mask[frame][..., None] * 255).round().astype(np.uint8), 3, -1)
    gap = np.full((source.shape[1], 2, 3), 255, np.uint8)
    row = np.concatenate([source[frame], gap, edited[frame], gap, m], axis=1)
    Image.fromarray(_up(row[None])[0]).save(path)


def run(output: str | Path, *, steps: int = 10, frames: int = 8, model: str | None = None,
        guidance_scale: float | None = None, threads: int | None = None, quiet: bool = False) -> dict:
    if threads:
        torch.set_num_threads(threads)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    t0 = time.perf_counter()
    pipe = toyworld_pipeline(model)
    clip = demo_clip(frames)
    source = clip.frames
    save_frames(source, out / "frames" / "source")
    say(f"source: {clip.caption!r} ({frames} frames, {clip.frames.shape[2]}x{clip.frames.shape[1]})")
    t = time.perf_counter()
    inversion = pipe.invert(clip.tensor(), clip.caption, steps, seed=0, progress=False)
    guide = {} if guidance_scale is None else dict(guidance_scale=guidance_scale)
    summary = dict(source_prompt=clip.caption, steps=steps, frames=frames,
                   inversion_s=round(time.perf_counter() - t, 2), edits={})
    recon = pipe.edit(inversion, clip.caption, progress=False, **{**E.OPTIONS["reconstruct"], **guide})
    summary["reconstruction_psnr"] = round(metrics.psnr(source, metrics.to_uint8(recon.frames)), 2)
    for edit in demo_edits(clip.scene):
        t = time.perf_counter()
        result = pipe.edit(inversion, edit.prompt, progress=False, **{**edit.options, **guide})
        seconds = time.perf_counter() - t
        edited = metrics.to_uint8(result.frames)
        tag = edit.kind
        save_frames(edited, out / "frames" / tag)
        pair = np.concatenate([_up(source), _up(edited)], axis=2)
        for suffix in (".mp4", ".gif"):
            save_video(pair, out / f"{tag}{suffix}")
        mask, label = mask_rows(result, inversion, edit, pipe.tokenizer, source.shape[1])
        mask_picture(source, edited, mask, f"{edit.prompt}  (rows: source, edit, {label})", out / f"{tag}_masks.png")
        if tag == "attribute":
            still(source, edited, mask, out / "still.png", frames // 2)
        scores = metrics.score_edit(clip, edited, target_colour=edit.target_colour, target_kind=edit.target_kind,
                                    masks=result.masks.get("self_attention"))
        if tag == "style":  # the whole frame should darken like the world's night
            night = world.render(edit.target, frames).frames
            scores["psnr_to_rendered_night"] = metrics.psnr(night, edited)
            scores["brightness_ratio"] = float(edited.mean() / max(source.mean(), 1e-6))
        if tag == "attribute":
            scores["colour_frames"] = metrics.colour_hits(clip, edited, edit.target_colour).astype(int).tolist()
        summary["edits"][tag] = dict(prompt=edit.prompt, options=edit.options, seconds=round(seconds, 2),
                                     **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items()})
        say(f"{tag:9s} {edit.prompt!r}: " + ", ".join(f"{k} {v:.3g}" for k, v in scores.items()
                                                    if isinstance(v, float)) + f" ({seconds:.1f} s)")
    summary["total_s"] = round(time.perf_counter() - t0, 2)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"source: {clip.caption}  ({frames} frames, {steps} DDIM steps)",
             f"reconstruction PSNR {summary['reconstruction_psnr']:.1f} dB"]
    for tag, s in summary["edits"].items():
        if tag == "attribute":
            main = f"object recoloured in {s['colour_acc']:.0%} of frames"
        elif tag == "shape":
            main = f"new shape in {s['shape_rate']:.0%} of frames"
        else:
            main = f"brightness x{s['brightness_ratio']:.2f}"
        lines.append(f"{tag}: {s['prompt']!r}: {main}; background PSNR {s['bg_psnr']:.1f} dB, "
                     f"SSIM {s['bg_ssim']:.3f}")
    lines.append(f"total {summary['total_s']:.0f} s")
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    say("\n".join(lines[1:]))
    say(f"wrote {out}/ (side-by-side videos, *_masks.png, still.png, summary.txt)")
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="out/demo")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the edits' (edits.GUIDANCE)")
    p.add_argument("--model", default=None, help="a toy-world model folder (default: the shipped one)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    run(args.output, steps=args.steps, frames=args.frames, model=args.model, guidance_scale=args.guidance_scale,
        threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
