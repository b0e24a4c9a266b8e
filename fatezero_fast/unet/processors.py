"""Diffusers attention processors for FateZero (installed with `unet.set_attn_processor`).

- SpatioTemporalAttnProcessor (attn1): sparse-causal self-attention across frames
  (docs/semantics.md §1) through the fused op; in controlled layers during editing the target
  branch blends the source branch's attention in (§6) without building an Nq x Nk map.
- FateZeroCrossAttnProcessor (attn2): cross-attention; in controlled layers during editing
  the target branch's map is fused with the source branch's (§5); at the mask level it
  records head-averaged per-token maps for the blend masks (items 7 and 8).

The UNet batch is a run of branches of `num_frames` frames each, the edited (target) branch
last. With the recompute store the editing batch is [source, (uncond,) target]: the source
branch re-evaluates inversion on the stored inversion latent with the source prompt (exact).
With any other store the batch is [(uncond,) target] and the source comes from the store,
which the inversion filled through the same processors.

Chunked (layer-major) execution (unet/runner.py): the runner calls each attention with a
`chunk=ChunkView(...)` argument, which says that the rows of the call are frames [start, stop)
of every branch and, for attn1, carries the keys/values of the frames those queries attend to
(gathered by the runner over the whole clip). Without it (chunk=None) the rows are all frames.
Stores are written and read per chunk (the rows of query frames [start, stop) and, for qk, the
keys of their anchor frames), so stored attention reaches the device one chunk at a time;
captured maps are written per frame range.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.source import Source, SourceForm
from ..semantics import masks
from ..semantics.frames import IndexEntry, resolve_frame_index
from ..semantics.plan import EditPlan
from ..stores import AttentionStore, RecomputeStore
from . import levels, temporal
from .groupnorm import make_groupnorms_clip_wide

_CPU = torch.device("cpu")


@dataclass
class VideoAttentionConfig:
    """How the 2D UNet becomes FateZero's video model (model_config keys of the official configs)."""

    sparse_causal_index: Sequence[IndexEntry] = (-1, "first")  # SparseCausalAttention_index
    least_sc_channel: int | None = None        # blocks narrower than this use per-frame attention
    max_control_tokens: int = levels.CONTROL_LIMIT  # layers with more query tokens are never controlled
    backend: str = "auto"                      # blended_attention backend

    def __post_init__(self):
        self.sparse_causal_index = list(self.sparse_causal_index)
        resolve_frame_index(self.sparse_causal_index, 1)  # rejects unknown entries now


@dataclass
class ChunkView:
    """Rows of the current call are frames [start, stop) of every branch (chunked execution).

    kv: for attn1, (k, v, frames): keys and values (B*S, H, N, D) of the S sorted clip frames
    `frames` (a CPU tensor) of each branch (branch-major): those that the chunk's queries attend to.
    """

    start: int
    stop: int
    kv: tuple | None = None


@dataclass
class FateZeroState:
    """What the processors and norms need to know about the current UNet call."""

    config: VideoAttentionConfig
    num_frames: int = 1
    latent_size: tuple[int, int] = (64, 64)
    mode: str = "plain"                      # plain | invert | edit
    plan: EditPlan | None = None
    step: int = 0                            # edit step j (edit mode)
    store: AttentionStore = field(default_factory=RecomputeStore)
    store_step: int = 0                      # inversion call whose attention is captured or fused
    source_token_maps: torch.Tensor | None = None  # (F, rh, rw, 77) this step's inversion maps
    capture_branch: int | None = None        # branch whose mask-level cross maps are recorded (-1: the last)
    _captured: list = field(default_factory=list)
    _masks: dict = field(default_factory=dict)
    _chunk_maps: dict = field(default_factory=dict)   # layer -> (F, rh, rw, 77) buffer in _captured

    # -- geometry
    def level_size(self, tokens: int) -> tuple[int, int]:
        return levels.level_size(self.latent_size, tokens)

    def mask_level_tokens(self) -> int:
        return levels.mask_level_tokens(self.latent_size)

    def controls(self, tokens: int) -> bool:
        """Is a layer with this many query tokens captured (inversion) or fused (editing)?"""
        return self.mode in ("invert", "edit") and tokens <= self.config.max_control_tokens

    # -- per call
    def begin_call(self, mode: str, num_frames: int, latent_size: tuple[int, int], *, plan=None, step=0,
                   store=None, store_step=0, source_token_maps=None, capture_branch=None) -> None:
        self.mode, self.num_frames, self.latent_size = mode, num_frames, tuple(latent_size)
        self.plan, self.step, self.source_token_maps = plan, step, source_token_maps
        self.store, self.store_step = store or RecomputeStore(), store_step
        self.capture_branch = capture_branch
        self._captured, self._masks, self._chunk_maps = [], {}, {}

    # -- chunked execution
    def frame_slice(self, chunk: ChunkView | None) -> slice:
        """The clip frames an attention call's rows hold, in each branch (all unless chunked)."""
        return slice(0, self.num_frames) if chunk is None else slice(chunk.start, chunk.stop)

    def rows_per_branch(self, chunk: ChunkView | None) -> int:
        """Frames of each branch in an attention call's rows."""
        return self.num_frames if chunk is None else chunk.stop - chunk.start

    def drop_first_branch(self) -> None:
        """Branch 0 (the recompute source) left the batch mid-call (unet/source_exit.py)."""
        if self.capture_branch is not None and self.capture_branch >= 0:
            self.capture_branch -= 1

    def captured_token_maps(self) -> torch.Tensor | None:
        """Mean over the mask-level layers of the recorded (F, rh, rw, 77) maps of this call."""
        if not self._captured:
            return None
        return torch.stack(self._captured).mean(0)

    def captured_buffers(self) -> list[torch.Tensor]:
        """The whole-clip (F, rh, rw, 77) buffers the chunks of this call recorded into."""
        return list(self._chunk_maps.values())

    def record(self, head_mean_probs: torch.Tensor, layer: str | None = None, chunk: ChunkView | None = None) -> None:
        rh, rw = self.level_size(head_mean_probs.shape[1])
        maps = head_mean_probs.reshape(self.rows_per_branch(chunk), rh, rw, -1).float()
        if chunk is None:
            self._captured.append(maps)
            return
        if layer not in self._chunk_maps:  # the whole clip's buffer, filled chunk by chunk
            self._chunk_maps[layer] = maps.new_zeros(self.num_frames, rh, rw, maps.shape[-1])
            self._captured.append(self._chunk_maps[layer])
        self._chunk_maps[layer][self.frame_slice(chunk)] = maps

    def self_blend_mask(self, tokens: int) -> torch.Tensor | None:
        if tokens not in self._masks:
            self._masks[tokens] = masks.self_blend_mask(self.plan, self.source_token_maps, self.level_size(tokens))
        return self._masks[tokens]


@functools.lru_cache(maxsize=64)
def _frame_index_on(index_list: tuple, num_frames: int, device: torch.device) -> torch.Tensor:
    """resolve_frame_index, built once per device (no host-to-device copy on every layer call)."""
    return resolve_frame_index(list(index_list), num_frames).to(device)


def _split_heads(attn, x: torch.Tensor) -> torch.Tensor:
    bf, n, _ = x.shape
    return x.view(bf, n, attn.heads, -1).transpose(1, 2)


def _merge_heads_and_project(attn, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    bf, h, n, d = out.shape
    out = out.transpose(1, 2).reshape(bf, n, h * d)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


class SpatioTemporalAttnProcessor:
    """Sparse-causal self-attention with FateZero's source blend (attn1)."""

    def __init__(self, state: FateZeroState, index_list: Sequence[IndexEntry], name: str = "attn1"):
        self.state = state
        self.index_list = list(index_list)
        self.name = name

    def key_value(self, attn, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame keys and values (B*F, H, N, D) of the (normalised) input rows."""
        return _split_heads(attn, attn.to_k(hidden_states)), _split_heads(attn, attn.to_v(hidden_states))

    def kv_frames_index(self) -> torch.Tensor:
        """(F, R) clip frames each query frame attends to (CPU)."""
        return _frame_index_on(tuple(self.index_list), self.state.num_frames, _CPU)

    def kv_frames_needed(self) -> torch.Tensor:
        """Sorted clip frames whose keys/values a chunked call of this layer must be given."""
        return _frame_index_on(tuple(self.index_list), self.state.num_frames, _CPU).unique()

    def kv_frames_for(self, start: int, stop: int) -> torch.Tensor:
        """Sorted clip frames the queries of frames [start, stop) attend to."""
        return _frame_index_on(tuple(self.index_list), self.state.num_frames, _CPU)[start:stop].unique()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, chunk: ChunkView | None = None, **kwargs):
        if attention_mask is not None or hidden_states.dim() != 3:
            raise NotImplementedError("spatio-temporal self-attention takes (B*F, N, C) input without a mask")
        st = self.state
        q = _split_heads(attn, attn.to_q(hidden_states))
        f, tokens = st.num_frames, q.shape[2]
        local = _frame_index_on(tuple(self.index_list), f, q.device)
        frames = None  # the clip frames of k/v (None: all)
        if chunk is None:
            k, v = self.key_value(attn, hidden_states)
            kf = f  # key frames per branch
        else:  # queries of frames [start, stop); k/v of `frames` of each branch, gathered by the runner
            k, v, frames = chunk.kv
            kf = frames.numel()
            local = torch.searchsorted(frames.to(q.device), local[chunk.start:chunk.stop])
        qf, rows = st.rows_per_branch(chunk), st.frame_slice(chunk)
        branches = q.shape[0] // qf
        controlled = st.controls(tokens)
        if controlled and st.mode == "invert" and not st.store.recompute:
            st.store.capture_self(st.store_step, self.name, q, k, _frame_index_on(tuple(self.index_list), f, _CPU),
                                  attn.scale, frames=rows, key_frames=frames)
        edit = controlled and st.mode == "edit" and st.plan.replaces_self(st.step)
        plain = branches - 1 if edit else branches  # the target branch is last
        out = torch.empty_like(q)
        if plain:
            offsets = torch.arange(0, plain * kf, kf, device=q.device)[:, None, None]
            kv_frames = (local[None] + offsets).reshape(plain * qf, -1)
            ops.blended_attention(q[:plain * qf], k[:plain * kf], v[:plain * kf], kv_frames=kv_frames,
                                  scale=attn.scale, backend=st.config.backend, out=out[:plain * qf])
        if edit:
            if st.store.recompute:
                source = Source(SourceForm.QK, q[:qf], k[:kf])  # the source branch goes first
            else:
                source = st.store.self_source(st.store_step, self.name, rows, frames, q.device)
            mask = st.self_blend_mask(tokens)
            if mask is not None and chunk is not None:
                mask = mask[rows]
            tgt, ktgt = slice(plain * qf, (plain + 1) * qf), slice(plain * kf, (plain + 1) * kf)
            ops.blended_attention(q[tgt], k[ktgt], v[ktgt], kv_frames=local, source=source,
                                  mask=mask, scale=attn.scale, backend=st.config.backend, out=out[tgt])
        return _merge_heads_and_project(attn, out, hidden_states)


class FateZeroCrossAttnProcessor:
    """Cross-attention with FateZero's map fusion and mask-map capture (attn2)."""

    def __init__(self, state: FateZeroState, is_mask_layer: bool, name: str = "attn2"):
        self.state = state
        self.is_mask_layer = is_mask_layer
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, chunk: ChunkView | None = None, **kwargs):
        st = self.state
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = _split_heads(attn, attn.to_q(hidden_states))
        k = _split_heads(attn, attn.to_k(context))
        v = _split_heads(attn, attn.to_v(context))
        f, tokens, rows = st.rows_per_branch(chunk), q.shape[2], st.frame_slice(chunk)
        controlled = st.controls(tokens)
        fuse = controlled and st.mode == "edit" and st.plan.fuses_cross(st.step)
        store = controlled and st.mode == "invert" and not st.store.recompute
        capture = self.is_mask_layer and st.capture_branch is not None and tokens == st.mask_level_tokens()
        if not (fuse or store or capture):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
            return _merge_heads_and_project(attn, out, hidden_states)
        if attention_mask is not None:
            raise NotImplementedError("controlled cross-attention takes no attention mask")
        dt = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 upcast; fp64 (exactness tests) stays
        probs = torch.softmax(torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * attn.scale, dim=-1)
        if capture:
            branch = st.capture_branch % (probs.shape[0] // f)  # negative: from the end
            st.record(probs[branch * f:(branch + 1) * f].mean(1), self.name, chunk)
        if store:
            st.store.capture_cross(st.store_step, self.name, probs.to(v.dtype), frames=rows,
                                   num_frames=st.num_frames)
        if fuse:
            p_src = probs[:f] if st.store.recompute else \
                st.store.cross_source(st.store_step, self.name, rows, q.device)
            tgt = slice(probs.shape[0] - f, probs.shape[0])
            probs[tgt] = st.plan.fuse_cross(p_src, probs[tgt], st.step)
        out = torch.matmul(probs.to(v.dtype), v)
        return _merge_heads_and_project(attn, out, hidden_states)


def _block_width(attn) -> int:
    return attn.to_q.in_features


def install(unet, config: VideoAttentionConfig | None = None) -> FateZeroState:
    """Make a stock UNet2DConditionModel FateZero's video model; returns the state to drive it.

    Sets the processors (self-attention of blocks narrower than least_sc_channel stays per
    frame), makes the ResNet GroupNorms clip-wide and runs the temporal modules a tuned
    checkpoint attached (fatezero_fast.unet.temporal) over the clip's frames.
    """
    state = FateZeroState(config or VideoAttentionConfig())
    processors = {}
    for name, attn in unet.attn_processors.items():
        module = unet.get_submodule(name.rsplit(".processor", 1)[0])
        if name.endswith("attn1.processor"):
            narrow = state.config.least_sc_channel is not None and \
                _block_width(module) < state.config.least_sc_channel
            processors[name] = SpatioTemporalAttnProcessor(state, [] if narrow else state.config.sparse_causal_index,
                                                           name)
        else:
            is_mask_layer = not name.startswith("mid_block")
            processors[name] = FateZeroCrossAttnProcessor(state, is_mask_layer, name)
    unet.set_attn_processor(processors)
    make_groupnorms_clip_wide(unet, lambda: state.num_frames)
    temporal.install_hooks(unet, state)
    return state
