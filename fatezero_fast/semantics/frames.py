"""Sparse-causal attention's index list: which frames each frame's self-attention reads (docs/semantics.md §1)."""
from __future__ import annotations

from typing import Sequence, Union

import torch

from ..errors import InputError

IndexEntry = Union[int, str]

_NAMED_FRAMES = ("first", "last", "mid", "middle")


def resolve_frame_index(index_list: Sequence[IndexEntry], num_frames: int) -> torch.Tensor:
    """Sparse-causal index list -> (num_frames, R) long tensor of key/value frames per query frame.

    Each entry is resolved per frame: an int is a relative offset clipped to [0, F-1];
    'first' is 0, 'last' is F-1, 'mid'/'middle' is (F-1)//2. Entries are concatenated in order
    (duplicates kept, as the official code concatenates them). An empty list means plain
    per-frame attention: each frame attends to itself.
    """
    if num_frames <= 0:
        raise InputError(f"num_frames must be positive, got {num_frames}")
    frames = torch.arange(num_frames)
    if len(index_list) == 0:
        return frames[:, None].clone()
    columns = []
    for entry in index_list:
        if isinstance(entry, bool) or not isinstance(entry, (int, str)):
            raise InputError(f"unknown sparse-causal index entry {entry!r}: use an int offset or one of {_NAMED_FRAMES}")
        if isinstance(entry, int):
            columns.append((frames + entry).clamp(0, num_frames - 1))
        elif entry == "first":
            columns.append(torch.zeros_like(frames))
        elif entry == "last":
            columns.append(torch.full_like(frames, num_frames - 1))
        elif entry in ("mid", "middle"):
            columns.append(torch.full_like(frames, (num_frames - 1) // 2))
        else:
            raise InputError(f"unknown sparse-causal index entry {entry!r}: use an int offset or one of {_NAMED_FRAMES}")
    return torch.stack(columns, dim=1)
