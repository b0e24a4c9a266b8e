"""Tuned video checkpoints (FateZero's, Tune-A-Video's) on the stock UNet: loading, exactness, errors.

The tests write tiny random tuned models in the official layouts (fatezero_fast.models.tuned,
temporal weights large enough to change the output clearly) and compare the loaded UNet with
its temporal hooks against tests/video_unet_reference.py, an independent plain-PyTorch forward
of the official video UNet on the raw state dict: float64 to 1e-12, fp32 to 1e-5 (relative:
max |a - b| / max |b|).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from video_unet_reference import VideoUNetReference, load_folder

from fatezero_fast.errors import InputError
from fatezero_fast.models.formats import describe, detect
from fatezero_fast.models.loading import load_unet
from fatezero_fast.models.tuned import save_random_tuned_model
from fatezero_fast.unet.processors import VideoAttentionConfig, install

FRAMES, SIZE = 3, 8
MODELS = {"fatezero-lora": {"fmt": "fatezero", "conv": "lora", "lora": 8},
          "fatezero-full": {"fmt": "fatezero", "conv": "full"},
          "tuneavideo": {"fmt": "tuneavideo"},
          "fatezero-sd2": {"fmt": "fatezero", "conv": "lora", "lora": 8, "kind": "tiny-sd2"}}


@pytest.fixture(scope="module")
def tuned_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuned")
    return {name: save_random_tuned_model(root / name, seed=3, **kw) for name, kw in MODELS.items()}


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _inputs(dtype, branches=2):
    g = torch.Generator().manual_seed(7)
    sample = torch.randn(branches, 4, FRAMES, SIZE, SIZE, generator=g, dtype=torch.float64).to(dtype)
    ctx = torch.randn(branches, 77, 32, generator=g, dtype=torch.float64).to(dtype)
    return sample, ctx


def _ours(folder, sample, ctx, index, t=601):
    unet, _ = load_unet(folder)
    unet = unet.to(sample.dtype)
    state = install(unet, VideoAttentionConfig(sparse_causal_index=index, backend="reference"))
    b, c, f, h, w = sample.shape
    state.begin_call("plain", f, (h, w))
    rows = sample.transpose(1, 2).reshape(b * f, c, h, w)
    with torch.no_grad():
        out = unet(rows, t, encoder_hidden_states=ctx.repeat_interleave(f, 0)).sample
    return out.reshape(b, f, c, h, w).transpose(1, 2)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_unet_equals_the_official_math(tuned_dirs, name, dtype, tol):
    index = ["first", -1] if name == "tuneavideo" else [-1, "first"]
    sample, ctx = _inputs(dtype)
    config, state = load_folder(tuned_dirs[name])
    with torch.no_grad():
        expected = VideoUNetReference(config, state, dtype, index)(sample, 601, ctx)
        plain = {k: v for k, v in state.items() if "_temp" not in k}
        without = VideoUNetReference(config, plain, dtype, index)(sample, 601, ctx)
    assert rel(without, expected) > 0.05  # the temporal modules change the output clearly
    assert rel(_ours(tuned_dirs[name], sample, ctx, index), expected) < tol


def test_detection_and_description(tuned_dirs, tiny_model_dir):
    fz = detect(tuned_dirs["fatezero-lora"])
    assert (fz.kind, fz.temporal.conv, fz.temporal.rank, fz.rank_source) == ("fatezero", "lora", 8, "weight shapes")
    assert len([n for n in fz.temporal_layers if n.endswith("attn_temporal")]) == 16
    assert len([n for n in fz.temporal_layers if n.endswith("conv_temporal")]) == 52  # every 3x3 conv
    assert detect(tuned_dirs["fatezero-full"]).temporal.conv == "full"
    tav = detect(tuned_dirs["tuneavideo"])
    assert (tav.kind, tav.temporal.conv, tav.native_index) == ("tuneavideo", None, ["first", -1])
    assert detect(tiny_model_dir).kind == "sd"
    sd2 = detect(tuned_dirs["fatezero-sd2"])
    assert (sd2.prediction_type, sd2.family, sd2.unet_config["upcast_attention"]) == ("v_prediction", "2.x", True)
    text = describe(tuned_dirs["fatezero-lora"], lora=8)
    assert "FateZero" in text and "LoRA rank: 8 (from the model_config" in text and "prediction type: epsilon" in text


def test_lora_rank_from_config_and_mismatch(tuned_dirs):
    folder = tuned_dirs["fatezero-lora"]
    assert detect(folder, lora=8).rank_source == "model_config"
    with pytest.raises(InputError, match=r"LoRA rank mismatch: model_config.lora is 16, so "
                                         r"conv_in.conv_temporal.down.weight should have rank 16, but it has 8"):
        load_unet(folder, lora=16)


def test_rank_larger_than_every_width(tmp_path):
    folder = save_random_tuned_model(tmp_path / "m", "fatezero", lora=160)  # tiny widths are <= 64: all clamped
    fmt = detect(folder)
    assert fmt.temporal.rank is None and "larger than every layer's width" in describe(folder)
    assert detect(folder, lora=160).temporal.rank == 160
    with pytest.raises(InputError, match="LoRA rank mismatch"):
        detect(folder, lora=32)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_weights(folder, fn):
    path = folder / "unet" / "diffusion_pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    fn(state)
    torch.save(state, path)


def test_bad_folders_are_one_line_errors(tuned_dirs, tiny_model_dir, tmp_path):
    fz = tuned_dirs["fatezero-lora"]
    cases = []
    bad = _copy(fz, tmp_path / "unknown")
    _edit_weights(bad, lambda s: s.update({"down_blocks.0.bogus.weight": torch.zeros(1)}))
    cases.append((bad, "has keys that UNetPseudo3DConditionModel does not: down_blocks.0.bogus.weight"))
    bad = _copy(fz, tmp_path / "missing")
    _edit_weights(bad, lambda s: s.pop("mid_block.attentions.0.transformer_blocks.0.attn_temporal.to_q.weight"))
    cases.append((bad, ("lacks keys that UNetPseudo3DConditionModel needs: "
                       "mid_block.attentions.0.transformer_blocks.0.attn_temporal.to_q.weight")))
    bad = _copy(fz, tmp_path / "shape")
    _edit_weights(bad, lambda s: s.update({"conv_in.weight": torch.zeros(32, 4, 1, 1)}))
    cases.append((bad, r"wrong shape: conv_in.weight \(32, 4, 1, 1\) \(expected \(32, 4, 3, 3\)\)"))
    bad = _copy(fz, tmp_path / "truncated")
    path = bad / "unet" / "diffusion_pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:100_000])
    cases.append((bad, "is truncated or not a weight file"))
    bad = _copy(tuned_dirs["tuneavideo"], tmp_path / "tav-as-fz")  # a FateZero config over Tune-A-Video weights
    shutil.copy(fz / "unet" / "config.json", bad / "unet" / "config.json")
    cases.append((bad, (r"declares a FateZero tuned model \(UNetPseudo3DConditionModel\) but its weights are "
                       r"a Tune-A-Video model's \(e.g. .*attn_temp")))
    bad = _copy(fz, tmp_path / "fz-as-sd")  # an SD config over FateZero weights
    shutil.copy(tiny_model_dir / "unet" / "config.json", bad / "unet" / "config.json")
    cases.append((bad, r"declares plain Stable Diffusion .* but its weights are a FateZero tuned model's"))
    bad = _copy(fz, tmp_path / "sd-as-fz")  # a FateZero config over plain SD weights
    shutil.rmtree(bad / "unet")
    shutil.copytree(tiny_model_dir / "unet", bad / "unet")
    shutil.copy(fz / "unet" / "config.json", bad / "unet" / "config.json")
    cases.append((bad, (r"declares a FateZero tuned model .* but its weights are plain Stable Diffusion's "
                       r"\(no temporal keys\)")))
    for folder, message in cases:
        with pytest.raises(InputError, match=message) as info:
            load_unet(folder)
        assert "\n" not in str(info.value)


def test_truncated_safetensors(tiny_model_dir, tmp_path):
    bad = _copy(tiny_model_dir, tmp_path / "st")
    path = bad / "unet" / "diffusion_pytorch_model.safetensors"
    assert path.is_file()
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(InputError, match=r"is truncated \(\d+ bytes\): tensors up_blocks\..* lie beyond its end"):
        load_unet(bad)


def test_plain_sd_loads_as_before(tiny_model_dir):
    from diffusers import UNet2DConditionModel

    unet, fmt = load_unet(tiny_model_dir)
    stock = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    assert fmt.kind == "sd" and fmt.temporal_layers == []
    assert all(torch.equal(a, stock.state_dict()[k]) for k, a in unet.state_dict().items())


def test_tune_a_video_pipeline_uses_its_index(tuned_dirs):
    from fatezero_fast.edit.pipeline import FateZeroPipeline

    pipe = FateZeroPipeline.from_pretrained(tuned_dirs["tuneavideo"], device="cpu")
    assert pipe.state.config.sparse_causal_index == ["first", -1]
    assert pipe.model_format.kind == "tuneavideo"
    config = json.loads((tuned_dirs["tuneavideo"] / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNet3DConditionModel"


def test_cli_info_and_edit_on_tuned_models(tuned_dirs, clip_dir, tmp_path, capsys):
    from fatezero_fast.io.cli import main

    assert main(["info", "--model", str(tuned_dirs["fatezero-lora"]), "--lora", "8"]) == 0
    out = capsys.readouterr().out
    assert "format: a FateZero tuned model" in out and "LoRA rank: 8" in out and "prediction type: epsilon" in out
    assert "temporal attention: 16 layers" in out and "temporal conv: 52 layers, LoRA pairs" in out
    assert main(["info", "--model", str(tuned_dirs["fatezero-lora"]), "--lora", "16"]) == 2
    assert "error:" in capsys.readouterr().err
    for name in ("fatezero-lora", "tuneavideo"):
        out_dir = tmp_path / name
        rc = main(["edit", "--model", str(tuned_dirs[name]), "--video", str(clip_dir), "--source-prompt", "a car",
                   "--target-prompt", "a red car", "--frames", "2", "--steps", "2", "--width", "64", "--height", "64",
                   "--backend", "reference", "-o", str(out_dir)])
        assert rc == 0, capsys.readouterr().err
        assert (out_dir / "edit_00").is_dir()
