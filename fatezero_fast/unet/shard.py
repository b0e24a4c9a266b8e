"""Frames of a clip split over the ranks of a torch.distributed process group.

Each rank owns a contiguous, balanced range of frames [lo, hi) (ranges differ by at most one
frame) and runs the UNet's modules for those frames only. Frames are coupled in two places,
and both are exchanged exactly (docs/design.md, "Several GPUs"):

- clip-wide GroupNorm: every rank's per-channel (count, mean, M2) are gathered and combined in
  rank order with the parallel-variance formula in float64, so all ranks normalise alike;
- sparse-causal attention: the K/V of the frames some query attends to are summed over the
  ranks, each rank contributing the frames it owns and zeros elsewhere (x + 0 is exact).

The UNet's output, and the mask-level cross maps captured during the call, are summed the same
way, so every rank ends a UNet call with the whole clip's result and the rest of the pipeline
(scheduler, masks, latent blend) runs unchanged and identically on every rank.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def frame_range(num_frames: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of `rank`: contiguous and balanced (sizes differ by at most one frame)."""
    return rank * num_frames // world, (rank + 1) * num_frames // world


@dataclass
class FrameShard:
    """A process group, and this rank's place in it."""

    group: object = None  # a torch.distributed ProcessGroup (None: the default group)

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

    def sum_(self, x: torch.Tensor) -> torch.Tensor:
        """In-place sum over the ranks (each rank holds its own frames and zeros elsewhere)."""
        if x.device.type == "cpu" or dist.get_backend(self.group) != "gloo":
            dist.all_reduce(x, group=self.group)
            return x
        host = x.cpu()  # gloo reduces host tensors
        dist.all_reduce(host, group=self.group)
        return x.copy_(host)

    def gather_stats(self, count: int, mean: torch.Tensor, m2: torch.Tensor):
        """(count, mean, M2) of every rank, in rank order."""
        packed = torch.stack([mean.double(), m2.double()]).cpu()
        parts = [torch.empty_like(packed) for _ in range(self.world)]
        counts = [None] * self.world
        dist.all_gather(parts, packed, group=self.group)
        dist.all_gather_object(counts, count, group=self.group)
        return [(n, p[0].to(mean.device), p[1].to(mean.device)) for n, p in zip(counts, parts)]


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
