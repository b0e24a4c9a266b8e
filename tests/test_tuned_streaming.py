"""Chunked (layer-major) runs of tuned video models equal unchunked ones (float64, to 1e-12).

Temporal attention runs over blocks of token positions with all frames; the temporal conv reads
each chunk with a halo of its reach (1 frame for a full conv, 2 for a LoRA pair's two k=3 convs).
Chunks of 1, 2, 3 and 4 frames of a 5-frame clip (2, 3 and 4 do not divide it).
"""
from __future__ import annotations

import pytest
import torch

from fatezero_fast.edit.pipeline import FateZeroPipeline
from fatezero_fast.models.tuned import random_tuned_components
from fatezero_fast.unet.processors import VideoAttentionConfig, install
from fatezero_fast.unet.runner import streaming_unet

FRAMES = 5
MODELS = {"fatezero-lora": {"fmt": "fatezero", "conv": "lora", "lora": 8},
          "fatezero-full": {"fmt": "fatezero", "conv": "full"},
          "tuneavideo": {"fmt": "tuneavideo"}}


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def unets():
    return {name: random_tuned_components(kind="tiny", seed=5, **kw)["unet"].double() for name, kw in MODELS.items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_one_unet_call_equals_unchunked(unets, name):
    unet = unets[name]
    state = install(unet, VideoAttentionConfig(sparse_causal_index=["first", -1], backend="reference"))
    g = torch.Generator().manual_seed(2)
    sample = torch.randn(2 * FRAMES, 4, 8, 8, generator=g, dtype=torch.float64)
    context = torch.randn(2, 77, 32, generator=g, dtype=torch.float64).repeat_interleave(FRAMES, 0)
    state.begin_call("plain", FRAMES, (8, 8))
    with torch.no_grad():
        expected = unet(sample, 400, encoder_hidden_states=context).sample
    for chunk in (1, 2, 3, 4):
        state.begin_call("plain", FRAMES, (8, 8))
        out = streaming_unet(unet, sample, 400, context, num_frames=FRAMES, chunk_size=chunk, state=state)
        assert rel(out, expected) < 1e-12, chunk


@pytest.mark.parametrize("form,index", [("recompute", [-1, "first"]), ("qk", ["mid"])])
def test_invert_and_edit_equal_unchunked(form, index):
    parts = random_tuned_components("fatezero", "tiny", conv="lora", lora=8, seed=5)
    pipe = FateZeroPipeline(**parts, device="cpu", dtype=torch.float64,
                            attention=VideoAttentionConfig(sparse_causal_index=index, backend="reference"))
    latents = torch.randn(FRAMES, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    results = []
    for chunk in (None, 2):
        inversion = pipe.invert(latents=latents, source_prompt="a silver jeep", num_inference_steps=2,
                                store=form, progress=False, chunk_size=chunk)
        edit = pipe.edit(inversion, "a red car", progress=False, decode=False, chunk_size=chunk,
                         blend_words=[["jeep"], ["car"]], blend_self_attention=True, self_replace_steps=1.0)
        results.append((inversion.latents, edit.latents))
    assert rel(results[1][0], results[0][0]) < 1e-12
    assert rel(results[1][1], results[0][1]) < 1e-12


def test_controller_on_a_tuned_model_equals_the_pipeline():
    """FateZeroController around a user's own loop on a UNet with temporal modules (the drop-in path)."""
    import copy

    from test_controller import (
        GUIDANCE,
        INDEX,
        OPTIONS,
        SOURCE,
        STEPS,
        TARGET,
        own_loop,
    )

    parts = random_tuned_components("fatezero", "tiny", conv="lora", lora=8, seed=5)
    for name in ("unet", "text_encoder", "vae"):
        parts[name] = parts[name].double()
    latents = torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pipe = FateZeroPipeline(**copy.deepcopy(parts), device="cpu", dtype=torch.float64,
                            attention=VideoAttentionConfig(sparse_causal_index=INDEX, backend="reference"))
    inversion = pipe.invert(None, SOURCE, STEPS, latents=latents, store="recompute", progress=False)
    expected = pipe.edit(inversion, TARGET, decode=False, progress=False, guidance_scale=GUIDANCE, **OPTIONS)
    z, _ = own_loop(copy.deepcopy(parts), latents, "recompute")
    assert rel(z, expected.latents) < 1e-12
