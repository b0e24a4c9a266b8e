"""The recompute store's source branch runs only where and when the fusion reads it, exactly.

The tiny model has SD's block structure; on 16x16 latents its levels have 256, 64, 16 and 4 query
tokens. With max_control_tokens=16 the source branch is needed up to up_blocks[1] and leaves the
batch before up_blocks[2]; with 4 only the mid block is controlled and it leaves before
up_blocks[0], so that the edit's mask-level maps (16 tokens, up_blocks[1]) are captured after it
left. Float64 runs compare against the qk store, which never has a source branch, at 1e-12.
"""
import pytest
import torch

from fatezero_fast.edit.pipeline import FateZeroPipeline
from fatezero_fast.models import random_components
from fatezero_fast.unet.chunks import ClipActivation
from fatezero_fast.unet.levels import up_block_tokens
from fatezero_fast.unet.processors import FateZeroState, VideoAttentionConfig
from fatezero_fast.unet.source_exit import source_exit_block

SOURCE, TARGET = "a red car driving down a road", "a blue car driving down a road"
FRAMES, STEPS = 3, 4
# the source is fused at steps 0 and 1 only (cross alphas and the self window end at 0.5 T)
EDIT = dict(cross_replace_steps=0.5, self_replace_steps=0.5, blend_words=[["car"], ["car"]],
            blend_self_attention=True, blend_latents=True, blend_th=(0.97, 0.97), is_replace_controller=True)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def calls(branches_per_call, chunk):
    """Rows a module sees, call by call: all frames of every branch, or chunk frames at a time."""
    sizes = [FRAMES] if chunk is None else [min(chunk, FRAMES - a) for a in range(0, FRAMES, chunk)]
    return [b * n for b in branches_per_call for n in sizes]


@pytest.fixture(scope="module")
def unet():
    return random_components("tiny", seed=0)["unet"]


@pytest.mark.parametrize("latent,tokens", [((64, 64), [64, 256, 1024, 4096]),
                                           ((72, 128), [144, 576, 2304, 9216]),  # 1024x576
                                           ((8, 5), [1, 4, 12, 40])])             # levels round up
def test_up_block_tokens(unet, latent, tokens):
    assert up_block_tokens(unet, latent) == tokens


@pytest.mark.parametrize("latent,max_tokens,block", [((64, 64), 1024, 3), ((72, 128), 1024, 2),
                                                     ((64, 64), 4096, None), ((16, 16), 4, 0)])
def test_source_exit_block(unet, latent, max_tokens, block):
    state = FateZeroState(VideoAttentionConfig(max_control_tokens=max_tokens))
    state.begin_call("edit", FRAMES, latent)
    assert source_exit_block(unet, state) == block


@pytest.mark.parametrize("max_tokens,exit_block", [(16, 2), (4, 0)])
@pytest.mark.parametrize("chunk", [None, 2])
def test_recompute_with_early_exit_equals_stored_source_in_float64(max_tokens, exit_block, chunk, monkeypatch):
    compacted = []  # chunked: skips read only after the source left, kept without its rows (branches kept)
    compact = ClipActivation.compact_without_first_branch

    def recording(clip):
        out = compact(clip)
        compacted.append(out.data.shape[1])
        return out

    monkeypatch.setattr(ClipActivation, "compact_without_first_branch", recording)
    config = VideoAttentionConfig(backend="reference", max_control_tokens=max_tokens)
    pipe = FateZeroPipeline.tiny_random(seed=0, device="cpu", dtype=torch.float64, attention=config)
    latents = torch.randn(FRAMES, 4, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    results = {}
    for form in ("qk", "recompute"):
        inversion = pipe.invert(None, SOURCE, STEPS, latents=latents, store=form, progress=False, chunk_size=chunk)
        # batch rows entering the first and the exit level, per module call (per chunk when chunked)
        rows = {"conv_in": [], f"up_blocks.{exit_block}.resnets.0.conv1": []}
        hooks = [pipe.unet.get_submodule(name).register_forward_pre_hook(
            lambda module, args, seen=seen: seen.append(args[0].shape[0])) for name, seen in rows.items()]
        try:
            results[form] = pipe.edit(inversion, TARGET, decode=False, progress=False, chunk_size=chunk, **EDIT)
        finally:
            for hook in hooks:
                hook.remove()
        entering, exiting = rows.values()
        fused = form == "recompute"  # the source branch is in the batch at the fused steps 0 and 1
        if chunk is None:  # one call a step: [source, uncond, target], then [uncond, target]
            assert entering == calls([3, 3, 2, 2] if fused else [2] * STEPS, chunk)
            assert exiting == calls([2] * STEPS, chunk)  # the source has left by then
        else:  # chunked: [uncond] in a pass of its own, then [source, target] or [target]
            assert entering == calls([1, 2, 1, 2, 1, 1, 1, 1] if fused else [1] * 2 * STEPS, chunk)
            assert exiting == calls([1] * 2 * STEPS, chunk)
    # with the source at steps 0 and 1: the skips of the up blocks from exit_block on, but the one
    # that feeds the next block (the last skip when every skip is late), each in one branch, target's
    late = {2: 6, 0: 11}[exit_block]
    assert compacted == ([] if chunk is None else [1] * late * 2)
    masks = results["qk"].masks
    assert 0 < masks["self_attention"].mean() < 1 and 0 < masks["latents"].mean() < 1  # mixed masks
    for name in masks:
        assert torch.equal(masks[name], results["recompute"].masks[name])
    assert rel_err(results["recompute"].latents, results["qk"].latents) < 1e-12
