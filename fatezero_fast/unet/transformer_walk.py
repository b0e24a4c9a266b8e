"""A Transformer2DModel of the UNet run over the whole clip, chunk by chunk (unet/runner.py).

The norms, projections, cross-attention and feed-forward act per frame. Two things couple frames:
the sparse-causal attn1, whose keys/values for the frames the index lists name are computed
first, chunk by chunk, into a K/V cache (unet/chunks.py) that every chunk's queries then read
(`ChunkView.kv`); and a tuned checkpoint's temporal attention, run over blocks of token
positions with all frames (over pixel shards of all ranks when sharded: FrameShard.over_pixels).
"""
from __future__ import annotations

import functools

import torch

from .chunks import ChunkSchedule, ClipActivation, KVCache
from .processors import ChunkView, FateZeroCrossAttnProcessor, FateZeroState, SpatioTemporalAttnProcessor
from .temporal import temporal_attention_tokens


class ChunkedTransformer:
    """Runs a UNet's Transformer2DModels layer-major for one call (`chunks`, `state`)."""

    def __init__(self, state: FateZeroState | None, chunks: ChunkSchedule):
        self.state, self.chunks = state, chunks

    def __call__(self, model, x: ClipActivation) -> ClipActivation:
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

        hidden = self.chunks.map([x], with_kv(enter, 0), stats=False)
        if caches[0] is not None:
            caches[0].share()
        for i, block in enumerate(blocks):
            last = i == len(blocks) - 1

            def tail(a, e, h, *rest, last=last):
                if not last:
                    return h
                n = h.shape[0]
                if not model.use_linear_projection:
                    h = h.reshape(n, height, width, -1).permute(0, 3, 1, 2).contiguous()
                    h = model.proj_out(h)
                else:
                    h = model.proj_out(h).reshape(n, height, width, -1).permute(0, 3, 1, 2).contiguous()
                return h + rest[0]

            def body(a, e, h, *rest, block=block, cache=caches[i], temporal=False):
                h = self._basic_block(block, cache, a, e, h)
                return h if temporal else tail(a, e, h, *rest)

            if hasattr(block, "_fz_temporal_names"):  # temporal attention couples all frames of each token
                hidden = self.chunks.map([hidden], functools.partial(body, temporal=True), stats=False)
                hidden = self.temporal_attention(block, hidden)
                body = tail
            fn = body if last else with_kv(body, i + 1)
            hidden = self.chunks.map([hidden] + ([x] if last else []), fn, stats=last)
            if not last and caches[i + 1] is not None:
                caches[i + 1].share()
        return hidden

    def temporal_attention(self, block, x: ClipActivation) -> ClipActivation:
        """The block's temporal attention (with residual) over blocks of token positions with all frames.

        A block of n tokens of all F frames is as large as a chunk of c frames of all N tokens when
        n = c N / F; each token's F x F attention lives only while its block is computed. Sharded,
        the blocks are other ranks' too: all-to-alls carry them (FrameShard.over_pixels)."""
        data = x.data[:, x.dropped:]  # (F, B, N, C) in storage (sharded: this rank's frames)
        r, n = self.chunks, data.shape[2]
        step = -(-r.chunk_size * n // r.num_frames)
        out = ClipActivation(r, stats=False)
        out.data = torch.empty(data.shape, dtype=data.dtype, device=data.device, pin_memory=r.pin)
        attend = functools.partial(temporal_attention_tokens, block)
        if r.shard is not None:
            r.shard.over_pixels(attend, data, out.data, r.num_frames, step, r.device)
            return out
        for t0 in range(0, n, step):
            y = attend(data[:, :, t0:t0 + step].to(r.device, non_blocking=r.pin))
            out.data[:, :, t0:t0 + y.shape[2]].copy_(y, non_blocking=r.pin)
        return out

    def _kv_cache(self, attn) -> KVCache | None:
        processor = attn.processor
        if isinstance(processor, SpatioTemporalAttnProcessor) and self.state is not None:
            return KVCache(self.chunks, attn, processor)
        return None  # any other processor is per-frame self-attention: nothing crosses frames

    def _basic_block(self, block, cache: KVCache | None, a: int, e: int, h: torch.Tensor) -> torch.Tensor:
        view = ChunkView(a, e)  # FateZero's processors are told which frames the rows are
        if cache is not None:
            frames = cache.processor.kv_frames_for(a, e)
            view = ChunkView(a, e, kv=(*cache.get(frames), frames))
        h = block.attn1(block.norm1(h), **_chunk_argument(block.attn1, view)) + h
        if block.attn2 is not None:
            h = block.attn2(block.norm2(h), encoder_hidden_states=self.chunks.context_rows(a, e),
                            **_chunk_argument(block.attn2, view)) + h
        return block.ff(block.norm3(h)) + h


def _chunk_argument(attn, view: ChunkView) -> dict:
    """{"chunk": view} for FateZero's processors (diffusers passes it on to them); nothing for others."""
    if isinstance(attn.processor, (SpatioTemporalAttnProcessor, FateZeroCrossAttnProcessor)):
        return {"chunk": view}
    return {}
