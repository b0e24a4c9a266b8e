"""Exact store sizes for any model, resolution, frame count and step count, without running it."""
from __future__ import annotations

import math

from ..semantics.frames import resolve_frame_index
from ..unet.levels import CONTROL_LIMIT, unet_levels


def controlled_layers(unet_config: dict, height: int, width: int, sparse_causal_index,
                      least_sc_channel: int | None = None, max_control_tokens: int = CONTROL_LIMIT,
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
                         sparse_causal_index, least_sc_channel: int | None = None, max_control_tokens: int = CONTROL_LIMIT,
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
                         max_control_tokens: int = CONTROL_LIMIT, vae_scale: int = 8, bytes_per_value: int = 4) -> int:
    """Bytes of the official FateZero store for any model, resolution, frames, steps, index list.

    Per controlled layer and step it keeps P of self-attention (F, H, Nq, R*Nq) and of
    cross-attention (F, H, Nq, 77) in the model's dtype (4 bytes fp32, 2 bytes for an fp16 run).
    """
    fp32 = estimate_store_bytes("full", unet_config, height, width, frames, steps, sparse_causal_index,
                                least_sc_channel, max_control_tokens, vae_scale)
    return fp32 * bytes_per_value // 4
