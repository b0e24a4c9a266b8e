"""FateZero's editing semantics in plain PyTorch (docs/semantics.md): no UNet, no kernels.

frames (sparse-causal index lists), tokens (word indices, mappers), schedules (per-step
weights), plan (EditOptions -> EditPlan), masks (the two blend masks), ddim (the inversion step).
"""
