"""How a run executes, in one place: device, dtype, attention options, chunk size, store, latents.

The CLI and the Python API (`FateZeroPipeline`, its `invert` and `edit`) build one `RunConfig`
and it checks itself when built, before any model is loaded, so both raise the same InputError
with the same message. Messages name the CLI flag; the Python keyword is the flag's name with
underscores (--chunk-size is chunk_size=).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import torch

from ..errors import InputError
from ..unet.processors import VideoAttentionConfig
from .choices import DTYPE_CHOICES, LATENTS_PLACEMENTS, STORE_FORMS, STORE_PLACEMENTS

DTYPES = dict(zip(DTYPE_CHOICES, (torch.float32, torch.float16, torch.bfloat16)))
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def check_dtype(dtype: str | torch.dtype, flag: str) -> torch.dtype:
    """The torch dtype for fp32, fp16, bf16 or any floating torch dtype (float64 for exactness tests)."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"{flag}: unknown dtype {dtype!r}, use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_device(device: str | torch.device | None) -> torch.device:
    """The torch device for cpu, cuda or cuda:N (default: cuda when available)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not _DEVICE.fullmatch(str(device)):
        raise InputError(f"--device {str(device)!r} is not a device: use cpu, cuda or cuda:N")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda was requested but this torch has no CUDA device: use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {device} does not exist: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s), cuda:0 ..")
    return device


def check_chunk_size(chunk_size):
    if chunk_size is None or chunk_size == "auto":
        return chunk_size
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise InputError(f"--chunk-size must be a positive number of frames or 'auto' (chunk_size=None in Python: "
                         f"all at once), got {chunk_size!r}")
    return chunk_size


def _choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise InputError(f"{flag} {value!r} is not one of {', '.join(map(str, choices))}")


@dataclass(frozen=True)
class RunConfig:
    """Everything about how the UNet runs and where the inversion's tensors are kept.

    device: cpu, cuda, cuda:N or a torch.device (None: cuda when available); dtype: the model's;
    chunk_size: frames per UNet pass (None: all, 'auto': from the free GPU memory); store: the form
    the source attention is kept in, at store_placement (lowrank: store_rank or store_error);
    latents_dtype (None: the model's) and latents_placement: how the inversion latents are kept.
    """

    device: str | torch.device | None = None
    dtype: str | torch.dtype | None = None
    attention: VideoAttentionConfig = field(default_factory=VideoAttentionConfig)
    chunk_size: int | str | None = None
    store: str = "recompute"
    store_placement: str = "host"
    store_rank: int | None = None
    store_error: float | None = None
    latents_dtype: str | torch.dtype | None = None
    latents_placement: str = "host"

    def __post_init__(self):
        device = check_device(self.device)
        object.__setattr__(self, "device", device)
        dtype = self.dtype if self.dtype is not None else ("fp16" if device.type == "cuda" else "fp32")
        object.__setattr__(self, "dtype", check_dtype(dtype, "--dtype"))
        if self.latents_dtype is not None:
            object.__setattr__(self, "latents_dtype", check_dtype(self.latents_dtype, "--latents-dtype"))
        if not isinstance(self.attention, VideoAttentionConfig):
            raise InputError("attention must be a VideoAttentionConfig")
        check_chunk_size(self.chunk_size)
        _choice("--store", self.store, STORE_FORMS)
        _choice("--store-placement", self.store_placement, STORE_PLACEMENTS)
        _choice("--latents-placement", self.latents_placement, LATENTS_PLACEMENTS)
        if self.store_rank is not None and (isinstance(self.store_rank, bool) or not isinstance(self.store_rank, int)
                                            or self.store_rank < 1):
            raise InputError(f"--store-rank must be a positive integer, got {self.store_rank!r}")
        if self.store_error is not None and not (isinstance(self.store_error, (int, float))
                                                 and math.isfinite(self.store_error) and 0 < self.store_error < 1):
            raise InputError(f"--store-error must be a number in (0, 1), got {self.store_error!r}")
        if (self.store_rank is not None or self.store_error is not None) and self.store != "lowrank":
            raise InputError(f"--store-rank and --store-error apply to --store lowrank, not --store {self.store}")

    def with_(self, **changes) -> "RunConfig":
        """A copy with `changes` (None values keep what is set), checked again."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    @property
    def keep_dtype(self) -> torch.dtype:
        """The dtype the inversion latents are kept in."""
        return self.latents_dtype or self.dtype

    def make_store(self, folder=None):
        """A new store of this form and placement (a disk store writes into `folder`)."""
        from ..stores import make_store

        return make_store(self.store, placement=self.store_placement, folder=folder, rank=self.store_rank,
                          error_budget=self.store_error)


def check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise InputError(f"--steps must be positive, got {steps!r}")
    return steps


def check_prompt_and_scale(target_prompt: str, options) -> None:
    """One edit's target prompt is not empty and its guidance scale is a finite number."""
    if not isinstance(target_prompt, str) or not target_prompt.strip():
        raise InputError("--target-prompt is empty: give the prompt the edit should follow")
    scale = options.guidance_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise InputError(f"--guidance-scale must be a finite number, got {scale!r}")


def check_edit(target_prompt: str, options, tokenizer) -> str:
    """Check one edit's prompt and guidance scale; the prompt cut to CLIP's 77 tokens (with a warning)."""
    from ..semantics.tokens import fit_prompt

    check_prompt_and_scale(target_prompt, options)
    return fit_prompt(target_prompt, tokenizer, "target")
