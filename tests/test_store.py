"""Attention stores: exact forms agree, sizes are exact, lossy forms stay within their settings."""
import pytest
import torch

from fatezero_fast.errors import InputError
from fatezero_fast.models import CONFIGS
from fatezero_fast.stores import (
    FORMS,
    estimate_store_bytes,
    make_store,
    official_store_bytes,
)

STEPS = 3
SOURCE, TARGET = "a red car driving down a road", "a blue car driving down a road"
# refine + reweight, no blend mask: every controlled self-attention layer takes the source in full
OPTIONS = dict(cross_replace_steps=0.8, self_replace_steps=1.0, eq_params={"words": ["blue"], "values": [3]})


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def latents():
    return torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def edits(tiny_pipeline, latents):
    """Final edited latents and the inversion for every store form."""
    out = {}
    for form in FORMS:
        inversion = tiny_pipeline.invert(None, SOURCE, STEPS, latents=latents, store=form, progress=False)
        result = tiny_pipeline.edit(inversion, TARGET, decode=False, progress=False, **OPTIONS)
        out[form] = (inversion, result.latents)
    return out


@pytest.mark.parametrize("form", ["recompute", "qk"])
def test_exact_forms_equal_full(edits, form):
    assert rel_err(edits[form][1], edits["full"][1]) <= 1e-5


def test_fusion_changes_the_edit(tiny_pipeline, edits, latents):
    inversion = edits["recompute"][0]
    plain = tiny_pipeline.edit(inversion, TARGET, decode=False, progress=False, cross_replace_steps=0.0,
                               self_replace_steps=0.0).latents
    assert rel_err(plain, edits["recompute"][1]) > 1e-3


@pytest.mark.parametrize("form,bound", [("fp16", 1e-3), ("fp8", 5e-2), ("lowrank", 5e-2)])
def test_lossy_forms_stay_close(edits, form, bound):
    err = rel_err(edits[form][1], edits["full"][1])
    assert 0 < err <= bound, f"{form}: relative error {err:.2e}"


def test_sizes_are_exact_and_ordered(edits):
    sizes = {form: inv.store.nbytes() for form, (inv, _) in edits.items()}
    assert sizes["recompute"] == 0
    assert sizes["full"] > sizes["fp16"] > sizes["fp8"] > 0 and sizes["full"] == 2 * sizes["fp16"]
    assert sizes["qk"] < sizes["full"] / 4
    for form, (inv, _) in edits.items():
        measured = sum(t.numel() * t.element_size() for step in inv.store.steps.values()
                       for kept in step.values() for t in kept)
        assert inv.store.nbytes() == measured == sum(inv.store.breakdown().values())


def test_official_store_size_formula_matches_full(edits):
    inv = edits["full"][0]
    expected = official_store_bytes(dict(CONFIGS["tiny"]["unet"]), 128, 128, frames=inv.num_frames, steps=STEPS,
                                    sparse_causal_index=inv.attention.sparse_causal_index)
    assert inv.store.nbytes() == expected


def test_size_estimates_match_measured_bytes_of_every_form(edits):
    for form, (inv, _) in edits.items():
        expected = estimate_store_bytes(form, dict(CONFIGS["tiny"]["unet"]), 128, 128, frames=inv.num_frames,
                                        steps=STEPS, sparse_causal_index=inv.attention.sparse_causal_index,
                                        model_bytes=4)
        assert inv.store.nbytes() == expected, form


def test_official_store_size_at_sd14_scale():
    sd14 = dict(CONFIGS["sd14"]["unet"])
    # the official code's measured stores (fp16 run, 8 frames, 50 steps): 38.9 GB and 74.5 GB
    assert round(official_store_bytes(sd14, 512, 512, 8, 50, ["mid"], 640, bytes_per_value=2) / 1e9, 1) == 38.9
    assert round(official_store_bytes(sd14, 512, 512, 8, 50, [-1, "first"], bytes_per_value=2) / 1e9, 1) == 74.5


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_lowrank_error_budget_is_respected(tiny_pipeline, latents, chunk_size):
    """Per chunk too: each chunk's maps get the rank they need, the layer keeps the widest."""
    store = make_store("lowrank", error_budget=0.05)
    tiny_pipeline.invert(None, SOURCE, 2, latents=latents, store=store, progress=False, chunk_size=chunk_size)
    assert store.errors and max(store.errors.values()) <= 0.05 + 1e-6


def test_qk_keeps_keys_of_attended_frames_only(latents):
    """['mid']: every query frame attends to frame 1 of 3, so K of one frame is kept per layer and
    step (not 3); the estimate counts that, and edits equal the full maps' and recompute's."""
    from fatezero_fast.edit.pipeline import FateZeroPipeline
    from fatezero_fast.unet.processors import VideoAttentionConfig

    pipe = FateZeroPipeline.tiny_random(seed=0, device="cpu",
                                        attention=VideoAttentionConfig(sparse_causal_index=["mid"]))
    results = {}
    for form in ("qk", "full", "recompute"):
        inversion = pipe.invert(None, SOURCE, STEPS, latents=latents, store=form, progress=False)
        results[form] = (inversion.store, pipe.edit(inversion, TARGET, decode=False, progress=False, **OPTIONS).latents)
    store = results["qk"][0]
    self_layers = [kept for step in store.steps.values() for kept in step.values() if len(kept) == 2]
    assert self_layers and all(q.shape[0] == 3 and k.shape[0] == 1 for q, k in self_layers)
    assert all(torch.equal(frames, torch.tensor([1])) for frames in store.key_frames.values())
    assert store.nbytes() == estimate_store_bytes("qk", dict(CONFIGS["tiny"]["unet"]), 128, 128, frames=3,
                                                  steps=STEPS, sparse_causal_index=["mid"], model_bytes=4)
    key_bytes = sum(k.numel() * k.element_size() for _, k in self_layers)
    assert store.nbytes() + 2 * key_bytes == estimate_store_bytes(  # K of all 3 frames, as before
        "qk", dict(CONFIGS["tiny"]["unet"]), 128, 128, frames=3, steps=STEPS, sparse_causal_index=[],
        model_bytes=4)
    assert rel_err(results["qk"][1], results["full"][1]) <= 1e-5
    assert rel_err(results["qk"][1], results["recompute"][1]) <= 1e-5
    # a store saved before (K of every frame, no key_frames) still loads; frames 0 and 2 are never read
    state = store.state_dict()
    del state["key_frames"]
    for layers in state["steps"].values():
        for layer, kept in layers.items():
            if len(kept) == 2:
                layers[layer] = (kept[0], torch.cat([torch.randn_like(kept[1]), kept[1], torch.randn_like(kept[1])]))
    old = make_store("qk")
    old.load_state_dict(state)
    inversion = pipe.invert(None, SOURCE, STEPS, latents=latents, store="recompute", progress=False)
    inversion.store = old
    for chunk_size in (None, 2):
        edited = pipe.edit(inversion, TARGET, decode=False, progress=False, chunk_size=chunk_size, **OPTIONS).latents
        assert rel_err(edited, results["qk"][1]) <= 1e-5


def test_qk_size_at_sd14_scale():
    """SD-1.4, 512x512, 8 frames, 50 steps, ['mid']: K of one frame instead of 8 per layer and step."""
    sd14 = dict(CONFIGS["sd14"]["unet"])
    assert estimate_store_bytes("qk", sd14, 512, 512, 8, 50, ["mid"]) == 7_682_867_200  # was 11_180_851_200
    assert estimate_store_bytes("qk", sd14, 512, 512, 8, 50, [-1, "first"]) == 10_681_139_200  # K of 7 frames


@pytest.mark.parametrize("form", ["recompute", "qk", "fp8"])
def test_save_load_round_trip_gives_identical_edits(tiny_pipeline, edits, tmp_path, form):
    inversion, expected = edits[form]
    inversion.save(tmp_path / form)
    loaded = type(inversion).load(tmp_path / form)
    assert loaded.store.nbytes() == inversion.store.nbytes()
    again = tiny_pipeline.edit(loaded, TARGET, decode=False, progress=False, **OPTIONS).latents
    assert torch.equal(again, expected)


def test_disk_placement(tiny_pipeline, latents, edits, tmp_path):
    store = make_store("fp16", placement="disk", folder=tmp_path / "steps")
    inversion = tiny_pipeline.invert(None, SOURCE, STEPS, latents=latents, store=store, progress=False)
    assert sorted(p.name for p in (tmp_path / "steps").iterdir()) == [f"step_{i:04d}.pt" for i in range(STEPS)]
    assert not store.steps  # written out, not kept in memory
    result = tiny_pipeline.edit(inversion, TARGET, decode=False, progress=False, **OPTIONS).latents
    assert torch.equal(result, edits["fp16"][1])


@pytest.mark.parametrize("kwargs", [dict(form="zip"), dict(form="lowrank", rank=0), dict(form="full", placement="ram")])
def test_bad_store_settings(kwargs):
    with pytest.raises(InputError):
        make_store(**kwargs)


def test_recompute_equals_stored_source_in_float64():
    """In float64 the fp32 noise is gone: re-evaluating the source branch beside the edit is the
    stored-inversion computation itself, with a mixed self-attention blend mask and latent blend."""
    from fatezero_fast.edit.pipeline import FateZeroPipeline
    from fatezero_fast.unet.processors import VideoAttentionConfig

    pipe = FateZeroPipeline.tiny_random(seed=0, device="cpu", dtype=torch.float64,
                                        attention=VideoAttentionConfig(backend="reference"))
    latents = torch.randn(3, 4, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    options = dict(cross_replace_steps=0.8, self_replace_steps=0.8, blend_words=[["car"], ["car"]],
                   blend_self_attention=True, blend_latents=True, blend_th=(0.97, 0.97), is_replace_controller=True)
    results = {}
    for form in ("recompute", "qk"):
        inversion = pipe.invert(None, SOURCE, 6, latents=latents, store=form, progress=False)
        results[form] = pipe.edit(inversion, TARGET, decode=False, progress=False, **options)
    masks = results["qk"].masks
    assert 0 < masks["self_attention"].mean() < 1 and 0 < masks["latents"].mean() < 1  # mixed masks
    for name in masks:
        assert torch.equal(masks[name], results["recompute"].masks[name])
    assert rel_err(results["qk"].latents, results["recompute"].latents) < 1e-12
