"""Shared session fixtures: a saved random tiny model, a tiny clip of PNG frames, a tiny pipeline.

All of them are small enough for the CPU: the tiny model's VAE downsamples by 8, so the 64x64
clip gives 8x8 latents.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in its interpreter on the CPU; the flag must be set before they are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
# the test tensors are tiny: one thread is several times faster than two threads waiting on each other
torch.set_num_threads(1)

CLIP_FRAMES = 3
CLIP_SIZE = 64  # width = height, a multiple of 8


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A diffusers-format folder (vae, text_encoder, tokenizer, unet, scheduler) with random weights."""
    from fatezero_fast.models import save_random_model

    return save_random_model(tmp_path_factory.mktemp("model") / "tiny-sd", "tiny", seed=0)


@pytest.fixture(scope="session")
def clip():
    """The built-in car clip, (CLIP_FRAMES, 3, CLIP_SIZE, CLIP_SIZE) in [-1, 1]."""
    from fatezero_fast.io.video import make_sample_clip

    return make_sample_clip(CLIP_FRAMES, CLIP_SIZE, CLIP_SIZE)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory, clip):
    """A folder of CLIP_FRAMES PNG frames (0000.png, ...) of the built-in car clip, CLIP_SIZE square."""
    from fatezero_fast.io.video import save_frames

    folder = tmp_path_factory.mktemp("clip") / "car"
    save_frames(clip, folder)
    return folder


@pytest.fixture(scope="session")
def tiny_pipeline():
    """The built-in random tiny FateZeroPipeline on the CPU (fp32)."""
    from fatezero_fast.edit.pipeline import FateZeroPipeline

    return FateZeroPipeline.tiny_random(seed=0, device="cpu", dtype="fp32")
