"""Shared session fixtures: a saved random tiny model, a tiny clip of PNG frames, a tiny pipeline.

All of them are small enough for the CPU: the tiny model's VAE downsamples by 8, so the 64x64
clip gives 8x8 latents.
"""
import json
import os
import time

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


# benchmarks/gpu_check.sh runs the GPU tests inside a fixed time: FATEZERO_FAST_TEST_BUDGET=S skips the
# tests still to run once S seconds have passed (the session then ends and reports, instead of being
# killed), and FATEZERO_FAST_TEST_REPORT=PATH writes each test's outcome and duration as JSON, rewritten
# after every test so that a run cut short keeps what it ran.
_BUDGET = float(os.environ.get("FATEZERO_FAST_TEST_BUDGET") or 0)
_REPORT = os.environ.get("FATEZERO_FAST_TEST_REPORT")
_session = {"start": time.monotonic(), "tests": []}


def pytest_sessionstart(session):
    _session["start"] = time.monotonic()


def pytest_runtest_setup(item):
    spent = time.monotonic() - _session["start"]
    if _BUDGET and spent > _BUDGET:
        pytest.skip(f"time budget spent ({spent:.0f} s > FATEZERO_FAST_TEST_BUDGET={_BUDGET:g} s)")


def pytest_runtest_logreport(report):
    if not _REPORT or not (report.when == "call" or report.outcome != "passed"):
        return
    message = None
    if report.failed:
        message = str(report.longrepr).strip().splitlines()[-1][:500]
    elif report.skipped and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])[:300]
    _session["tests"].append({"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                              "seconds": round(report.duration, 3), "message": message})
    counts = {}
    for t in _session["tests"]:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    with open(_REPORT, "w") as f:
        json.dump({"counts": counts, "elapsed_s": round(time.monotonic() - _session["start"], 1),
                   "budget_s": _BUDGET or None, "tests": _session["tests"]}, f, indent=1)
