"""A saved DDIM inversion: the latents of every step, the mask-level source maps, the store.

One inversion serves any number of edits (docs/semantics.md §2, §4). `Inversion.save` writes a
folder (inversion.json + inversion.pt, and latents/ and store/ for what is kept on disk) that
`Inversion.load` reads back.
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
    tensor, or a fatezero_fast.latents.DiskSteps (one file per step) read a step at a time;
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
        meta = dict(source_prompt=self.source_prompt, num_inference_steps=self.num_inference_steps,
                    attention=asdict(self.attention), model=self.model, **kept, format=1)
        (folder / "inversion.json").write_text(json.dumps(meta, indent=2))
        in_file = {name: None if kept[name]["placement"] == "disk" else getattr(self, name) for name in kept}
        torch.save({**in_file, "frames": self.frames, "store": self.store.state_dict()}, folder / "inversion.pt")
        if self.store.placement == "disk" and self.store.folder.resolve() != (folder / "store").resolve():
            shutil.copytree(self.store.folder, folder / "store", dirs_exist_ok=True)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "Inversion":
        folder = Path(folder)
        if not (folder / "inversion.json").is_file() or not (folder / "inversion.pt").is_file():
            raise InputError(f"{folder} is not a saved inversion (no inversion.json/inversion.pt): "
                             f"create one with `fatezero-fast invert`")
        meta = json.loads((folder / "inversion.json").read_text())
        tensors = torch.load(folder / "inversion.pt", map_location="cpu")
        saved = tensors["store"]
        store = make_store(saved["form"], placement=saved["placement"], folder=folder / "store")
        store.load_state_dict(saved)
        for name in ("latents", "token_maps"):
            kept = meta.get(name, {})
            if kept.get("placement") == "disk":
                tensors[name] = DiskSteps(folder / _DISK_FOLDERS[name], kept["shape"],
                                          dtype_from_name(kept["dtype"])).check()
        return cls(meta["source_prompt"], meta["num_inference_steps"], tensors["latents"], tensors["token_maps"],
                   VideoAttentionConfig(**meta["attention"]), store, tensors.get("frames"), meta.get("model"))
