"""Where an inversion keeps its per-step tensors: a host tensor, or one file per step on disk.

The latents z_0 .. z_T ((T+1, F, 4, h, w)) and the source token maps of the mask level
((T, F, rh, rw, 77), fp32) are both indexed by step (`latents[i]` is z_i on the CPU) and written
the same way (`latents[i] = z`), so the pipeline reads one step at a time whichever it is. For
1,024 frames at 512x512 and 50 steps the latents take 1.7 GB in fp16 (3.4 GB in fp32) and the
token maps 4.0 GB; on disk, an edit step reads two latent steps of 32 MB and one map step of 81 MB.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..errors import InputError

DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
_BY_NAME = {name: dtype for dtype, name in DTYPE_NAMES.items()}


def dtype_from_name(name: str) -> torch.dtype:
    if name not in _BY_NAME:
        raise InputError(f"unknown latents dtype {name!r}: use one of {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


class DiskSteps:
    """Per-step tensors (shape[0] steps) kept as files step_0000.pt, step_0001.pt, ... in `folder`."""

    def __init__(self, folder: str | Path, shape, dtype: torch.dtype):
        self.folder, self.shape, self.dtype = Path(folder), torch.Size(shape), dtype
        self._cache: dict[int, torch.Tensor] = {}  # the steps read last: an edit step reads z_i and z_{i+1}

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize

    def path(self, step: int) -> Path:
        return self.folder / f"step_{step:04d}.pt"

    def _index(self, step: int) -> int:
        if not -len(self) <= step < len(self):
            raise IndexError(f"step {step} out of range for {len(self)} latent steps")
        return step % len(self)

    def __getitem__(self, step: int) -> torch.Tensor:
        step = self._index(step)
        if step not in self._cache:
            if not self.path(step).is_file():
                raise InputError(f"{self.path(step)} is missing: the inversion's latents on disk are incomplete")
            self._cache = {s: z for s, z in self._cache.items() if abs(s - step) == 1}
            self._cache[step] = torch.load(self.path(step), map_location="cpu")
        return self._cache[step]

    def __setitem__(self, step: int, z: torch.Tensor) -> None:
        step = self._index(step)
        self.folder.mkdir(parents=True, exist_ok=True)
        # a contiguous copy with its own storage, as a host tensor's step is (the layout changes conv rounding)
        torch.save(z.detach().to("cpu", self.dtype, memory_format=torch.contiguous_format, copy=True), self.path(step))
        self._cache.pop(step, None)

    def check(self) -> "DiskSteps":
        missing = [s for s in range(len(self)) if not self.path(s).is_file()]
        if missing:
            raise InputError(f"{self.folder} lacks the files of steps {missing[:5]}{' ...' if len(missing) > 5 else ''}: "
                             f"the inversion folder is incomplete")
        return self

    def copy_to(self, folder: str | Path) -> "DiskSteps":
        folder = Path(folder)
        if folder.resolve() != self.folder.resolve():
            folder.mkdir(parents=True, exist_ok=True)
            for step in range(len(self)):
                shutil.copyfile(self.path(step), folder / self.path(step).name)
        return DiskSteps(folder, self.shape, self.dtype)


def new_steps(shape, dtype: torch.dtype, folder: str | Path | None = None) -> torch.Tensor | DiskSteps:
    """Room for per-step tensors of `shape` in `dtype`: a host tensor, or files in `folder`."""
    if folder is None:
        return torch.empty(tuple(shape), dtype=dtype)
    return DiskSteps(folder, shape, dtype)
