"""control.py against the official FateZero code itself, on every prompt pair of its configs.

Skipped unless FATEZERO_SRC points at a checkout of the official repository (never part of this
project). Its modules are imported with stand-ins for the parts these functions do not use
(cv2, torchvision.utils, omegaconf, visualization).
"""
import glob
import importlib.util
import os
import sys
import types

import pytest
import torch
import yaml

from fatezero_fast.models.tokenizer import clip_tokenizer
from fatezero_fast.semantics import masks, schedules, tokens
from fatezero_fast.semantics.plan import EditOptions, EditPlan

SRC = os.environ.get("FATEZERO_SRC")
pytestmark = pytest.mark.skipif(not SRC, reason="set FATEZERO_SRC to an official FateZero checkout")


def _stub(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules.setdefault(name, module)
    return module


@pytest.fixture(scope="module")
def official():
    import transformers  # noqa: F401  (before the torchvision stand-in: it probes for torchvision)
    _stub("cv2")
    _stub("omegaconf", dictconfig=types.SimpleNamespace(DictConfig=dict))
    _stub("torchvision", utils=_stub("torchvision.utils"))
    _stub("video_diffusion")
    _stub("video_diffusion.prompt_attention")
    _stub("video_diffusion.common")
    _stub("video_diffusion.common.util", get_time_string=lambda: "x")
    _stub("video_diffusion.prompt_attention.visualization", show_cross_attention=None,
          show_self_attention_comp=None)
    loaded = {}
    for name in ("ptp_utils", "seq_aligner", "spatial_blend", "attention_store", "attention_register",
                 "attention_util"):
        full = f"video_diffusion.prompt_attention.{name}"
        spec = importlib.util.spec_from_file_location(full, f"{SRC}/video_diffusion/prompt_attention/{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        loaded[name] = module
    return types.SimpleNamespace(**loaded)


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def _config_pairs():
    pairs = []
    for path in sorted(glob.glob(f"{SRC}/config/**/*.yaml", recursive=True)):
        raw = yaml.safe_load(open(path))
        source = raw["dataset_config"]["prompt"]
        p2p = raw["editing_config"].get("p2p_config") or {}
        for i, target in enumerate(raw["editing_config"]["editing_prompts"]):
            pairs.append((source, target, p2p.get(i) or {}))
    return pairs


def test_mappers_word_indices_and_schedules(official, tok):
    pairs = _config_pairs()
    assert len(pairs) > 20
    for source, target, entry in pairs:
        m, a = official.seq_aligner.get_refinement_mapper([source, target], tok)
        ours_m, ours_a = tokens.refinement_mapper(source, target, tok)
        assert torch.equal(m[0], ours_m) and torch.equal(a[0], ours_a), (source, target)
        if len(source.split(" ")) == len(target.split(" ")):
            assert torch.equal(official.seq_aligner.get_replacement_mapper([source, target], tok)[0],
                               tokens.replacement_mapper(source, target, tok)), (source, target)
        for word in set(target.split(" ")):
            assert list(official.ptp_utils.get_word_inds(target, word, tok)) == \
                tokens.word_token_indices(target, word, tok)
        steps = entry.get("cross_replace_steps", 0.8)
        for num in (10, 50):
            theirs = official.ptp_utils.get_time_words_attention_alpha(
                [source, target], num, dict(steps) if isinstance(steps, dict) else steps, tok)
            assert torch.equal(theirs.reshape(num + 1, 77), schedules.cross_replace_alpha(target, num, steps, tok))


CASES = [
    ("a silver jeep driving down a curvy road in the countryside,",
     "a Porsche car driving down a curvy road in the countryside", True, None, {"default_": 0.5}),
    ("a silver jeep driving down a curvy road in the countryside",
     "watercolor painting of a silver jeep driving down a curvy road in the countryside", False,
     {"words": ["watercolor"], "values": [10]}, {"default_": 0.8}),
    ("a cat on the grass", "a tiger on the grass", True, {"words": ["tiger"], "values": [2]},
     {"default_": (0.1, 0.7), "tiger": 0.3}),
]


@pytest.mark.parametrize("source,target,replace,eq,steps", CASES)
def test_cross_attention_fusion(official, tok, source, target, replace, eq, steps):
    torch.manual_seed(0)
    num = 10
    theirs = official.attention_util.make_controller(tok, [source, target], replace, steps, 0.5,
                                                     equilizer_params=eq, NUM_DDIM_STEPS=num)
    plan = EditPlan.build(EditOptions(cross_replace_steps=steps, is_replace_controller=replace,
                                                      eq_params=eq), source, target, num, tok)
    for step in range(num):
        base = torch.softmax(torch.randn(2, 3, 16, 77), -1)
        edit = torch.softmax(torch.randn(1, 2, 3, 16, 77), -1)
        alpha = theirs.cross_replace_alpha[step]
        expected = theirs.replace_cross_attention(base, edit) * alpha + (1 - alpha) * edit
        assert (expected.reshape(2, 3, 16, 77) - plan.fuse_cross(base, edit[0], step)).abs().max() < 1e-6


@pytest.mark.parametrize("th", [0.2, 0.35, 0.6])
def test_blend_masks(official, tok, th):
    torch.manual_seed(1)
    source, target = CASES[0][:2]
    words = [["silver", "jeep"], ["Porsche", "car"]]
    frames = 3
    maps = [torch.softmax(torch.randn(frames, 4, 256, 77) * 3, -1) for _ in range(5)]
    edit_maps = [torch.softmax(torch.randn(frames, 4, 256, 77) * 3, -1) for _ in range(5)]
    mean_maps = lambda ms: torch.stack([m.mean(1) for m in ms]).mean(0).reshape(frames, 16, 16, 77)
    blend = official.spatial_blend.SpatialBlender([source, target], words, tokenizer=tok, th=(th, th),
                                                  NUM_DDIM_STEPS=10, prompt_choose="source", start_blend=0.0,
                                                  end_blend=2)
    theirs = blend(attention_store={"down_cross": maps[:2] * 2, "up_cross": maps[2:]}, target_h=32, target_w=32)
    plan = EditPlan.build(EditOptions(blend_words=words, blend_self_attention=True,
                                                      blend_latents=True, blend_th=(th, th)), source, target, 10, tok)
    assert torch.equal(theirs[0], masks.self_blend_mask(plan, mean_maps(maps), (32, 32)).view(frames, 32, 32))

    latent_blend = official.spatial_blend.SpatialBlender([source, target], words, tokenizer=tok, th=(th, th),
                                                         NUM_DDIM_STEPS=10, prompt_choose="both")
    latent_blend.counter = 3  # the call below is edit step 3
    both = [torch.cat([a[None], b[None]]) for a, b in zip(maps, edit_maps)]
    x_src, x = torch.randn(1, 4, frames, 8, 8), torch.randn(1, 4, frames, 8, 8)
    theirs = latent_blend(attention_store={"down_cross": both[:2] * 2, "up_cross": both[2:]},
                          x_t=torch.cat([x_src, x]))[1]
    mask = masks.latent_blend_mask(plan, 3, mean_maps(maps), mean_maps(edit_maps), (8, 8))
    ours = masks.blend_latents(x[0].transpose(0, 1), x_src[0].transpose(0, 1), mask).transpose(0, 1)
    assert torch.equal(theirs, ours)
