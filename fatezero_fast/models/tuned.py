"""Random-weight tuned video models, written the way the official code saves them.

No tuned checkpoint can be downloaded here, so tests and benchmarks write their own: SD's random
UNet (fatezero_fast.models.random) plus temporal modules with random weights large enough to
change the outputs clearly, saved as the official code's save_pretrained would: unet/config.json
with the official class and block names (and only the config keys diffusers 0.11.1 knew), one
diffusion_pytorch_model.bin with the official key names.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..unet import temporal
from .random import random_components

CLASS_NAMES = {"fatezero": ("UNetPseudo3DConditionModel", "Pseudo3D"), "tuneavideo": ("UNet3DConditionModel", "3D")}
# the UNet config keys of diffusers 0.11.1 (what the official loaders accept)
_CONFIG_KEYS = ("sample_size", "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
                "down_block_types", "mid_block_type", "up_block_types", "only_cross_attention", "block_out_channels",
                "layers_per_block", "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups",
                "norm_eps", "cross_attention_dim", "attention_head_dim", "dual_cross_attention",
                "use_linear_projection", "class_embed_type", "num_class_embeds", "upcast_attention",
                "resnet_time_scale_shift")


def randomize_temporal(unet, seed: int = 0, strength: float = 1.0) -> None:
    """Give the attached temporal modules random weights that change the UNet's output clearly."""
    g = torch.Generator().manual_seed(seed)

    def normal(t, std):
        with torch.no_grad():
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) * std)

    for name, p in unet.named_parameters():
        if "conv_temporal" in name:
            if name.endswith(("down.weight", "up.weight")):
                normal(p, strength / (p.shape[1] * 3) ** 0.5)
            elif name.endswith("conv_temporal.weight"):  # full conv: identity plus a random part
                normal(p, 0.5 * strength / (p.shape[1] * 3) ** 0.5)
                p.data[:, :, 1] += torch.eye(p.shape[0], dtype=p.dtype)
            else:
                normal(p, 0.1 * strength)
        elif ".attn_temp" in name:
            normal(p, strength / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.1 * strength)
        elif ".norm_temp" in name:
            normal(p, 0.2 * strength)
            if name.endswith("weight"):
                p.data += 1


def official_unet_config(unet, fmt: str) -> dict:
    """The UNet config as the official code saves it for format `fmt`."""
    class_name, suffix = CLASS_NAMES[fmt]
    config = {k: unet.config[k] for k in _CONFIG_KEYS if k in unet.config}
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    config["down_block_types"] = [b.replace("2D", suffix) for b in config["down_block_types"]]
    config["up_block_types"] = [b.replace("2D", suffix) for b in config["up_block_types"]]
    config["mid_block_type"] = config.get("mid_block_type", "UNetMidBlock2DCrossAttn").replace("2D", suffix)
    return {"_class_name": class_name, "_diffusers_version": "0.11.1", **config}


def random_tuned_components(fmt: str = "fatezero", kind: str = "tiny", *, conv: str | None = "lora",
                            lora: int | None = 8, seed: int = 0, strength: float = 1.0) -> dict:
    """random_components of `kind` whose UNet has `fmt`'s temporal modules (FateZero: `conv` lora|full|None)."""
    parts = random_components(kind, seed)
    spec = temporal.TemporalSpec(attention=fmt, conv=conv if fmt == "fatezero" else None, rank=lora)
    temporal.attach(parts["unet"], spec)
    randomize_temporal(parts["unet"], seed + 1, strength)
    return parts


def save_random_tuned_model(folder: str | Path, fmt: str = "fatezero", kind: str = "tiny", *,
                            conv: str | None = "lora", lora: int | None = 8, seed: int = 0,
                            strength: float = 1.0) -> Path:
    """Write a random tuned model folder in the official layout of `fmt` (fatezero | tuneavideo)."""
    folder = Path(folder)
    parts = random_tuned_components(fmt, kind, conv=conv, lora=lora, seed=seed, strength=strength)
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        parts[name].save_pretrained(folder / name)
    unet_dir = folder / "unet"
    unet_dir.mkdir(parents=True, exist_ok=True)
    (unet_dir / "config.json").write_text(json.dumps(official_unet_config(parts["unet"], fmt), indent=2))
    torch.save(parts["unet"].state_dict(), unet_dir / "diffusion_pytorch_model.bin")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "SpatioTemporalStableDiffusionPipeline" if fmt == "fatezero" else "TuneAVideoPipeline",
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", CLASS_NAMES[fmt][0]],
        "scheduler": ["diffusers", "DDIMScheduler"]}))
    return folder
