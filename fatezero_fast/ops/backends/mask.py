"""The fused blend-mask op (docs/semantics.md §7): torch.ops.fatezero_fast.blend_mask from fatezero_fast._C.

csrc/blend_mask_cpu.cpp (CPU, OpenMP over frames) and csrc/blend_mask_cuda.cu (CUDA) compute
control.blend_mask in one pass without the (F, rh, rw, 77) product tensor, equal to it bit for
bit: the token sum is done in the order torch's CPU sum kernel uses (exact for float32 maps whose
token axis is the innermost one; any weights, 0/1 or not). The CUDA op reproduces the CPU
result; control.blend_mask run on CUDA tensors sums in torch's CUDA order, which gives the same
floats whenever a pixel has at most two nonzero products (one or two selected tokens with 0/1
weights). `available()` is False when the extension (or this op in it) was not built; importing
this module never fails because of it.
"""
from __future__ import annotations

import math

import torch

from . import cpu as _cpu

_op = None          # torch.ops.fatezero_fast.blend_mask once loaded
_load_error = None  # why it could not be loaded (str), once tried


def _load():
    """Load fatezero_fast._C through the cpu backend's loader and cache the blend_mask op."""
    global _op, _load_error
    if _op is None and _load_error is None:
        if _cpu._load() is None:
            _load_error = _cpu.load_error()
        else:
            try:
                _op = torch.ops.fatezero_fast.blend_mask
            except (AttributeError, RuntimeError) as exc:  # an extension built before the op existed
                _load_error = f"{type(exc).__name__}: {exc}"
    return _op


def load_error() -> str | None:
    """Why the op is unavailable (None when it loaded)."""
    _load()
    return _load_error


def available(device=None) -> bool:
    """True when the op is built with a kernel for `device` (CPU when None)."""
    if _load() is None:
        return False
    kind = "cpu" if device is None else torch.device(device).type
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch._C._dispatch_has_kernel_for_dispatch_key("fatezero_fast::blend_mask", "CUDA")
    return False


def average_maps(maps: torch.Tensor, map_size: tuple[int, int] | None = None) -> torch.Tensor:
    """(L, F, H, rh*rw, T) per-layer, per-head maps (the official code's layout) -> (F, rh, rw, T).

    Mean over layers and heads in torch, so that every backend (and the reference) sees the same
    averaged floats; (F, rh, rw, T) maps are returned as they are. map_size defaults to square.
    """
    if maps.dim() == 4:
        return maps
    if maps.dim() != 5:
        raise ValueError(f"token maps must be (F, rh, rw, T) or (L, F, H, rh*rw, T); got {tuple(maps.shape)}")
    n = maps.shape[3]
    if map_size is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} map positions are not a square: pass map_size=(rh, rw)")
        map_size = (side, side)
    rh, rw = map_size
    if rh * rw != n:
        raise ValueError(f"map_size {tuple(map_size)} does not hold the {n} map positions")
    return maps.mean(dim=(0, 2)).reshape(maps.shape[1], rh, rw, maps.shape[4])


def blend_mask(token_maps: torch.Tensor, weights: torch.Tensor, threshold: float, size, use_pool: bool = True,
               map_size: tuple[int, int] | None = None) -> torch.Tensor:
    """control.blend_mask with the fused op: (F, out_h, out_w) bool, on token_maps' device.

    token_maps: (F, rh, rw, T) float32 (or (L, F, H, rh*rw, T), averaged first); weights: (T,).
    """
    op = _load()
    if op is None:
        raise RuntimeError(f"the blend_mask op needs fatezero_fast._C ({_load_error}); rebuild with "
                           "`pip install --no-build-isolation -e .`")
    maps = average_maps(token_maps, map_size)
    if maps.dtype != torch.float32:
        raise ValueError(f"the blend_mask op takes float32 maps, got {maps.dtype} (use the reference backend)")
    if not available(maps.device):
        raise RuntimeError(f"the blend_mask op has no kernel for {maps.device} in this build")
    out_h, out_w = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    maps = maps.contiguous()
    weights = weights.to(device=maps.device, dtype=torch.float32).contiguous()
    out = torch.empty(maps.shape[0], out_h, out_w, dtype=torch.bool, device=maps.device)
    op(maps, weights, float(threshold), out_h, out_w, bool(use_pool), out)
    return out
