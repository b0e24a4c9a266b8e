"""Tests for the `fatezero-fast` command line: info, edit (flags and official config), invert, bad input.

`fatezero_fast.cli.main` runs in-process (return code, stdout and stderr through capsys); one
test runs the installed command in a subprocess. Every run is tiny: a 64x64 clip (8x8 latents),
2 frames, 2 DDIM steps, one torch thread (on tensors this small more threads only wait for
each other, badly so on a busy machine). Bad input must give return code 2, exactly one
`error:` line on stderr, no model work and no change to anything that existed before.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fatezero_fast import __version__
from fatezero_fast.io.cli import main

REPO = Path(__file__).resolve().parents[1]
SOURCE = "a red car driving down a road"
TARGETS = ("a blue car driving down a road", "a green car driving down a road")
TINY = ("--frames", "2", "--steps", "2", "--width", "64", "--height", "64")

CONFIG = """\
# like the official config/teaser/jeep_posche.yaml, on a random tiny model and a tiny clip
pretrained_model_path: "{model}"

dataset_config:
    path: "{clip}"
    prompt: "a silver jeep driving down a curvy road in the countryside"
    n_sample_frame: 2
    sampling_rate: 1
    stride: 80
    offset:
        left: 0
        right: 0
        top: 0
        bottom: 0

editing_config:
    use_invertion_latents: True
    use_inversion_attention: True
    guidance_scale: 7.5
    editing_prompts: [
        a watercolor painting of a silver jeep driving down a curvy road in the countryside,
        a Porsche car driving down a curvy road in the countryside,
    ]
    p2p_config:
        0:
            cross_replace_steps:
                default_: 0.8
            self_replace_steps: 0.9
            eq_params:
                words: ["watercolor", "painting"]
                values: [10, 10]
            blend_th: [2, 2]
        1:
            cross_replace_steps:
                default_: 0.5
            self_replace_steps: 0.5
            use_inversion_attention: True
            is_replace_controller: True
            blend_words: [['silver', 'jeep'], ["Porsche", 'car']]
            blend_self_attention: True
            blend_th: [0.3, 0.3]
    num_inference_steps: 2

model_config:
    lora: 160
    SparseCausalAttention_index: ['mid']
    least_sc_channel: 640

seed: 0
"""


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def run_cli(capsys, *argv):
    """main(argv) in-process -> (return code, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def lines(text, prefix):
    return [line for line in text.splitlines() if line.startswith(prefix)]


def snapshot(root: Path) -> dict:
    """Every path under root with its bytes (None for folders): detects any write or removal."""
    return {p.relative_to(root).as_posix(): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def edit_args(clip, out, *extra):
    return ["edit", "--video", clip, "--source-prompt", SOURCE, "--target-prompt", TARGETS[0], *TINY,
            "-o", out, *extra]


def assert_bad_input(capsys, root: Path, argv, *fragments):
    """rc 2, stderr exactly one `error:` line naming the fragments, nothing under root changed."""
    before = snapshot(root)
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2, (rc, out, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and err.endswith("\n"), err
    for fragment in fragments:
        assert fragment in err, err
    assert snapshot(root) == before
    return err


def assert_edit_folder(folder: Path, frames: int, size: int = 64, masks: bool = False):
    for name in ("edit.mp4", "edit.gif", "side_by_side.mp4"):
        assert (folder / name).is_file() and (folder / name).stat().st_size > 0, folder / name
    pngs = sorted((folder / "frames").iterdir())
    assert [p.name for p in pngs] == [f"{i:04d}.png" for i in range(frames)]
    with Image.open(pngs[0]) as image:
        assert image.size == (size, size)
    assert (folder / "masks.png").is_file() == masks  # one picture per edit


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_model_work(monkeypatch):
    """Fail the test if a model is built or a clip inverted: bad input must be caught before."""
    from fatezero_fast import models
    from fatezero_fast.edit.pipeline import FateZeroPipeline

    def forbidden(*args, **kwargs):
        raise AssertionError("model work started before the bad input was reported")

    monkeypatch.setattr(FateZeroPipeline, "__init__", forbidden)
    monkeypatch.setattr(FateZeroPipeline, "invert", forbidden)
    monkeypatch.setattr(models, "random_components", forbidden)


@pytest.fixture(scope="module")
def inversion_dir(clip_dir, tmp_path_factory):
    """`fatezero-fast invert` of the tiny clip on the built-in model (2 frames, 2 steps)."""
    out = tmp_path_factory.mktemp("inversion") / "inv"
    assert main(["invert", "--video", str(clip_dir), "--source-prompt", SOURCE, *TINY, "-o", str(out)]) == 0
    return out


# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------
def test_info(capsys):
    rc, out, err = run_cli(capsys, "info")
    assert rc == 0, err
    assert f"fatezero-fast {__version__}" in out
    assert f"torch {torch.__version__}" in out
    assert "diffusers" in out and "transformers" in out
    assert "blended_attention backends on cpu:" in out and "reference" in out
    assert "error" not in err


def test_info_console_script(tmp_path):
    """The installed command (or `python -m fatezero_fast.cli` when it is not installed)."""
    script = Path(sys.executable).parent / "fatezero-fast"
    command = [str(script), "info"] if script.is_file() else [sys.executable, "-m", "fatezero_fast.cli", "info"]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"fatezero-fast {__version__}\n")
    assert "blended_attention backends on cpu:" in done.stdout


# ---------------------------------------------------------------------------------------------
# edit / invert that work
# ---------------------------------------------------------------------------------------------
def test_edit_flags_builtin_model(capsys, clip_dir, tmp_path):
    out = tmp_path / "out"
    rc, stdout, err = run_cli(capsys, "edit", "--video", clip_dir, "--source-prompt", SOURCE,
                              "--target-prompt", TARGETS[0], "--target-prompt", TARGETS[1], *TINY,
                              "--blend-words", "car", "car", "--blend-self-attention", "-o", out)
    assert rc == 0, err
    assert not lines(err, "error:") and not lines(err, "warning:"), err
    assert any("built-in tiny model" in line for line in lines(err, "note:"))
    assert (out / "source.mp4").is_file()
    for i in range(2):
        assert_edit_folder(out / f"edit_{i:02d}", frames=2, masks=True)
        assert f"edit {i}:" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["edit_00", "edit_01", "run.json", "source.mp4"]
    run = json.loads((out / "run.json").read_text())
    assert run["source_prompt"] == SOURCE and run["steps"] == 2 and run["model"] is None
    assert [e["target_prompt"] for e in run["edits"]] == list(TARGETS)
    assert run["edits"][0]["options"]["blend_words"] == [["car"], ["car"]]


def test_edit_official_config(capsys, clip_dir, tiny_model_dir, tmp_path):
    config = tmp_path / "jeep_posche.yaml"
    config.write_text(CONFIG.format(model=tiny_model_dir, clip=clip_dir))
    out = tmp_path / "out"
    rc, stdout, err = run_cli(capsys, "edit", "--config", config, "--width", "64", "--height", "64", "-o", out)
    assert rc == 0, err
    assert not lines(err, "error:") and not lines(err, "warning:"), err
    lora = [line for line in lines(err, "note:") if "lora" in line]
    assert len(lora) == 1, err
    assert sorted(p.name for p in out.iterdir()) == ["edit_00", "edit_01", "run.json", "source.mp4"]
    assert_edit_folder(out / "edit_00", frames=2, masks=False)  # refine + eq_params, no blend words
    assert_edit_folder(out / "edit_01", frames=2, masks=True)   # replace + blend_words + blend_self_attention
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == str(tiny_model_dir) and run["steps"] == 2
    assert run["source_prompt"] == "a silver jeep driving down a curvy road in the countryside"
    edits = run["edits"]
    assert edits[1]["target_prompt"] == "a Porsche car driving down a curvy road in the countryside"
    assert edits[0]["options"]["eq_params"] == {"words": ["watercolor", "painting"], "values": [10, 10]}
    assert edits[0]["options"]["blend_th"] == [2.0, 2.0]
    assert edits[1]["options"]["is_replace_controller"] is True


def test_invert_then_edit_from_inversion(capsys, inversion_dir, tmp_path):
    assert sorted(p.name for p in inversion_dir.iterdir()) == ["inversion.json", "inversion.pt", "run.json"]
    meta = json.loads((inversion_dir / "inversion.json").read_text())
    assert meta["source_prompt"] == SOURCE and meta["num_inference_steps"] == 2
    out = tmp_path / "out"
    rc, stdout, err = run_cli(capsys, "edit", "--inversion", inversion_dir, "--target-prompt", TARGETS[1],
                              "-o", out)
    assert rc == 0, err
    assert not lines(err, "error:") and not lines(err, "warning:"), err
    assert (out / "source.mp4").is_file()
    assert_edit_folder(out / "edit_00", frames=2)
    run = json.loads((out / "run.json").read_text())
    assert run["source_prompt"] == SOURCE and run["steps"] == 2


def test_invert_command_output(capsys, clip_dir, tmp_path):
    """invert prints where it saved; nothing but the inversion is written."""
    out = tmp_path / "inv"
    rc, stdout, err = run_cli(capsys, "invert", "--video", clip_dir, "--source-prompt", SOURCE, *TINY,
                              "--steps", "1", "-o", out)
    assert rc == 0, err
    assert f"done: the inversion (2 frames, 1 steps) in {out}" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["inversion.json", "inversion.pt", "run.json"]


@pytest.mark.parametrize("store", [["--store", "qk"], ["--store", "fp8", "--store-placement", "disk"]])
def test_invert_with_a_stored_form_then_edit(capsys, clip_dir, tmp_path, store):
    inv, out = tmp_path / "inv", tmp_path / "out"
    rc, stdout, err = run_cli(capsys, "invert", "--video", clip_dir, "--source-prompt", SOURCE, *TINY,
                              *store, "-o", inv)
    assert rc == 0, err
    assert f"attention store ({store[1]})" in err
    assert (inv / "store").is_dir() == ("disk" in store)
    rc, stdout, err = run_cli(capsys, "edit", "--inversion", inv, "--target-prompt", TARGETS[0], "-o", out)
    assert rc == 0, err
    assert_edit_folder(out / "edit_00", frames=2)


def test_invert_latents_fp16_on_disk_then_edit(capsys, clip_dir, tmp_path, monkeypatch):
    import tempfile

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    inv, out = tmp_path / "inv", tmp_path / "out"
    rc, stdout, err = run_cli(capsys, "invert", "--video", clip_dir, "--source-prompt", SOURCE, *TINY,
                              "--latents-dtype", "fp16", "--latents-placement", "disk", "-o", inv)
    assert rc == 0, err
    assert "latents (on disk, float16)" in err
    assert sorted(p.name for p in (inv / "latents").iterdir()) == ["step_0000.pt", "step_0001.pt", "step_0002.pt",
                                                                 "token_maps"]
    assert len(list((inv / "latents" / "token_maps").iterdir())) == 2  # the mask-level maps of both steps
    meta = json.loads((inv / "inversion.json").read_text())
    assert meta["latents"] == {"placement": "disk", "dtype": "fp16", "shape": [3, 2, 4, 8, 8]}
    assert not any(temp.iterdir())  # the temporary latents folder is gone
    rc, stdout, err = run_cli(capsys, "edit", "--inversion", inv, "--target-prompt", TARGETS[0], "-o", out)
    assert rc == 0, err
    assert_edit_folder(out / "edit_00", frames=2)


def test_absent_blend_word_warns_once_and_succeeds(capsys, inversion_dir, tmp_path):
    rc, stdout, err = run_cli(capsys, "edit", "--inversion", inversion_dir, "--target-prompt", TARGETS[0],
                              "--blend-words", "truck", "car", "--blend-self-attention", "-o", tmp_path / "out")
    assert rc == 0, err
    assert not lines(err, "error:"), err
    warnings = lines(err, "warning:")
    assert len(warnings) == 1 and "'truck'" in warnings[0], err
    assert_edit_folder(tmp_path / "out" / "edit_00", frames=2, masks=True)


def test_replace_with_different_word_counts_warns_and_refines(capsys, inversion_dir, tmp_path):
    rc, stdout, err = run_cli(capsys, "edit", "--inversion", inversion_dir, "--replace",
                              "--target-prompt", "a big blue car driving down a road", "-o", tmp_path / "out")
    assert rc == 0, err
    assert not lines(err, "error:"), err
    warnings = lines(err, "warning:")
    assert len(warnings) == 1 and "same number of words" in warnings[0] and "refin" in warnings[0], err
    assert_edit_folder(tmp_path / "out" / "edit_00", frames=2)


def test_existing_output_with_overwrite_is_replaced(capsys, inversion_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sentinel.txt").write_text("old run")
    rc, stdout, err = run_cli(capsys, "edit", "--inversion", inversion_dir, "--target-prompt", TARGETS[0],
                              "-o", out, "--overwrite")
    assert rc == 0, err
    assert not (out / "sentinel.txt").exists()
    assert sorted(p.name for p in out.iterdir()) == ["edit_00", "run.json", "source.mp4"]


# ---------------------------------------------------------------------------------------------
# bad input: rc 2, one `error:` line, before any model work, nothing pre-existing touched
# ---------------------------------------------------------------------------------------------
def test_chunked_edit_equals_unchunked(capsys, inversion_dir, tmp_path):
    frames = {}
    for name, extra in (("whole", []), ("chunked", ["--chunk-size", "1"]), ("auto", ["--chunk-size", "auto"])):
        out = tmp_path / name
        rc, stdout, err = run_cli(capsys, "edit", "--inversion", inversion_dir, "--target-prompt", TARGETS[0],
                                  *extra, "-o", out)
        assert rc == 0, err
        frames[name] = np.asarray(Image.open(out / "edit_00" / "frames" / "0000.png"), dtype=np.int16)
    assert np.abs(frames["whole"] - frames["chunked"]).max() <= 1  # uint8 rounding of fp32-equal frames
    assert np.array_equal(frames["whole"], frames["auto"])  # auto on the CPU: all frames at once


def test_bad_chunk_size(capsys, clip_dir, tmp_path, no_model_work):
    assert_bad_input(capsys, tmp_path, edit_args(clip_dir, tmp_path / "out", "--chunk-size", "0"), "--chunk-size")


def test_usage_errors_are_one_line(capsys, clip_dir, tmp_path, no_model_work):
    for argv in (edit_args(clip_dir, tmp_path / "out", "--store", "zip"), edit_args(clip_dir, tmp_path / "o", "--steps", "abc"),
                 edit_args(clip_dir, tmp_path / "o", "--chunk-size", "big"),
                 edit_args(clip_dir, tmp_path / "o", "--latents-placement", "cloud")):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a) for a in argv])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err


def test_missing_video(capsys, tmp_path, no_model_work):
    assert_bad_input(capsys, tmp_path, edit_args(tmp_path / "nope.mp4", tmp_path / "out"), "video not found")


def test_unreadable_video(capsys, tmp_path, no_model_work):
    bad = tmp_path / "garbage.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_bad_input(capsys, tmp_path, edit_args(bad, tmp_path / "out"), "cannot read video", "garbage.mp4")


def test_empty_frame_folder(capsys, tmp_path, no_model_work):
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "notes.txt").write_text("not a frame")
    assert_bad_input(capsys, tmp_path, edit_args(tmp_path / "frames", tmp_path / "out"), "no PNG/JPG frames")


def test_frames_of_different_sizes(capsys, tmp_path, no_model_work):
    folder = tmp_path / "frames"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "0000.png")
    Image.new("RGB", (48, 64)).save(folder / "0001.png")
    assert_bad_input(capsys, tmp_path, edit_args(folder, tmp_path / "out"), "differ in size")


@pytest.mark.parametrize("flag, value", [("--width", "60"), ("--height", "100")])
def test_size_not_multiple_of_8(capsys, clip_dir, tmp_path, no_model_work, flag, value):
    err = assert_bad_input(capsys, tmp_path, edit_args(clip_dir, tmp_path / "out", flag, value),
                           "not a multiple of 8")
    assert value in err


def test_unknown_sparse_causal_index(capsys, clip_dir, tmp_path, no_model_work):
    assert_bad_input(capsys, tmp_path, edit_args(clip_dir, tmp_path / "out", "--index", "-1", "foo"),
                     "sparse-causal index", "'foo'")


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_steps_not_positive(capsys, clip_dir, tmp_path, no_model_work, steps):
    assert_bad_input(capsys, tmp_path, edit_args(clip_dir, tmp_path / "out", "--steps", steps),
                     "must be positive", steps)


def test_blend_threshold_out_of_range(capsys, clip_dir, tmp_path, no_model_work):
    assert_bad_input(capsys, tmp_path, edit_args(clip_dir, tmp_path / "out", "--blend-words", "car", "car",
                                                 "--blend-th", "3", "0.3"), "--blend-th", "[0, 2]")


def test_model_folder_missing_components(capsys, clip_dir, tmp_path, no_model_work):
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "config.json").write_text("{}")
    assert_bad_input(capsys, tmp_path, edit_args(clip_dir, tmp_path / "out", "--model", model),
                     "lacks", "vae", "text_encoder")


def test_output_under_a_file(capsys, clip_dir, tmp_path, no_model_work):
    (tmp_path / "file.txt").write_text("a regular file")
    assert_bad_input(capsys, tmp_path, edit_args(clip_dir, tmp_path / "file.txt" / "out"), "not writable")


def test_output_is_a_file_even_with_overwrite(capsys, clip_dir, tmp_path, no_model_work):
    (tmp_path / "result").write_text("a regular file")
    assert_bad_input(capsys, tmp_path, edit_args(clip_dir, tmp_path / "result", "--overwrite"), "is a file")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(capsys, clip_dir, tmp_path, no_model_work):
    assert_bad_input(capsys, tmp_path, edit_args(clip_dir, tmp_path / "out", "--device", "cuda"), "CUDA")


def test_existing_output_without_overwrite(capsys, clip_dir, tmp_path, no_model_work):
    out = tmp_path / "out"
    out.mkdir()
    (out / "sentinel.txt").write_text("old run")
    assert_bad_input(capsys, tmp_path, edit_args(clip_dir, out), "already exists", "--overwrite")
    assert (out / "sentinel.txt").read_text() == "old run"


def test_missing_config(capsys, tmp_path, no_model_work):
    assert_bad_input(capsys, tmp_path, ["edit", "--config", tmp_path / "nope.yaml", "-o", tmp_path / "out"],
                     "config file not found")


def test_inversion_folder_is_not_an_inversion(capsys, clip_dir, tmp_path, no_model_work):
    assert_bad_input(capsys, tmp_path, ["edit", "--inversion", clip_dir, "--target-prompt", TARGETS[0],
                                        "-o", tmp_path / "out"], "not a saved inversion")


@pytest.mark.parametrize("case", ["missing video", "existing output", "no source prompt"])
def test_invert_bad_input(capsys, clip_dir, tmp_path, no_model_work, case):
    out = tmp_path / "inv"
    argv = ["invert", "--video", clip_dir, "--source-prompt", SOURCE, *TINY, "-o", out]
    if case == "missing video":
        argv[2], fragment = tmp_path / "nope", "video not found"
    elif case == "existing output":
        out.mkdir()
        (out / "sentinel.txt").write_text("old inversion")
        fragment = "already exists"
    else:
        del argv[3:5]
        fragment = "no source prompt"
    assert_bad_input(capsys, tmp_path, argv, fragment)


def test_bad_edit_options_fail_before_inverting(capsys, clip_dir, tmp_path, monkeypatch):
    """Options only checked with the tokenizer (here a schedule outside [0, 1]) fail before the
    inversion and before an --overwrite output is replaced."""
    from fatezero_fast.edit.pipeline import FateZeroPipeline

    def forbidden(*args, **kwargs):
        raise AssertionError("inverted before the bad options were reported")

    monkeypatch.setattr(FateZeroPipeline, "invert", forbidden)
    out = tmp_path / "out"
    out.mkdir()
    (out / "sentinel.txt").write_text("old run")
    before = snapshot(tmp_path)
    rc, stdout, err = run_cli(capsys, *edit_args(clip_dir, out, "--overwrite", "--cross-replace-steps", "1.5"))
    assert rc == 2, err
    assert lines(err, "error:") == err.splitlines()[-1:] and "--cross-replace-steps" in err, err  # after the model note
    assert snapshot(tmp_path) == before
