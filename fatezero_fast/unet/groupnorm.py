"""Clip-wide GroupNorm for the ResNet blocks (FATEZERO.md item 1).

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
