"""Attention stores: how the source attention captured at inversion reaches the edits.

`make_store(form)` gives one of FORMS; `sizes` computes their exact bytes without running.
"""
from .base import PLACEMENTS, AttentionStore
from .forms import (
           FORMS,
           FP8Store,
           LowRankStore,
           MapStore,
           QKStore,
           RecomputeStore,
           make_store,
)
from .sizes import controlled_layers, estimate_store_bytes, official_store_bytes

__all__ = ["FORMS", "PLACEMENTS", "AttentionStore", "FP8Store", "LowRankStore", "MapStore", "QKStore",
           "RecomputeStore", "controlled_layers", "estimate_store_bytes", "make_store", "official_store_bytes"]
