"""The toy-world model: Stable Diffusion's architecture types at toy widths, trained on the toy world.

`load_components()` returns vae, text_encoder, tokenizer, unet, scheduler (the dict
fatezero_fast.models.random_components returns) from the diffusers-format folder shipped beside
this file (MODEL_DIR, fp16 safetensors; see docs/toyworld/MODEL_CARD.md); `toyworld_pipeline()` wraps them in a
FateZeroPipeline. The folder also loads with FateZeroPipeline.from_pretrained(MODEL_DIR) and the
CLI's `--model`. tools/train_toyworld.py trains it.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from fatezero_fast.models import SCHEDULER_CONFIG
from fatezero_fast.models.tokenizer import VOCAB_SIZE, clip_tokenizer

from ..errors import InputError

MODEL_DIR = Path(__file__).parent / "model"
FRAME_SIZE = 48  # frames are 48x48; the VAE downsamples by 2: 24x24 latents, 6x6 blend masks

_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

CONFIG = {
    # SD-1.x's UNet block types and attention levels; (1, 2, 4, 4) heads, top level first
    "unet": dict(sample_size=FRAME_SIZE // 2, in_channels=4, out_channels=4, down_block_types=_DOWN,
                 up_block_types=_UP, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
                 cross_attention_dim=64, attention_head_dim=(1, 2, 4, 4), norm_num_groups=16),
    # SD's VAE block types, two levels (factor 2) instead of four (factor 8)
    "vae": dict(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(24, 48), layers_per_block=1,
                norm_num_groups=8, sample_size=FRAME_SIZE),
    # CLIP's text model with one causal transformer layer: a word's encoding also carries the words
    # before it ("red car" in "car"), so the UNet can find an object's colour at the object's own
    # token. Two-object captions in training make it read there (docs/toyworld/MODEL_CARD.md).
    "text": dict(vocab_size=VOCAB_SIZE, max_position_embeddings=77, hidden_act="quick_gelu", hidden_size=64,
                 intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, projection_dim=64),
}


def build_components(seed: int = 0) -> dict:
    """Untrained toy-world components (what tools/train_toyworld.py starts from)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return dict(vae=AutoencoderKL(**CONFIG["vae"]), text_encoder=CLIPTextModel(CLIPTextConfig(**CONFIG["text"])),
                tokenizer=clip_tokenizer(), unet=UNet2DConditionModel(**CONFIG["unet"]),
                scheduler=DDIMScheduler(**SCHEDULER_CONFIG))


def save_folder(parts: dict, folder: str | Path) -> Path:
    """Write the components as a diffusers-format folder, weights in fp16 safetensors."""
    folder = Path(folder)
    for name in ("vae", "text_encoder", "unet"):
        # a copy, not from_config: diffusers' from_config resets config values set after init to their
        # defaults (the VAE's scaling_factor would silently become SD's 0.18215)
        half = copy.deepcopy(parts[name]).to(torch.float16)
        half.save_pretrained(folder / name, safe_serialization=True)
    parts["tokenizer"].save_pretrained(folder / "tokenizer")
    parts["scheduler"].save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDIMScheduler"]}, indent=1) + "\n")
    return folder


def load_components(folder: str | Path | None = None) -> dict:
    """vae, text_encoder, tokenizer, unet, scheduler of the shipped toy-world model, in fp32 on the CPU."""

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    folder = Path(folder or MODEL_DIR)
    if not (folder / "unet").is_dir():
        raise InputError(f"no toy-world model in {folder}: train one with `python tools/train_toyworld.py --export "
                         f"{folder}` (none ships yet: docs/toyworld/MODEL_CARD.md)")
    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error(), transformers_logging.set_verbosity_error()
    progress = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        return _load(folder)
    finally:
        diffusers_logging.set_verbosity(levels[0]), transformers_logging.set_verbosity(levels[1])
        if progress:
            transformers_logging.enable_progress_bar()


def _load(folder: Path) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    return dict(vae=AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval(),
                text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32).eval(),
                tokenizer=clip_tokenizer(),
                unet=UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32).eval(),
                scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"))


def toyworld_pipeline(folder: str | Path | None = None, **kwargs):
    """A FateZeroPipeline on the toy-world model (kwargs: attention=, device=, dtype=, chunk_size=)."""
    from fatezero_fast.edit.pipeline import FateZeroPipeline

    kwargs.setdefault("device", "cpu")
    return FateZeroPipeline(**load_components(folder), **kwargs)
