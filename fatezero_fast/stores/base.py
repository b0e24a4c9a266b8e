"""Attention stores: how the source attention captured at inversion reaches the edits.

One interface, one class per form (docs/semantics.md, "Where the memory goes"). Inversion
writes each controlled layer's source attention through `capture_self` / `capture_cross`;
editing reads it back with `self_source` / `cross_source` at the same inversion step. Forms:

- recompute: keeps nothing per layer; each edit step re-evaluates the source branch beside the
  edit in the same UNet batch (exact). `self_source` returns None: "take the batch's source".
- qk: source Q of controlled self-attention, K of the frames some query attends to (one frame
  for ['mid']), and the maps of cross-attention, in the model's dtype (fp16 on the GPU); the
  fused op recomputes P_s on the fly (exact up to that dtype).
- full (fp32 maps, the official behaviour), fp16, fp8 (e4m3 with a per-row scale), lowrank
  (rank-r factors of each self map, or the smallest rank within an error budget).

Row ranges: captures and reads name the query frames [a, e) they hold (`frames`; default the
whole clip), so chunked execution (unet/runner.py) hands the store one chunk at a time
and gets back one chunk at a time: device memory follows the chunk, not the clip. Each layer's
per-frame tensors are whole-clip tensors in the store's placement, allocated at the first chunk.

Every store reports its exact size: `nbytes()` is the sum of its tensors' bytes, with
`breakdown()` per (step, layer). Tensors live on the device, in host memory (pinned when CUDA
is there; on CUDA the next read is copied in on a side stream), or on disk (one file per step,
loaded into host memory once per step while editing).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from ..errors import InputError
from ..ops.source import Source

PLACEMENTS = ("device", "host", "disk")


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(_nbytes(v) for v in value)


def _rows(frames: slice | None, num_frames: int) -> slice:
    """Query frames [a, e) of a clip of num_frames as a slice (None: all)."""
    if frames is None:
        return slice(0, num_frames)
    a, e = frames.start or 0, num_frames if frames.stop is None else frames.stop
    if frames.step not in (None, 1) or not 0 <= a < e <= num_frames:
        raise ValueError(f"frames must be a non-empty range [a, e) of {num_frames} frames, got {frames}")
    return slice(a, e)


def _chunk_frames(kv_frames: torch.Tensor, frames: slice | None, key_frames: torch.Tensor | None):
    """(rows of query frames `frames`, their kv_frames as indices into the keys of `key_frames`)."""
    rows = _rows(frames, kv_frames.shape[0])
    local = kv_frames[rows]
    if key_frames is not None:
        local = torch.searchsorted(key_frames.to(local.device), local)
    return rows, local


class AttentionStore:
    """Base: per-step dicts {layer: tensors}, exact byte accounting, placement, save/load."""

    form = "base"
    recompute = False

    def __init__(self, placement: str = "host", folder: str | Path | None = None):
        if placement not in PLACEMENTS:
            raise InputError(f"unknown store placement {placement!r}: use one of {PLACEMENTS}")
        if placement == "disk" and folder is None:
            raise InputError("a disk store needs a folder")
        self.placement, self.folder = placement, None if folder is None else Path(folder)
        self.steps: dict[int, dict[str, tuple]] = defaultdict(dict)
        self._sizes: dict[tuple[int, str], int] = {}
        self._disk_step: tuple[int, dict] | None = None  # (step, its layers) read from disk
        self._side_stream = None
        self._prefetched = None   # ((step, read), tensors) copied in on the side stream
        self._last_read = None    # (step, read)
        self._follows: dict = {}  # read -> (the read that came after it, step offset)
        self.device = torch.device("cpu")

    # -- what each form keeps (subclasses)
    def _keep_self(self, q, k, kv_frames, scale) -> tuple:
        """Per-query-frame tensors (c, ...) of rows q (c, H, N, D), kv_frames (c, R) indexing k."""
        raise NotImplementedError

    def _keep_cross(self, probs) -> tuple:
        return (probs.to(torch.float16),)

    def _source_from(self, kept: tuple) -> Source:
        raise NotImplementedError

    # -- writing (inversion)
    def capture_self(self, step: int, layer: str, q, k, kv_frames, scale: float, *,
                     frames: slice | None = None, key_frames: torch.Tensor | None = None) -> None:
        """Keep the source self-attention of query frames `frames` ([a, e); default the whole clip).

        q: (e-a, H, N, D) their queries; kv_frames: (F, R) the clip frames every query frame of the
        clip attends to (F = the clip length); k: (S, H, N, D) keys of the sorted clip frames
        `key_frames` (default all F), at least those that frames [a, e) attend to.
        """
        rows, local = _chunk_frames(kv_frames, frames, key_frames)
        kept = self._keep_self(q, k, local, scale)
        self._write(step, layer, [(rows, kv_frames.shape[0], t) for t in kept])

    def capture_cross(self, step: int, layer: str, probs, *, frames: slice | None = None,
                      num_frames: int | None = None) -> None:
        """probs: (e-a, H, N, 77) of query frames `frames` of a num_frames clip (default: all), model dtype."""
        num_frames = probs.shape[0] if num_frames is None else num_frames
        rows = _rows(frames, num_frames)
        self._write(step, layer, [(rows, num_frames, t) for t in self._keep_cross(probs)])

    def _write(self, step: int, layer: str, parts) -> None:
        """parts: (rows, total, x): x holds rows `rows` (slice or index) of a (total, ...) tensor
        of the layer, allocated in the store's placement at the first write."""
        self.device = parts[0][2].device
        kept = self.steps[step].get(layer)
        if kept is None:
            kept = tuple(self._empty((total,) + tuple(x.shape[1:]), x.dtype, x.device) for _, total, x in parts)
            self._set(step, layer, kept)
        for t, (rows, _, x) in zip(kept, parts):
            if isinstance(rows, slice):
                t[rows].copy_(x)
            else:
                t[rows.to(t.device)] = x.to(t.device)

    def _empty(self, shape, dtype, device) -> torch.Tensor:
        if self.placement == "device":
            return torch.empty(shape, dtype=dtype, device=device)
        return torch.empty(shape, dtype=dtype, pin_memory=self.placement == "host" and torch.cuda.is_available())

    def _set(self, step: int, layer: str, kept: tuple) -> None:
        self.steps[step][layer] = kept
        self._sizes[(step, layer)] = _nbytes(kept)

    def end_step(self, step: int) -> None:
        """Inversion finished this step: a disk store writes it out and frees the memory."""
        if self.placement == "disk":
            self.folder.mkdir(parents=True, exist_ok=True)
            torch.save(dict(self.steps.pop(step, {})), self.folder / f"step_{step:04d}.pt")

    # -- reading (editing)
    def self_source(self, step: int, layer: str, frames: slice | None = None,
                    key_frames: torch.Tensor | None = None, device: torch.device | None = None):
        """The fused op's `source` for query frames `frames` (default all) of this controlled
        self-attention layer at this inversion step, on `device` (default: where it was captured).
        key_frames: the sorted clip frames of the edit's k/v (default all): a qk source's K holds them."""
        return self._source_from(self._read(step, layer, frames, key_frames, device))

    def cross_source(self, step: int, layer: str, frames: slice | None = None,
                     device: torch.device | None = None) -> torch.Tensor:
        """The source cross-attention map (e-a, H, N, 77) of query frames `frames`, as kept."""
        return self._read(step, layer, frames, None, device)[0]

    def _layer(self, step: int, layer: str) -> tuple:
        """A layer's kept tensors in host or device memory (a disk step is read once per step)."""
        if self.placement != "disk":
            return self.steps[step][layer]
        if self._disk_step is None or self._disk_step[0] != step:
            self._disk_step = None  # free the previous step first
            self._disk_step = (step, torch.load(self.folder / f"step_{step:04d}.pt", map_location="cpu"))
        return self._disk_step[1][layer]

    def _select(self, step: int, layer: str, kept: tuple, frames: slice | None, key_frames) -> tuple:
        """The rows of query frames `frames` of each kept tensor."""
        rows = _rows(frames, kept[0].shape[0])
        return tuple(t[rows] for t in kept)

    def _load(self, step: int, read: tuple, device: torch.device) -> tuple:
        layer, frames, key_frames = read
        frames = None if frames is None else slice(*frames)
        key_frames = None if key_frames is None else torch.tensor(key_frames)
        parts = self._select(step, layer, self._layer(step, layer), frames, key_frames)
        return tuple(t.to(device, non_blocking=True) for t in parts)  # one layer, one chunk

    def _read(self, step, layer, frames, key_frames, device) -> tuple:
        """One read; on CUDA from host memory, the read that followed it last time (same order every
        edit step, one inversion step earlier after the last read of a step) is copied in meanwhile."""
        device = torch.device(device) if device is not None else self.device
        read = (layer, None if frames is None else (frames.start, frames.stop),
                None if key_frames is None else tuple(key_frames.tolist()))
        if self._prefetched is not None and self._prefetched[0] == (step, read):
            current = torch.cuda.current_stream(device)
            current.wait_stream(self._side_stream)
            tensors = self._prefetched[1]
            for t in tensors:
                t.record_stream(current)  # allocated on the side stream, used on this one
        else:
            tensors = self._load(step, read, device)
        self._prefetched = None
        if self._last_read is not None:
            self._follows[self._last_read[1]] = (read, step - self._last_read[0])
        self._last_read = (step, read)
        following = self._follows.get(read)
        if following is not None and device.type == "cuda" and self.placement == "host" and \
                following[0][0] in self.steps.get(step + following[1], {}):
            self._side_stream = self._side_stream or torch.cuda.Stream(device)
            with torch.cuda.stream(self._side_stream):
                nxt = step + following[1]
                self._prefetched = ((nxt, following[0]), self._load(nxt, following[0], device))
        return tensors

    # -- several ranks
    def gather_(self, shard, num_frames: int) -> None:
        """Distributed (unet/shard.py): every rank captured its own query frames; afterwards every
        rank's store holds every frame's rows, as one process keeps them (docs/design.md, "Several GPUs")."""
        if self.placement == "disk" and self.steps:
            raise InputError("a disk store cannot be gathered from several ranks: use a host or device placement")
        owners = [shard.owner(f, num_frames) for f in range(num_frames)]
        for step in sorted(self.steps):
            for layer in sorted(self.steps[step]):
                self._gather_layer(shard, step, layer, owners)

    def _gather_layer(self, shard, step: int, layer: str, owners: list[int]) -> None:
        """The layer's kept tensors, rows by query frame: each row from the rank that owns its frame."""
        for t in self.steps[step][layer]:
            shard.gather_rows_(t, owners)

    # -- accounting
    def nbytes(self) -> int:
        return sum(self._sizes.values())

    def breakdown(self) -> dict[tuple[int, str], int]:
        """Bytes per (inversion step, layer name)."""
        return dict(self._sizes)

    # -- persistence
    def state_dict(self) -> dict:
        if self.placement == "disk":
            return {"form": self.form, "placement": "disk", "sizes": self._sizes}
        return {"form": self.form, "placement": self.placement, "sizes": self._sizes,
                "steps": {s: {k: tuple(t.cpu() for t in v) for k, v in d.items()} for s, d in self.steps.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._sizes = dict(state["sizes"])
        for step, layers in state.get("steps", {}).items():
            self.steps[step] = dict(layers)
