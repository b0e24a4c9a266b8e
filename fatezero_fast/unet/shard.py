"""Frames of a clip split over the ranks of a torch.distributed process group.

Each rank owns a contiguous, balanced range of frames [lo, hi) (ranges differ by at most one
frame) and runs the UNet's modules for those frames only. Frames are coupled in two places,
and both are exchanged exactly (docs/design.md, "Several GPUs"):

- clip-wide GroupNorm: every rank's per-channel (count, mean, M2) are gathered and combined in
  rank order with the parallel-variance formula in float64, so all ranks normalise alike;
- sparse-causal attention: the K/V of each frame that a rank's queries attend to but another rank
  owns (an anchor such as 'first' or 'mid', or the halo frame of a relative offset) is broadcast
  from its owner, once per layer and call: a few frames per rank, not the clip.

The UNet's output, and the mask-level cross maps captured during the call, are all-gathered, so
every rank ends a UNet call with the whole clip's result and the rest of the pipeline
(scheduler, masks, latent blend) runs unchanged and identically on every rank.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..semantics.frames import resolve_frame_index


def frame_range(num_frames: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of `rank`: contiguous and balanced (sizes differ by at most one frame)."""
    return rank * num_frames // world, (rank + 1) * num_frames // world


def remote_frames(kv_index: torch.Tensor, world: int) -> list[int]:
    """Sorted frames that some rank's queries attend to but another rank owns: the frames whose
    K/V cross ranks. kv_index: (F, R) frames each query frame attends to (semantics.frames)."""
    remote = set()
    for lo, hi in (frame_range(kv_index.shape[0], r, world) for r in range(world)):
        remote.update(f for f in kv_index[lo:hi].unique().tolist() if not lo <= f < hi)
    return sorted(remote)


@dataclass
class FrameShard:
    """A process group, and this rank's place in it."""

    group: object = None  # a torch.distributed ProcessGroup (None: the default group)
    sent: int = 0         # bytes this rank has contributed to collectives (for the benchmark)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    def frames(self, num_frames: int) -> tuple[int, int]:
        if num_frames < self.world:
            raise ValueError(f"a clip of {num_frames} frames cannot be split over {self.world} ranks: "
                             "use at most as many ranks as frames")
        return frame_range(num_frames, self.rank, self.world)

    def share_frames_(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """In place: every rank's own frames of x (frames along `dim`) on every rank (all-gather)."""
        num_frames = x.shape[dim]
        ranges = [frame_range(num_frames, r, self.world) for r in range(self.world)]
        size = max(hi - lo for lo, hi in ranges)  # ranges differ by one frame at most: pad to the largest
        lo, hi = ranges[self.rank]
        mine = x.narrow(dim, lo, hi - lo).cpu() if dist.get_backend(self.group) == "gloo" else x.narrow(dim, lo, hi - lo)
        if hi - lo < size:
            pad = list(mine.shape)
            pad[dim] = size - (hi - lo)
            mine = torch.cat([mine, mine.new_zeros(pad)], dim)
        mine = mine.contiguous()
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine, group=self.group)
        self.sent += mine.numel() * mine.element_size()
        for (lo, hi), part in zip(ranges, parts):
            x.narrow(dim, lo, hi - lo).copy_(part.narrow(dim, 0, hi - lo))
        return x

    def owner(self, frame: int, num_frames: int) -> int:
        """The rank whose range holds `frame`."""
        return next(r for r in range(self.world) if frame < frame_range(num_frames, r, self.world)[1])

    def broadcast_(self, x: torch.Tensor, src: int) -> torch.Tensor:
        """In place: `src`'s x on every rank."""
        self.sent += x.numel() * x.element_size() if self.rank == src else 0
        if x.device.type == "cpu" or dist.get_backend(self.group) != "gloo":
            dist.broadcast(x, src, group=self.group)
            return x
        host = x.cpu()
        dist.broadcast(host, src, group=self.group)
        return x.copy_(host)

    def gather_stats(self, count: int, mean: torch.Tensor, m2: torch.Tensor):
        """(count, mean, M2) of every rank, in rank order."""
        packed = torch.stack([mean.double(), m2.double()]).cpu()
        self.sent += packed.numel() * packed.element_size()
        parts = [torch.empty_like(packed) for _ in range(self.world)]
        counts = [None] * self.world
        dist.all_gather(parts, packed, group=self.group)
        dist.all_gather_object(counts, count, group=self.group)
        return [(n, p[0].to(mean.device), p[1].to(mean.device)) for n, p in zip(counts, parts)]


def is_main_process() -> bool:
    """True in a single process and on rank 0 (the group's, or torchrun's RANK before it is up)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def shard_from_env(group=None) -> FrameShard | None:
    """A FrameShard over `group`, or over the default group, initialised from torchrun's
    environment (WORLD_SIZE, RANK, MASTER_ADDR, ...) when it is not yet; None for one process."""
    if group is not None or dist.is_available() and dist.is_initialized():
        return FrameShard(group)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return FrameShard()


def exchange_bytes(unet, latent_size: tuple[int, int], num_frames: int, world: int, rank: int, branches: int,
                   captured_layers: int = 0) -> int:
    """Bytes `rank` contributes to the collectives of one sharded UNet call (no source exit).

    `unet` has FateZero's processors installed (its state's index lists decide the K/V exchange);
    it may live on the meta device. Per clip-wide GroupNorm: (mean, M2) per (branch, channel) in
    float64. Per sparse-causal transformer block: K and V of each frame this rank owns that another
    rank attends to. The output and `captured_layers` mask-level (F, rh, rw, 77) fp32 maps: this
    rank's frames, padded to the largest range.
    """
    from . import levels
    from .processors import SpatioTemporalAttnProcessor

    itemsize = unet.dtype.itemsize
    total = 0
    norms = [m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]
    channels = [getattr(n, "norm", n).num_channels for r in norms for n in (r.norm1, r.norm2)]  # ClipGroupNorm wraps
    total += 16 * branches * (sum(channels) + getattr(unet.conv_norm_out, "norm", unet.conv_norm_out).num_channels)
    ranges = [frame_range(num_frames, r, world) for r in range(world)]
    lo, hi = ranges[rank]
    level_tokens = [n for _, n in levels.unet_levels(unet.config, latent_size)]
    for name, module in unet.named_modules():
        processor = getattr(getattr(module, "attn1", None), "processor", None)
        if not isinstance(processor, SpatioTemporalAttnProcessor):
            continue
        remote = remote_frames(resolve_frame_index(processor.index_list, num_frames), world)
        owned = sum(1 for f in remote if lo <= f < hi)
        part, i = name.split(".")[:2]
        level = len(level_tokens) - 1 if part == "mid_block" else \
            int(i) if part == "down_blocks" else len(level_tokens) - 1 - int(i)
        total += owned * 2 * branches * level_tokens[level] * module.attn1.to_k.out_features * itemsize
    size = max(e - a for a, e in ranges)
    h, w = latent_size
    total += branches * size * unet.config.out_channels * h * w * itemsize
    mh, mw = latent_size
    for _ in range(levels.MASK_LEVEL):
        mh, mw = levels.halve(mh, mw)
    total += captured_layers * size * mh * mw * 77 * 4
    return total
