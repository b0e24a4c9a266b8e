"""The geometry of an SD-style UNet's levels: token counts, the mask level, the control limit.

Levels halve the latent, rounding up (the down path's strided convs). Everything that asks
"which level is this layer at" or "is this layer controlled" comes here.
"""
from __future__ import annotations

import math

CONTROL_LIMIT = 32 * 32  # layers with more query tokens are never captured or fused (SD-1.x at 512: the 64x64 level)
MASK_LEVEL = 2           # blend masks come from the cross maps at 1/4 of the latent size (16x16 at 512x512)


def halve(h: int, w: int) -> tuple[int, int]:
    return (h + 1) // 2, (w + 1) // 2


def unet_levels(unet_config, latent_size: tuple[int, int]) -> list[tuple[int, int]]:
    """(channels, tokens) of each UNet level, top first (levels halve, rounding up)."""
    h, w = latent_size
    levels = []
    for channels in unet_config["block_out_channels"]:
        levels.append((channels, h * w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return levels


def level_size(latent_size: tuple[int, int], tokens: int) -> tuple[int, int]:
    """(h, w) of the UNet level with `tokens` query tokens."""
    h, w = latent_size
    while h * w > tokens:
        h, w = halve(h, w)
    if h * w != tokens:
        raise ValueError(f"no UNet level of a {tuple(latent_size)} latent has {tokens} tokens")
    return h, w


def mask_level_tokens(latent_size: tuple[int, int]) -> int:
    """Query tokens of the level whose cross maps make the blend masks."""
    h, w = latent_size
    for _ in range(MASK_LEVEL):
        h, w = halve(h, w)
    return h * w


def up_block_tokens(unet, latent_size: tuple[int, int]) -> list[int]:
    """Query tokens of the attention layers of each up block (the block's input resolution)."""
    h, w = latent_size
    ups = [len(getattr(block, "upsamplers", None) or []) for block in unet.up_blocks]
    tokens, halvings = [], sum(ups)
    for count in ups:
        bh, bw = h, w
        for _ in range(halvings):
            bh, bw = halve(bh, bw)
        tokens.append(bh * bw)
        halvings -= count
    return tokens
