"""Chunked execution's bookkeeping: whole-clip activations, the chunk loop, per-frame K/V caches.

A layer-major UNet call (unet/runner.py) keeps every activation of the whole clip between
modules in a `ClipActivation` (host memory, pinned on CUDA, frame-major so that a chunk is one
contiguous block) and runs each module chunk by chunk through a `ChunkSchedule`. As each chunk
is written its per-(branch, channel) count, mean and M2 are kept, so that a clip-wide GroupNorm
can be applied afterwards (unet/groupnorm.py). A `KVCache` keeps the keys and values of one
attn1 for the frames the sparse-causal index lists name, so that each chunk's queries find the
K/V of their anchor frames wherever those are in the clip.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .groupnorm import upcast
from .processors import SpatioTemporalAttnProcessor
from .shard import FrameShard, frame_range, remote_frames


class ChunkSchedule:
    """Frames [a, e) of every branch, chunk after chunk: where whole-clip activations live, and the
    loop that brings each chunk to the device (prefetching the next one on CUDA)."""

    def __init__(self, num_frames: int, branches: int, chunk_size: int, device: torch.device, offload: bool,
                 context: torch.Tensor, passes: int | None, shard: FrameShard | None = None):
        self.num_frames, self.branches, self.device, self.shard = num_frames, branches, device, shard
        # this process's frames [lo, hi): the whole clip, or a rank's range (unet/shard.py)
        self.lo, self.hi = (0, num_frames) if shard is None else shard.frames(num_frames)
        self.bounds = [(a, min(a + chunk_size, self.hi)) for a in range(self.lo, self.hi, chunk_size)]
        self.storage = torch.device("cpu") if offload else device
        self.pin = device.type == "cuda" and offload
        self.copy_stream = torch.cuda.Stream(device) if self.pin else None
        self.context = context  # encoder_hidden_states (B*F, L, D), branch-major
        self.chunk_size = chunk_size
        self.temporal = None    # the UNet's TemporalControl (unet/temporal.py), when it has temporal modules
        self.bar = tqdm(total=None if passes is None else passes * len(self.bounds), desc="UNet chunks",
                        unit="chunk", leave=False, disable=passes is None)

    def span(self, a: int, e: int, reach: int) -> tuple[int, int]:
        """Frames [a, e) with up to `reach` neighbour frames on each side, within the clip (sharded,
        those beyond this rank's frames are other ranks': `ClipActivation.fetch_halo`)."""
        return max(0, a - reach), min(self.num_frames, e + reach)

    def _enter(self, a: int, e: int, reach: int) -> None:
        a0, e0 = self.span(a, e, reach)
        if self.temporal is not None:  # the temporal conv hooks trim the halo (unet/temporal.py)
            self.temporal.halo = (a - a0, e0 - e, self.branches) if reach else None

    def each(self, inputs: Sequence[ClipActivation], reach: int | Sequence[int] = 0):
        """Yield (a, e, device rows of each input) for every chunk; on CUDA the next chunk's inputs
        are copied in on a side stream while the caller computes on this one. With `reach` (one for
        all inputs, or one per input), the rows also hold up to that many neighbour frames on each
        side: the halo a temporal conv in the caller's computation needs (its hook trims it)."""
        reaches = [reach] * len(inputs) if isinstance(reach, int) else list(reach)
        for x, r in zip(inputs, reaches):
            x.fetch_halo(r)
        reach = max(reaches, default=0)

        def read(a, e):
            return [x.read(*self.span(a, e, r)) for x, r in zip(inputs, reaches)]

        if self.copy_stream is None:
            for a, e in self.bounds:
                rows = read(a, e)
                self._enter(a, e, reach)
                yield a, e, rows
                self.bar.update()
            self._enter(0, 0, 0)
            return
        current = torch.cuda.current_stream(self.device)
        self.copy_stream.wait_stream(current)  # the inputs were written on the current stream

        def fetch(j):
            with torch.cuda.stream(self.copy_stream):
                return read(*self.bounds[j])

        pending = fetch(0)
        for j, (a, e) in enumerate(self.bounds):
            current.wait_stream(self.copy_stream)
            rows = pending
            for t in rows:
                t.record_stream(current)
            if j + 1 < len(self.bounds):
                pending = fetch(j + 1)
            self._enter(a, e, reach)
            yield a, e, rows
            self.bar.update()
        self._enter(0, 0, 0)

    def map(self, inputs: Sequence[ClipActivation], fn: Callable, stats: bool = True,
            reach: int | Sequence[int] = 0) -> ClipActivation:
        """out[a:e] = fn(a, e, *rows of inputs[a:e]) for every chunk (rows with a halo of `reach` frames)."""
        out = ClipActivation(self, stats)
        for a, e, rows in self.each(inputs, reach):
            out.write(a, e, fn(a, e, *rows))
        return out

    def context_rows(self, a: int, e: int) -> torch.Tensor:
        """encoder_hidden_states rows of frames [a, e) of every branch."""
        c = self.context
        c = c.reshape(self.branches, self.num_frames, *c.shape[1:])[:, a:e]
        return c.reshape(-1, *c.shape[2:]).to(self.device)

    def drop_first_branch(self) -> None:
        """Branch 0 leaves the batch: later chunks hold the other branches only."""
        self.branches -= 1
        self.context = self.context[self.num_frames:]


class ClipActivation:
    """A whole-clip activation: (F, B, ...) frame-major, on the host (pinned on CUDA) or the device.

    Chunks are read and written as branch-major rows (B*c, ...) of frames [a, e) of every branch,
    the UNet batch layout the processors expect. Each written chunk of a 4-D activation adds its
    per-(branch, channel) statistics for a later clip-wide GroupNorm.
    """

    def __init__(self, schedule: "ChunkSchedule", stats: bool = True):
        self.schedule, self.keep_stats = schedule, stats
        self.data: torch.Tensor | None = None
        self.dropped = 0  # leading branches of `data` that left the batch (`without_first_branch`)
        self.compacted = False  # branch 0 is not in `data` at all (`compact_without_first_branch`)
        self.stats: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (count, mean, M2) per chunk, (B, C)
        # sharded: the neighbour ranks' frames before and after this rank's, (f, B, ...) without dropped branches
        self.halo: tuple[torch.Tensor, torch.Tensor] | None = None
        self.halo_reach = 0

    @property
    def shape(self) -> torch.Size:
        return self.data.shape[2:]

    def write(self, a: int, e: int, y: torch.Tensor) -> None:
        r = self.schedule
        b, c = r.branches, e - a
        y = y.reshape(b, c, *y.shape[1:])
        if self.data is None:
            self.data = torch.empty((r.hi - r.lo, b) + tuple(y.shape[2:]), dtype=y.dtype, device=r.storage,
                                    pin_memory=r.pin)
        if self.keep_stats and y.dim() == 5:
            var, mean = torch.var_mean(upcast(y).flatten(3), dim=(1, 3), unbiased=False)  # (B, C)
            n = c * y.shape[3] * y.shape[4]
            self.stats.append((n, mean.double(), var.double() * n))
        self.data[a - r.lo:e - r.lo].copy_(y.transpose(0, 1), non_blocking=r.pin)

    def read(self, a: int, e: int) -> torch.Tensor:
        """Frames [a, e) as device rows (B*c, ...) (issued on the current stream); sharded, frames
        beyond this rank's come from the halo (`fetch_halo`)."""
        r = self.schedule
        # the whole (contiguous) chunk is copied, dropped branches are sliced off on the device
        x = self.data[max(a, r.lo) - r.lo:min(e, r.hi) - r.lo].to(r.device, non_blocking=r.pin)[:, self.dropped:]
        if a < r.lo or e > r.hi:
            before, after = self.halo
            before, after = before[len(before) - max(0, r.lo - a):], after[:max(0, e - r.hi)]
            x = torch.cat([before.to(r.device), x, after.to(r.device)])
        return x.transpose(0, 1).reshape((r.branches * (e - a),) + tuple(x.shape[2:]))

    def fetch_halo(self, reach: int) -> None:
        """Sharded: get the `reach` frames on each side of this rank's range from the ranks owning
        them (kept for later reads); every rank calls this alike (a collective)."""
        r = self.schedule
        if r.shard is None or reach <= self.halo_reach:
            return
        self.halo = r.shard.halo(self.data[:, self.dropped:], r.num_frames, reach)
        self.halo_reach = reach

    def without_first_branch(self) -> "ClipActivation":
        """The same activation without branch 0 (a view: nothing is copied)."""
        if self.compacted:
            return self
        clip = ClipActivation(self.schedule, self.keep_stats)
        clip.data, clip.dropped = self.data, self.dropped + 1
        clip.stats = [(n, mean[1:], m2[1:]) for n, mean, m2 in self.stats]
        if self.halo is not None:  # the halo holds the branches in the batch only
            clip.halo, clip.halo_reach = tuple(x[:, 1:] for x in self.halo), self.halo_reach
        return clip

    def compact_without_first_branch(self) -> "ClipActivation":
        """A copy without branch 0, for a skip activation that only modules after branch 0 left the
        batch will read: its memory goes, and `without_first_branch` of the copy is the copy itself."""
        clip = self.without_first_branch()
        data = self.data[:, 1:]
        clip.data = torch.empty(data.shape, dtype=data.dtype, device=data.device, pin_memory=self.schedule.pin)
        clip.data.copy_(data)
        clip.dropped, clip.compacted = 0, True
        return clip

    def channel_stats(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(count, mean, M2) per (branch, channel) over all frames of the clip, float64: this process's
        chunks, then (sharded) every rank's, combined in order with the parallel-variance formula."""
        r = self.schedule
        if not self.stats or sum(n for n, _, _ in self.stats) != (r.hi - r.lo) * self.shape[1] * self.shape[2]:
            raise RuntimeError("clip-wide statistics need every chunk of the activation written")
        stats = _combine(self.stats)
        return stats if r.shard is None else _combine(r.shard.gather_stats(*stats))


def _combine(stats: list[tuple[int, torch.Tensor, torch.Tensor]]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Chan et al.'s parallel variance: parts (n_k, mean_k, M2_k) -> (n, mean, M2)."""
    total = sum(n for n, _, _ in stats)  # no device sync: counts are host ints
    counts = torch.tensor([n for n, _, _ in stats], dtype=torch.float64).to(stats[0][1].device)
    means = torch.stack([m for _, m, _ in stats])        # (K, B, C)
    m2s = torch.stack([m2 for _, _, m2 in stats])
    mean = (counts[:, None, None] * means).sum(0) / total
    m2 = m2s.sum(0) + (counts[:, None, None] * (means - mean) ** 2).sum(0)
    return total, mean, m2


class KVCache:
    """Per-frame keys and values of one attn1 for the frames its queries need, kept over the clip."""

    def __init__(self, schedule: ChunkSchedule, attn, processor: SpatioTemporalAttnProcessor):
        self.schedule, self.attn, self.processor = schedule, attn, processor
        self.frames = processor.kv_frames_needed()  # (S,) sorted clip frames, CPU
        self.remote = torch.zeros(0, dtype=torch.long)  # sharded: frames broadcast from their owners
        if schedule.shard is not None:
            self._plan_exchange(schedule.shard, schedule.num_frames)
        self.k: torch.Tensor | None = None  # (S, B, H, N, D) in storage
        self.v: torch.Tensor | None = None

    def put(self, a: int, e: int, normed: torch.Tensor) -> None:
        """Project the normalised attn1 input rows of frames [a, e) and keep the needed frames."""
        lo, hi = (int(torch.searchsorted(self.frames, x)) for x in (a, e))
        r = self.schedule
        if lo == hi:
            if r.shard is not None and self.k is None:  # a rank owning none of its frames receives them all
                k, _ = self.processor.key_value(self.attn, normed[:1])
                self._allocate((r.branches,) + tuple(k.shape[1:]), k.dtype)
            return
        rows = normed.reshape(r.branches, e - a, *normed.shape[1:])[:, self.frames[lo:hi] - a]
        k, v = self.processor.key_value(self.attn, rows.reshape(-1, *normed.shape[1:]))
        k, v = (x.reshape(r.branches, hi - lo, *x.shape[1:]).transpose(0, 1) for x in (k, v))
        if self.k is None:
            self._allocate(tuple(k.shape[1:]), k.dtype)
        self.k[lo:hi].copy_(k, non_blocking=r.pin)
        self.v[lo:hi].copy_(v, non_blocking=r.pin)

    def _allocate(self, shape: tuple, dtype: torch.dtype) -> None:
        """(S, B, H, N, D) caches of the S frames."""
        r = self.schedule
        self.k, self.v = (torch.empty((len(self.frames),) + shape, dtype=dtype, device=r.storage, pin_memory=r.pin)
                          for _ in range(2))

    def _plan_exchange(self, shard: FrameShard, num_frames: int) -> None:
        """Cache the frames this rank's queries attend to, and the frames it owns that another
        rank's queries attend to; `remote`: every frame some rank needs from another."""
        index = self.processor.kv_frames_index()
        remote = remote_frames(index, shard.world)
        lo, hi = frame_range(num_frames, shard.rank, shard.world)
        mine = set(index[lo:hi].unique().tolist()) | {f for f in remote if lo <= f < hi}
        self.frames = torch.tensor(sorted(mine), dtype=torch.long)
        self.remote = torch.tensor(remote, dtype=torch.long)

    def share(self) -> None:
        """Sharded: each remote frame's K/V, broadcast from the rank that owns it to the others."""
        shard, r = self.schedule.shard, self.schedule
        if shard is None:
            return
        cached = self.frames.tolist()
        for frame in self.remote.tolist():
            src = shard.owner(frame, r.num_frames)
            slot = cached.index(frame) if frame in cached else None
            pair = torch.stack([self.k[slot], self.v[slot]]) if slot is not None else \
                self.k.new_empty((2,) + tuple(self.k.shape[1:]))
            shard.broadcast_(pair, src)
            if slot is not None and shard.rank != src:
                self.k[slot], self.v[slot] = pair[0], pair[1]

    def get(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V (B*S', H, N, D) of the sorted clip `frames` (a subset of the cached ones), on the device."""
        r = self.schedule
        slots = torch.searchsorted(self.frames, frames).tolist()
        if any(self.frames[s] != f for s, f in zip(slots, frames.tolist())):
            raise RuntimeError(f"frames {frames.tolist()} are not all in the K/V cache {self.frames.tolist()}")
        runs, start = [], 0  # contiguous slot runs: plain slices of (pinned) storage, no host-side gather
        for i in range(1, len(slots) + 1):
            if i == len(slots) or slots[i] != slots[i - 1] + 1:
                runs.append((slots[start], slots[i - 1] + 1))
                start = i
        out = []
        for cache in (self.k, self.v):
            parts = [cache[lo:hi].to(r.device, non_blocking=r.pin) for lo, hi in runs]
            x = parts[0] if len(parts) == 1 else torch.cat(parts)
            out.append(x.transpose(0, 1).reshape(-1, *x.shape[2:]))
        return out[0], out[1]
