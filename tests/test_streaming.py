"""Chunked, layer-major UNet execution (fatezero_fast.unet.runner) equals the unchunked video model.

All on the random tiny model, non-square (8x5 latents: levels 8x5, 4x3, 2x2, 1x1) and with 5 frames,
so chunk sizes 2 and 3 leave a short last chunk. fp32 runs are compared at 1e-5 relative
(max|a-b|/max|b|): that is close to the fp32 noise of this model once guidance 7.5 amplifies it
(the unchunked model with the reference attention backend instead of the C++ kernel differs from
itself by ~6e-6 after 3 steps), so the float64 runs carry the exactness claim, at 1e-12.
"""
import copy

import pytest
import torch
from torch import nn

from fatezero_fast.edit.pipeline import FateZeroPipeline
from fatezero_fast.errors import InputError
from fatezero_fast.io.video import make_sample_clip
from fatezero_fast.models import random_components
from fatezero_fast.stores import make_store
from fatezero_fast.unet.chunks import ChunkSchedule, ClipActivation
from fatezero_fast.unet.groupnorm import ClipGroupNorm
from fatezero_fast.unet.processors import VideoAttentionConfig, install
from fatezero_fast.unet.runner import LayerMajorUNet, streaming_unet

SOURCE, TARGET = "a red car driving down a road", "a blue car driving down a road"
FRAMES, LATENT = 5, (8, 5)
# self-attention blended by the 'car' mask (steps [0, 0.8 T)), latent blend (needs T >= 3), guidance 7.5
EDIT = dict(blend_words=[["car"], ["car"]], blend_self_attention=True, blend_latents=True, guidance_scale=7.5)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def components():
    """The tiny model's parts, never installed: each pipeline below gets its own copy."""
    return random_components("tiny", seed=0)


@pytest.fixture(scope="module")
def latents():
    torch.manual_seed(0)
    return torch.randn(FRAMES, 4, *LATENT)


def make_pipeline(components, index_list, dtype=torch.float32, backend="auto", least_sc_channel=None):
    parts = copy.deepcopy(components)  # the pipeline moves and installs its parts in place
    config = VideoAttentionConfig(sparse_causal_index=index_list, backend=backend, least_sc_channel=least_sc_channel)
    return FateZeroPipeline(**parts, device="cpu", dtype=dtype, attention=config)


def invert_and_edit(pipe, chunk_size, *, steps=2, latents=None, video=None, store="recompute", decode=False):
    inversion = pipe.invert(video, SOURCE, steps, latents=latents, seed=3, store=store, progress=False,
                            chunk_size=chunk_size)
    return inversion, pipe.edit(inversion, TARGET, progress=False, decode=decode, chunk_size=chunk_size, **EDIT)


def assert_same_run(chunked, unchunked, tol):
    (inv_c, edit_c), (inv_u, edit_u) = chunked, unchunked
    assert rel_err(inv_c.latents, inv_u.latents) <= tol
    assert rel_err(inv_c.token_maps, inv_u.token_maps) <= tol
    assert rel_err(edit_c.latents, edit_u.latents) <= tol
    assert set(edit_c.masks) == set(edit_u.masks) and "self_attention" in edit_u.masks
    for name, mask in edit_u.masks.items():
        assert torch.equal(edit_c.masks[name], mask), name


# --- one UNet call --------------------------------------------------------------------------------

@pytest.mark.parametrize("index_list,least_sc,chunk", [(["mid"], None, 1), ([-1, "first"], 48, 2),
                                                       ([-2, -1], None, 3), (["first"], None, 8)])
def test_one_unet_call_equals_unchunked(components, index_list, least_sc, chunk):
    unet = copy.deepcopy(components["unet"])
    state = install(unet, VideoAttentionConfig(sparse_causal_index=index_list, least_sc_channel=least_sc))
    state.begin_call("plain", FRAMES, LATENT)
    torch.manual_seed(1)
    sample, context = torch.randn(2 * FRAMES, 4, *LATENT), torch.randn(2 * FRAMES, 77, 32)
    with torch.no_grad():
        expected = unet(sample, 500, encoder_hidden_states=context).sample
        out = streaming_unet(unet, sample, torch.tensor(500), context, num_frames=FRAMES, chunk_size=chunk,
                             state=state)
    assert out.shape == expected.shape and not hasattr(state, "chunk")  # the chunk is a call argument
    assert rel_err(out, expected) <= 1e-5


def test_stock_unet_without_fatezero(components):
    """A UNet without FateZero's processors and norms is per frame: chunks change nothing."""
    unet = copy.deepcopy(components["unet"])
    torch.manual_seed(2)
    sample, context = torch.randn(2 * FRAMES, 4, *LATENT), torch.randn(2 * FRAMES, 77, 32)
    with torch.no_grad():
        expected = unet(sample, 300, encoder_hidden_states=context).sample
        out = streaming_unet(unet, sample, 300, context, num_frames=FRAMES, chunk_size=2)
    assert rel_err(out, expected) <= 1e-5


def test_modules_see_one_chunk_at_a_time(components):
    """Every layer of the UNet (but the tiny time embedding) runs on at most branches*chunk frames."""
    unet = copy.deepcopy(components["unet"])
    state = install(unet, VideoAttentionConfig(sparse_causal_index=[-1, "first"]))
    state.begin_call("plain", FRAMES, LATENT)
    rows, hooks = [], []
    for name, module in unet.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm)) and "time_emb" not in name:
            hooks.append(module.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0])))
    torch.manual_seed(3)
    with torch.no_grad():
        streaming_unet(unet, torch.randn(3 * FRAMES, 4, *LATENT), 500, torch.randn(3 * FRAMES, 77, 32),
                       num_frames=FRAMES, chunk_size=2, state=state)
    for hook in hooks:
        hook.remove()
    assert rows and max(rows) == 3 * 2


def test_clip_group_norm_over_chunks_and_concatenated_inputs():
    """Clip statistics from per-chunk moments, groups straddling a concatenation (6 + 10 channels, groups of 4)."""
    torch.manual_seed(4)
    norm = nn.GroupNorm(4, 16).double()
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    clip_norm = ClipGroupNorm(norm, lambda: FRAMES)
    parts = [torch.randn(2 * FRAMES, ch, 3, 5, dtype=torch.float64) * 3 + 1 for ch in (6, 10)]
    chunks = ChunkSchedule(FRAMES, 2, 2, torch.device("cpu"), offload=False, context=None, passes=None)
    runner = LayerMajorUNet(None, None, chunks)
    clips = []
    for x in parts:
        clip, grouped = ClipActivation(chunks), x.view(2, FRAMES, *x.shape[1:])
        for a, e in chunks.bounds:
            clip.write(a, e, grouped[:, a:e].reshape(-1, *x.shape[1:]))
        clips.append(clip)
    apply = runner.norm(clip_norm, clips)
    out = torch.cat([apply(torch.cat([c.read(a, e) for c in clips], 1)).view(2, e - a, 16, 3, 5)
                     for a, e in chunks.bounds], dim=1)
    expected = clip_norm(torch.cat(parts, 1)).view(2, FRAMES, 16, 3, 5)
    assert rel_err(out, expected) <= 1e-12


# --- whole inversions and edits -------------------------------------------------------------------

@pytest.mark.parametrize("index_list,chunk", [(["mid"], 3), (["first"], 1), ([-1, "first"], 2), ([-2, -1], 3)])
def test_invert_and_edit_equal_unchunked(components, latents, index_list, chunk):
    pipe = make_pipeline(components, index_list)
    unchunked = invert_and_edit(pipe, None, latents=latents)
    assert_same_run(invert_and_edit(pipe, chunk, latents=latents), unchunked, 1e-5)


STORED = ("qk", "full", "fp16", "fp8", "lowrank")


@pytest.fixture(scope="module")
def unchunked_stored(components, latents):
    """(form, index list) -> the unchunked run with that store, computed once."""
    runs = {}

    def run(form, index_list):
        key = (form, tuple(index_list))
        if key not in runs:
            runs[key] = invert_and_edit(make_pipeline(components, index_list), None, latents=latents, store=form)
        return runs[key]
    return run


def stored_values(store):
    """(step, layer) -> what each kept tuple stands for, in fp32 (fp8 maps scaled back, low-rank factors
    multiplied: their signs are arbitrary), and the rounding step of the dtype it is kept in."""
    values = {}
    for step, layers in store.steps.items():
        for layer, kept in layers.items():
            rounding = max(1e-5, torch.finfo(kept[0].dtype).eps)
            if store.form == "lowrank" and len(kept) == 2:
                kept = (kept[0].float() @ kept[1].float(),)
            elif store.form == "fp8" and len(kept) == 2:
                kept = (kept[0].float() * kept[1][..., None],)
            values[(step, layer)] = [(t.float(), rounding) for t in kept]
    return values


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("index_list", [["mid"], [-1, "first"]])
@pytest.mark.parametrize("form", STORED)
def test_stored_attention_in_chunks(components, latents, unchunked_stored, form, index_list, chunk):
    """Stores written per chunk at inversion and read back per chunk equal the unchunked run, tensor
    for tensor (5 frames: chunks of 2 and 3 leave a short last chunk)."""
    unchunked = unchunked_stored(form, index_list)
    chunked = invert_and_edit(make_pipeline(components, index_list), chunk, latents=latents, store=form)
    assert_same_run(chunked, unchunked, 1e-5)
    store_c, store_u = chunked[0].store, unchunked[0].store
    assert store_c.breakdown() == store_u.breakdown() and store_c.nbytes() > 0
    values_c, values_u = stored_values(store_c), stored_values(store_u)
    assert values_c.keys() == values_u.keys()
    for key, kept in values_u.items():
        for (c, _), (u, rounding) in zip(values_c[key], kept):
            assert rel_err(c, u) <= rounding, key  # fp16/fp8: the fp32 noise may flip a rounding


@pytest.mark.parametrize("index_list", [["mid"], [-1, "first"]])
@pytest.mark.parametrize("form", STORED)
def test_stores_see_one_chunk_at_a_time(components, latents, form, index_list):
    """Bounded device memory: in chunks of 2 of a 6-frame clip, every tensor handed to the store at
    inversion and every tensor it hands back to the attention at editing holds the rows of the
    chunk's query frames only (and, for K, the frames those queries attend to), never the clip."""
    num_frames, chunk = 6, 2
    pipe = make_pipeline(components, index_list)
    store = make_store(form)
    seen = []  # (what, first-axis length, allowed length)

    def watch(name, check):
        method = getattr(store, name)

        def wrapped(*args, **kwargs):
            out = method(*args, **kwargs)
            check(out, *args, **kwargs)
            return out
        setattr(store, name, wrapped)

    def on_capture_self(_, step, layer, q, k, kv_frames, scale, *, frames, key_frames):
        rows = frames.stop - frames.start
        needed = kv_frames[frames].unique()
        seen.append(("q", q.shape[0], rows))
        seen.append(("k", k.shape[0], needed.numel()))
        assert torch.equal(key_frames, needed)

    def on_capture_cross(_, step, layer, probs, *, frames, num_frames):
        seen.append(("cross map", probs.shape[0], frames.stop - frames.start))

    def on_self_source(source, step, layer, frames, key_frames, device):
        seen.append(("source rows", source.a.shape[0], frames.stop - frames.start))
        if form == "qk":
            seen.append(("source k", source.b.shape[0], key_frames.numel()))
        else:
            seen.extend(("source rows", t.shape[0], frames.stop - frames.start)
                        for t in (source.b, source.row_scale) if t is not None)

    def on_cross_source(p, step, layer, frames, device):
        seen.append(("source cross map", p.shape[0], frames.stop - frames.start))

    watch("capture_self", on_capture_self)
    watch("capture_cross", on_capture_cross)
    watch("self_source", on_self_source)
    watch("cross_source", on_cross_source)
    torch.manual_seed(5)
    inversion = pipe.invert(None, SOURCE, 2, latents=torch.randn(num_frames, 4, *LATENT), seed=3, store=store,
                            progress=False, chunk_size=chunk)
    pipe.edit(inversion, TARGET, progress=False, decode=False, chunk_size=chunk, **EDIT)
    kinds = {what for what, _, _ in seen}
    expected = {"q", "k", "cross map", "source rows", "source cross map"} | ({"source k"} if form == "qk" else set())
    assert kinds == expected
    for what, length, allowed in seen:
        assert length == allowed, what
    rows = max(length for what, length, _ in seen if what != "k" and what != "source k")
    keys = max(length for what, length, _ in seen if what in ("k", "source k"))
    assert rows == chunk and keys == (1 if index_list == ["mid"] else chunk + 1)


def test_chunked_qk_store_saves_loads_and_uses_disk(components, latents, tmp_path):
    """A chunked qk inversion (['mid']: K of one frame) saved and loaded, and a disk store, give the
    same chunked edit bit for bit."""
    pipe = make_pipeline(components, ["mid"])
    inversion, result = invert_and_edit(pipe, 2, latents=latents, store="qk")
    assert {k.shape[0] for step in inversion.store.steps.values() for _, k in
            (kept for kept in step.values() if len(kept) == 2)} == {1}
    inversion.save(tmp_path / "saved")
    loaded = type(inversion).load(tmp_path / "saved")
    again = pipe.edit(loaded, TARGET, progress=False, decode=False, chunk_size=2, **EDIT)
    assert torch.equal(again.latents, result.latents)
    disk = make_store("qk", placement="disk", folder=tmp_path / "disk")
    on_disk = invert_and_edit(pipe, 2, latents=latents, store=disk)[1]
    assert not disk.steps and torch.equal(on_disk.latents, result.latents)


def test_non_square_clip_end_to_end_is_exact_in_float64(components):
    """A 64x40 (height x width) clip through the VAE, a 3-step inversion, an edit with every blend (latent
    blend too) and decoding, in chunks of 2 frames. In float64 (reference attention) chunked and unchunked
    runs agree to rounding: the algorithm is exact, the fp32 differences above are float noise."""
    pipe = make_pipeline(components, [-1, "first"], dtype=torch.float64, backend="reference")
    clip = make_sample_clip(FRAMES, 40, 64)
    unchunked = invert_and_edit(pipe, None, steps=3, video=clip, decode=True)
    chunked = invert_and_edit(pipe, 2, steps=3, video=clip, decode=True)
    assert chunked[0].latents.shape[-2:] == LATENT and chunked[1].frames.shape == (FRAMES, 3, 64, 40)
    assert set(chunked[1].masks) == {"self_attention", "latents"}
    assert_same_run(chunked, unchunked, 1e-12)
    assert rel_err(chunked[1].frames, unchunked[1].frames) <= 1e-6  # decoded frames are returned in fp32


def test_chunk_size_is_checked(components, latents):
    pipe = make_pipeline(components, ["mid"])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="chunk_size"):
            pipe.invert(latents=latents, source_prompt=SOURCE, num_inference_steps=1, chunk_size=bad)
    with pytest.raises(ValueError, match="chunk_size"):
        streaming_unet(pipe.unet, latents, 1, torch.zeros(FRAMES, 77, 32), num_frames=FRAMES, chunk_size=0)
    with pytest.raises(ValueError, match="whole number"):
        streaming_unet(pipe.unet, latents, 1, torch.zeros(FRAMES, 77, 32), num_frames=3, chunk_size=1)


def test_store_predicts_each_read_for_the_cuda_prefetch(components, latents):
    """The side-stream prefetch (CUDA, host placement) copies in the read that followed the current
    one last time. Within the self-replacement window (here: all steps) edits read in the same order
    every step, so from the second edit on every read is predicted, the last of a step by the first
    of the step one inversion step earlier."""
    pipe = make_pipeline(components, [-1, "first"])
    inversion = pipe.invert(None, SOURCE, 2, latents=latents, seed=3, store="fp16", progress=False, chunk_size=2)
    pipe.edit(inversion, TARGET, progress=False, decode=False, chunk_size=2, **dict(EDIT, self_replace_steps=1.0))
    store, reads = inversion.store, []
    load = store._load
    store._load = lambda step, read, device: reads.append((step, read)) or load(step, read, device)
    pipe.edit(inversion, TARGET, progress=False, decode=False, chunk_size=2, **dict(EDIT, self_replace_steps=1.0))
    assert len(reads) > 2 * FRAMES
    for (step, read), (next_step, next_read) in zip(reads, reads[1:]):
        assert store._follows[read] == (next_read, next_step - step)
