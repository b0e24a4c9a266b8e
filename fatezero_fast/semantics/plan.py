"""One edit's plan: the options of an official p2p_config entry, and the tensors derived from them.

`EditOptions` holds what a config entry says; `EditPlan.build` turns it and the two prompts into
per-step weights (docs/semantics.md §5-§8). The plan only hands out weights, windows and
thresholds: the blend masks themselves are computed by `semantics.masks` with the fused op.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from ..errors import InputError, warn_fatezero
from .schedules import Bounds, cross_replace_alpha, self_replace_window
from .tokens import (
    MAX_TOKENS,
    refinement_mapper,
    replacement_mapper,
    word_token_indices,
    word_weights,
)


@dataclass
class EditOptions:
    """One edit's fusion options, named as in the official configs (p2p_config entries)."""

    cross_replace_steps: object = 0.8
    self_replace_steps: Bounds = 0.8
    is_replace_controller: bool = False
    blend_words: Sequence[Sequence[str]] | None = None
    blend_th: Sequence[float] = (0.3, 0.3)
    blend_self_attention: bool = False
    blend_latents: bool = False
    eq_params: Mapping | None = None
    subtract_words: Sequence[Sequence[str]] | None = None
    guidance_scale: float = 7.5

    def __post_init__(self):
        th = self.blend_th
        if isinstance(th, (int, float)):
            th = (th, th)
        if len(th) != 2 or not all(0 <= float(v) <= 2 for v in th):
            raise InputError(f"blend_th {self.blend_th!r} must be two numbers in [0, 2] ([2, 2] = full source)")
        self.blend_th = (float(th[0]), float(th[1]))
        if self.blend_words is not None:
            if isinstance(self.blend_words, str) or not 1 <= len(self.blend_words) <= 2:
                raise InputError("blend_words must be [[source words], [target words]] (the target list may be left out)")
            # a missing target list blends on source words only, as the official zip over prompts does
            self.blend_words = [list(w) if not isinstance(w, str) else [w] for w in self.blend_words] + \
                [[]] * (2 - len(self.blend_words))
        if self.eq_params is not None and ("words" not in self.eq_params or "values" not in self.eq_params):
            raise InputError("eq_params needs 'words' and 'values', e.g. {words: [watercolor], values: [10]}")


@dataclass
class EditPlan:
    """The per-edit tensors derived from EditOptions and the two prompts, for T steps."""

    num_steps: int
    cross_alpha: torch.Tensor                   # (T+1, 77)
    self_window: tuple[int, int]
    replace_mapper: torch.Tensor | None         # (77, 77) when replacing
    refine_mapper: torch.Tensor | None          # (77,) when refining
    refine_alphas: torch.Tensor | None          # (77,)
    equalizer: torch.Tensor | None              # (77,)
    blend_source_weights: torch.Tensor | None   # (77,) source blend words
    blend_target_weights: torch.Tensor | None   # (77,) target blend words
    subtract_source_weights: torch.Tensor | None
    subtract_target_weights: torch.Tensor | None
    blend_th: tuple[float, float]
    blend_self_attention: bool
    blend_latents: bool
    latent_blend_window: tuple[int, int] = field(default=(0, 0))

    @classmethod
    def build(cls, options: EditOptions, source_prompt: str, target_prompt: str, num_steps: int,
              tokenizer) -> "EditPlan":
        replace = options.is_replace_controller
        if replace and len(source_prompt.split(" ")) != len(target_prompt.split(" ")):
            warn_fatezero("replace needs prompts with the same number of words: refining instead "
                  "(as the official code does)")
            replace = False
        refine_mapper = refine_alphas = replace_map = None
        if replace:
            replace_map = replacement_mapper(source_prompt, target_prompt, tokenizer)
        else:
            refine_mapper, refine_alphas = refinement_mapper(source_prompt, target_prompt, tokenizer)
        equalizer = None
        if options.eq_params is not None:
            words, values = options.eq_params["words"], options.eq_params["values"]
            words = [words] if isinstance(words, str) else list(words)
            values = [values] if isinstance(values, (int, float)) else list(values)
            equalizer = torch.ones(MAX_TOKENS)
            for word, value in zip(words, values):
                inds = word_token_indices(target_prompt, word, tokenizer)
                if not inds:
                    warn_fatezero(f"eq_params word {word!r} does not occur in the target prompt {target_prompt!r}: "
                          f"it is ignored (as the official code does)")
                equalizer[inds] = float(value)
        src_w = tgt_w = sub_src = sub_tgt = None
        if options.blend_words is not None:
            src_w = word_weights(source_prompt, options.blend_words[0], tokenizer, "blend")
            tgt_w = word_weights(target_prompt, options.blend_words[1], tokenizer, "blend")
            if options.subtract_words is not None:
                sub_src = word_weights(source_prompt, options.subtract_words[0], tokenizer, "subtract")
                sub_tgt = word_weights(target_prompt, options.subtract_words[1], tokenizer, "subtract")
        return cls(
            num_steps=num_steps,
            cross_alpha=cross_replace_alpha(target_prompt, num_steps, options.cross_replace_steps, tokenizer),
            self_window=self_replace_window(num_steps, options.self_replace_steps),
            replace_mapper=replace_map, refine_mapper=refine_mapper, refine_alphas=refine_alphas,
            equalizer=equalizer, blend_source_weights=src_w, blend_target_weights=tgt_w,
            subtract_source_weights=sub_src, subtract_target_weights=sub_tgt,
            blend_th=options.blend_th,
            # without blend words there is no mask: self-attention is replaced in full (make_controller)
            blend_self_attention=bool(options.blend_self_attention and src_w is not None),
            blend_latents=bool(options.blend_latents and src_w is not None),
            latent_blend_window=(int(0.2 * num_steps), int(0.8 * num_steps)),
        )

    # docs/semantics.md §5
    def fuse_cross(self, p_src: torch.Tensor, p_edit: torch.Tensor, step: int) -> torch.Tensor:
        """Cross-attention fusion P = a_j * base + (1 - a_j) * P_edit, maps (..., 77)."""
        dev, dt = p_edit.device, p_edit.dtype
        p_src = p_src.to(dev, dt)
        if self.replace_mapper is not None:
            base = torch.matmul(p_src, self.replace_mapper.to(dev, dt))
        else:
            alphas = self.refine_alphas.to(dev, dt)
            base = p_src[..., self.refine_mapper.to(dev)] * alphas + p_edit * (1 - alphas)
        if self.equalizer is not None:
            base = base * self.equalizer.to(dev, dt)
        alpha = self.cross_alpha[step].to(dev, dt)
        return alpha * base + (1 - alpha) * p_edit

    def fuses_cross(self, step: int) -> bool:
        """Does step `step` mix any source into the cross maps? (With every alpha 0 the fusion is P_edit.)"""
        return bool(self.cross_alpha[step].any())

    # docs/semantics.md §6
    def replaces_self(self, step: int) -> bool:
        return self.self_window[0] <= step < self.self_window[1]

    def uses_source(self, step: int) -> bool:
        """Does any layer read the source attention at step `step`?"""
        return self.replaces_self(step) or self.fuses_cross(step)

    # §7, §8: what the blend masks are made of (semantics.masks computes them with the fused op)
    def latent_blend_step(self, step: int) -> bool:
        """Is edit step `step` (0-based) inside the latent-blend window (20%-80% of the steps)?"""
        start, end = self.latent_blend_window
        return self.blend_latents and start < step + 1 < end
