"""Backends of the fused ops: each module has `available(...)` and `blended_attention(...)`."""
