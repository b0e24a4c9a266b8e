"""The editing pipeline end to end on the random tiny model (CPU)."""
import pytest
import torch

from fatezero_fast.edit.inversion import Inversion
from fatezero_fast.edit.pipeline import FateZeroPipeline
from fatezero_fast.errors import InputError

SOURCE = "a red car driving down a road"
STEPS = 3


@pytest.fixture(scope="module")
def inversion(tiny_pipeline, clip):
    return tiny_pipeline.invert(clip, SOURCE, STEPS, seed=7, progress=False)


def test_inversion_shapes_and_ddim_chain(inversion):
    assert inversion.latents.shape == (STEPS + 1, 3, 4, 8, 8)
    assert inversion.token_maps.shape == (STEPS, 3, 2, 2, 77)  # mask level: 1/4 of the 8x8 latent
    assert torch.isfinite(inversion.latents).all()
    torch.testing.assert_close(inversion.token_maps.sum(-1), torch.ones(STEPS, 3, 2, 2))  # maps are softmaxes


def test_two_edits_from_one_inversion(tiny_pipeline, inversion):
    blue = tiny_pipeline.edit(inversion, "a blue car driving down a road", progress=False,
                              blend_words=[["car"], ["car"]], blend_self_attention=True, blend_latents=True)
    art = tiny_pipeline.edit(inversion, "watercolor painting of a red car driving down a road", progress=False,
                             eq_params={"words": ["watercolor"], "values": [5]})
    for result in (blue, art):
        assert result.latents.shape == (3, 4, 8, 8) and result.frames.shape == (3, 3, 64, 64)
        assert result.frames.min() >= -1 and result.frames.max() <= 1
    assert not torch.equal(blue.latents, art.latents)
    assert blue.masks["self_attention"].shape[1:] == (3, 8, 8)
    assert set(blue.masks["self_attention"].unique().tolist()) <= {0.0, 1.0}
    assert "latents" in blue.masks and not art.masks


def test_deterministic_for_a_seed(tiny_pipeline, clip, inversion):
    again = tiny_pipeline.invert(clip, SOURCE, STEPS, seed=7, progress=False)
    assert torch.equal(again.latents, inversion.latents)
    other_seed = tiny_pipeline.invert(clip, SOURCE, STEPS, seed=8, progress=False)
    assert not torch.equal(other_seed.latents[0], inversion.latents[0])  # the VAE posterior sample differs
    first = tiny_pipeline.edit(inversion, "a blue car", decode=False, progress=False)
    second = tiny_pipeline.edit(inversion, "a blue car", decode=False, progress=False)
    assert torch.equal(first.latents, second.latents)


@pytest.mark.parametrize("dtype", ["bf16"])
def test_low_precision_on_cpu(clip, dtype):
    pipe = FateZeroPipeline.tiny_random(seed=0, device="cpu", dtype=dtype)
    inv = pipe.invert(clip, SOURCE, 2, progress=False)
    result = pipe.edit(inv, "a blue car", progress=False)
    assert result.latents.dtype == torch.bfloat16 and torch.isfinite(result.latents.float()).all()


def test_bad_calls(tiny_pipeline, clip, tmp_path):
    with pytest.raises(InputError, match="positive"):
        tiny_pipeline.invert(clip, SOURCE, 0)
    with pytest.raises(InputError, match="exactly one"):
        tiny_pipeline.invert(None, SOURCE, 2)
    with pytest.raises(InputError, match="not a saved inversion"):
        Inversion.load(tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            FateZeroPipeline.tiny_random(device="cuda")


def test_from_pretrained_loads_a_diffusers_folder(tiny_model_dir, clip):
    pipe = FateZeroPipeline.from_pretrained(tiny_model_dir, device="cpu")
    inv = pipe.invert(clip, SOURCE, 2, progress=False)
    assert inv.latents.shape == (3, 3, 4, 8, 8)


def test_from_pretrained_names_the_missing_part(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(InputError, match="lacks vae, text_encoder, tokenizer, scheduler"):
        FateZeroPipeline.from_pretrained(tmp_path)
