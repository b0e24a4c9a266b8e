"""Attention stores: how the source attention captured at inversion reaches the edits.

One interface, one class per form (../shared/DESIGN.md "Stores", FATEZERO.md "Where the memory
goes"). Inversion writes each controlled layer's source attention through `capture_self` /
`capture_cross`; editing reads it back with `self_source` / `cross_source` at the same
inversion step. Forms:

- recompute: keeps nothing per layer; each edit step re-evaluates the source branch beside the
  edit in the same UNet batch (exact). `self_source` returns None: "take the batch's source".
- qk: source Q of controlled self-attention, K of the frames some query attends to (one frame
  for ['mid']), and the maps of cross-attention, in the model's dtype (fp16 on the GPU); the
  fused op recomputes P_s on the fly (exact up to that dtype).
- full (fp32 maps, the official behaviour), fp16, fp8 (e4m3 with a per-row scale), lowrank
  (rank-r factors of each self map, or the smallest rank within an error budget).

Row ranges: captures and reads name the query frames [a, e) they hold (`frames`; default the
whole clip), so chunked execution (fatezero_fast.streaming) hands the store one chunk at a time
and gets back one chunk at a time: device memory follows the chunk, not the clip. Each layer's
per-frame tensors are whole-clip tensors in the store's placement, allocated at the first chunk.

Every store reports its exact size: `nbytes()` is the sum of its tensors' bytes, with
`breakdown()` per (step, layer). Tensors live on the device, in host memory (pinned when CUDA
is there; on CUDA the next read is copied in on a side stream), or on disk (one file per step,
loaded into host memory once per step while editing).
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch

from .chunking import unet_levels
from .errors import InputError
from .reference import attention_probs, gather_frames, resolve_frame_index

FORMS = ("recompute", "qk", "full", "fp16", "fp8", "lowrank")
PLACEMENTS = ("device", "host", "disk")
FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0


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

    def _source_from(self, kept: tuple):
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


class RecomputeStore(AttentionStore):
    """Keeps nothing per layer: the source branch is re-evaluated beside each edit (exact)."""

    form = "recompute"
    recompute = True

    def capture_self(self, *args, **kwargs) -> None:
        pass

    def capture_cross(self, *args, **kwargs) -> None:
        pass


class QKStore(AttentionStore):
    """Source Q of self-attention and K of the frames some query attends to; the fused op
    recomputes P_s = softmax(Q_s K_s^T s). `key_frames[(step, layer)]`: the clip frames K holds."""

    form = "qk"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.key_frames: dict[tuple[int, str], torch.Tensor] = {}

    def capture_self(self, step, layer, q, k, kv_frames, scale, *, frames=None, key_frames=None):
        num_frames = kv_frames.shape[0]
        kept = self.key_frames.setdefault((step, layer), kv_frames.unique().cpu())  # sorted
        given = torch.arange(k.shape[0]) if key_frames is None else key_frames.cpu()
        needed = torch.isin(given, kept)
        slots = torch.searchsorted(kept, given[needed])
        self._write(step, layer, [(_rows(frames, num_frames), num_frames, q),
                                  (slots, kept.numel(), k[needed.to(k.device)])])

    def _keep_cross(self, probs):
        return (probs,)

    def _select(self, step, layer, kept, frames, key_frames):
        if len(kept) == 1:  # a cross map
            return super()._select(step, layer, kept, frames, key_frames)
        q, k = kept
        stored = self.key_frames.get((step, layer), torch.arange(k.shape[0]))  # older saves kept all
        wanted = torch.arange(q.shape[0]) if key_frames is None else key_frames
        slots = torch.searchsorted(stored, wanted).clamp_max(stored.numel() - 1)
        found = stored[slots] == wanted
        keys = k[slots.to(k.device)]
        if not found.all():
            keys[~found.to(k.device)] = 0  # frames no query attends to were not kept: never read
        return q[_rows(frames, q.shape[0])], keys

    def _source_from(self, kept):
        return ("qk",) + kept

    def state_dict(self) -> dict:
        return dict(super().state_dict(), key_frames=self.key_frames)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.key_frames = dict(state.get("key_frames", {}))


class MapStore(AttentionStore):
    """Materialized source maps P_s (F, H, Nq, R*Nk) in `dtype` (full: fp32 as the official code)."""

    def __init__(self, dtype: torch.dtype, form: str, **kwargs):
        super().__init__(**kwargs)
        self.dtype, self.form = dtype, form

    def _keep_self(self, q, k, kv_frames, scale):
        return (attention_probs(q.float(), gather_frames(k, kv_frames).float(), scale).to(self.dtype),)

    def _keep_cross(self, probs):
        return (probs.to(self.dtype),)

    def _source_from(self, kept):
        return ("probs",) + kept


class FP8Store(AttentionStore):
    """Maps in float8 e4m3 with a per-row fp32 scale (row max / 448): ~1/4 of fp32."""

    form = "fp8"

    def __init__(self, **kwargs):
        if FP8 is None:
            raise InputError("this torch has no float8_e4m3fn: use --store fp16")
        super().__init__(**kwargs)

    def _keep_self(self, q, k, kv_frames, scale):
        p = attention_probs(q.float(), gather_frames(k, kv_frames).float(), scale)
        row_scale = p.amax(-1).clamp_min(1e-30) / FP8_MAX
        return (p / row_scale[..., None]).to(FP8), row_scale

    def _source_from(self, kept):
        return ("probs",) + kept


class LowRankStore(AttentionStore):
    """P_s ~= U @ W per map: rank r, or the smallest rank whose relative Frobenius error <= budget.

    Each row range (chunk) is factorised on its own; with an error budget the layer keeps the
    largest rank any of its chunks needed, smaller ranks padded with zero factors (exact padding).
    """

    form = "lowrank"

    def __init__(self, rank: int | None = None, error_budget: float | None = None, **kwargs):
        if (rank is None) == (error_budget is None):
            raise InputError("the lowrank store needs exactly one of rank or error_budget")
        if rank is not None and rank <= 0 or error_budget is not None and not 0 < error_budget < 1:
            raise InputError("lowrank rank must be positive and error_budget in (0, 1)")
        super().__init__(**kwargs)
        self.rank, self.error_budget = rank, error_budget
        self.errors: dict[tuple[int, str], float] = {}

    def capture_self(self, step, layer, q, k, kv_frames, scale, *, frames=None, key_frames=None):
        rows, local = _chunk_frames(kv_frames, frames, key_frames)
        p = attention_probs(q.float(), gather_frames(k, local).float(), scale)
        u, s, vh = torch.linalg.svd(p, full_matrices=False)
        rank = min(self.rank or self._rank_for_budget(s), s.shape[-1])
        u, w = u[..., :rank] * s[..., None, :rank], vh[..., :rank, :]
        error = (torch.linalg.matrix_norm(p - u @ w) / torch.linalg.matrix_norm(p)).max().item()
        self.errors[(step, layer)] = max(error, self.errors.get((step, layer), 0.0))
        kept = self.steps[step].get(layer)
        if kept is not None and kept[0].shape[-1] < rank:  # this chunk needs more: widen the layer's factors
            self._set(step, layer, (_pad_rank(kept[0], rank, -1), _pad_rank(kept[1], rank, -2)))
        elif kept is not None:
            rank = kept[0].shape[-1]
        num_frames = kv_frames.shape[0]
        self._write(step, layer, [(rows, num_frames, _pad_rank(u, rank, -1).to(torch.float16)),
                                  (rows, num_frames, _pad_rank(w, rank, -2).to(torch.float16))])

    def _rank_for_budget(self, s: torch.Tensor) -> int:
        # relative Frobenius error of rank r = sqrt(sum_{i>r} s_i^2 / sum s_i^2), worst map decides
        energy = s.pow(2)
        tail = energy.flip(-1).cumsum(-1).flip(-1) / energy.sum(-1, keepdim=True)  # tail[r] = error^2 at rank r
        ok = (tail <= self.error_budget ** 2).reshape(-1, s.shape[-1])
        ranks = torch.where(ok.any(-1), ok.float().argmax(-1), torch.tensor(s.shape[-1]))
        return max(1, int(ranks.max()))

    def _source_from(self, kept):
        return ("lowrank",) + kept


def _pad_rank(x: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """x with its rank axis `dim` zero-padded to `rank`."""
    missing = rank - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim)


def make_store(form: str = "recompute", *, placement: str = "host", folder=None, rank=None,
               error_budget=None) -> AttentionStore:
    """A store of the given form (`--store`); see the module docstring for the forms."""
    if form not in FORMS:
        raise InputError(f"unknown store {form!r}: use one of {', '.join(FORMS)}")
    kwargs = dict(placement=placement, folder=folder)
    if form == "recompute":
        return RecomputeStore(**kwargs)
    if form == "qk":
        return QKStore(**kwargs)
    if form == "full":
        return MapStore(torch.float32, "full", **kwargs)
    if form == "fp16":
        return MapStore(torch.float16, "fp16", **kwargs)
    if form == "fp8":
        return FP8Store(**kwargs)
    if rank is None and error_budget is None:
        rank = 16
    return LowRankStore(rank=rank, error_budget=error_budget, **kwargs)


def controlled_layers(unet_config: dict, height: int, width: int, sparse_causal_index,
                      least_sc_channel: int | None = None, max_control_tokens: int = 1024,
                      vae_scale: int = 8) -> list[tuple[int, int, int, list]]:
    """(channels, heads, query tokens N, index list) of each controlled transformer block (one self-
    and one cross-attention each) of an SD-style UNet at this resolution; [] for per-frame attention."""
    heads_cfg = unet_config.get("attention_head_dim", 8)  # SD-1.x's config names the head count so
    per_block = unet_config.get("layers_per_block", 2)
    down = unet_config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    up = unet_config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    latent_size = (math.ceil(height / vae_scale), math.ceil(width / vae_scale))
    levels = [(i, ch, n) for i, (ch, n) in enumerate(unet_levels(unet_config, latent_size))]
    blocks = [(lv, per_block) for lv, kind in zip(levels, down) if kind.startswith("CrossAttn")]
    blocks.append((levels[-1], 1))  # the mid block
    blocks += [(lv, per_block + 1) for lv, kind in zip(reversed(levels), up) if kind.startswith("CrossAttn")]
    layers = []
    for (i, ch, n), count in blocks:
        if n > max_control_tokens:
            continue
        heads = heads_cfg if isinstance(heads_cfg, int) else heads_cfg[i]
        per_frame = (least_sc_channel is not None and ch < least_sc_channel) or not sparse_causal_index
        layers += [(ch, heads, n, [] if per_frame else list(sparse_causal_index))] * count
    return layers


def estimate_store_bytes(form: str, unet_config: dict, height: int, width: int, frames: int, steps: int,
                         sparse_causal_index, least_sc_channel: int | None = None, max_control_tokens: int = 1024,
                         vae_scale: int = 8, model_bytes: int = 2, rank: int = 16) -> int:
    """Exact bytes of a store form for any model, resolution, frame count, steps and index list.

    Mirrors what each class keeps per controlled layer and step (checked against the measured
    `nbytes()` of every form in tests/test_store.py). model_bytes: the model dtype's size (qk keeps
    Q, K of the frames some query attends to, and cross maps in it).
    """
    total = 0
    for ch, heads, n, index in controlled_layers(unet_config, height, width, sparse_causal_index,
                                                 least_sc_channel, max_control_tokens, vae_scale):
        kv_frames = resolve_frame_index(index, frames)
        r, key_frames = kv_frames.shape[1], kv_frames.unique().numel()
        rows = frames * heads * n  # map rows of this layer
        self_map, cross_map = rows * r * n, rows * 77
        total += {
            "recompute": 0,
            "qk": ((frames + key_frames) * n * ch + cross_map) * model_bytes,
            "full": (self_map + cross_map) * 4,
            "fp16": (self_map + cross_map) * 2,
            "fp8": self_map + rows * 4 + cross_map * 2,
            "lowrank": 2 * frames * heads * min(rank, n) * (n + r * n) + cross_map * 2,
        }[form]
    return total * steps


def official_store_bytes(unet_config: dict, height: int, width: int, frames: int, steps: int,
                         sparse_causal_index, least_sc_channel: int | None = None,
                         max_control_tokens: int = 1024, vae_scale: int = 8, bytes_per_value: int = 4) -> int:
    """Bytes of the official FateZero store for any model, resolution, frames, steps, index list.

    Per controlled layer and step it keeps P of self-attention (F, H, Nq, R*Nq) and of
    cross-attention (F, H, Nq, 77) in the model's dtype (4 bytes fp32, 2 bytes for an fp16 run).
    """
    fp32 = estimate_store_bytes("full", unet_config, height, width, frames, steps, sparse_causal_index,
                                least_sc_channel, max_control_tokens, vae_scale)
    return fp32 * bytes_per_value // 4
