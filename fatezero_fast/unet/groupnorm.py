"""Clip-wide GroupNorm for the ResNet blocks (docs/semantics.md §1).

The official inflated UNet applies its ResNet norms and conv_norm_out to (batch, channels,
frames, h, w), so statistics span the group's channels and *all frames* of each batch element.
A stock 2D UNet run on frames as a batch normalises each frame alone; this module restores
the clip-wide statistics. Each classifier-free branch (a run of `num_frames` frames) is
normalised separately.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for statistics and normalisation (fp32 and fp64 stay)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


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


def chunk_norm(module: nn.Module, inputs: Sequence, chunks) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function a chunked run (unet/runner.py) applies to each chunk for a ResNet/output norm.

    inputs: the ClipActivations the norm reads (their channels concatenated); chunks: the call's
    ChunkSchedule. A ClipGroupNorm normalises every chunk with the statistics of the whole clip
    (all ranks' frames when sharded); a plain GroupNorm is per frame and runs as it is."""
    if isinstance(module, ClipGroupNorm):
        if module.frames() != chunks.num_frames:
            raise ValueError(f"the clip-wide GroupNorm counts {module.frames()} frames per clip, the call "
                             f"has {chunks.num_frames}: call state.begin_call first")
        if len(chunks.bounds) == 1 and chunks.shard is None:  # the whole clip in one chunk
            return module
        if chunks.num_frames > 1:
            return _clip_affine(module.norm, inputs, chunks.device)
        module = module.norm
    if isinstance(module, nn.GroupNorm):
        return module
    raise NotImplementedError(f"chunked execution does not support the norm {type(module).__name__}")


def _clip_affine(gn: nn.GroupNorm, inputs: Sequence, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """GroupNorm of a chunk as the affine map group_norm_affine derives from the clip's statistics."""
    stats = [x.channel_stats() for x in inputs]
    count = stats[0][0]
    mean = torch.cat([s[1] for s in stats], dim=1)  # (B, C) per channel, float64
    m2 = torch.cat([s[2] for s in stats], dim=1)
    scale, shift = group_norm_affine(count, mean, m2, gn)
    b, c = mean.shape
    dtype = torch.promote_types(gn.weight.dtype if gn.weight is not None else torch.float32, torch.float32)
    scale, shift = scale.to(device, dtype), shift.to(device, dtype)

    def apply(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        y = upcast(x).reshape(b, n // b, c, -1)
        y = torch.addcmul(shift[:, None, :, None], y, scale[:, None, :, None])
        return y.reshape(x.shape).to(x.dtype)

    return apply
