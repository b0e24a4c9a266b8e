"""Loading a model folder's UNet into a stock diffusers UNet2DConditionModel, temporal modules included.

The UNet is built from its config (3D block types renamed to their 2D originals), the temporal
modules its format has are attached under the checkpoint's own names (fatezero_fast.unet.temporal),
and the weights are loaded strictly: every key of the file must be one of the model's and the
other way round, with the same shapes. Anything else is a one-line InputError naming the first
offending keys.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import InputError
from ..unet import temporal
from .formats import ModelFormat, detect
from .weights import first_keys, read_weights, weights_file


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
        raise InputError(f"{where} has keys that {fmt.unet_class} does not: {first_keys(unknown)}")
    missing = [k for k in expected if k not in state]
    if missing:
        raise InputError(f"{where} lacks keys that {fmt.unet_class} needs: {first_keys(missing)}")
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise InputError(f"{where} has tensors of the wrong shape: {first_keys(wrong, 2)}")
    unet.load_state_dict(state, strict=True, assign=True)
    meta = [name for name, t in list(unet.named_parameters()) + list(unet.named_buffers()) if t.is_meta]
    if meta:  # nothing may be left uninitialised
        raise RuntimeError(f"tensors not loaded: {first_keys(meta)}")
    return unet.eval()


def load_unet(folder: str | Path, lora: int | None = None):
    """(unet, format) of a model folder: a stock UNet2DConditionModel plus the format's temporal modules.

    `lora`: the LoRA rank the run's model_config gives (checked against the weights)."""
    folder = Path(folder)
    state = read_weights(weights_file(folder / "unet"))
    fmt = detect(folder, lora, {k: tuple(v.shape) for k, v in state.items()})
    return build_unet(fmt, state), fmt


COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")


def check_model_folder(folder: str | Path) -> Path:
    """A local diffusers-format Stable Diffusion folder with all of COMPONENTS, or InputError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--model folder not found: {folder} (give a local diffusers-format Stable Diffusion folder)")
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise InputError(f"--model folder {folder} lacks {', '.join(missing)}: a diffusers-format folder has "
                         f"{', '.join(COMPONENTS)}")
    return folder


def load_components(folder: str | Path, lora: int | None = None) -> tuple[dict, ModelFormat]:
    """({component name: model}, the UNet's format) of a model folder; a broken component is an
    InputError naming it. `lora` as for load_unet."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from diffusers.utils import is_accelerate_available
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = check_model_folder(folder)
    unet, fmt = load_unet(folder, lora)
    loaders = {"vae": AutoencoderKL, "text_encoder": CLIPTextModel, "tokenizer": CLIPTokenizer,
               "scheduler": DDIMScheduler}
    # without accelerate diffusers would warn that it cannot load with low memory
    low_memory = {"vae": {"low_cpu_mem_usage": is_accelerate_available()}}
    parts = {"unet": unet}
    for name, loader in loaders.items():
        try:
            parts[name] = loader.from_pretrained(folder / name, **low_memory.get(name, {}))
        except Exception as exc:  # a broken component: name it, not a deep traceback
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"cannot load {name} from {folder / name}: {first}") from exc
    return parts, fmt
