"""Exact chunked execution of FateZero's video UNet over the frames of a clip (../shared/DESIGN.md, "Long videos").

For plain SD weights the only cross-frame dependencies of the video model are the sparse-causal
self-attention (attn1: each frame's queries attend to the keys/values of the frames of its index
list) and the clip-wide GroupNorm of the ResNet blocks and of conv_norm_out (statistics over all
frames of a branch). Everything else is per frame. `streaming_unet` therefore runs a stock
diffusers UNet2DConditionModel *layer-major*: module by module over the whole clip, `chunk_size`
frames of every branch at a time, calling the stock model's submodules, and honours both
dependencies exactly:

- every activation of the whole clip lives between modules in a `_Clip` (host memory, pinned on
  CUDA, frame-major so that a chunk is one contiguous block), and as each chunk is written its
  per-(branch, channel) count, mean and M2 are kept (fp32 per chunk, combined in float64 with the
  parallel-variance formula). A clip-wide GroupNorm then normalises each chunk with the group
  statistics of all frames: torch's biased variance, eps inside the square root. Concatenated
  inputs (up blocks: [h, skip]) combine the statistics of their parts, so groups that straddle
  the two are exact too;
- before a transformer block runs, the keys and values of its attn1 are computed chunk by chunk
  for the frames the index lists name and kept per frame (`_KVCache`); each chunk's queries then
  get the K/V of their own anchor frames (`ChunkView.kv`), wherever those frames are in the clip.
  The processors of fatezero_fast.processors do the rest (controlled layers, source fusion, map
  capture, stores).

Nothing else changes: outputs equal the unchunked model's up to float rounding (in float64 to
~1e-14; the time embedding is even computed for every row, as the stock forward does, so that its
rounding matches). On CUDA each chunk is copied in on a side stream while the previous one
computes. Device memory depends on the chunk size and the frame size, not on the clip length;
host memory grows linearly (the UNet's activations and skips, one K/V cache at a time). Stored
source attention (fatezero_fast.store) is captured and read back per chunk too: only the chunk's
rows (and the keys of its anchor frames) reach the device, unless the store itself is placed there.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .groupnorm import ClipGroupNorm
from .processors import ChunkView, FateZeroState, SpatioTemporalAttnProcessor

_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID = ("UNetMidBlock2DCrossAttn",)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32 for statistics and normalisation (fp32 and fp64 stay)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _Clip:
    """A whole-clip activation: (F, B, ...) frame-major, on the host (pinned on CUDA) or the device.

    Chunks are read and written as branch-major rows (B*c, ...) of frames [a, e) of every branch,
    the UNet batch layout the processors expect. Each written chunk of a 4-D activation adds its
    per-(branch, channel) statistics for a later clip-wide GroupNorm.
    """

    def __init__(self, runner: "_Runner", stats: bool = True):
        self.runner, self.keep_stats = runner, stats
        self.data: torch.Tensor | None = None
        self.dropped = 0  # leading branches of `data` that left the batch (`without_first_branch`)
        self.compacted = False  # branch 0 is not in `data` at all (`compact_without_first_branch`)
        self.stats: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (count, mean, M2) per chunk, (B, C)

    @property
    def shape(self) -> torch.Size:
        return self.data.shape[2:]

    def write(self, a: int, e: int, y: torch.Tensor) -> None:
        r = self.runner
        b, c = r.branches, e - a
        y = y.reshape(b, c, *y.shape[1:])
        if self.data is None:
            self.data = torch.empty((r.num_frames, b) + tuple(y.shape[2:]), dtype=y.dtype, device=r.storage,
                                    pin_memory=r.pin)
        if self.keep_stats and y.dim() == 5:
            var, mean = torch.var_mean(_upcast(y).flatten(3), dim=(1, 3), unbiased=False)  # (B, C)
            n = c * y.shape[3] * y.shape[4]
            self.stats.append((n, mean.double(), var.double() * n))
        self.data[a:e].copy_(y.transpose(0, 1), non_blocking=r.pin)

    def read(self, a: int, e: int) -> torch.Tensor:
        """Frames [a, e) as device rows (B*c, ...) (issued on the current stream)."""
        r = self.runner
        # the whole (contiguous) chunk is copied, dropped branches are sliced off on the device
        x = self.data[a:e].to(r.device, non_blocking=r.pin)[:, self.dropped:]
        return x.transpose(0, 1).reshape((r.branches * (e - a),) + tuple(x.shape[2:]))

    def without_first_branch(self) -> "_Clip":
        """The same activation without branch 0 (a view: nothing is copied)."""
        if self.compacted:
            return self
        clip = _Clip(self.runner, self.keep_stats)
        clip.data, clip.dropped = self.data, self.dropped + 1
        clip.stats = [(n, mean[1:], m2[1:]) for n, mean, m2 in self.stats]
        return clip

    def compact_without_first_branch(self) -> "_Clip":
        """A copy without branch 0, for a skip activation that only modules after branch 0 left the
        batch will read: its memory goes, and `without_first_branch` of the copy is the copy itself."""
        clip = self.without_first_branch()
        data = self.data[:, 1:]
        clip.data = torch.empty(data.shape, dtype=data.dtype, device=data.device, pin_memory=self.runner.pin)
        clip.data.copy_(data)
        clip.dropped, clip.compacted = 0, True
        return clip

    def channel_stats(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(count, mean, M2) per (branch, channel) over all frames, float64 (parallel-variance combination)."""
        if not self.stats or sum(n for n, _, _ in self.stats) != self.runner.num_frames * self.shape[1] * \
                self.shape[2]:
            raise RuntimeError("clip-wide statistics need every chunk of the activation written")
        total = sum(n for n, _, _ in self.stats)  # no device sync: counts are host ints
        counts = torch.tensor([n for n, _, _ in self.stats], dtype=torch.float64).to(self.stats[0][1].device)
        means = torch.stack([m for _, m, _ in self.stats])        # (K, B, C)
        m2s = torch.stack([m2 for _, _, m2 in self.stats])
        mean = (counts[:, None, None] * means).sum(0) / total
        m2 = m2s.sum(0) + (counts[:, None, None] * (means - mean) ** 2).sum(0)
        return total, mean, m2


class _KVCache:
    """Per-frame keys and values of one attn1 for the frames its queries need, kept over the clip."""

    def __init__(self, runner: "_Runner", attn, processor: SpatioTemporalAttnProcessor):
        self.runner, self.attn, self.processor = runner, attn, processor
        self.frames = processor.kv_frames_needed()  # (S,) sorted clip frames, CPU
        self.k: torch.Tensor | None = None  # (S, B, H, N, D) in storage
        self.v: torch.Tensor | None = None

    def put(self, a: int, e: int, normed: torch.Tensor) -> None:
        """Project the normalised attn1 input rows of frames [a, e) and keep the needed frames."""
        lo, hi = (int(torch.searchsorted(self.frames, x)) for x in (a, e))
        if lo == hi:
            return
        r = self.runner
        rows = normed.reshape(r.branches, e - a, *normed.shape[1:])[:, self.frames[lo:hi] - a]
        k, v = self.processor.key_value(self.attn, rows.reshape(-1, *normed.shape[1:]))
        for name, x in (("k", k), ("v", v)):
            x = x.reshape(r.branches, hi - lo, *x.shape[1:]).transpose(0, 1)
            if getattr(self, name) is None:
                setattr(self, name, torch.empty((len(self.frames),) + tuple(x.shape[1:]), dtype=x.dtype,
                                                device=r.storage, pin_memory=r.pin))
            getattr(self, name)[lo:hi].copy_(x, non_blocking=r.pin)

    def get(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V (B*S', H, N, D) of the sorted clip `frames` (a subset of the cached ones), on the device."""
        r = self.runner
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


class _Runner:
    def __init__(self, unet, state: FateZeroState | None, num_frames: int, branches: int, chunk_size: int,
                 device: torch.device, offload: bool, progress: bool):
        self.unet, self.state = unet, state
        self.num_frames, self.branches, self.device = num_frames, branches, device
        self.bounds = [(a, min(a + chunk_size, num_frames)) for a in range(0, num_frames, chunk_size)]
        self.cuda = device.type == "cuda"
        self.storage = torch.device("cpu") if offload else device
        self.pin = self.cuda and offload
        self.copy_stream = torch.cuda.Stream(device) if self.pin else None
        self.context: torch.Tensor | None = None
        self.bar = tqdm(total=_count_passes(unet) * len(self.bounds) if progress else None, desc="UNet chunks",
                        unit="chunk", leave=False, disable=not progress)

    # -- the layer-major loop ---------------------------------------------------------------------
    def chunks(self, inputs: Sequence[_Clip]):
        """Yield (a, e, device rows of each input) for every chunk; on CUDA the next chunk's inputs
        are copied in on a side stream while the caller computes on this one."""
        if self.copy_stream is None:
            for a, e in self.bounds:
                yield a, e, [x.read(a, e) for x in inputs]
                self.bar.update()
            return
        current = torch.cuda.current_stream(self.device)
        self.copy_stream.wait_stream(current)  # the inputs were written on the current stream

        def fetch(j):
            with torch.cuda.stream(self.copy_stream):
                return [x.read(*self.bounds[j]) for x in inputs]

        pending = fetch(0)
        for j, (a, e) in enumerate(self.bounds):
            current.wait_stream(self.copy_stream)
            rows = pending
            for t in rows:
                t.record_stream(current)
            if j + 1 < len(self.bounds):
                pending = fetch(j + 1)
            yield a, e, rows
            self.bar.update()

    def map(self, inputs: Sequence[_Clip], fn: Callable, stats: bool = True) -> _Clip:
        """out[a:e] = fn(a, e, *rows of inputs[a:e]) for every chunk."""
        out = _Clip(self, stats)
        for a, e, rows in self.chunks(inputs):
            out.write(a, e, fn(a, e, *rows))
        return out

    def ctx(self, a: int, e: int) -> torch.Tensor:
        """encoder_hidden_states rows of frames [a, e) of every branch."""
        c = self.context
        c = c.reshape(self.branches, self.num_frames, *c.shape[1:])[:, a:e]
        return c.reshape(-1, *c.shape[2:]).to(self.device)

    def drop_first_branch(self) -> None:
        """Branch 0 leaves the batch: later modules see the other branches only."""
        self.branches -= 1
        self.context = self.context[self.num_frames:]
        if self.state is not None:
            self.state.drop_first_branch()

    def set_chunk(self, a: int, e: int, **kwargs) -> None:
        if self.state is not None:
            self.state.chunk = ChunkView(a, e, **kwargs)

    # -- normalisation ----------------------------------------------------------------------------
    def norm(self, module: nn.Module, inputs: Sequence[_Clip]) -> Callable[[torch.Tensor], torch.Tensor]:
        """The chunk function of a ResNet/output norm: clip-wide (ClipGroupNorm) or per frame."""
        if isinstance(module, ClipGroupNorm):
            if module.frames() != self.num_frames:
                raise ValueError(f"the clip-wide GroupNorm counts {module.frames()} frames per clip, the call "
                                 f"has {self.num_frames}: call state.begin_call first")
            if len(self.bounds) == 1:  # the whole clip in one chunk: the module itself
                return module
            if self.num_frames > 1:
                return self._clip_group_norm(module.norm, inputs)
            module = module.norm
        if isinstance(module, nn.GroupNorm):
            return module
        raise NotImplementedError(f"chunked execution does not support the norm {type(module).__name__}")

    def _clip_group_norm(self, gn: nn.GroupNorm, inputs: Sequence[_Clip]):
        stats = [x.channel_stats() for x in inputs]
        count = stats[0][0]
        mean = torch.cat([s[1] for s in stats], dim=1)  # (B, C) per channel, float64
        m2 = torch.cat([s[2] for s in stats], dim=1)
        b, c = mean.shape
        g = gn.num_groups
        mean, m2 = mean.view(b, g, c // g), m2.view(b, g, c // g)
        group_mean = mean.mean(-1)
        group_m2 = m2.sum(-1) + count * ((mean - group_mean[..., None]) ** 2).sum(-1)
        var = group_m2 / (count * (c // g))                        # biased, as torch's group_norm
        rstd = torch.rsqrt(var + gn.eps)  # eps inside the square root
        # per (branch, channel) y = x * scale + shift, as torch's kernel applies it
        per_group = c // g
        scale = rstd.repeat_interleave(per_group, dim=1)                    # (B, C) float64
        shift = -group_mean.repeat_interleave(per_group, dim=1) * scale
        if gn.weight is not None:
            scale = scale * gn.weight.double()
            shift = shift * gn.weight.double() + gn.bias.double()
        dtype = torch.promote_types(gn.weight.dtype if gn.weight is not None else torch.float32, torch.float32)
        scale, shift = scale.to(self.device, dtype), shift.to(self.device, dtype)

        def apply(x: torch.Tensor) -> torch.Tensor:
            n = x.shape[0]
            y = _upcast(x).reshape(b, n // b, c, -1)
            y = torch.addcmul(shift[:, None, :, None], y, scale[:, None, :, None])
            return y.reshape(x.shape).to(x.dtype)

        return apply

    # -- blocks -----------------------------------------------------------------------------------
    def resnet(self, resnet, inputs: Sequence[_Clip], emb: torch.Tensor | None) -> _Clip:
        """ResnetBlock2D on the channel concatenation of `inputs`: two passes, one per GroupNorm."""
        if type(resnet).__name__ != "ResnetBlock2D" or resnet.time_embedding_norm != "default":
            raise NotImplementedError(f"chunked execution supports ResnetBlock2D with the default time embedding "
                                      f"norm, not {type(resnet).__name__}")
        temb = None
        if resnet.time_emb_proj is not None and emb is not None:
            temb = resnet.time_emb_proj(emb if resnet.skip_time_act else resnet.nonlinearity(emb))
            temb = temb.reshape(self.branches, self.num_frames, -1)
        norm1 = self.norm(resnet.norm1, inputs)

        def resample(x):
            if resnet.upsample is not None:
                return resnet.upsample(x.contiguous())
            return resnet.downsample(x) if resnet.downsample is not None else x

        def first(a, e, *xs):
            x = xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)
            h = resnet.conv1(resample(resnet.nonlinearity(norm1(x))))
            return h if temb is None else h + temb[:, a:e].reshape(h.shape[0], -1, 1, 1)

        hidden = self.map(inputs, first)
        norm2 = self.norm(resnet.norm2, [hidden])

        def second(a, e, h, *xs):
            h = resnet.conv2(resnet.dropout(resnet.nonlinearity(norm2(h))))
            x = resample(xs[0] if len(xs) == 1 else torch.cat(xs, dim=1))
            if resnet.conv_shortcut is not None:
                x = resnet.conv_shortcut(x)
            return (x + h) / resnet.output_scale_factor

        return self.map([hidden] + list(inputs), second)

    def transformer(self, model, x: _Clip) -> _Clip:
        """Transformer2DModel (continuous input): per-frame norm/projections, attn1 through the K/V cache."""
        if type(model).__name__ != "Transformer2DModel" or not model.is_input_continuous:
            raise NotImplementedError(f"chunked execution does not support {type(model).__name__} here")
        blocks = list(model.transformer_blocks)
        for block in blocks:
            if type(block).__name__ != "BasicTransformerBlock" or block.norm_type != "layer_norm" or \
                    block.only_cross_attention or block.pos_embed is not None or \
                    getattr(block, "fuser", None) is not None:
                raise NotImplementedError("chunked execution supports SD's BasicTransformerBlock "
                                          "(layer_norm, self- then cross-attention) only")
        height, width = x.shape[-2:]
        tokens = height * width
        caches = [self._kv_cache(block.attn1) for block in blocks]

        def enter(a, e, xs):
            n = xs.shape[0]
            h = model.norm(xs)
            if not model.use_linear_projection:
                h = model.proj_in(h)
                return h.permute(0, 2, 3, 1).reshape(n, tokens, h.shape[1])
            return model.proj_in(h.permute(0, 2, 3, 1).reshape(n, tokens, h.shape[1]))

        def with_kv(fn, index):
            """fn, then the K/V of block `index`'s attn1 for the needed frames of the chunk."""
            block, cache = blocks[index], caches[index]

            def run(a, e, *rows):
                h = fn(a, e, *rows)
                if cache is not None:
                    cache.put(a, e, block.norm1(h))
                return h
            return run

        hidden = self.map([x], with_kv(enter, 0), stats=False)
        for i, block in enumerate(blocks):
            last = i == len(blocks) - 1

            def body(a, e, h, *rest, block=block, cache=caches[i], last=last):
                h = self._basic_block(block, cache, a, e, h)
                if not last:
                    return h
                n = h.shape[0]
                if not model.use_linear_projection:
                    h = h.reshape(n, height, width, -1).permute(0, 3, 1, 2).contiguous()
                    h = model.proj_out(h)
                else:
                    h = model.proj_out(h).reshape(n, height, width, -1).permute(0, 3, 1, 2).contiguous()
                return h + rest[0]

            fn = body if last else with_kv(body, i + 1)
            hidden = self.map([hidden] + ([x] if last else []), fn, stats=last)
        if self.state is not None:
            self.state.chunk = None  # drop the last chunk's K/V
        return hidden

    def _kv_cache(self, attn) -> _KVCache | None:
        processor = attn.processor
        if isinstance(processor, SpatioTemporalAttnProcessor) and self.state is not None:
            return _KVCache(self, attn, processor)
        return None  # any other processor is per-frame self-attention: nothing crosses frames

    def _basic_block(self, block, cache: _KVCache | None, a: int, e: int, h: torch.Tensor) -> torch.Tensor:
        if cache is None:
            self.set_chunk(a, e)
        else:
            frames = cache.processor.kv_frames_for(a, e)
            k, v = cache.get(frames)
            self.set_chunk(a, e, kv=(k, v, frames))
        h = block.attn1(block.norm1(h)) + h
        if block.attn2 is not None:
            h = block.attn2(block.norm2(h), encoder_hidden_states=self.ctx(a, e)) + h
        return block.ff(block.norm3(h)) + h

    def per_frame(self, module: nn.Module, x: _Clip, *args) -> _Clip:
        return self.map([x], lambda a, e, rows: module(rows, *args))

    def down_block(self, block, h: _Clip, emb) -> tuple[_Clip, list[_Clip]]:
        outputs = []
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, attention in zip(block.resnets, attentions):
            h = self.resnet(resnet, [h], emb)
            if attention is not None:
                h = self.transformer(attention, h)
            outputs.append(h)
        for downsampler in block.downsamplers or []:
            h = self.per_frame(downsampler, h)
        if block.downsamplers is not None:
            outputs.append(h)
        return h, outputs

    def mid_block(self, block, h: _Clip, emb) -> _Clip:
        h = self.resnet(block.resnets[0], [h], emb)
        for attention, resnet in zip(block.attentions, block.resnets[1:]):
            h = self.transformer(attention, h)
            h = self.resnet(resnet, [h], emb)
        return h

    def up_block(self, block, h: _Clip, skips: list[_Clip], emb, upsample_size) -> _Clip:
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, attention in zip(block.resnets, attentions):
            h = self.resnet(resnet, [h, skips.pop()], emb)
            if attention is not None:
                h = self.transformer(attention, h)
        for upsampler in block.upsamplers or []:
            h = self.per_frame(upsampler, h, upsample_size)
        return h


def _count_passes(unet) -> int:
    """Chunk passes of one layer-major UNet call (for the progress bar)."""
    passes = 2  # conv_in, output head
    for block in list(unet.down_blocks) + [unet.mid_block] + list(unet.up_blocks):
        if block is None:
            continue
        passes += 2 * len(block.resnets)
        for attention in getattr(block, "attentions", None) or []:
            passes += 1 + len(attention.transformer_blocks)
        passes += len(getattr(block, "downsamplers", None) or []) + len(getattr(block, "upsamplers", None) or [])
    return passes


def _check_supported(unet) -> None:
    config = unet.config
    unsupported = [name for name in ("class_embedding", "add_embedding", "encoder_hid_proj", "position_net")
                   if getattr(unet, name, None) is not None]
    if unsupported or config.get("addition_embed_type") is not None:
        raise NotImplementedError(f"chunked execution supports Stable Diffusion's UNet; this one has "
                                  f"{', '.join(unsupported) or config.addition_embed_type}")
    for kind, blocks, names in (("down", unet.down_blocks, _DOWN), ("up", unet.up_blocks, _UP)):
        for block in blocks:
            if type(block).__name__ not in names:
                raise NotImplementedError(f"chunked execution does not support the {kind} block "
                                          f"{type(block).__name__}")
            if getattr(block, "s1", None):
                raise NotImplementedError("chunked execution does not support FreeU")
    if unet.mid_block is not None and type(unet.mid_block).__name__ not in _MID:
        raise NotImplementedError(f"chunked execution does not support the mid block {type(unet.mid_block).__name__}")


@torch.no_grad()
def streaming_unet(unet, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *,
                   num_frames: int, chunk_size: int, state: FateZeroState | None = None,
                   offload: bool | None = None, progress: bool = False,
                   drop_first_branch_at: int | None = None) -> torch.Tensor:
    """`unet(sample, timestep, encoder_hidden_states).sample`, computed layer-major in chunks of frames.

    sample: (B*F, C, h, w), branches of `num_frames` frames each (FateZero's batch layout);
    encoder_hidden_states: (B*F, L, D); timestep: one timestep for the whole batch. `state` is the
    FateZeroState of `processors.install` (its begin_call done); chunk_size frames of every branch
    go through each module at once. offload (default: on CUDA) keeps the clip's activations in
    pinned host memory between modules; otherwise they stay on the device. Returns (B*F, C_out, h, w)
    on the UNet's device, equal to the unchunked call up to float rounding. With
    `drop_first_branch_at` = i, branch 0 leaves the batch before up_blocks[i] and the output has
    the other branches only (fatezero_fast.source_branch).
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    rows = sample.shape[0]
    if num_frames <= 0 or rows % num_frames:
        raise ValueError(f"a batch of {rows} frames is not a whole number of {num_frames}-frame branches")
    if encoder_hidden_states.shape[0] != rows:
        raise ValueError(f"encoder_hidden_states has {encoder_hidden_states.shape[0]} rows for {rows} frames")
    timestep = torch.as_tensor(timestep)
    if timestep.numel() > 1:
        if not (timestep == timestep.flatten()[0]).all():
            raise NotImplementedError("chunked execution takes one timestep for the whole batch")
        timestep = timestep.flatten()[0]
    if state is not None and state.num_frames != num_frames:
        raise ValueError(f"the FateZero state was begun for {state.num_frames} frames, the call has {num_frames}")
    _check_supported(unet)
    device = unet.device
    offload = device.type == "cuda" if offload is None else offload
    runner = _Runner(unet, state, num_frames, rows // num_frames, chunk_size, device, offload, progress)
    runner.context = encoder_hidden_states
    try:
        return _forward(runner, sample.to(device, unet.dtype), timestep, drop_first_branch_at)
    finally:
        runner.bar.close()
        if state is not None:
            state.chunk = None


def _forward(r: _Runner, sample: torch.Tensor, timestep: torch.Tensor, drop_first_branch_at: int | None) -> torch.Tensor:
    unet = r.unet
    # time embedding of every row, (B*F, C_t): tiny, and row for row the unchunked arithmetic
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)

    x = _Clip(r, stats=False)
    b, f = r.branches, r.num_frames
    grouped = sample.reshape(b, f, *sample.shape[1:])
    for a, e in r.bounds:
        rows = grouped[:, a:e].reshape(-1, *sample.shape[1:])
        x.write(a, e, 2 * rows - 1.0 if unet.config.center_input_sample else rows)

    h = r.per_frame(unet.conv_in, x)
    skips = [h]
    # the first `late` skips are read only by up blocks after branch 0 leaves: once the down path is
    # done with them, their branch-0 part is freed (the largest, top-level ones: less host memory)
    late = 0 if drop_first_branch_at is None else \
        sum(len(block.resnets) for block in list(unet.up_blocks)[drop_first_branch_at:])
    for block in unet.down_blocks:
        h, outputs = r.down_block(block, h, emb)
        skips += outputs
        skips[:late] = [s if s is h or s.compacted else s.compact_without_first_branch() for s in skips[:late]]
    if unet.mid_block is not None:
        h = r.mid_block(unet.mid_block, h, emb)
    # up blocks upsample to the skip's size when the sample is not a multiple of the overall factor
    forward_size = any(s % 2 ** unet.num_upsamplers for s in sample.shape[-2:])
    for i, block in enumerate(unet.up_blocks):
        if i == drop_first_branch_at:
            h, skips = h.without_first_branch(), [s.without_first_branch() for s in skips]
            emb = emb[f:]  # rows are branch-major
            r.drop_first_branch()
        taken = skips[-len(block.resnets):]
        del skips[-len(block.resnets):]
        size = tuple(skips[-1].shape[-2:]) if forward_size and i < len(unet.up_blocks) - 1 else None
        h = r.up_block(block, h, taken, emb, size)

    # output head, gathered on the device (the output has the latents' few channels)
    norm = r.norm(unet.conv_norm_out, [h]) if unet.conv_norm_out is not None else None
    out, b = None, r.branches
    for a, e, (rows,) in r.chunks([h]):
        if norm is not None:
            rows = unet.conv_act(norm(rows))
        y = unet.conv_out(rows)
        if out is None:
            out = torch.empty((b, f) + tuple(y.shape[1:]), dtype=y.dtype, device=r.device)
        out[:, a:e] = y.reshape(b, e - a, *y.shape[1:])
    return out.reshape(b * f, *out.shape[2:])
