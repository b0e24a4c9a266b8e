"""The flags of `fatezero-fast edit` and `invert`, each with its help line and default.

Nothing here imports torch, so `--help` and `--version` answer at once.
"""
from __future__ import annotations

import argparse

from ..edit.choices import (
    BACKENDS,
    DTYPE_CHOICES,
    LATENTS_PLACEMENTS,
    STORE_FORMS,
    STORE_PLACEMENTS,
)


def _chunk_size(text: str):
    """--chunk-size: an int (checked positive with the other options) or 'auto'."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of frames or 'auto'") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local diffusers-format Stable Diffusion folder (default: the config's "
                                   "pretrained_model_path, else a built-in random tiny model)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="model dtype (default: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="attention kernel backend (default: auto, the fastest available)")
    p.add_argument("--seed", type=int, default=None, help="seed of the VAE posterior sample (default: 0)")
    p.add_argument("--chunk-size", type=_chunk_size, default=None,
                   help="run the UNet over this many frames at a time (exact; memory then depends on the "
                        "chunk, not the clip length), or 'auto': chosen from the free GPU memory (all at once "
                        "on the CPU) (default: all frames at once)")


def add_video_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video", help="mp4/gif/webm file, a PNG/JPG image (an image edit) or a folder of PNG/JPG "
                                   "frames (default: a built-in sample clip)")
    p.add_argument("--source-prompt", help="prompt describing the input clip (default: the config's)")
    p.add_argument("--frames", type=int, default=None,
                   help="number of frames to take, -1 for all (default: what the clip has, up to 8)")
    p.add_argument("--sampling-rate", type=int, default=None, help="take every N-th frame (default: 1)")
    p.add_argument("--start-frame", type=int, default=None, help="first frame to take (default: 0)")
    p.add_argument("--width", type=int, default=None,
                   help="output width, a multiple of 8 (default: 512, 128 on the built-in model)")
    p.add_argument("--height", type=int, default=None,
                   help="output height, a multiple of 8 (default: 512, 128 on the built-in model)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 50)")
    p.add_argument("--index", nargs="+", default=None,
                   help="sparse-causal frames each frame attends to: ints (relative) or first/last/mid "
                        "(default: -1 first)")
    p.add_argument("--least-sc-channel", type=int, default=None,
                   help="blocks narrower than this use per-frame self-attention (default: none)")
    p.add_argument("--max-control-tokens", type=int, default=None,
                   help="layers with at most this many query tokens are controlled (default: 1024)")


def add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", choices=STORE_FORMS,
                   help="how the source attention is kept: recompute (exact, ~nothing stored), qk, full "
                        "(official fp32 maps), fp16, fp8, lowrank (default: recompute)")
    p.add_argument("--store-placement", choices=STORE_PLACEMENTS,
                   help="where a stored form lives: device, host (pinned, prefetched) or disk (default: host)")
    p.add_argument("--store-rank", type=int, default=None, help="lowrank: rank per map (default: 16)")
    p.add_argument("--store-error", type=float, default=None,
                   help="lowrank: smallest rank with relative error <= this, instead of --store-rank "
                        "(default: unset)")
    p.add_argument("--latents-dtype", choices=DTYPE_CHOICES,
                   help="dtype of the inversion latents kept for the edits; fp16 halves an fp32 model's: "
                        "1.7 GB instead of 3.4 for 1,024 frames at 512x512, 50 steps (default: the model's, exact)")
    p.add_argument("--latents-placement", choices=LATENTS_PLACEMENTS,
                   help="keep the inversion latents and the source token maps of the mask level (4 GB for "
                        "1,024 frames at 512x512, 50 steps) in host memory or on disk, one file per step, read "
                        "back a step at a time while editing (default: host)")


def add_edit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-prompt", action="append",
                   help="target prompt; repeat for several edits (default: the config's editing_prompts)")
    p.add_argument("--cross-replace-steps", type=float, default=0.8,
                   help="fraction of the steps whose cross-attention is fused from the source (default: 0.8)")
    p.add_argument("--self-replace-steps", type=float, default=0.8,
                   help="fraction of the steps whose self-attention is fused from the source (default: 0.8)")
    p.add_argument("--replace", action="store_true",
                   help="word-swap replace instead of refine, for prompts with the same word count (default: refine)")
    p.add_argument("--blend-words", nargs=2, metavar=("SOURCE", "TARGET"),
                   help="comma-separated source and target words whose mask keeps the edit local (default: none)")
    p.add_argument("--blend-th", nargs=2, type=float, default=(0.3, 0.3),
                   help="thresholds in [0, 2] of the self-attention and latent blend masks (default: 0.3 0.3)")
    p.add_argument("--blend-self-attention", action="store_true",
                   help="blend the fused self-attention with the blend-word mask (default: off)")
    p.add_argument("--blend-latents", action="store_true",
                   help="blend the latents with the blend-word mask, for local shape edits (default: off)")
    p.add_argument("--eq", nargs="+", metavar="WORD=VALUE",
                   help="reweight target words, e.g. watercolor=10 (default: none)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the config's, else 7.5)")
    p.add_argument("--fps", type=int, default=8, help="frames per second of the saved videos (default: 8)")
    p.add_argument("--save-latents", action="store_true",
                   help="also write each edit's final latents to edit_NN/latents.pt (default: off)")


def add_output_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("-o", "--output", default=default, help=f"output folder (default: {default})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder once the run has succeeded (default: off)")


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line with exit code 2, like every other bad input."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
