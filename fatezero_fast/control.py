"""FateZero's editing semantics in plain PyTorch: word indices, schedules, mappers, masks.

Everything here follows the official code (video_diffusion/prompt_attention/: ptp_utils.py,
seq_aligner.py, attention_util.py, spatial_blend.py) as ../shared/FATEZERO.md items 5-8
describe it; the numbered comments cite those items.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

MAX_TOKENS = 77
Bounds = Union[float, Sequence[float]]


class FateZeroWarning(UserWarning):
    """Input the official code accepts silently but that probably is not what the user meant."""


def _warn(message: str) -> None:
    warnings.warn(message, FateZeroWarning, stacklevel=3)


# --- word -> token indices (ptp_utils.get_word_inds) -------------------------------------------

def word_token_indices(text: str, word: Union[str, int], tokenizer) -> list[int]:
    """Token positions (BOS = 0) of a space-separated word of `text`, by string or by word index.

    Token pieces are decoded one by one and their lengths summed until they cover the word,
    so "countryside," (one word) covers two tokens; a word absent from the text gives [].
    """
    split_text = text.split(" ")
    if isinstance(word, str):
        places = [i for i, w in enumerate(split_text) if w == word]
    else:
        places = [int(word)]
    if not places:
        return []
    pieces = [tokenizer.decode([t]).strip("#") for t in tokenizer.encode(text)][1:-1]
    out, covered, ptr = [], 0, 0
    for i, piece in enumerate(pieces):
        covered += len(piece)
        if ptr in places:
            out.append(i + 1)
        if covered >= len(split_text[ptr]):
            ptr += 1
            covered = 0
    return out


def word_weights(prompt: str, words: Sequence[str], tokenizer, what: str) -> torch.Tensor:
    """(77,) one-hot of the tokens of `words` in `prompt`; absent words warn and count for nothing."""
    weights = torch.zeros(MAX_TOKENS)
    for word in [words] if isinstance(words, str) else words:
        inds = word_token_indices(prompt, word, tokenizer)
        if not inds:
            _warn(f"{what} word {word!r} does not occur in the prompt {prompt!r}: it is ignored "
                  f"(as the official code does)")
        weights[inds] = 1
    return weights


# --- schedules (item 5, item 6) ----------------------------------------------------------------

def _bounds(value: Bounds, name: str) -> tuple[float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        bounds = (0.0, float(value))
    elif isinstance(value, Sequence) and len(value) == 2:
        bounds = (float(value[0]), float(value[1]))
    else:
        raise InputError(f"{name} must be a number or a [start, end] pair, got {value!r}")
    if not (0 <= bounds[0] <= bounds[1] <= 1):
        raise InputError(f"{name} {value!r} must lie in [0, 1] with start <= end")
    return bounds


def cross_replace_alpha(target_prompt: str, num_steps: int, cross_replace_steps, tokenizer) -> torch.Tensor:
    """(T+1, 77) per-step, per-token weight of the source map in cross-attention (item 5).

    cross_replace_steps: a float f (steps [0, f)), a (start, end) pair, or a dict with `default_`
    (all tokens) and per-word entries for words of the target prompt. Rows cover T+1 steps:
    row j is 1 for int(start*(T+1)) <= j < int(end*(T+1)).
    """
    entries = dict(cross_replace_steps) if isinstance(cross_replace_steps, Mapping) \
        else {"default_": cross_replace_steps}
    entries.setdefault("default_", (0.0, 1.0))
    alpha = torch.zeros(num_steps + 1, MAX_TOKENS)

    def fill(bounds: Bounds, name: str, token_inds) -> None:
        start, end = _bounds(bounds, name)
        start, end = int(start * (num_steps + 1)), int(end * (num_steps + 1))
        alpha[:start, token_inds] = 0
        alpha[start:end, token_inds] = 1
        alpha[end:, token_inds] = 0

    fill(entries["default_"], "cross_replace_steps", slice(None))
    for word, bounds in entries.items():
        if word != "default_":
            inds = word_token_indices(target_prompt, word, tokenizer)
            if inds:
                fill(bounds, f"cross_replace_steps[{word!r}]", inds)
            else:
                _warn(f"cross_replace_steps word {word!r} does not occur in the target prompt: it is ignored")
    return alpha


def self_replace_window(num_steps: int, self_replace_steps: Bounds) -> tuple[int, int]:
    """Editing steps [int(T*s0), int(T*s1)) whose controlled self-attention uses the source (item 6)."""
    start, end = _bounds(self_replace_steps, "self_replace_steps")
    return int(num_steps * start), int(num_steps * end)


# --- token mappers (seq_aligner) ---------------------------------------------------------------

def replacement_mapper(source: str, target: str, tokenizer) -> torch.Tensor:
    """(77, 77) word-swap mapper: P_base = P_src @ mapper (item 5, replace).

    Swapped words map all their source tokens onto the target tokens (split evenly when the
    token counts differ). After the last swapped word the official code fills m[j, j] rather
    than the aligned m[i, j]; kept here on purpose (FATEZERO.md, "Details").
    """
    words_x, words_y = source.split(" "), target.split(" ")
    if len(words_x) != len(words_y):
        raise InputError(f"replace needs prompts with the same number of words ({len(words_x)} vs {len(words_y)})")
    swapped = [i for i in range(len(words_y)) if words_y[i] != words_x[i]]
    inds_source = [word_token_indices(source, i, tokenizer) for i in swapped]
    inds_target = [word_token_indices(target, i, tokenizer) for i in swapped]
    mapper = torch.zeros(MAX_TOKENS, MAX_TOKENS)
    i = j = cur = 0
    while i < MAX_TOKENS and j < MAX_TOKENS:
        if cur < len(inds_source) and inds_source[cur] and inds_source[cur][0] == i:
            src, tgt = inds_source[cur], inds_target[cur]
            if len(src) == len(tgt):
                mapper[src, tgt] = 1
            else:
                for t in tgt:
                    mapper[src, t] = 1 / len(tgt)
            cur += 1
            i += len(src)
            j += len(tgt)
        elif cur < len(inds_source):
            mapper[i, j] = 1
            i += 1
            j += 1
        else:
            mapper[j, j] = 1
            i += 1
            j += 1
    return mapper


def _global_alignment(x: Sequence[int], y: Sequence[int]) -> list[int]:
    """Needleman-Wunsch (gap 0, match 1, mismatch -1): for each y token the aligned x index or -1.

    Ties prefer a gap in x (left), then a gap in y (up), then the diagonal, as seq_aligner does.
    """
    n, m = len(x), len(y)
    score = np.zeros((n + 1, m + 1), dtype=np.int64)
    move = np.zeros((n + 1, m + 1), dtype=np.int64)  # 1 left, 2 up, 3 diagonal, 4 start
    move[0, 1:], move[1:, 0], move[0, 0] = 1, 2, 4
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i, j - 1], score[i - 1, j]
            diag = score[i - 1, j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            score[i, j] = max(left, up, diag)
            move[i, j] = 1 if score[i, j] == left else 2 if score[i, j] == up else 3
    aligned, i, j = [], n, m
    while (i > 0 or j > 0) and move[i, j] != 4:
        if move[i, j] == 3:
            i, j = i - 1, j - 1
            aligned.append(i)
        elif move[i, j] == 1:
            j -= 1
            aligned.append(-1)
        else:
            i -= 1
    return aligned[::-1]


def refinement_mapper(source: str, target: str, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(77,) source column for each target token and (77,) alphas (1 = aligned) (item 5, refine)."""
    x, y = tokenizer.encode(source), tokenizer.encode(target)
    aligned = torch.tensor(_global_alignment(x, y), dtype=torch.long)
    alphas = torch.ones(MAX_TOKENS)
    alphas[:len(aligned)] = aligned.ne(-1).float()
    mapper = torch.zeros(MAX_TOKENS, dtype=torch.long)
    mapper[:len(aligned)] = aligned
    mapper[len(aligned):] = len(y) + torch.arange(MAX_TOKENS - len(y))
    return mapper, alphas


# --- blend masks (item 7, item 8) --------------------------------------------------------------

def blend_mask(token_maps: torch.Tensor, weights: torch.Tensor, threshold: float, size: tuple[int, int],
               use_pool: bool = True) -> torch.Tensor:
    """Binary mask (F, h, w) from head- and layer-averaged cross maps (F, rh, rw, 77) (item 7).

    Weighted token sum, 3x3 max-pool (stride 1, pad 1), nearest resize to `size`, division by
    each frame's maximum, threshold (strictly greater). A frame with no attention on the words
    gives 0/0 and so an all-zero mask, as in the official code.
    """
    maps = (token_maps * weights.to(token_maps)).sum(-1)[None]  # (1, F, rh, rw)
    if use_pool:
        maps = F.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
    maps = F.interpolate(maps, size=size)
    maps = maps / maps.amax(dim=(-2, -1), keepdim=True)
    return maps.gt(threshold)[0]


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
            _warn("replace needs prompts with the same number of words: refining instead "
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
                    _warn(f"eq_params word {word!r} does not occur in the target prompt {target_prompt!r}: "
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

    # item 5
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

    # item 6
    def replaces_self(self, step: int) -> bool:
        return self.self_window[0] <= step < self.self_window[1]

    def uses_source(self, step: int) -> bool:
        """Does any layer read the source attention at step `step`?"""
        return self.replaces_self(step) or self.fuses_cross(step)

    # item 7: mask for the self-attention blend, from the source maps of this step
    def self_blend_mask(self, source_token_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor | None:
        """(F, h*w) float mask, 1 = edit attention; None = full source (no blending)."""
        if not self.blend_self_attention:
            return None
        from . import ops  # the fused op when built, else blend_mask above (ops imports this module)

        mask = ops.blend_mask(source_token_maps, self.blend_source_weights, self.blend_th[0], size)
        if self.subtract_source_weights is not None:
            mask &= ~ops.blend_mask(source_token_maps, self.subtract_source_weights, self.blend_th[1], size, False)
        return mask.flatten(1).float()

    # item 8
    def latent_blend_mask(self, step: int, source_token_maps: torch.Tensor, edit_token_maps: torch.Tensor,
                          size: tuple[int, int]) -> torch.Tensor | None:
        """(F, h, w) bool: mask(source maps) OR mask(edit maps) inside the 20%-80% window, else None.

        `step` is the 0-based edit step; edit_token_maps is the running sum of the edit's maps.
        Subtract words remove (source OR edit) subtract masks, as SpatialBlender's 'both' mode does.
        """
        start, end = self.latent_blend_window
        if not (self.blend_latents and start < step + 1 < end):
            return None
        from . import ops  # the fused op when built, else blend_mask above (ops imports this module)

        th = self.blend_th
        mask = ops.blend_mask(source_token_maps, self.blend_source_weights, th[0], size) | \
            ops.blend_mask(edit_token_maps, self.blend_target_weights, th[0], size)
        if self.subtract_source_weights is not None:
            mask &= ~(ops.blend_mask(source_token_maps, self.subtract_source_weights, th[1], size, False) |
                      ops.blend_mask(edit_token_maps, self.subtract_target_weights, th[1], size, False))
        return mask


def blend_latents(latents: torch.Tensor, inverted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x = x_src + M (x - x_src) (item 8); latents (F, C, h, w), mask (F, h, w)."""
    inverted = inverted.to(latents)
    return inverted + mask[:, None].to(latents.dtype) * (latents - inverted)
