"""The store forms, one class each, and `make_store` (docs/design.md, "Stores")."""
from __future__ import annotations

import torch

from ..errors import InputError
from ..ops.reference import attention_probs, gather_frames
from ..ops.source import Source, SourceForm
from .base import AttentionStore, _chunk_frames, _rows

FORMS = ("recompute", "qk", "full", "fp16", "fp8", "lowrank")
FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0


class RecomputeStore(AttentionStore):
    """Keeps nothing per layer: the source branch is re-evaluated beside each edit (exact)."""

    form = "recompute"
    recompute = True



class QKStore(AttentionStore):
    """Source Q of self-attention and K of the frames some query attends to; the fused op
    recomputes P_s = softmax(Q_s K_s^T s). `key_frames[(step, layer)]`: the clip frames K holds."""

    form = "qk"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.key_frames: dict[tuple[int, str], torch.Tensor] = {}
        self.written: dict[tuple[int, str], set[int]] = {}  # K slots this process wrote (for `gather_`)
        self._key_owners: dict[tuple[int, str], list[int]] = {}  # the rank each K slot is gathered from

    def capture_self(self, step, layer, q, k, kv_frames, scale, *, frames=None, key_frames=None):
        num_frames = kv_frames.shape[0]
        kept = self.key_frames.setdefault((step, layer), kv_frames.unique().cpu())  # sorted
        given = torch.arange(k.shape[0]) if key_frames is None else key_frames.cpu()
        needed = torch.isin(given, kept)
        slots = torch.searchsorted(kept, given[needed])
        self.written.setdefault((step, layer), set()).update(slots.tolist())
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
        return Source(SourceForm.QK, *kept)

    def gather_(self, shard, num_frames):
        # a K slot comes from the first rank whose queries attend to its frame (all that do hold the
        # same K: a frame's K is computed by its owner and broadcast, unet/chunks.py KVCache)
        written = shard.objects(self.written)
        self._key_owners = {key: [next(r for r, w in enumerate(written) if slot in w[key])
                                  for slot in range(len(frames))] for key, frames in self.key_frames.items()}
        super().gather_(shard, num_frames)

    def _gather_layer(self, shard, step, layer, owners):
        kept = self.steps[step][layer]
        if len(kept) == 1:  # a cross map
            return super()._gather_layer(shard, step, layer, owners)
        shard.gather_rows_(kept[0], owners)
        shard.gather_rows_(kept[1], self._key_owners[(step, layer)])

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
        return Source(SourceForm.PROBS, kept[0])


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
        return Source(SourceForm.PROBS, kept[0], row_scale=kept[1])


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
        return Source(SourceForm.LOWRANK, *kept)

    def gather_(self, shard, num_frames):
        # every rank widens each layer's factors to the largest rank any rank's chunks needed
        widths = shard.objects({(step, layer): kept[0].shape[-1] for step, layers in self.steps.items()
                                for layer, kept in layers.items() if len(kept) == 2})
        errors = shard.objects(self.errors)
        for step, layer in widths[0]:
            u, w = self.steps[step][layer]
            rank = max(ws[(step, layer)] for ws in widths)
            self._set(step, layer, (_pad_rank(u, rank, -1), _pad_rank(w, rank, -2)))
        self.errors = {key: max(e[key] for e in errors) for key in self.errors}
        super().gather_(shard, num_frames)


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
