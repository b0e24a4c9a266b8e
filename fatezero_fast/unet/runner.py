"""Exact chunked execution of FateZero's video UNet over the frames of a clip (docs/design.md, "Long clips").

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
  for the frames the index lists name and kept per frame (`KVCache`); each chunk's queries then
  get the K/V of their own anchor frames (`ChunkView.kv`), wherever those frames are in the clip
  (unet/transformer_walk.py).
  The processors of unet/processors.py do the rest (controlled layers, source fusion, map
  capture, stores).

Nothing else changes: outputs equal the unchunked model's up to float rounding (in float64 to
~1e-14; the time embedding is even computed for every row, as the stock forward does, so that its
rounding matches). On CUDA each chunk is copied in on a side stream while the previous one
computes. Device memory depends on the chunk size and the frame size, not on the clip length;
host memory grows linearly (the UNet's activations and skips, one K/V cache at a time). Stored
source attention (fatezero_fast.stores) is captured and read back per chunk too: only the chunk's
rows (and the keys of its anchor frames) reach the device, unless the store itself is placed there.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .chunks import ChunkSchedule, ClipActivation
from .groupnorm import chunk_norm
from .processors import FateZeroState
from .shard import FrameShard
from .temporal import reach_of
from .transformer_walk import ChunkedTransformer

_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID = ("UNetMidBlock2DCrossAttn",)


@torch.no_grad()
def streaming_unet(unet, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, *,
                   num_frames: int, chunk_size: int, state: FateZeroState | None = None,
                   offload: bool | None = None, progress: bool = False,
                   drop_first_branch_at: int | None = None, shard: FrameShard | None = None) -> torch.Tensor:
    """`unet(sample, timestep, encoder_hidden_states).sample`, computed layer-major in chunks of frames.

    sample: (B*F, C, h, w), branches of `num_frames` frames each (FateZero's batch layout);
    encoder_hidden_states: (B*F, L, D); timestep: one timestep for the whole batch. `state` is the
    FateZeroState of `processors.install` (its begin_call done); chunk_size frames of every branch
    go through each module at once. offload (default: on CUDA) keeps the clip's activations in
    pinned host memory between modules; otherwise they stay on the device. Returns (B*F, C_out, h, w)
    on the UNet's device, equal to the unchunked call up to float rounding. With
    `drop_first_branch_at` = i, branch 0 leaves the batch before up_blocks[i] and the output has
    the other branches only (unet/source_exit.py). With a `shard`, this rank runs its own frames
    (unet/shard.py); the output, and the mask-level maps `state` captured, are the whole clip's on
    every rank.
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
    chunks = ChunkSchedule(num_frames, rows // num_frames, chunk_size, device, offload, encoder_hidden_states,
                           _count_passes(unet) if progress else None, shard)
    runner = LayerMajorUNet(unet, state, chunks)
    chunks.temporal = getattr(unet, "_fz_temporal", None)  # a tuned checkpoint's temporal hooks
    if chunks.temporal is not None:
        chunks.temporal.layer_major = True
    try:
        out = runner.forward(sample.to(device, unet.dtype), timestep, drop_first_branch_at)
        if shard is not None and state is not None:
            for maps in state.captured_buffers():  # each rank recorded its own frames
                shard.share_frames_(maps, 0)
        return out
    finally:
        chunks.bar.close()
        if chunks.temporal is not None:
            chunks.temporal.layer_major, chunks.temporal.halo = False, None



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



class LayerMajorUNet:
    """A stock UNet2DConditionModel's forward, module by module over the whole clip, chunk by chunk."""

    def __init__(self, unet, state: FateZeroState | None, chunks: ChunkSchedule):
        self.unet, self.state, self.chunks = unet, state, chunks
        self.transformer = ChunkedTransformer(state, chunks)

    def drop_first_branch(self) -> None:
        """Branch 0 (the recompute source) leaves the batch (unet/source_exit.py)."""
        self.chunks.drop_first_branch()
        if self.state is not None:
            self.state.drop_first_branch()

    def norm(self, module: nn.Module, inputs: Sequence[ClipActivation]) -> Callable[[torch.Tensor], torch.Tensor]:
        return chunk_norm(module, inputs, self.chunks)

    # -- blocks -----------------------------------------------------------------------------------
    def resnet(self, resnet, inputs: Sequence[ClipActivation], emb: torch.Tensor | None) -> ClipActivation:
        """ResnetBlock2D on the channel concatenation of `inputs`: two passes, one per GroupNorm."""
        if type(resnet).__name__ != "ResnetBlock2D" or resnet.time_embedding_norm != "default":
            raise NotImplementedError(f"chunked execution supports ResnetBlock2D with the default time embedding "
                                      f"norm, not {type(resnet).__name__}")
        temb = None
        if resnet.time_emb_proj is not None and emb is not None:
            temb = resnet.time_emb_proj(emb if resnet.skip_time_act else resnet.nonlinearity(emb))
            temb = temb.reshape(self.chunks.branches, self.chunks.num_frames, -1)
        norm1 = self.norm(resnet.norm1, inputs)

        def resample(x):
            if resnet.upsample is not None:
                return resnet.upsample(x.contiguous())
            return resnet.downsample(x) if resnet.downsample is not None else x

        def first(a, e, *xs):
            x = xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)
            h = resnet.conv1(resample(resnet.nonlinearity(norm1(x))))
            return h if temb is None else h + temb[:, a:e].reshape(h.shape[0], -1, 1, 1)

        # with a temporal conv after conv1/conv2 the chunks are read with a halo that the conv trims
        hidden = self.chunks.map(inputs, first, reach=reach_of(resnet.conv1))
        norm2 = self.norm(resnet.norm2, [hidden])

        def second(a, e, h, *xs):
            h = resnet.conv2(resnet.dropout(resnet.nonlinearity(norm2(h))))
            x = resample(xs[0] if len(xs) == 1 else torch.cat(xs, dim=1))
            if resnet.conv_shortcut is not None:
                x = resnet.conv_shortcut(x)
            return (x + h) / resnet.output_scale_factor

        # only conv2's input needs the halo: the residual inputs are read without one
        return self.chunks.map([hidden] + list(inputs), second, reach=(reach_of(resnet.conv2),) + (0,) * len(inputs))

    def per_frame(self, module: nn.Module, x: ClipActivation, *args) -> ClipActivation:
        return self.chunks.map([x], lambda a, e, rows: module(rows, *args), reach=reach_of(module))

    def down_block(self, block, h: ClipActivation, emb) -> tuple[ClipActivation, list[ClipActivation]]:
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

    def mid_block(self, block, h: ClipActivation, emb) -> ClipActivation:
        h = self.resnet(block.resnets[0], [h], emb)
        for attention, resnet in zip(block.attentions, block.resnets[1:]):
            h = self.transformer(attention, h)
            h = self.resnet(resnet, [h], emb)
        return h

    def up_block(self, block, h: ClipActivation, skips: list[ClipActivation], emb, upsample_size) -> ClipActivation:
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        for resnet, attention in zip(block.resnets, attentions):
            h = self.resnet(resnet, [h, skips.pop()], emb)
            if attention is not None:
                h = self.transformer(attention, h)
        for upsampler in block.upsamplers or []:
            h = self.per_frame(upsampler, h, upsample_size)
        return h

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, drop_first_branch_at: int | None) -> torch.Tensor:
        unet = self.unet
        # time embedding of every row, (B*F, C_t): tiny, and row for row the unchunked arithmetic
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)

        x = ClipActivation(self.chunks, stats=False)
        b, f = self.chunks.branches, self.chunks.num_frames
        grouped = sample.reshape(b, f, *sample.shape[1:])
        for a, e in self.chunks.bounds:
            rows = grouped[:, a:e].reshape(-1, *sample.shape[1:])
            x.write(a, e, 2 * rows - 1.0 if unet.config.center_input_sample else rows)

        h = self.per_frame(unet.conv_in, x)
        skips = [h]
        # the first `late` skips are read only by up blocks after branch 0 leaves: once the down path is
        # done with them, their branch-0 part is freed (the largest, top-level ones: less host memory)
        late = 0 if drop_first_branch_at is None else \
            sum(len(block.resnets) for block in list(unet.up_blocks)[drop_first_branch_at:])
        for block in unet.down_blocks:
            h, outputs = self.down_block(block, h, emb)
            skips += outputs
            skips[:late] = [s if s is h or s.compacted else s.compact_without_first_branch() for s in skips[:late]]
        if unet.mid_block is not None:
            h = self.mid_block(unet.mid_block, h, emb)
        # up blocks upsample to the skip's size when the sample is not a multiple of the overall factor
        forward_size = any(s % 2 ** unet.num_upsamplers for s in sample.shape[-2:])
        for i, block in enumerate(unet.up_blocks):
            if i == drop_first_branch_at:
                h, skips = h.without_first_branch(), [s.without_first_branch() for s in skips]
                emb = emb[f:]  # rows are branch-major
                self.drop_first_branch()
            taken = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            size = tuple(skips[-1].shape[-2:]) if forward_size and i < len(unet.up_blocks) - 1 else None
            h = self.up_block(block, h, taken, emb, size)

        # output head, gathered on the device (the output has the latents' few channels)
        norm = self.norm(unet.conv_norm_out, [h]) if unet.conv_norm_out is not None else None
        out, b = None, self.chunks.branches
        for a, e, (rows,) in self.chunks.each([h], reach=reach_of(unet.conv_out)):
            if norm is not None:
                rows = unet.conv_act(norm(rows))
            y = unet.conv_out(rows)
            if out is None:
                out = torch.empty((b, f) + tuple(y.shape[1:]), dtype=y.dtype, device=self.chunks.device)
            out[:, a:e] = y.reshape(b, e - a, *y.shape[1:])
        if self.chunks.shard is not None:  # every rank computed its own frames
            self.chunks.shard.share_frames_(out, 1)
        return out.reshape(b * f, *out.shape[2:])
