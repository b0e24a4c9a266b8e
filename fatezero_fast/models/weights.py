"""Reading a UNet's weight file (.safetensors or .bin): keys and shapes, or the tensors.

A damaged file (truncated, not a weight file) is a one-line InputError naming the file and, for
a truncated .safetensors file, the first tensors that lie beyond its end.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..errors import InputError

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def weights_file(unet_dir: Path) -> Path:
    for name in WEIGHT_FILES:
        if (unet_dir / name).is_file():
            return unet_dir / name
    raise InputError(f"{unet_dir} has no weights: expected one of {', '.join(WEIGHT_FILES)}")


def first_keys(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _safetensors_header(path: Path) -> dict:
    """The tensors a .safetensors file declares, checked against the file's length (a truncated file fails)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(f"{path} is truncated: {size} bytes, not even a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise InputError(f"{path} is truncated: its header needs {8 + n} bytes, the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InputError(f"{path} is not a safetensors file ({exc})") from None
    header.pop("__metadata__", None)
    beyond = sorted((info["data_offsets"][1], key) for key, info in header.items()
                    if 8 + n + info["data_offsets"][1] > size)
    if beyond:
        raise InputError(f"{path} is truncated ({size} bytes): tensors {first_keys([k for _, k in beyond])} "
                         f"lie beyond its end")
    return header


def read_shapes(path: Path) -> dict[str, tuple]:
    """{key: shape} of a weight file, without reading the tensors where the format allows."""
    if path.suffix == ".safetensors":
        return {k: tuple(info["shape"]) for k, info in _safetensors_header(path).items()}
    return {k: tuple(v.shape) for k, v in read_weights(path, mmap=True).items()}


def read_weights(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a .safetensors or .bin weight file; a damaged file is an InputError."""
    try:
        if path.suffix == ".safetensors":
            _safetensors_header(path)
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except InputError:
        raise
    except Exception as exc:  # torch/safetensors say "failed finding central directory" and the like
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{path} is truncated or not a weight file ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path} does not hold a state dict of tensors")
    return state
