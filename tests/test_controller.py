"""FateZeroController drives a hand-written diffusers loop to exactly the pipeline's edit.

The loop below is what a port of FateZero to current diffusers has: its own DDIM inversion and
classifier-free editing loop over a stock UNet2DConditionModel. In float64 (reference attention)
it must give the pipeline's final latents and masks to rounding, for a stored form (batch
[uncond, target]) and for recompute (the source branch first at the steps that fuse it).
"""
import copy

import pytest
import torch

from fatezero_fast.edit.controller import FateZeroController
from fatezero_fast.edit.pipeline import FateZeroPipeline
from fatezero_fast.errors import InputError
from fatezero_fast.models import random_components
from fatezero_fast.semantics.ddim import ddim_inversion_step
from fatezero_fast.unet.processors import VideoAttentionConfig

SOURCE, TARGET = "a red car driving down a road", "a blue car driving down a road"
FRAMES, STEPS, GUIDANCE = 3, 4, 7.5
OPTIONS = dict(cross_replace_steps=0.5, self_replace_steps=0.5, blend_words=[["car"], ["car"]],
               blend_self_attention=True, blend_latents=True, blend_th=(0.97, 0.97), is_replace_controller=True)
INDEX = [-1, "first"]


@pytest.fixture(scope="module")
def components():
    parts = random_components("tiny", seed=0)
    for name in ("unet", "text_encoder", "vae"):
        parts[name] = parts[name].double()
    return parts


@pytest.fixture(scope="module")
def latents():
    return torch.randn(FRAMES, 4, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def own_loop(parts, latents, store):
    """A user's FateZero loop on a stock UNet, with the controller around each UNet call."""
    unet, tokenizer, scheduler = parts["unet"], parts["tokenizer"], copy.deepcopy(parts["scheduler"])
    ctl = FateZeroController(unet, tokenizer, SOURCE, STEPS, SparseCausalAttention_index=INDEX, store=store,
                             backend="reference")

    def embed(prompt):
        ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return parts["text_encoder"](ids)[0].expand(FRAMES, -1, -1)

    source, uncond, target = embed(SOURCE), embed(""), embed(TARGET)
    scheduler.set_timesteps(STEPS)
    z, inverted = latents, [latents]
    for i, t in enumerate(reversed(scheduler.timesteps)):
        with ctl.inversion_step(i, z):
            eps = unet(z, t, encoder_hidden_states=source).sample
        z = ddim_inversion_step(eps, t, z, scheduler.alphas_cumprod, scheduler.final_alpha_cumprod,
                                scheduler.config.num_train_timesteps, STEPS)
        inverted.append(z)
    ctl.set_edit(TARGET, **OPTIONS)
    masks_seen = []
    for j, t in enumerate(scheduler.timesteps):
        branches, context = [z, z], [uncond, target]
        if ctl.uses_source(j):
            branches, context = [inverted[STEPS - 1 - j]] + branches, [source] + context
        with ctl.edit_step(j, z):
            eps = unet(torch.cat(branches), t, encoder_hidden_states=torch.cat(context)).sample
        eps_uncond, eps_target = eps[-2 * FRAMES:-FRAMES], eps[-FRAMES:]
        z = scheduler.step(eps_uncond + GUIDANCE * (eps_target - eps_uncond), t, z).prev_sample
        blended = ctl.blend_latents(j, z, inverted[STEPS - j])
        masks_seen.append(not torch.equal(blended, z))
        z = blended
    return z, masks_seen


@pytest.mark.parametrize("store", ["qk", "recompute"])
def test_own_loop_equals_the_pipeline_in_float64(components, latents, store):
    pipe = FateZeroPipeline(**copy.deepcopy(components), device="cpu", dtype=torch.float64,
                            attention=VideoAttentionConfig(sparse_causal_index=INDEX, backend="reference"))
    inversion = pipe.invert(None, SOURCE, STEPS, latents=latents, store=store, progress=False)
    expected = pipe.edit(inversion, TARGET, decode=False, progress=False, guidance_scale=GUIDANCE, **OPTIONS)
    assert 0 < expected.masks["latents"].mean() < 1 and 0 < expected.masks["self_attention"].mean() < 1

    z, blended_at = own_loop(copy.deepcopy(components), latents, store)
    assert blended_at == [True, True, False, False]  # the latent blend window of 4 steps: edit steps 0 and 1
    assert ((z - expected.latents).abs().max() / expected.latents.abs().max()).item() < 1e-12


def test_steps_out_of_order_are_refused(components, latents):
    ctl = FateZeroController(copy.deepcopy(components["unet"]), components["tokenizer"], SOURCE, STEPS)
    with pytest.raises(InputError, match="inversion steps"):
        ctl.set_edit(TARGET)
    with pytest.raises(InputError, match="set_edit"):
        ctl.uses_source(0)
    with pytest.raises(InputError, match="outside"):
        with ctl.inversion_step(STEPS, latents):
            pass
    with pytest.raises(InputError, match="positive"):
        FateZeroController(components["unet"], components["tokenizer"], SOURCE, 0)
