"""Which kind of model a diffusers-format folder holds, read from its files.

- plain Stable Diffusion 1.x / 2.x: unet/config.json of a UNet2DConditionModel, weights without
  temporal keys (SD 2.x: v-prediction in the scheduler config, linear projections, upcast_attention);
- FateZero tuned pipeline folders: a UNetPseudo3DConditionModel (Pseudo3D block types) whose
  weights add attn_temporal / norm_temporal to every transformer block and conv_temporal
  (a LoRA pair down/up, or a full Conv1d) to every Conv2d with a kernel larger than 1;
- Tune-A-Video folders: a UNet3DConditionModel (3D block types) whose weights add attn_temp /
  norm_temp and no temporal conv.

The config says what the folder claims to be, the weight keys what it is: the two must agree.
The LoRA rank comes from the caller (the YAML's model_config.lora), from the config, or from the
weight shapes, and must fit every layer's shape.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..unet.temporal import TemporalSpec, lora_rank
from .weights import read_shapes, weights_file

KINDS = {"sd": "plain Stable Diffusion (UNet2DConditionModel)",
         "fatezero": "a FateZero tuned model (UNetPseudo3DConditionModel)",
         "tuneavideo": "a Tune-A-Video model (UNet3DConditionModel)"}
# key fragments that only one kind of weights has
_KEY_MARKS = (("fatezero", re.compile(r"\.(attn_temporal|norm_temporal|conv_temporal)\.")),
              ("tuneavideo", re.compile(r"\.(attn_temp|norm_temp)\.")),
              ("text-to-video", re.compile(r"(^|\.)(temp_attentions|temp_convs|transformer_in)\.")))
# official config keys that are not UNet2DConditionModel arguments and change nothing here
_IGNORED_CONFIG = {"_class_name", "_diffusers_version", "_name_or_path", "kwargs", "lora",
                   "SparseCausalAttention_index", "least_sc_channel", "temporal_downsample",
                   "temporal_downsample_time"}


@dataclass
class ModelFormat:
    """What `detect` found in a model folder."""

    kind: str                          # sd | fatezero | tuneavideo
    unet_class: str                    # the config's _class_name
    weights: Path                      # the UNet's weight file
    unet_config: dict                  # the config as UNet2DConditionModel arguments
    prediction_type: str = "epsilon"   # epsilon | v_prediction (the scheduler config's)
    temporal: TemporalSpec = field(default_factory=TemporalSpec)
    rank_source: str | None = None     # where the LoRA rank came from
    temporal_layers: list[str] = field(default_factory=list)  # module names with temporal modules

    @property
    def family(self) -> str:
        """SD 1.x or 2.x, by the text width the UNet reads (768 vs 1024) and its projections."""
        if self.unet_config.get("cross_attention_dim") == 1024 or self.unet_config.get("use_linear_projection"):
            return "2.x"
        return "1.x"

    @property
    def native_index(self) -> list:
        """The sparse-causal index list the checkpoint was tuned with (Tune-A-Video: first and previous)."""
        return ["first", -1] if self.kind == "tuneavideo" else [-1, "first"]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path} is missing: a diffusers-format model folder has one") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object")
    return data


def _declared_kind(config: dict, path: Path) -> str:
    name = str(config.get("_class_name", "UNet2DConditionModel"))
    blocks = [str(b) for b in list(config.get("down_block_types") or []) + list(config.get("up_block_types") or [])]
    if name == "UNetPseudo3DConditionModel" or any("Pseudo3D" in b for b in blocks):
        return "fatezero"
    if name == "UNet3DConditionModel":
        return "tuneavideo"
    if name == "UNet2DConditionModel":
        return "sd"
    raise InputError(f"{path}: unsupported UNet class {name!r}: use a UNet2DConditionModel (SD 1.x/2.x), "
                     f"UNetPseudo3DConditionModel (FateZero) or UNet3DConditionModel (Tune-A-Video) folder")


def weights_kind(keys) -> tuple[str, str | None]:
    """(kind, the first key that shows it) from weight keys; plain SD when no temporal key is present."""
    for kind, mark in _KEY_MARKS:
        for key in keys:
            if mark.search(key):
                return kind, key
    return "sd", None


def _config_2d(config: dict, path: Path) -> dict:
    """The config as UNet2DConditionModel arguments: 3D block types renamed, official extras dropped."""
    if config.get("temporal_downsample") or config.get("temporal_downsample_time"):
        raise InputError(f"{path}: temporal_downsample is not supported (clips keep all their frames in every block)")
    out = {k: v for k, v in config.items() if k not in _IGNORED_CONFIG}
    for key in ("down_block_types", "up_block_types"):
        if key in out:
            out[key] = [re.sub(r"(Pseudo3D|3D)$", "2D", str(b)) for b in out[key]]
    if "mid_block_type" in out:
        out["mid_block_type"] = str(out["mid_block_type"]).replace("Pseudo3D", "2D").replace("3D", "2D")
    return out


def _conv_kind(keys, path: Path) -> str | None:
    lora = [k for k in keys if k.endswith(("conv_temporal.down.weight", "conv_temporal.up.weight"))]
    full = [k for k in keys if k.endswith(("conv_temporal.weight", "conv_temporal.bias"))]
    if lora and full:
        raise InputError(f"{path}: the temporal convs mix LoRA pairs ({lora[0]}) and full convs ({full[0]})")
    return "lora" if lora else "full" if full else None


def infer_rank(shapes: dict, declared: int | None, path: Path) -> tuple[int | None, str]:
    """The model's LoRA rank from the down-projection shapes {key: (r, C, 3)}, checked against `declared`.

    A layer of width C gets the model's rank r, or C // 2 where r > C. Returns (rank, source);
    rank None means larger than every layer's width (every layer clamped)."""
    layers = sorted((k, s[0], s[1]) for k, s in shapes.items())

    def fits(rank):
        return next(((k, r, c) for k, r, c in layers if r != lora_rank(rank, c)), None)

    if declared is not None:
        if isinstance(declared, bool) or not isinstance(declared, int) or declared <= 0:
            raise InputError(f"model_config.lora must be a positive integer, got {declared!r}")
        bad = fits(declared)
        if bad:
            k, r, c = bad
            raise InputError(f"{path}: LoRA rank mismatch: model_config.lora is {declared}, so {k} should have rank "
                             f"{lora_rank(declared, c)}, but it has {r}")
        return declared, "model_config"
    candidates = sorted({r for _, r, _ in layers}, reverse=True)
    for rank in candidates:
        if fits(rank) is None:
            return rank, "weight shapes"
    if fits(None) is None:
        return None, "weight shapes"
    k, r, c = layers[0]
    raise InputError(f"{path}: the LoRA ranks of the temporal convs fit no single rank (e.g. {k} has rank {r} "
                     f"at width {c}): the weights are damaged or not one model's")


def detect(folder: str | Path, lora: int | None = None, keys_shapes: dict | None = None) -> ModelFormat:
    """The format of a model folder (its unet/ and scheduler/), from the config and the weight keys.

    keys_shapes: {key: shape} of the UNet weights (read from the weight file when not given);
    lora: the LoRA rank the user's model_config gives, if any."""
    folder = Path(folder)
    unet_dir = folder / "unet"
    config_path = unet_dir / "config.json"
    config = _read_json(config_path)
    declared = _declared_kind(config, config_path)
    weights = weights_file(unet_dir)
    shapes = read_shapes(weights) if keys_shapes is None else keys_shapes
    found, key = weights_kind(shapes)
    if found == "text-to-video":
        raise InputError(f"{weights}: these are weights of diffusers' text-to-video UNet3DConditionModel "
                         f"(e.g. {key}), not a Tune-A-Video or FateZero model")
    if found != declared:
        shown = f" (e.g. {key})" if key else " (no temporal keys)"
        raise InputError(f"{folder}: unet/config.json declares {KINDS[declared]} but its weights are "
                         f"{KINDS[found].split(' (')[0]}'s{shown}")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    prediction = _read_json(scheduler).get("prediction_type", "epsilon") if scheduler.is_file() else "epsilon"
    if prediction not in ("epsilon", "v_prediction"):
        raise InputError(f"{scheduler}: prediction_type {prediction!r} is not supported: use epsilon or v_prediction")
    fmt = ModelFormat(declared, str(config.get("_class_name", "UNet2DConditionModel")), weights,
                      _config_2d(config, config_path), prediction)
    if declared == "sd":
        return fmt
    conv = _conv_kind(shapes, weights) if declared == "fatezero" else None
    rank, source = None, None
    if conv == "lora":
        downs = {k: s for k, s in shapes.items() if k.endswith("conv_temporal.down.weight")}
        rank, source = infer_rank(downs, lora if lora is not None else config.get("lora"), weights)
        if lora is None and config.get("lora") is not None:
            source = "unet/config.json"
    fmt.temporal = TemporalSpec(attention=declared, conv=conv, rank=rank)
    fmt.rank_source = source
    mark = re.compile(r"^(.*)\.(attn_temporal|attn_temp|conv_temporal)\.")
    fmt.temporal_layers = sorted({m.group(1) + "." + m.group(2) for k in shapes if (m := mark.match(k))})
    return fmt


def describe(folder: str | Path, lora: int | None = None) -> str:
    """What `fatezero-fast info --model DIR` prints: format, prediction type, LoRA rank, temporal layers."""
    fmt = detect(folder, lora)
    c = fmt.unet_config
    lines = [f"model: {folder}",
             f"format: {KINDS[fmt.kind]}, SD {fmt.family} architecture",
             f"weights: {fmt.weights.name}",
             f"prediction type: {fmt.prediction_type}",
             (f"cross-attention width {c.get('cross_attention_dim')}, "
             f"{'linear' if c.get('use_linear_projection') else 'conv'} projections, "
             f"upcast_attention {bool(c.get('upcast_attention'))}")]
    t = fmt.temporal
    if fmt.kind == "sd":
        lines.append("temporal layers: none (temporal modules are identities)")
        return "\n".join(lines)
    attn = [n for n in fmt.temporal_layers if not n.endswith("conv_temporal")]
    convs = [n for n in fmt.temporal_layers if n.endswith("conv_temporal")]
    lines.append(f"temporal attention: {len(attn)} layers ({attn[0]} ... {attn[-1]})")
    if t.conv is None:
        lines.append("temporal conv: none")
    else:
        lines.append(f"temporal conv: {len(convs)} layers, "
                     f"{'LoRA pairs (k=3, residual)' if t.conv == 'lora' else 'full Conv1d (k=3)'} "
                     f"({convs[0]} ... {convs[-1]})")
    if t.conv == "lora":
        rank = t.rank if t.rank is not None else "larger than every layer's width (each layer: width // 2)"
        lines.append(f"LoRA rank: {rank} (from the {fmt.rank_source}; layers narrower than the rank get width // 2)")
    else:
        lines.append("LoRA rank: none")
    lines.append(f"sparse-causal index it was tuned with: {fmt.native_index}")
    return "\n".join(lines)
