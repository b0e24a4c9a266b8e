"""Triton kernels of fatezero-fast (shipped as `fatezero_fast.kernels`).

Import this package only after deciding TRITON_INTERPRET: Triton fixes interpreted vs compiled
kernels when they are decorated, i.e. at import time.
"""
from .blended_attention import INTERPRET, blended_attention_fwd, lowrank_wv, pick_config

__all__ = ["INTERPRET", "blended_attention_fwd", "lowrank_wv", "pick_config"]
