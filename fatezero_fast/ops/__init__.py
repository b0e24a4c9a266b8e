"""The fused ops: FateZero's blended spatio-temporal attention and its blend mask.

`blended_attention` and `blend_mask` pick a backend (ops/backends/: cpu, cuda, triton) and
check their inputs; `reference` holds the materialized plain-PyTorch oracles they are tested
against; `SourceForm` names the ways the source attention can be handed in.
"""
from .api import (
    BACKENDS,
    BLEND_MASK_BACKENDS,
    available_backends,
    blend_mask,
    blended_attention,
)
from .source import SourceForm

__all__ = ["BACKENDS", "BLEND_MASK_BACKENDS", "SourceForm", "available_backends", "blend_mask", "blended_attention"]
