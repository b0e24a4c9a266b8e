"""The fused ops: FateZero's blended spatio-temporal attention and its blend mask.

`blended_attention` and `blend_mask` check their inputs and pick a backend (ops/backends/: cpu,
cuda, sdpa, triton): `capabilities` says what each supports, `dispatch` walks auto's priority list
and `selfcheck` checks a backend against `reference` (the materialized plain-PyTorch oracles) at
first use; `SourceForm` names the ways the source attention can be handed in.
"""
from . import dispatch, selfcheck
from .api import (
    BACKENDS,
    BLEND_MASK_BACKENDS,
    available_backends,
    blend_mask,
    blended_attention,
)
from .source import SourceForm

__all__ = ["BACKENDS", "BLEND_MASK_BACKENDS", "SourceForm", "available_backends", "blend_mask", "blended_attention",
           "dispatch", "selfcheck"]
