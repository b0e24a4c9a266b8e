"""The official FateZero YAML configs (config/**/*.yaml of the official repository), as they are.

A config names the model, the clip (dataset_config), the editing prompts with one p2p_config
entry each (editing_config) and the video model (model_config). The first editing prompt is
usually the source prompt itself; every prompt is edited from the one inversion. model_config's
lora is the LoRA rank of a FateZero tuned checkpoint (checked against its weights); keys that do
not apply (temporal_downsample_time, ...) are accepted with a note.
"""
from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from ..errors import FateZeroWarning, InputError
from ..semantics.plan import EditOptions
from ..unet.processors import VideoAttentionConfig

_EDIT_KEYS = {f.name for f in fields(EditOptions)} - {"guidance_scale"}
# p2p_config keys the official code reads that change nothing here (recompute always uses inversion attention)
_IGNORED_EDIT_KEYS = {"use_inversion_attention", "save_self_attention", "disk_store"}
_VIDEO_KEYS = {"path", "prompt", "n_sample_frame", "sampling_rate", "start_sample_frame", "offset"}
_IGNORED_VIDEO_KEYS = {"stride", "image_size", "crop", "image_mode", "class_data_root", "class_prompt_ids"}
_TOP_KEYS = {"pretrained_model_path", "dataset_config", "editing_config", "model_config", "seed"}
_IGNORED_TOP_KEYS = {"logdir", "train_steps", "validation_sample_logger_config", "test_pipeline_config",
                     "trainer_pipeline_config", "train_dataset", "learning_rate", "gradient_accumulation_steps",
                     "enable_xformers", "mixed_precision", "use_8bit_adam", "checkpointing_steps", "train_batch_size"}
_EDITING_KEYS = {"editing_prompts", "p2p_config", "num_inference_steps", "guidance_scale",
                 "use_inversion_attention", "use_invertion_latents", "editing_type", "clip_length",
                 "sample_seeds", "num_warmup_steps", "strength", "test_steps"}
_MODEL_KEYS = {"SparseCausalAttention_index", "least_sc_channel", "lora", "temporal_downsample_time",
               "lora_alpha", "use_temporal_conv", "temporal_conv_type"}


@dataclass
class VideoSpec:
    path: str | None = None
    n_sample_frame: int | None = None  # None: what the clip has, up to DEFAULT_FRAMES
    sampling_rate: int = 1
    start_sample_frame: int = 0
    offset: dict | None = None
    width: int = 512
    height: int = 512


@dataclass
class JobConfig:
    """What one `fatezero-fast edit` run does: model, clip, prompts, edits (from flags or a config)."""

    model: str | None = None
    video: VideoSpec = field(default_factory=VideoSpec)
    source_prompt: str = ""
    edits: list[tuple[str, EditOptions]] = field(default_factory=list)
    num_inference_steps: int = 50
    attention: VideoAttentionConfig = field(default_factory=VideoAttentionConfig)
    lora: int | None = None        # model_config.lora: the tuned checkpoint's LoRA rank
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    from_config: set[str] = field(default_factory=set)  # the keys the config set (dataset_config.path, ...)


def unknown_keys(section: dict, known: set, where: str) -> None:
    """A warning per key of `section` outside `known`, naming the closest known key."""
    for key in sorted(set(section) - known, key=str):
        close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
        hint = f": did you mean {close[0]!r}?" if close else ""
        warnings.warn(f"{where}key {key!r} is not a FateZero config key and is ignored{hint}", FateZeroWarning)


def _int_or_none(value) -> int | None:
    return None if value is None else int(value)


def _section(raw: dict, name: str) -> dict:
    value = raw.get(name) or {}
    if not isinstance(value, dict):
        raise InputError(f"config section {name!r} must be a mapping")
    return value


def edit_options(entry: dict | None, guidance_scale: float, where: str) -> EditOptions:
    """EditOptions from one p2p_config entry (official key names)."""
    entry = dict(entry or {})
    unknown_keys(entry, _EDIT_KEYS | _IGNORED_EDIT_KEYS, f"{where}: ")
    for key in set(entry) - _EDIT_KEYS:
        entry.pop(key)
    return EditOptions(guidance_scale=guidance_scale, **entry)


def load_config(path: str | Path) -> JobConfig:
    """Read an official FateZero config file; bad values raise InputError, inapplicable keys add notes."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, dict):
        raise InputError(f"config {path} must be a YAML mapping")
    notes: list[str] = []
    data, editing, model = (_section(raw, n) for n in ("dataset_config", "editing_config", "model_config"))
    unknown_keys(raw, _TOP_KEYS | _IGNORED_TOP_KEYS, "")
    unknown_keys(data, _VIDEO_KEYS | _IGNORED_VIDEO_KEYS, "dataset_config: ")
    unknown_keys(editing, _EDITING_KEYS, "editing_config: ")
    unknown_keys(model, _MODEL_KEYS, "model_config: ")
    from_config = {f"dataset_config.{k}" for k in data} | {f"editing_config.{k}" for k in editing} | \
        {f"model_config.{k}" for k in model} | {k for k in raw if not isinstance(raw[k], dict)}
    video = VideoSpec(path=data.get("path"), n_sample_frame=_int_or_none(data.get("n_sample_frame")),
                      sampling_rate=int(data.get("sampling_rate", 1)),
                      start_sample_frame=int(data.get("start_sample_frame", 0) or 0), offset=data.get("offset"))
    if "image_size" in data:
        video.width = video.height = int(data["image_size"])

    attention = VideoAttentionConfig(
        sparse_causal_index=model.get("SparseCausalAttention_index", [-1, "first"]),
        least_sc_channel=model.get("least_sc_channel"))
    lora = model.get("lora")
    if lora is not None:
        notes.append(f"model_config: lora {lora} is the LoRA rank of a FateZero tuned checkpoint's temporal convs: "
                     f"checked against its weights, unused with plain Stable Diffusion weights")
    for key in sorted(set(model) & _MODEL_KEYS - {"SparseCausalAttention_index", "least_sc_channel", "lora"}):
        notes.append(f"model_config: {key!r} does not apply here and is ignored")

    guidance = float(editing.get("guidance_scale", 7.5))
    prompts = editing.get("editing_prompts") or []
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise InputError("editing_config.editing_prompts must be a list of prompts")
    p2p = editing.get("p2p_config") or {}
    edits = []
    for i, prompt in enumerate(prompts):
        entry = p2p.get(i, p2p.get(str(i)))
        if entry is None:
            notes.append(f"p2p_config has no entry {i}: editing prompt {i} uses the defaults")
        edits.append((prompt, edit_options(entry, guidance, f"p2p_config[{i}]")))
    if editing.get("use_inversion_attention") is False:
        notes.append("use_inversion_attention: false is not supported; inversion attention is used")
    if not raw.get("pretrained_model_path"):
        raise InputError(f"config {path} has no pretrained_model_path: add it (a local diffusers-format Stable "
                         f"Diffusion folder) or pass --model")
    return JobConfig(model=str(raw["pretrained_model_path"]), video=video, source_prompt=data.get("prompt", ""),
                     edits=edits, num_inference_steps=int(editing.get("num_inference_steps", 50)),
                     attention=attention, lora=lora, seed=int(raw.get("seed", 0)), notes=notes,
                     from_config=from_config)

