"""The toy world (generator determinism, ground-truth masks, caption words) and the quality floor of
the shipped toy-world model: one clip, a few steps, scores the trained model clears with a margin.

The floor is the project's guard against regressions in what edits look like (exact-match tests
cannot catch them): a FateZero "red car -> blue car" edit must recolour the car and keep the
background, and must keep it far better than plain DDIM inversion + regeneration.
"""
import numpy as np
import pytest
import torch

from fatezero_fast.toyworld import edits as E
from fatezero_fast.toyworld import metrics, world
from fatezero_fast.toyworld.model import MODEL_DIR

# Floors below what the shipped model measures on this test's clip and settings (4 frames, 8 steps;
# measured: background PSNR 27.2 dB fused vs 21.4 dB plain, reconstruction 21.8 dB, the car blue in 4 of
# 4 frames, the blend mask over 99% of the car and 41% of the rest; docs/toyworld/MODEL_CARD.md).
FLOOR_BG_PSNR = 24.0           # dB, background of the attribute edit against the source
FLOOR_FUSION_MARGIN = 3.0      # dB, FateZero's background PSNR above plain inversion + regeneration's
FLOOR_RECON_PSNR = 19.5        # dB, same-prompt reconstruction against the input
TARGET_COLOUR_ACC = 0.8        # the target: frames whose object takes the target colour
FLOOR_MASK_RECALL = 0.9        # the blend mask covers the object ...
CEILING_MASK_BACKGROUND = 0.6  # ... and leaves most of the background out


def test_clips_are_deterministic_from_the_seed():
    a, b, c = world.make_clip(11), world.make_clip(11), world.make_clip(12)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.masks, b.masks) and a.caption == b.caption
    assert a.scene == b.scene and a.scene != c.scene and not np.array_equal(a.frames, c.frames)
    assert a.frames.shape == (8, world.SIZE, world.SIZE, 3) and a.frames.dtype == np.uint8


@pytest.mark.parametrize("seed", range(12))
def test_ground_truth_masks(seed):
    clip = world.make_clip(seed)
    scene = clip.scene
    assert clip.masks.any(axis=(1, 2)).all()              # the object is in every frame
    assert not (clip.body & ~clip.masks).any()             # its body is part of it
    # the body is painted in the object's colour (in night light at night)
    light = np.array(world.NIGHT_LIGHT) if scene.sky == "night" else np.ones(3)
    expected = np.clip(np.round(np.array(world.PALETTE[scene.colour], np.float32) * light), 0, 255)
    assert np.abs(clip.frames[clip.body].astype(float) - expected).max() <= 1
    # outside the mask, the frame is the scene without its object: recolouring it changes only the mask
    other = world.render(scene.with_(colour=E.COLOUR_EDIT[scene.colour]))
    assert np.array_equal(other.masks, clip.masks)
    assert np.array_equal(other.frames[~clip.masks], clip.frames[~clip.masks])
    assert (other.frames[clip.body] != clip.frames[clip.body]).any(-1).all()
    # the judging rules read the ground truth right
    night = scene.sky == "night"
    assert all(world.classify_colour(f[b], night) == scene.colour for f, b in zip(clip.frames, clip.body))
    assert metrics.colour_hits(clip, other.frames, other.scene.colour).all()


def test_masks_follow_the_motion():
    clip = world.make_clip(3, kind="car", motion="crossing")
    xs = [np.nonzero(m)[1].mean() for m in clip.masks]
    assert np.all(np.sign(np.diff(xs)) == np.sign(clip.scene.dx))
    bounce = world.make_clip(3, kind="ball", motion="bounce")
    ys = [np.nonzero(m)[0].mean() for m in bounce.masks]
    assert max(ys) - min(ys) > 3


def test_caption_words_are_clip_words():
    from fatezero_fast.models.tokenizer import clip_tokenizer

    tok = clip_tokenizer()
    vocab = tok.get_vocab()
    for word in world.vocabulary():
        assert word + "</w>" in vocab, word  # one whole-word CLIP token
        assert len(tok(word).input_ids) == 3  # <start> word <end>
    assert world.caption(world.sample_scene(0, kind="car", colour="red", ground="road", sky="blue")) \
        .startswith("a red car driving on a road under a blue sky")


def test_shape_rule_on_rendered_shapes():
    for kind in ("car", "ball", "box"):
        clip = world.make_clip(21, kind=kind, colour="red", sky="blue")
        target = E.SHAPE_EDIT[kind]
        rendered = world.render(E.shape(clip.scene).target)
        assert metrics.shape_hits(clip, clip.frames, kind).mean() >= 0.75
        assert metrics.shape_hits(clip, rendered.frames, target).mean() >= 0.75


needs_model = pytest.mark.skipif(not (MODEL_DIR / "unet").is_dir(), reason="the toy-world model is not in this checkout")


@pytest.fixture(scope="module")
def floor_run():
    """The demo clip (4 frames), 8 DDIM steps: FateZero's red -> blue edit, the same edit without
    fusion, and the reconstruction, scored against the ground truth."""
    from fatezero_fast.toyworld.demo import demo_clip
    from fatezero_fast.toyworld.model import toyworld_pipeline

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    clip = demo_clip(num_frames=4)
    pipe = toyworld_pipeline()
    inversion = pipe.invert(clip.tensor(), clip.caption, 8, seed=0, progress=False)
    edit = E.attribute(clip.scene, "blue")
    fused = pipe.edit(inversion, edit.prompt, progress=False, **edit.options)
    plain = pipe.edit(inversion, edit.prompt, progress=False, **E.no_fusion(edit).options)
    recon = pipe.edit(inversion, clip.caption, progress=False, **E.OPTIONS["reconstruct"])
    f = metrics.score_edit(clip, fused.frames, target_colour="blue", masks=fused.masks.get("self_attention"))
    p = metrics.score_edit(clip, plain.frames, target_colour="blue")
    r = metrics.psnr(clip.frames, metrics.to_uint8(recon.frames))
    return f, p, r


@needs_model
def test_quality_floor_of_the_trained_model(floor_run):
    f, p, r = floor_run
    summary = f"fused {f}, plain {p}, reconstruction {r:.1f} dB"
    assert f["bg_psnr"] >= FLOOR_BG_PSNR, summary
    assert f["bg_psnr"] >= p["bg_psnr"] + FLOOR_FUSION_MARGIN, summary
    assert r >= FLOOR_RECON_PSNR, summary


@needs_model
def test_colour_edit_target(floor_run):
    f, _, _ = floor_run
    assert f["colour_acc"] >= TARGET_COLOUR_ACC, f


@needs_model
def test_blend_mask_follows_the_object(floor_run):
    f, _, _ = floor_run
    assert f["mask_recall"] >= FLOOR_MASK_RECALL and f["mask_background"] <= CEILING_MASK_BACKGROUND, f
