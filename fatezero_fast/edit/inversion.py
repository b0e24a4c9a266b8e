"""A saved DDIM inversion: the latents of every step, the mask-level source maps, the store.

One inversion serves any number of edits (docs/semantics.md §2, §4). `Inversion.save` writes a
folder (inversion.json + inversion.pt, and latents/ and store/ for what is kept on disk) that
`Inversion.load` reads back. inversion.json lists every other file with its size, so `load`
checks the whole folder (files, shapes, dtypes, step counts) before any work starts.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from ..stores import AttentionStore, make_store
from ..unet.processors import VideoAttentionConfig
from .steps import DTYPE_NAMES, DiskSteps, dtype_from_name

_DISK_FOLDERS = {"latents": "latents", "token_maps": "latents/token_maps"}  # in a saved inversion folder


@dataclass
class Inversion:
    """A DDIM-inverted clip: everything an edit needs, on the CPU (or on disk).

    latents: (T+1, F, 4, h, w), latents[i] = z_i (z_0 the encoded clip, z_T the noisiest): a host
    tensor, or a edit.steps.DiskSteps (one file per step) read a step at a time;
    token_maps: (T, F, rh, rw, 77), the source cross maps of inversion call i averaged over the
    heads and layers of the mask level, kept like the latents (on disk: in their token_maps/).
    """

    source_prompt: str
    num_inference_steps: int
    latents: torch.Tensor
    token_maps: torch.Tensor
    attention: VideoAttentionConfig
    store: AttentionStore = field(default_factory=make_store)
    frames: torch.Tensor | None = None  # the source clip (F, 3, H, W) in [-1, 1], when known
    model: str | None = None            # the model folder it was made with (None: the built-in model)
    video: str | None = None            # the clip it was made from (None: given as tensors or built in)

    @property
    def num_frames(self) -> int:
        return self.latents.shape[1]

    def latent(self, step: int, device=None, dtype=None) -> torch.Tensor:
        """z_step (F, 4, h, w), read from wherever the latents are kept, on `device` in `dtype`."""
        return self.latents[step].to(device=device, dtype=dtype)

    def save(self, folder: str | Path) -> Path:
        """inversion.json + inversion.pt, and store/ and latents/ for what is kept on disk (latents on
        disk are copied into latents/, which this inversion then reads)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        kept = {}
        for name in ("latents", "token_maps"):
            value = getattr(self, name)
            if isinstance(value, DiskSteps):
                setattr(self, name, value.copy_to(folder / _DISK_FOLDERS[name]))
            kept[name] = dict(placement="disk" if isinstance(value, DiskSteps) else "host",
                              dtype=DTYPE_NAMES[value.dtype], shape=list(value.shape))
        in_file = {name: None if kept[name]["placement"] == "disk" else getattr(self, name) for name in kept}
        torch.save({**in_file, "frames": self.frames, "store": self.store.state_dict()}, folder / "inversion.pt")
        if self.store.placement == "disk" and self.store.folder.resolve() != (folder / "store").resolve():
            shutil.copytree(self.store.folder, folder / "store", dirs_exist_ok=True)
        files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
                 if p.is_file() and p.name != "inversion.json"}
        meta = dict(source_prompt=self.source_prompt, num_inference_steps=self.num_inference_steps,
                    attention=asdict(self.attention), model=self.model, video=self.video, store=self.store.form,
                    **kept, files=files, format=1)
        (folder / "inversion.json").write_text(json.dumps(meta, indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Inversion":
        """Read a saved inversion; a missing, damaged or inconsistent part raises InputError."""
        folder = Path(folder)
        if not (folder / "inversion.json").is_file() or not (folder / "inversion.pt").is_file():
            raise InputError(f"{folder} is not a saved inversion (no inversion.json/inversion.pt): "
                             f"create one with `fatezero-fast invert`")
        meta = _read_meta(folder)
        _check_files(folder, meta)
        try:
            tensors = torch.load(folder / "inversion.pt", map_location="cpu")
            saved = tensors["store"]
            store = make_store(saved["form"], placement=saved["placement"], folder=folder / "store")
            store.load_state_dict(saved)
            attention = VideoAttentionConfig(**meta["attention"])
        except (OSError, RuntimeError, KeyError, TypeError, EOFError, InputError) as exc:
            raise _damaged(folder, f"inversion.pt or its metadata cannot be read ({_first_line(exc)})") from None
        for name in ("latents", "token_maps"):
            kept = meta[name]
            if kept["placement"] == "disk":
                tensors[name] = DiskSteps(folder / _DISK_FOLDERS[name], kept["shape"], dtype_from_name(kept["dtype"]))
            _check_steps(folder, name, tensors[name], kept)
        steps = meta["num_inference_steps"]
        shape = tensors["latents"].shape
        if shape[0] != steps + 1 or tensors["token_maps"].shape[0] != steps or \
                tensors["token_maps"].shape[1] != shape[1]:
            raise _damaged(folder, f"{steps} steps need {steps + 1} latent steps and {steps} map steps, it has "
                                   f"{shape[0]} and {tensors['token_maps'].shape[0]}")
        frames = tensors.get("frames")
        if frames is not None and (frames.dim() != 4 or frames.shape[0] != shape[1]):
            raise _damaged(folder, f"its source frames {tuple(frames.shape)} do not match {shape[1]} latent frames")
        return cls(meta["source_prompt"], steps, tensors["latents"], tensors["token_maps"], attention, store, frames,
                   meta.get("model"), meta.get("video"))


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _damaged(folder: Path, what: str) -> InputError:
    return InputError(f"inversion {folder} is damaged: {what}; run `fatezero-fast invert` again")


def _read_meta(folder: Path) -> dict:
    """inversion.json, checked for its keys."""
    try:
        meta = json.loads((folder / "inversion.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as exc:
        raise _damaged(folder, f"inversion.json is not valid JSON ({_first_line(exc)})") from None
    required = {"source_prompt": str, "num_inference_steps": int, "attention": dict, "latents": dict,
                "token_maps": dict}
    for key, kind in required.items():
        if not isinstance(meta.get(key), kind):
            raise _damaged(folder, f"inversion.json lacks {key!r}")
    if meta["num_inference_steps"] < 1:
        raise _damaged(folder, f"num_inference_steps is {meta['num_inference_steps']}")
    return meta


def _check_files(folder: Path, meta: dict) -> None:
    """Every file inversion.json lists exists with the size it was written with (a truncated or deleted
    one is found before anything is read); the per-step folders name their missing steps."""
    for name in ("latents", "token_maps"):
        kept = meta[name]
        if kept.get("placement") == "disk":
            try:
                DiskSteps(folder / _DISK_FOLDERS[name], kept["shape"], dtype_from_name(kept["dtype"])).check()
            except (InputError, KeyError, TypeError) as exc:
                raise _damaged(folder, str(exc)) from None
    for name, size in (meta.get("files") or {}).items():
        path = folder / name
        if not path.is_file():
            raise _damaged(folder, f"{name} is missing")
        if path.stat().st_size != size:
            raise _damaged(folder, f"{name} has {path.stat().st_size} bytes, {size} were written")


def _check_steps(folder: Path, name: str, value, kept: dict) -> None:
    """A latents or token-maps entry has the shape and dtype inversion.json records."""
    if not isinstance(value, (torch.Tensor, DiskSteps)):
        raise _damaged(folder, f"it has no {name}")
    if list(value.shape) != list(kept.get("shape", [])) or DTYPE_NAMES.get(value.dtype) != kept.get("dtype"):
        raise _damaged(folder, f"its {name} are {list(value.shape)} {DTYPE_NAMES.get(value.dtype)}, "
                               f"inversion.json says {kept.get('shape')} {kept.get('dtype')}")
