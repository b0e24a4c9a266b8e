"""Frames of a clip split over the ranks of a torch.distributed process group.

Each rank owns a contiguous, balanced range of frames [lo, hi) (ranges differ by at most one
frame) and runs the UNet's modules for those frames only. Frames are coupled in these places,
all exchanged exactly (docs/design.md, "Several GPUs"):

- clip-wide GroupNorm: every rank's per-channel (count, mean, M2) are gathered and combined in
  rank order with the parallel-variance formula in float64, so all ranks normalise alike;
- sparse-causal attention: the K/V of each frame that a rank's queries attend to but another rank
  owns (an anchor such as 'first' or 'mid', or the halo frame of a relative offset) is broadcast
  from its owner, once per layer and call: a few frames per rank, not the clip;
- a tuned checkpoint's temporal conv (k=3 over frames): a rank reads the neighbour frames of its
  range, up to the conv's reach, from the ranks that own them (`FrameShard.halo`);
- a tuned checkpoint's temporal attention (all frames of each pixel): an all-to-all turns frame
  shards into pixel shards, every rank attends over all frames of its pixels, and a second
  all-to-all turns them back (`FrameShard.over_pixels`, as sequence-parallel attention does).

The UNet's output, and the mask-level cross maps captured during the call, are all-gathered, so
every rank ends a UNet call with the whole clip's result and the rest of the pipeline
(scheduler, masks, latent blend) runs unchanged and identically on every rank.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..semantics.frames import resolve_frame_index


def frame_range(num_frames: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of `rank`: contiguous and balanced (sizes differ by at most one frame)."""
    return rank * num_frames // world, (rank + 1) * num_frames // world


def token_slabs(tokens: int, step: int, world: int) -> list[list[tuple[int, int]]]:
    """The pixel blocks of a sharded temporal attention: slabs of `step` tokens per rank, each
    slab's tokens split over the ranks contiguously and balanced; [t0, t1) per rank, per slab."""
    slab = step * world
    return [[(s + a, s + e) for a, e in (frame_range(min(slab, tokens - s), r, world) for r in range(world))]
            for s in range(0, tokens, slab)]


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

    def all_to_all(self, parts: list[torch.Tensor], shapes: list[tuple], device: torch.device) -> list[torch.Tensor]:
        """parts[q] goes to rank q; returns on `device`, per rank p, the tensor of shapes[p] that p sent
        this rank. One all_to_all_single of flat buffers with uneven splits (gloo's list all_to_all
        wants equal sizes); empty parts are fine."""
        wire = torch.device("cpu") if dist.get_backend(self.group) == "gloo" else \
            torch.device("cuda", torch.cuda.current_device())
        send = torch.cat([p.reshape(-1).to(wire) for p in parts])
        sizes_in, sizes_out = [p.numel() for p in parts], [math.prod(s) for s in shapes]
        recv = send.new_empty(sum(sizes_out))
        dist.all_to_all_single(recv, send, sizes_out, sizes_in, group=self.group)
        self.sent += (send.numel() - sizes_in[self.rank]) * send.element_size()
        recv = recv.to(device)
        return [r.view(s) for r, s in zip(recv.split(sizes_out), shapes)]

    def gather_rows_(self, x: torch.Tensor, owners: list[int]) -> torch.Tensor:
        """In place: row i of x (along dim 0) from rank owners[i], on every rank."""
        if x.element_size() == 1 and x.is_floating_point():  # float8: sent as its bytes
            self.gather_rows_(x.view(torch.uint8), owners)
            return x
        rows = [[i for i, o in enumerate(owners) if o == r] for r in range(self.world)]
        mine = x[rows[self.rank]]
        got = self.all_to_all([mine] * self.world, [(len(r),) + tuple(x.shape[1:]) for r in rows], x.device)
        for r, part in zip(rows, got):
            if r and r is not rows[self.rank]:
                x[r] = part
        return x

    def halo(self, x: torch.Tensor, num_frames: int, reach: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's neighbour frames of x (its own frames along dim 0): [lo - reach, lo) and
        [hi, hi + reach) within the clip, each from the rank that owns it (a neighbour rank may own
        fewer frames than the reach: then several ranks send)."""
        ranges = [frame_range(num_frames, r, self.world) for r in range(self.world)]

        def wanted(q):  # the frames rank q reads beyond its range
            lo, hi = ranges[q]
            return list(range(max(0, lo - reach), lo)) + list(range(hi, min(num_frames, hi + reach)))

        lo, hi = ranges[self.rank]
        parts = [x.index_select(0, torch.tensor([f - lo for f in wanted(q) if lo <= f < hi], dtype=torch.long,
                                                device=x.device)) for q in range(self.world)]
        shapes = [(sum(1 for f in wanted(self.rank) if a <= f < e),) + tuple(x.shape[1:]) for a, e in ranges]
        got = torch.cat(self.all_to_all(parts, shapes, x.device))  # ranks hold ascending frames: clip order
        before = lo - max(0, lo - reach)
        return got[:before], got[before:]

    def over_pixels(self, fn, x: torch.Tensor, out: torch.Tensor, num_frames: int, step: int, device) -> None:
        """out = fn(x) where fn maps (F, B, n, ...) all frames of n token positions to the same shape
        and x, out (F_r, B, N, ...) hold this rank's frames of every token position.

        Slab by slab (`token_slabs`: `step` tokens per rank at a time), an all-to-all sends each rank
        this rank's frames of its block of tokens; fn runs on `device` over all frames of this
        rank's block, and a second all-to-all returns each rank its frames of every block."""
        ranges = [frame_range(num_frames, r, self.world) for r in range(self.world)]
        lo, hi = ranges[self.rank]
        lead, tail = x.shape[1], tuple(x.shape[3:])
        for blocks in token_slabs(x.shape[2], step, self.world):
            t0, t1 = blocks[self.rank]
            parts = [x[:, :, a:e] for a, e in blocks]
            shapes = [(e - a, lead, t1 - t0) + tail for a, e in ranges]
            pixels = torch.cat(self.all_to_all(parts, shapes, device))  # (F, B, n, ...) in clip order
            y = fn(pixels) if pixels.numel() else pixels
            shapes = [(hi - lo, lead, e - a) + tail for a, e in blocks]
            for (a, e), part in zip(blocks, self.all_to_all([y[f0:f1] for f0, f1 in ranges], shapes, out.device)):
                out[:, :, a:e].copy_(part)

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

    def objects(self, obj) -> list:
        """A small Python object of every rank, in rank order."""
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

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
                   captured_layers: int = 0, chunk_size: int | None = None) -> int:
    """Bytes `rank` contributes to the collectives of one sharded UNet call (no source exit).

    `unet` has FateZero's processors installed (its state's index lists decide the K/V exchange);
    it may live on the meta device. Per clip-wide GroupNorm: (mean, M2) per (branch, channel) in
    float64. Per sparse-causal transformer block: K and V of each frame this rank owns that another
    rank attends to. A tuned checkpoint's temporal layers (`chunk_size` as the call's): per temporal
    conv, the frames of its chunk input that other ranks read as their halo (an up block's skip
    input is not sent again: its halo was kept when the down path read it); per temporal attention,
    this rank's frames of the other ranks' token blocks, and all frames of its own token blocks back
    to them. The output and `captured_layers` mask-level (F, rh, rw, 77) fp32 maps: this rank's
    frames, padded to the largest range.
    """
    from . import levels
    from .processors import SpatioTemporalAttnProcessor
    from .temporal import conv_reach

    itemsize = unet.dtype.itemsize
    total = 0
    norms = [m for m in unet.modules() if type(m).__name__ == "ResnetBlock2D"]
    channels = [getattr(n, "norm", n).num_channels for r in norms for n in (r.norm1, r.norm2)]  # ClipGroupNorm wraps
    total += 16 * branches * (sum(channels) + getattr(unet.conv_norm_out, "norm", unet.conv_norm_out).num_channels)
    ranges = [frame_range(num_frames, r, world) for r in range(world)]
    lo, hi = ranges[rank]
    level_tokens = [n for _, n in levels.unet_levels(unet.config, latent_size)]
    skip_channels = _skip_channels(unet)
    for name, module in unet.named_modules():
        processor = getattr(getattr(module, "attn1", None), "processor", None)
        if isinstance(processor, SpatioTemporalAttnProcessor):
            remote = remote_frames(resolve_frame_index(processor.index_list, num_frames), world)
            owned = sum(1 for f in remote if lo <= f < hi)
            tokens = level_tokens[module_level(name, len(level_tokens))]
            total += owned * 2 * branches * tokens * module.attn1.to_k.out_features * itemsize
        if hasattr(module, "_fz_temporal_names"):  # temporal attention: two all-to-alls (FrameShard.over_pixels)
            tokens = level_tokens[module_level(name, len(level_tokens))]
            step = -(-(chunk_size or num_frames) * tokens // num_frames)
            token_bytes = branches * module.attn1.to_q.in_features * itemsize
            for blocks in token_slabs(tokens, step, world):
                t0, t1 = blocks[rank]
                total += sum((hi - lo) * (e - a) + (f1 - f0) * (t1 - t0)
                             for q, ((a, e), (f0, f1)) in enumerate(zip(blocks, ranges)) if q != rank) * token_bytes
        if hasattr(module, "conv_temporal"):  # its chunk input's halo, at the level of its block
            reach = conv_reach(module.conv_temporal)
            halos = [set(range(max(0, a - reach), a)) | set(range(e, min(num_frames, e + reach)))
                     for q, (a, e) in enumerate(ranges) if q != rank]
            sent = sum(1 for wanted in halos for f in wanted if lo <= f < hi)
            channels = module.in_channels - skip_channels.get(name, 0)
            pixels = level_tokens[module_level(name, len(level_tokens))]
            total += sent * branches * channels * pixels * itemsize
    size = max(e - a for a, e in ranges)
    h, w = latent_size
    total += branches * size * unet.config.out_channels * h * w * itemsize
    mh, mw = latent_size
    for _ in range(levels.MASK_LEVEL):
        mh, mw = levels.halve(mh, mw)
    total += captured_layers * size * mh * mw * 77 * 4
    return total


def _skip_channels(unet) -> dict[str, int]:
    """Channels of the skip activation in the input of each up-block resnet's conv1, by the conv's name."""
    skips = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        skips += [r.out_channels for r in block.resnets] + [d.out_channels for d in block.downsamplers or []]
    return {f"up_blocks.{i}.resnets.{j}.conv1": skips.pop()
            for i, block in enumerate(unet.up_blocks) for j in range(len(block.resnets))}


def module_level(name: str, count: int) -> int:
    """The UNet level (0: the latent's size) of a module by its name: down blocks top down, the mid block at
    the bottom, up blocks bottom up; conv_in and conv_out at the top. An up block's upsampler counts at its
    block's level (its input's size)."""
    part, i = (name.split(".") + ["0"])[:2]
    if part in ("conv_in", "conv_out"):
        return 0
    return count - 1 if part == "mid_block" else int(i) if part == "down_blocks" else count - 1 - int(i)
