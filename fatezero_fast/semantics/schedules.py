"""Per-step schedules of an edit: cross-attention replace weights and the self-attention window.

docs/semantics.md §5 (cross_replace_steps) and §6 (self_replace_steps).
"""
from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch

from ..errors import InputError, warn_fatezero
from .tokens import MAX_TOKENS, word_token_indices

Bounds = Union[float, Sequence[float]]


# --- schedules (docs/semantics.md §5, §6) ----------------------------------------------------------------

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
    """(T+1, 77) per-step, per-token weight of the source map in cross-attention (docs/semantics.md §5).

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
                warn_fatezero(f"cross_replace_steps word {word!r} does not occur in the target prompt: it is ignored")
    return alpha


def self_replace_window(num_steps: int, self_replace_steps: Bounds) -> tuple[int, int]:
    """Editing steps [int(T*s0), int(T*s1)) whose controlled self-attention uses the source (docs/semantics.md §6)."""
    start, end = _bounds(self_replace_steps, "self_replace_steps")
    return int(num_steps * start), int(num_steps * end)
