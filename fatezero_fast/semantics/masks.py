"""FateZero's two blend masks from an edit plan and the step's cross-attention token maps.

- the self-attention blend mask (docs/semantics.md §7): where the edit's own self-attention is
  kept; elsewhere the source's is used;
- the latent blend mask (§8): where the edited latents are kept; elsewhere the inversion's.

Each is a union/difference of `ops.blend_mask` terms whose weights and thresholds the plan holds.
"""
from __future__ import annotations

import torch

from .. import ops
from .plan import EditPlan


def self_blend_mask(plan: EditPlan, source_token_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor | None:
    """(F, h*w) float mask, 1 = edit attention; None = full source (no blending)."""
    if not plan.blend_self_attention:
        return None
    th = plan.blend_th
    mask = ops.blend_mask(source_token_maps, plan.blend_source_weights, th[0], size)
    if plan.subtract_source_weights is not None:
        mask &= ~ops.blend_mask(source_token_maps, plan.subtract_source_weights, th[1], size, False)
    return mask.flatten(1).float()


def latent_blend_mask(plan: EditPlan, step: int, source_token_maps: torch.Tensor, edit_token_maps: torch.Tensor,
                      size: tuple[int, int]) -> torch.Tensor | None:
    """(F, h, w) bool: mask(source maps) OR mask(edit maps) inside the 20%-80% window, else None.

    `step` is the 0-based edit step; edit_token_maps is the running sum of the edit's maps.
    Subtract words remove (source OR edit) subtract masks, as SpatialBlender's 'both' mode does.
    """
    if not plan.latent_blend_step(step):
        return None
    th = plan.blend_th
    mask = ops.blend_mask(source_token_maps, plan.blend_source_weights, th[0], size) | \
        ops.blend_mask(edit_token_maps, plan.blend_target_weights, th[0], size)
    if plan.subtract_source_weights is not None:
        mask &= ~(ops.blend_mask(source_token_maps, plan.subtract_source_weights, th[1], size, False) |
                  ops.blend_mask(edit_token_maps, plan.subtract_target_weights, th[1], size, False))
    return mask


def blend_latents(latents: torch.Tensor, inverted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x = x_src + M (x - x_src) (§8); latents (F, C, h, w), mask (F, h, w)."""
    inverted = inverted.to(latents)
    return inverted + mask[:, None].to(latents.dtype) * (latents - inverted)
