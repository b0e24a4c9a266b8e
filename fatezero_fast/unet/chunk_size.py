"""`chunk_size="auto"`: how many frames go through the UNet at once, from the free GPU memory.

A UNet call runs B branches of F frames, B*F rows. Estimated device bytes per row, in units of
the top level's activation A = h*w*C0 elements (h x w the latent, C0 = block_out_channels[0])
times the model dtype's size:

- chunked (unet/runner.py, activations on the host between modules): the working set
  of the module in flight, WORKING * A. The largest is a 64x64 transformer block of SD-1.4
  (GEGLU feed-forward 8*C0 wide, Q/K/V, the anchor frames' K/V, residuals) or a ResNet of the
  top up block (3*C0 input channels, GroupNorm upcast to fp32), plus the chunk being prefetched.
  The stock SD-1.4 UNet at 64x64 measured ~16 A per row (peak RSS, fp32, CPU); WORKING = 32
  doubles that.
- unchunked: the same working set plus the skip activations that wait on the device for the up
  blocks: conv_in's output and every down block's outputs (13.3 MB per row for SD-1.4 at
  512x512 in fp16).

auto takes the free memory as torch.cuda.mem_get_info's plus what the caching allocator holds
unused, and uses FRACTION of it: all frames at once (None) when B*F unchunked rows fit, else the
largest chunk c with B*c chunked rows within it (at least 1). On the CPU it is None.
"""
from __future__ import annotations

import torch

from .levels import unet_levels

WORKING = 32      # top-level activations alive at once per row, in units of h*w*C0 elements
FRACTION = 0.5    # of the free device memory a UNet call may take


def row_bytes(unet_config, latent_size: tuple[int, int], dtype_bytes: int, chunked: bool = True) -> int:
    """Estimated device bytes per UNet row (one frame of one branch), see the module docstring."""
    levels = unet_levels(unet_config, latent_size)
    channels, tokens = levels[0]
    total = WORKING * channels * tokens
    if not chunked:
        per_block = unet_config.get("layers_per_block", 2)
        total += channels * tokens  # conv_in
        for i, (channels, tokens) in enumerate(levels):
            total += per_block * channels * tokens
            if i + 1 < len(levels):
                total += channels * levels[i + 1][1]  # the downsampler's output
    return total * dtype_bytes


def choose_chunk_size(free_bytes: int, frames: int, branches: int, chunked_row: int, unchunked_row: int,
                      fraction: float = FRACTION) -> int | None:
    """None when all frames fit at once, else the largest chunk that fits (at least 1 frame)."""
    budget = free_bytes * fraction
    if branches * frames * unchunked_row <= budget:
        return None
    return max(1, min(frames, int(budget // (branches * chunked_row))))


def free_device_bytes(device: torch.device) -> int:
    """Free CUDA memory, counting what torch's caching allocator holds but does not use."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def auto_chunk_size(unet_config, device: torch.device, dtype: torch.dtype, frames: int, branches: int,
                    latent_size: tuple[int, int]) -> int | None:
    if device.type != "cuda":
        return None
    size = dtype.itemsize
    return choose_chunk_size(free_device_bytes(device), frames, branches,
                             row_bytes(unet_config, latent_size, size, chunked=True),
                             row_bytes(unet_config, latent_size, size, chunked=False))
