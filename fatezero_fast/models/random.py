"""Random-weight Stable Diffusion models: the embedded tiny default and SD-1.4's exact shape.

No weights can be downloaded here, so the project runs and tests its real loading and editing
code on models it builds itself: `tiny` (SD-1.4's block structure at toy widths; CPU-friendly)
and `sd14` (SD-1.4's exact architecture, 860M UNet parameters; for GPU benchmarks). Both use
the real CLIP vocabulary (fatezero_fast.tokenizer), so word indices are real.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .tokenizer import VOCAB_SIZE, clip_tokenizer

_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

CONFIGS = {
    "tiny": {
        "unet": dict(sample_size=16, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
                     cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8),
        "vae": dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=128),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     projection_dim=32),
    },
    # SD 2.x's UNet at toy widths: heads of 16 channels, linear projections, upcast attention, v-prediction
    "tiny-sd2": {
        "unet": dict(sample_size=16, block_out_channels=(32, 32, 64, 64), layers_per_block=2,
                     cross_attention_dim=32, attention_head_dim=(2, 2, 4, 4), norm_num_groups=8,
                     use_linear_projection=True, upcast_attention=True),
        "vae": dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=128),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     projection_dim=32),
        "scheduler": dict(prediction_type="v_prediction"),
    },
    "sd14": {
        "unet": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                     cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
        "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                    sample_size=512),
        "text": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     projection_dim=768),
    },
}

# Stable Diffusion's scheduler (DDIM with SD-1.x's betas).
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                        steps_offset=1)


def random_components(kind: str = "tiny", seed: int = 0) -> dict:
    """vae, text_encoder, tokenizer, unet, scheduler of a random-weight SD model (a kind of CONFIGS)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if kind not in CONFIGS:
        raise ValueError(f"unknown model kind {kind!r}: use one of {sorted(CONFIGS)}")
    cfg = CONFIGS[kind]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, down_block_types=_DOWN, up_block_types=_UP,
                                **cfg["unet"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        **cfg["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=77,
                                                hidden_act="quick_gelu", **cfg["text"]))
    return dict(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=clip_tokenizer(), unet=unet.eval(),
                scheduler=DDIMScheduler(**SCHEDULER_CONFIG, **cfg.get("scheduler", {})))


def save_random_model(folder: str | Path, kind: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight SD model as a diffusers-format folder (what users bring, with real weights)."""
    folder = Path(folder)
    parts = random_components(kind, seed)
    for name in ("vae", "text_encoder", "unet", "tokenizer", "scheduler"):
        parts[name].save_pretrained(folder / name)
    (folder / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline", "vae": ["diffusers", "AutoencoderKL"], '
        '"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"], '
        '"unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDIMScheduler"]}\n')
    return folder
