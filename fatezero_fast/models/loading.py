"""Loading a model folder's UNet into a stock diffusers UNet2DConditionModel, temporal modules included.

The UNet is built from its config (3D block types renamed to their 2D originals), the temporal
modules its format has are attached under the checkpoint's own names (fatezero_fast.unet.temporal),
and the weights are loaded strictly: every key of the file must be one of the model's and the
other way round, with the same shapes. Anything else is a one-line InputError naming the first
offending keys.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..errors import InputError
from ..unet import temporal
from .formats import ModelFormat, detect, weights_file


def _first(keys: list[str], n: int = 3) -> str:
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
        raise InputError(f"{path} is truncated ({size} bytes): tensors {_first([k for _, k in beyond])} "
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


def build_unet(fmt: ModelFormat, state: dict[str, torch.Tensor]):
    """A UNet2DConditionModel with the temporal modules of `fmt`, holding exactly the weights `state`."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with torch.device("meta"):  # no random initialisation: every tensor comes from `state`
            unet = UNet2DConditionModel.from_config(fmt.unet_config)
            temporal.attach(unet, fmt.temporal)
    except (ValueError, TypeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{fmt.weights.parent / 'config.json'} does not describe a UNet that can be built: {first}") \
            from None
    finally:
        diffusers_logging.set_verbosity(level)
    expected = unet.state_dict()
    where = fmt.weights
    unknown = [k for k in state if k not in expected]
    if unknown:
        raise InputError(f"{where} has keys that {fmt.unet_class} does not: {_first(unknown)}")
    missing = [k for k in expected if k not in state]
    if missing:
        raise InputError(f"{where} lacks keys that {fmt.unet_class} needs: {_first(missing)}")
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise InputError(f"{where} has tensors of the wrong shape: {_first(wrong, 2)}")
    unet.load_state_dict(state, strict=True, assign=True)
    meta = [name for name, t in list(unet.named_parameters()) + list(unet.named_buffers()) if t.is_meta]
    if meta:  # nothing may be left uninitialised
        raise RuntimeError(f"tensors not loaded: {_first(meta)}")
    return unet.eval()


def load_unet(folder: str | Path, lora: int | None = None):
    """(unet, format) of a model folder: a stock UNet2DConditionModel plus the format's temporal modules.

    `lora`: the LoRA rank the run's model_config gives (checked against the weights)."""
    folder = Path(folder)
    state = read_weights(weights_file(folder / "unet"))
    fmt = detect(folder, lora, {k: tuple(v.shape) for k, v in state.items()})
    return build_unet(fmt, state), fmt
