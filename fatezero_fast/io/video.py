"""Video input/output: load clips as tensors, save results, and make a built-in sample clip.

Frames travel through the pipeline as float32 tensors of shape (F, 3, H, W) in [-1, 1].
Every bad-input case raises :class:`fatezero_fast.errors.InputError` with a one-line message.
"""
from __future__ import annotations

import math
import os
from contextlib import closing
from pathlib import Path
from typing import Iterator, Mapping

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov")
GIF_EXTENSIONS = (".gif",)
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg")
OFFSET_KEYS = ("left", "right", "top", "bottom")
MIN_MASK_SIDE = 64
INPUT_HINT = "give an existing .mp4/.gif/.webm/.mov file, a PNG/JPG image or a folder of PNG/JPG frames"
DEFAULT_FRAMES = 8  # frames taken when n_sample_frame is None (fewer when the clip has fewer)


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------
def load_video(
    path: str | os.PathLike,
    *,
    n_sample_frame: int | None = None,
    sampling_rate: int = 1,
    start_sample_frame: int = 0,
    offset: Mapping[str, int] | None = None,
    width: int = 512,
    height: int = 512,
) -> torch.Tensor:
    """Load a clip as a float32 tensor of shape (F, 3, height, width) in [-1, 1].

    ``path`` is a video file (.mp4/.gif/.webm/.mov), one .png/.jpg/.jpeg image (a one-frame clip)
    or a folder of such frames (sorted by file name, other files ignored). Frame
    ``start_sample_frame + i * sampling_rate`` is taken for ``i in range(n_sample_frame)``; -1
    takes all frames from the start with that rate, None what the clip has up to DEFAULT_FRAMES.
    Each frame is cropped by ``offset`` (left/right/top/bottom pixels, clipped like the official
    FateZero code), scaled so it covers width x height (bilinear, antialiased) and center-cropped
    to exactly height x width.
    """
    check_size(width, height)
    crop = _check_offset(offset)
    check_frames(n_sample_frame)
    if sampling_rate < 1:
        raise InputError(f"--sampling-rate {sampling_rate} must be at least 1: use e.g. 1")
    if start_sample_frame < 0:
        raise InputError(f"--start-frame {start_sample_frame} is negative: use 0 or more")

    path = Path(path)
    frame_source = _open_frames(path)
    try:
        with closing(frame_source):
            frames = _select_frames(frame_source, path, n_sample_frame, sampling_rate, start_sample_frame)
    except InputError:
        raise
    except Exception as exc:  # imageio/ffmpeg/pillow raise many types for a broken file
        raise InputError(f"cannot read video {path}: {_first_line(exc)} ({INPUT_HINT})") from exc

    video = torch.from_numpy(np.stack([_crop(frame, crop) for frame in frames]))
    video = video.permute(0, 3, 1, 2).float()
    video = _cover_and_center_crop(video, width, height)
    return (video / 127.5 - 1.0).clamp(-1.0, 1.0).contiguous()


def check_fps(fps) -> None:
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise InputError(f"--fps must be positive, got {fps}")


def check_frames(n_sample_frame: int | None) -> None:
    """Raise InputError unless the number of frames is None, -1 or at least 1."""
    if n_sample_frame is not None and (not isinstance(n_sample_frame, int) or n_sample_frame == 0
                                       or n_sample_frame < -1):
        raise InputError(f"--frames {n_sample_frame} must be a positive number of frames, or -1 for all frames")


def check_size(width: int, height: int) -> None:
    """Raise InputError unless width and height are positive multiples of 8."""
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value <= 0:
            raise InputError(f"{name} {value} must be a positive multiple of 8: use e.g. 512")
        if value % 8:
            lower, upper = value // 8 * 8, value // 8 * 8 + 8
            suggestion = f"{lower} or {upper}" if lower else f"{upper}"
            raise InputError(f"{name} {value} is not a multiple of 8: use e.g. {suggestion}")


def _check_offset(offset: Mapping[str, int] | None) -> dict[str, int]:
    """Validate an offset dict and fill missing sides with 0."""
    offset = dict(offset or {})
    unknown = sorted(set(offset) - set(OFFSET_KEYS))
    if unknown:
        raise InputError(f"unknown offset key(s) {', '.join(unknown)}: use only left, right, top, bottom")
    for key, value in offset.items():
        if not isinstance(value, int) or value < 0:
            raise InputError(f"offset {key}={value!r} is not a non-negative integer: use e.g. {key}=0")
    return {key: offset.get(key, 0) for key in OFFSET_KEYS}


def _open_frames(path: Path) -> Iterator[np.ndarray]:
    """Return an iterator of (H, W, 3) uint8 frames for a video file or a frame folder."""
    if not path.exists():
        raise InputError(f"video not found: {path} ({INPUT_HINT})")
    if path.is_dir():
        return _iter_folder(path)
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return iio.imiter(path, plugin="FFMPEG")
    if suffix in GIF_EXTENSIONS:
        return iio.imiter(path, plugin="pillow", mode="RGB")
    if suffix in FRAME_EXTENSIONS:  # one image: an image edit
        return (_read_image(file) for file in [path])
    raise InputError(f"unsupported video format '{suffix or path.name}': {path} ({INPUT_HINT})")


def _iter_folder(folder: Path) -> Iterator[np.ndarray]:
    """Yield the frames of a folder in file-name order, after checking they share one size."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_EXTENSIONS)
    if not files:
        raise InputError(f"no PNG/JPG frames in folder {folder} ({INPUT_HINT})")
    sizes = {}
    for file in files:
        try:
            with Image.open(file) as image:  # reads the header only
                sizes[file] = image.size
        except Exception as exc:
            raise InputError(f"cannot read frame {file}: {_first_line(exc)} (replace or remove it)") from exc
        if sizes[file] != sizes[files[0]]:
            (w0, h0), (w1, h1) = sizes[files[0]], sizes[file]
            raise InputError(
                f"frames differ in size: {files[0].name} is {w0}x{h0} but {file.name} is {w1}x{h1}"
                f" in {folder} (give frames that all have the same size)"
            )
    return (_read_image(file) for file in files)


def _read_image(file: Path) -> np.ndarray:
    """Read one image file as an (H, W, 3) uint8 array."""
    with Image.open(file) as image:
        return np.asarray(image.convert("RGB"))


def _select_frames(
    frames: Iterator[np.ndarray], path: Path, n_sample_frame: int | None, sampling_rate: int, start: int
) -> list[np.ndarray]:
    """Keep frames start, start + rate, ...; stop early once n_sample_frame are taken."""
    up_to = n_sample_frame is None
    n_sample_frame = DEFAULT_FRAMES if up_to else n_sample_frame
    picked = []
    total = 0
    for index, frame in enumerate(frames):
        total = index + 1
        if index >= start and (index - start) % sampling_rate == 0:
            picked.append(frame)
            if len(picked) == n_sample_frame:
                return picked
    if (n_sample_frame < 0 or up_to) and picked:
        return picked
    needed = start + (max(n_sample_frame, 1) - 1) * sampling_rate + 1
    raise InputError(
        f"video {path} has {total} frames but {needed} are needed (--start-frame {start},"
        f" --frames {n_sample_frame}, --sampling-rate {sampling_rate}):"
        " lower --frames, --sampling-rate or --start-frame, or use a longer video"
    )


def _crop(frame: np.ndarray, offset: dict[str, int]) -> np.ndarray:
    """Crop an (H, W, C) frame by offset pixels, clipped like the official FateZero code."""
    h, w = frame.shape[:2]
    left = min(offset["left"], w - 1)
    right = min(offset["right"], w - left - 1)
    top = min(offset["top"], h - 1)
    bottom = min(offset["bottom"], h - top - 1)
    return frame[top : h - bottom, left : w - right]


def _cover_and_center_crop(video: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Scale (F, C, h, w) so it covers height x width, then center-crop to exactly that size."""
    h, w = video.shape[-2:]
    scale = max(width / w, height / h)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        video = F.interpolate(video, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return video[..., top : top + height, left : left + width]


def _first_line(exc: Exception) -> str:
    """The first non-empty line of an exception message (or its type name)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# ----------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------
def save_video(frames: torch.Tensor | np.ndarray, path: str | os.PathLike, fps: int = 8) -> Path:
    """Write frames to an .mp4 (libx264, yuv420p) or a looping .gif, chosen by extension.

    ``frames`` is a (F, 3, H, W) tensor in [-1, 1] or a uint8 (F, H, W, 3) array. The GIF
    encoder merges identical consecutive frames into one longer frame (same playback).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise InputError(f"cannot save video as '{suffix or path.name}': {path} (use a .mp4 or .gif file name)")
    check_fps(fps)
    check_writable(path)
    images = to_uint8(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if suffix == ".mp4":
            iio.imwrite(
                path, images, plugin="FFMPEG", fps=fps, codec="libx264",
                pixelformat="yuv420p", macro_block_size=2, quality=8,
            )
        else:
            iio.imwrite(path, images, plugin="pillow", duration=round(1000 / fps), loop=0)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {_first_line(exc)} (choose another --output)") from exc
    return path


def save_frames(frames: torch.Tensor | np.ndarray, folder: str | os.PathLike) -> list[Path]:
    """Write one PNG per frame into folder: 0000.png, 0001.png, ..."""
    folder = Path(folder)
    check_writable(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(to_uint8(frames)):
        paths.append(folder / f"{index:04d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def save_masks(masks: torch.Tensor | np.ndarray, path: str | os.PathLike) -> Path:
    """Write blend masks in [0, 1] as one grayscale PNG: a row per step, a column per frame.

    ``masks`` is (F, h, w) (one row) or (steps, F, h, w); small masks are nearest-upscaled so
    the short side of each is at least 64 pixels, and a 2-pixel gray line separates them.
    """
    masks = torch.as_tensor(masks).detach().float().cpu()
    if masks.dim() == 3:
        masks = masks[None]
    if masks.dim() != 4:
        raise InputError(f"masks have shape {tuple(masks.shape)}: expected (F, h, w) or (steps, F, h, w)")
    path = Path(path)
    check_writable(path)
    factor = math.ceil(MIN_MASK_SIDE / min(masks.shape[-2:]))
    cells = (masks.clamp(0, 1) * 255).round().to(torch.uint8)
    cells = cells.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    cells = F.pad(cells, (0, 2, 0, 2), value=128)  # a gray line right of and below each mask
    steps, frames, h, w = cells.shape
    grid = cells.permute(0, 2, 1, 3).reshape(steps * h, frames * w)[:-2, :-2]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.numpy(), mode="L").save(path)
    return path


def side_by_side(source: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """Put source and edited clips (F, 3, H, W) next to each other: (F, 3, H, 2W)."""
    if source.shape != edited.shape:
        raise InputError(
            f"source {tuple(source.shape)} and edit {tuple(edited.shape)} differ in shape: give equal-size clips"
        )
    return torch.cat([source, edited.to(source)], dim=-1)


def to_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """Convert a (F, 3, H, W) tensor in [-1, 1] to a uint8 (F, H, W, 3) array (uint8 arrays pass)."""
    if isinstance(frames, np.ndarray) and frames.dtype == np.uint8:
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise InputError(f"uint8 frames have shape {frames.shape}: expected (F, H, W, 3)")
        return frames
    frames = torch.as_tensor(frames).detach().float().cpu()
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise InputError(f"frames have shape {tuple(frames.shape)}: expected (F, 3, H, W) in [-1, 1]")
    images = ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def check_writable(path: str | os.PathLike) -> None:
    """Raise InputError unless path (a folder to create, or a file) can be written.

    Walks up to the nearest existing ancestor: it must be a writable folder (or, when path
    itself exists, path must be writable).
    """
    path = Path(path).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise InputError(f"output path {path} is not writable ({existing} is a file): choose another --output")
    if not os.access(existing, os.W_OK):
        raise InputError(f"output path {existing} is not writable: choose another --output")


# ----------------------------------------------------------------------------------------
# Built-in sample clip
# ----------------------------------------------------------------------------------------
def make_sample_clip(num_frames: int = 8, width: int = 512, height: int = 512) -> torch.Tensor:
    """A deterministic procedural clip (F, 3, height, width) in [-1, 1]: a red car drives right.

    The scene has a sky gradient with a sun, green grass, a gray road with dashed lane
    markings, and a car (body, cabin with windows, two wheels with hubs) that moves from the
    left to the right over the frames. No randomness and no files are involved.
    """
    if not isinstance(num_frames, int) or num_frames < 1:
        raise InputError(f"num_frames {num_frames} must be a positive integer: use e.g. 8")
    check_size(width, height)
    # Coordinates in units of the frame height (y down, 0..1) so the scene scales with size.
    y = ((torch.arange(height, dtype=torch.float32) + 0.5) / height)[:, None].expand(height, width)
    x = ((torch.arange(width, dtype=torch.float32) + 0.5) / height)[None, :].expand(height, width)
    aspect = width / height

    def color(r: int, g: int, b: int) -> torch.Tensor:
        return torch.tensor([r, g, b], dtype=torch.float32)[:, None, None] / 255

    def paint(image: torch.Tensor, mask: torch.Tensor, rgb: torch.Tensor) -> None:
        image[:] = torch.where(mask, rgb, image)

    def box(x0: float, x1: float, y0: float, y1: float) -> torch.Tensor:
        return (x >= x0) & (x < x1) & (y >= y0) & (y < y1)

    def disc(cx: float, cy: float, r: float) -> torch.Tensor:
        return (x - cx) ** 2 + (y - cy) ** 2 < r**2

    horizon, road_top, road_bottom = 0.55, 0.62, 0.92
    background = color(70, 130, 210) + (color(200, 225, 245) - color(70, 130, 210)) * (y / horizon)
    paint(background, disc(0.8 * aspect, 0.15, 0.07), color(255, 220, 90))
    paint(background, y >= horizon, color(80, 150, 70))
    paint(background, box(0, aspect, road_top, road_bottom), color(90, 90, 95))
    dash = (torch.remainder(x, 0.25) < 0.14) & box(0, aspect, 0.765, 0.78)
    paint(background, dash, color(240, 240, 240))

    car_length, ground = 0.36, 0.80
    frames = []
    for index in range(num_frames):
        image = background.clone()
        progress = index / max(num_frames - 1, 1)
        left = 0.05 * aspect + progress * (0.9 * aspect - car_length)
        right = left + car_length
        paint(image, box(left, right, ground - 0.14, ground - 0.04), color(200, 30, 40))  # body
        paint(image, box(left + 0.08, right - 0.08, ground - 0.22, ground - 0.14), color(200, 30, 40))  # cabin
        paint(image, box(left + 0.1, left + 0.17, ground - 0.2, ground - 0.14), color(170, 215, 240))  # windows
        paint(image, box(left + 0.19, right - 0.1, ground - 0.2, ground - 0.14), color(170, 215, 240))
        paint(image, box(right - 0.03, right, ground - 0.12, ground - 0.09), color(255, 240, 150))  # headlight
        for wheel_x in (left + 0.08, right - 0.08):
            paint(image, disc(wheel_x, ground - 0.04, 0.045), color(25, 25, 25))
            paint(image, disc(wheel_x, ground - 0.04, 0.018), color(180, 180, 185))
        frames.append(image)
    return torch.stack(frames) * 2 - 1
