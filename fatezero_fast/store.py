"""Attention stores: how the source attention captured at inversion reaches the edits.

One interface, one class per form (../shared/DESIGN.md "Stores", FATEZERO.md "Where the memory
goes"). Inversion writes each controlled layer's source attention through `capture_self` /
`capture_cross`; editing reads it back with `self_source` / `cross_source` at the same
inversion step. Forms:

- recompute: keeps nothing per layer; each edit step re-evaluates the source branch beside the
  edit in the same UNet batch (exact). `self_source` returns None: "take the batch's source".
- qk: source Q and K of controlled self-attention and the maps of cross-attention, in the
  model's dtype (fp16 on the GPU); the fused op recomputes P_s on the fly (exact up to that dtype).
- full (fp32 maps, the official behaviour), fp16, fp8 (e4m3 with a per-row scale), lowrank
  (rank-r factors of each self map, or the smallest rank within an error budget).

Every store reports its exact size: `nbytes()` is the sum of its tensors' bytes, with
`breakdown()` per (step, layer). Tensors live on the device, in host memory (pinned when CUDA
is there, next step prefetched), or on disk (one file per step).
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch

from .errors import InputError
from .reference import attention_probs, gather_frames

FORMS = ("recompute", "qk", "full", "fp16", "fp8", "lowrank")
PLACEMENTS = ("device", "host", "disk")
FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(_nbytes(v) for v in value)


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
        self._loaded: dict[int, dict] = {}
        self._side_stream = None
        self._sizes: dict[tuple[int, str], int] = {}
        self.device = torch.device("cpu")

    # -- what each form keeps (subclasses)
    def _keep_self(self, q, k, kv_frames, scale) -> tuple:
        raise NotImplementedError

    def _keep_cross(self, probs) -> tuple:
        return (probs.to(torch.float16),)

    def _source_from(self, kept: tuple):
        raise NotImplementedError

    # -- writing (inversion)
    def capture_self(self, step: int, layer: str, q, k, kv_frames, scale: float) -> None:
        self._put(step, layer, self._keep_self(q, k, kv_frames, scale))

    def capture_cross(self, step: int, layer: str, probs) -> None:
        """probs: (F, H, N, 77) in the model's dtype."""
        self._put(step, layer, self._keep_cross(probs))

    def _put(self, step: int, layer: str, kept: tuple) -> None:
        self.device = kept[0].device
        if self.placement != "device":
            kept = tuple(t.to("cpu") for t in kept)
            if torch.cuda.is_available():
                kept = tuple(t.pin_memory() for t in kept)
        self.steps[step][layer] = kept
        self._sizes[(step, layer)] = _nbytes(kept)

    def end_step(self, step: int) -> None:
        """Inversion finished this step: a disk store writes it out and frees the memory."""
        if self.placement == "disk":
            self.folder.mkdir(parents=True, exist_ok=True)
            torch.save(dict(self.steps.pop(step, {})), self.folder / f"step_{step:04d}.pt")

    # -- reading (editing)
    def _fetch(self, step: int) -> dict:
        data = torch.load(self.folder / f"step_{step:04d}.pt", map_location="cpu") if self.placement == "disk" \
            else self.steps[step]
        return {k: tuple(t.to(self.device, non_blocking=True) for t in v) for k, v in data.items()}

    def _step(self, step: int) -> dict:
        """This step's tensors on the compute device; on CUDA the next one (editing walks the
        inversion steps backwards: step - 1) is copied in on a side stream meanwhile."""
        if step not in self._loaded:
            self._loaded = {step: self._fetch(step)}
        elif self._side_stream is not None:
            torch.cuda.current_stream().wait_stream(self._side_stream)
        following = step - 1
        if self.device.type == "cuda" and self.placement == "host" and following in self.steps:
            self._side_stream = self._side_stream or torch.cuda.Stream()
            with torch.cuda.stream(self._side_stream):
                prefetched = self._fetch(following)
            self._loaded = {step: self._loaded[step], following: prefetched}
        return self._loaded[step]

    def self_source(self, step: int, layer: str):
        """The fused op's `source` for this controlled self-attention layer at this inversion step."""
        return self._source_from(self._step(step)[layer])

    def cross_source(self, step: int, layer: str) -> torch.Tensor:
        """The source cross-attention map (F, H, N, 77) for this layer and inversion step, as kept."""
        return self._step(step)[layer][0]

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
    """Source Q and K of self-attention; the fused op recomputes P_s = softmax(Q_s K_s^T s)."""

    form = "qk"

    def _keep_self(self, q, k, kv_frames, scale):
        return q.clone(), k.clone()

    def _keep_cross(self, probs):
        return (probs.clone(),)

    def _source_from(self, kept):
        return ("qk",) + kept


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
    """P_s ~= U @ W per map: rank r, or the smallest rank whose relative Frobenius error <= budget."""

    form = "lowrank"

    def __init__(self, rank: int | None = None, error_budget: float | None = None, **kwargs):
        if (rank is None) == (error_budget is None):
            raise InputError("the lowrank store needs exactly one of rank or error_budget")
        if rank is not None and rank <= 0 or error_budget is not None and not 0 < error_budget < 1:
            raise InputError("lowrank rank must be positive and error_budget in (0, 1)")
        super().__init__(**kwargs)
        self.rank, self.error_budget = rank, error_budget
        self.errors: dict[tuple[int, str], float] = {}

    def capture_self(self, step, layer, q, k, kv_frames, scale):
        p = attention_probs(q.float(), gather_frames(k, kv_frames).float(), scale)
        u, s, vh = torch.linalg.svd(p, full_matrices=False)
        rank = self.rank or self._rank_for_budget(s)
        rank = min(rank, s.shape[-1])
        u, w = u[..., :rank] * s[..., None, :rank], vh[..., :rank, :]
        self.errors[(step, layer)] = (torch.linalg.matrix_norm(p - u @ w) / torch.linalg.matrix_norm(p)).max().item()
        self._put(step, layer, (u.to(torch.float16), w.to(torch.float16)))

    def _rank_for_budget(self, s: torch.Tensor) -> int:
        # relative Frobenius error of rank r = sqrt(sum_{i>r} s_i^2 / sum s_i^2), worst map decides
        energy = s.pow(2)
        tail = energy.flip(-1).cumsum(-1).flip(-1) / energy.sum(-1, keepdim=True)  # tail[r] = error^2 at rank r
        ok = (tail <= self.error_budget ** 2).reshape(-1, s.shape[-1])
        ranks = torch.where(ok.any(-1), ok.float().argmax(-1), torch.tensor(s.shape[-1]))
        return max(1, int(ranks.max()))

    def _source_from(self, kept):
        return ("lowrank",) + kept


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
                      vae_scale: int = 8) -> list[tuple[int, int, int, int]]:
    """(channels, heads, query tokens N, reference frames R) of each controlled transformer block
    (one self- and one cross-attention each) of an SD-style UNet at this resolution."""
    widths = list(unet_config["block_out_channels"])
    heads_cfg = unet_config.get("attention_head_dim", 8)  # SD-1.x's config names the head count so
    per_block = unet_config.get("layers_per_block", 2)
    down = unet_config.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    up = unet_config.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    h, w = math.ceil(height / vae_scale), math.ceil(width / vae_scale)
    levels = []
    for i, ch in enumerate(widths):
        levels.append((i, ch, h * w))
        h, w = (h + 1) // 2, (w + 1) // 2
    blocks = [(lv, per_block) for lv, kind in zip(levels, down) if kind.startswith("CrossAttn")]
    blocks.append((levels[-1], 1))  # the mid block
    blocks += [(lv, per_block + 1) for lv, kind in zip(reversed(levels), up) if kind.startswith("CrossAttn")]
    layers = []
    for (i, ch, n), count in blocks:
        if n > max_control_tokens:
            continue
        heads = heads_cfg if isinstance(heads_cfg, int) else heads_cfg[i]
        per_frame = (least_sc_channel is not None and ch < least_sc_channel) or not sparse_causal_index
        layers += [(ch, heads, n, 1 if per_frame else len(sparse_causal_index))] * count
    return layers


def estimate_store_bytes(form: str, unet_config: dict, height: int, width: int, frames: int, steps: int,
                         sparse_causal_index, least_sc_channel: int | None = None, max_control_tokens: int = 1024,
                         vae_scale: int = 8, model_bytes: int = 2, rank: int = 16) -> int:
    """Exact bytes of a store form for any model, resolution, frame count, steps and index list.

    Mirrors what each class keeps per controlled layer and step (checked against the measured
    `nbytes()` of every form in tests/test_store.py). model_bytes: the model dtype's size (qk keeps
    Q, K and cross maps in it).
    """
    total = 0
    for ch, heads, n, r in controlled_layers(unet_config, height, width, sparse_causal_index, least_sc_channel,
                                             max_control_tokens, vae_scale):
        rows = frames * heads * n  # map rows of this layer
        self_map, cross_map = rows * r * n, rows * 77
        total += {
            "recompute": 0,
            "qk": (2 * frames * n * ch + cross_map) * model_bytes,
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
