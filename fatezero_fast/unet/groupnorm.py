"""Clip-wide GroupNorm for the ResNet blocks (docs/semantics.md §1).

The official inflated UNet applies its ResNet norms and conv_norm_out to (batch, channels,
frames, h, w), so statistics span the group's channels and *all frames* of each batch element.
A stock 2D UNet run on frames as a batch normalises each frame alone; this module restores
the clip-wide statistics. Each classifier-free branch (a run of `num_frames` frames) is
normalised separately.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClipGroupNorm(nn.Module):
    """Wraps an nn.GroupNorm; normalises (B*F, C, H, W) over each clip of `frames()` frames."""

    def __init__(self, norm: nn.GroupNorm, frames):
        super().__init__()
        self.norm = norm
        self.frames = frames  # callable -> frames per clip, set by the pipeline per UNet call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.frames()
        if f <= 1:
            return self.norm(x)
        bf, c, h, w = x.shape
        if bf % f:
            raise ValueError(f"batch of {bf} frames is not a whole number of {f}-frame clips")
        clip = x.reshape(bf // f, f, c, h, w).transpose(1, 2)  # (B, C, F, H, W)
        out = F.group_norm(clip, self.norm.num_groups, self.norm.weight, self.norm.bias, self.norm.eps)
        return out.transpose(1, 2).reshape(bf, c, h, w)


def make_groupnorms_clip_wide(unet: nn.Module, frames) -> int:
    """Replace norm1/norm2 of every ResNet block and the UNet's conv_norm_out; returns the count."""
    count = 0
    for module in unet.modules():
        if type(module).__name__ == "ResnetBlock2D":
            for name in ("norm1", "norm2"):
                norm = getattr(module, name)
                if isinstance(norm, nn.GroupNorm):
                    setattr(module, name, ClipGroupNorm(norm, frames))
                    count += 1
    if isinstance(getattr(unet, "conv_norm_out", None), nn.GroupNorm):
        unet.conv_norm_out = ClipGroupNorm(unet.conv_norm_out, frames)
        count += 1
    return count


def group_norm_affine(count: int, mean: torch.Tensor, m2: torch.Tensor, gn: nn.GroupNorm):
    """GroupNorm as y = x * scale + shift per (branch, channel), from per-channel statistics.

    count: elements per channel; mean, m2: (B, C) float64 per-channel mean and sum of squared
    deviations over the whole clip. Groups combine their channels with the parallel-variance
    formula; the variance is biased and eps sits inside the square root, as torch's group_norm.
    """
    b, c = mean.shape
    per_group = c // gn.num_groups
    mean, m2 = mean.view(b, gn.num_groups, per_group), m2.view(b, gn.num_groups, per_group)
    group_mean = mean.mean(-1)
    group_m2 = m2.sum(-1) + count * ((mean - group_mean[..., None]) ** 2).sum(-1)
    rstd = torch.rsqrt(group_m2 / (count * per_group) + gn.eps)
    scale = rstd.repeat_interleave(per_group, dim=1)                    # (B, C) float64
    shift = -group_mean.repeat_interleave(per_group, dim=1) * scale
    if gn.weight is not None:
        scale = scale * gn.weight.double()
        shift = shift * gn.weight.double() + gn.bias.double()
    return scale, shift
