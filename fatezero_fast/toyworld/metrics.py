"""Scores of an edit of a toy-world clip, from the generator's ground truth (no model needed).

All images are uint8 (F, H, W, 3) arrays; masks bool (F, H, W). Ground-truth masks are used here,
for scoring only; the editing method never sees them.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import world


def to_uint8(frames) -> np.ndarray:
    """(F, 3, H, W) in [-1, 1] (tensor) -> uint8 (F, H, W, 3); uint8 arrays pass."""
    if isinstance(frames, np.ndarray):
        return frames
    return ((frames.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def dilate(masks: np.ndarray, pixels: int) -> np.ndarray:
    if pixels <= 0:
        return masks
    m = torch.from_numpy(masks.astype(np.float32))[:, None]
    return (F.max_pool2d(m, 2 * pixels + 1, 1, pixels)[:, 0] > 0).numpy()


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    """PSNR (dB, peak 255) of two uint8 clips over the pixels `where` (bool (F, H, W); None: all)."""
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    mse = d.mean() if where is None else d[where].mean()
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


def ssim_map(a: np.ndarray, b: np.ndarray, window: int = 7, sigma: float = 1.5) -> np.ndarray:
    """Per-pixel SSIM (F, H, W) of two uint8 clips (Gaussian window, channels averaged)."""
    x = torch.from_numpy(a).double().permute(0, 3, 1, 2)
    y = torch.from_numpy(b).double().permute(0, 3, 1, 2)
    g = torch.exp(-((torch.arange(window) - window // 2).double() ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    k = (g[:, None] * g[None, :]).expand(3, 1, window, window)

    def blur(t):
        return F.conv2d(F.pad(t, [window // 2] * 4, mode="reflect"), k, groups=3)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(1).numpy()


def temporal_error(source: np.ndarray, edit: np.ndarray) -> float:
    """Mean |(e[f+1] - e[f]) - (s[f+1] - s[f])| (0-255 scale): how far the edit's frame-to-frame change
    departs from the source's (0: it moves exactly as the source; flicker raises it)."""
    ds = np.diff(source.astype(np.float64), axis=0)
    de = np.diff(edit.astype(np.float64), axis=0)
    return float(np.abs(de - ds).mean())


def background(clip: world.Clip, margin: int = 2) -> np.ndarray:
    """Bool (F, H, W): outside the ground-truth object mask grown by `margin` pixels."""
    return ~dilate(clip.masks, margin)


def colour_hits(clip: world.Clip, edit: np.ndarray, target: str) -> np.ndarray:
    """Per frame: is the object's body (the ground-truth body pixels) now nearest to `target`?"""
    night = clip.scene.sky == "night"
    return np.array([world.classify_colour(edit[f][clip.body[f]], night) == target for f in range(len(edit))])


def shape_hits(clip: world.Clip, edit: np.ndarray, target_kind: str, colour: str | None = None,
               margin: int = 4) -> np.ndarray:
    """Per frame: does a blob of the object's colour with `target_kind`'s shape sit where the source
    object was (its mask grown by `margin` pixels)?"""
    night = clip.scene.sky == "night"
    colour = colour or clip.scene.colour
    region = dilate(clip.masks, margin)
    return np.array([world.classify_kind(edit[f], colour, region[f], night) == target_kind for f in range(len(edit))])


def mask_scores(clip: world.Clip, masks: torch.Tensor | None) -> dict:
    """How a pipeline blend mask (steps, F, h, w) follows the object: recall of the ground-truth object
    pixels, IoU, and the fraction of the background it covers (masks averaged over steps, > 0.5)."""
    if masks is None or len(masks) == 0:
        return {}
    m = masks.float().mean(0)[:, None]
    size = clip.masks.shape[-2:]
    m = (F.interpolate(m, size=size, mode="nearest")[:, 0] > 0.5).numpy()
    gt = clip.masks
    inter, union = (m & gt).sum(), (m | gt).sum()
    return dict(mask_recall=float(inter / max(gt.sum(), 1)), mask_iou=float(inter / max(union, 1)),
                mask_background=float((m & ~gt).sum() / max((~gt).sum(), 1)))


def score_edit(clip: world.Clip, edit_frames, *, target_colour: str | None = None,
               target_kind: str | None = None, masks: torch.Tensor | None = None) -> dict:
    """The benchmark's scores of one edit of `clip` (edit_frames: (F, 3, H, W) in [-1, 1] or uint8)."""
    edit = to_uint8(edit_frames)
    bg = background(clip)
    out = dict(bg_psnr=psnr(clip.frames, edit, bg), bg_ssim=float(ssim_map(clip.frames, edit)[bg].mean()),
               temporal_err=temporal_error(clip.frames, edit), psnr=psnr(clip.frames, edit))
    if target_colour is not None:
        out["colour_acc"] = float(colour_hits(clip, edit, target_colour).mean())
    if target_kind is not None:
        out["shape_rate"] = float(shape_hits(clip, edit, target_kind).mean())
    out.update(mask_scores(clip, masks))
    return out
