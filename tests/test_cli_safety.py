"""The command as a new user meets it (issue 11): real processes, real files, nothing lost.

Every item runs `python -m fatezero_fast` in a subprocess at least once on the built-in tiny model
(64x64, 2 steps); further cases of the same item call `main` in-process (`run`), which is the
same code without the cost of starting Python and torch again. A bad input must give exit code
2, exactly one `error:` line, no traceback, no model load, and leave the checksums of every
earlier output and inversion as they were.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from fatezero_fast.edit.inversion import Inversion
from fatezero_fast.errors import InputError
from fatezero_fast.io.cli import build_parser, main
from fatezero_fast.io.video import save_video

REPO = Path(__file__).resolve().parents[1]
SOURCE = "a red car driving down a road"
TARGET = "a blue car driving down a road"
SMALL = ("--steps", "2", "--width", "64", "--height", "64")
MODEL_LOAD = "RANDOM weights"  # the note printed when the built-in model is loaded


def cli(cwd: Path, *argv, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # conftest's setting for the kernel tests; a user's run has none
    return subprocess.run([sys.executable, "-m", "fatezero_fast", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run(capsys, monkeypatch):
    """In-process `fatezero-fast` in a folder: (cwd, *argv) -> returncode, stdout, stderr."""
    def call(cwd: Path, *argv):
        monkeypatch.chdir(cwd)
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)
    return call


def checksums(root: Path) -> dict:
    """sha256 of every file under root, and the list of folders: any write, removal or leftover shows."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def assert_refused(done, *fragments, loads_model: bool = False) -> str:
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert (MODEL_LOAD in done.stderr) == loads_model, done.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def assert_ok(done):
    assert done.returncode == 0 and "Traceback" not in done.stderr and "error:" not in done.stderr, done.stderr
    return done


@pytest.fixture(scope="module")
def work(tmp_path_factory, clip_dir):
    """A user's folder: the 3-frame clip, an inversion of it in memory and one on disk."""
    root = tmp_path_factory.mktemp("user")
    shutil.copytree(clip_dir, root / "clip")
    assert_ok(cli(root, "invert", "--video", "clip", "--source-prompt", SOURCE, *SMALL, "-o", "inv"))
    assert main(["invert", "--video", str(root / "clip"), "--source-prompt", SOURCE, *SMALL, "--store", "fp16",
                 "--store-placement", "disk", "--latents-placement", "disk", "-o", str(root / "inv_disk")]) == 0
    return root


# -- item 1, and the new user's sequence of "Done when" ---------------------------------------------
def test_new_user_sequence(work, tmp_path, run):
    """Edit twice from one inversion with --overwrite, edit a single image, edit a 120-token prompt."""
    before = checksums(work / "inv")
    for call in (run, cli):
        done = assert_ok(call(work, "edit", "--inversion", "inv", "--target-prompt", TARGET, "--blend-words", "car",
                             "car", "--blend-self-attention", "--save-latents", "-o", tmp_path / "out", "--overwrite"))
        latents = torch.load(tmp_path / "out" / "edit_00" / "latents.pt")
        assert latents.shape == (3, 4, 8, 8)
    assert checksums(work / "inv") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind
    summary = done.stdout.strip().splitlines()[-1]
    assert summary.startswith("done: 1 edit in ") and str(tmp_path / "out") in summary and "peak memory" in summary
    assert not (tmp_path / "out" / "edit_00" / "masks").exists()
    with Image.open(tmp_path / "out" / "edit_00" / "masks.png") as image:  # one picture per edit
        assert image.size == (3 * 66 - 2, 64)  # 3 frames, 1 step of self-attention replacement, 8x8 -> 64
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    for key in ("frames", "size", "seed", "steps", "run_config", "versions", "model_format", "seconds",
                "peak_memory", "argv", "edits"):
        assert key in record, key
    assert record["frames"] == 3 and record["size"] == [64, 64] and record["run_config"]["store"] == "recompute"
    assert set(record["seconds"]) == {"load model", "edit_00"}

    Image.open(work / "clip" / "0000.png").save(tmp_path / "photo.png")
    done = assert_ok(cli(tmp_path, "edit", "--video", "photo.png", "--source-prompt", SOURCE, "--target-prompt",
                         TARGET, *SMALL, "-o", "image"))
    assert "photo.png has 1 frame" in done.stderr
    assert len(list((tmp_path / "image" / "edit_00" / "frames").iterdir())) == 1

    long_prompt = " ".join(["a blue car driving down a long and winding road under a bright sky"] * 9 + ["truck"])
    done = assert_ok(cli(work, "edit", "--inversion", "inv", "--target-prompt", long_prompt, "--blend-words", "car",
                         "truck", "--blend-self-attention", "-o", tmp_path / "long"))
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert any("more than 77" in w and "truck" in w for w in warnings), done.stderr
    assert any("blend word 'truck' does not occur" in w for w in warnings), done.stderr
    assert "Token indices sequence length" not in done.stderr  # transformers' own warning is not shown


def test_output_overlapping_what_the_run_reads_is_refused(work, run):
    before = checksums(work)
    for call, output, relation in ((cli, "inv", "is the --inversion folder"),
                                   (run, "inv/sub", "is inside the --inversion"),
                                   (run, ".", "contains the --inversion")):
        done = call(work, "edit", "--inversion", "inv", "--target-prompt", TARGET, "-o", output, "--overwrite")
        assert_refused(done, relation)
    assert_refused(run(work, "invert", "--video", "clip", "--source-prompt", SOURCE, "-o", "clip/out"),
                   "is inside the input video")
    assert checksums(work) == before


def test_failing_overwrite_keeps_the_old_output(work, tmp_path):
    """A run that fails after the model load leaves the old output and no staging folder."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("an earlier result")
    before = checksums(tmp_path)
    done = cli(work, "edit", "--inversion", "inv", "--target-prompt", TARGET, "--cross-replace-steps", "1.5",
               "-o", tmp_path / "out", "--overwrite")
    assert_refused(done, "--cross-replace-steps", loads_model=True)
    assert checksums(tmp_path) == before


def test_invert_and_edit_default_to_different_outputs():
    parser = build_parser()
    edit, invert = parser.parse_args(["edit"]).output, parser.parse_args(["invert"]).output
    assert edit != invert and not Path(edit).is_relative_to(invert) and not Path(invert).is_relative_to(edit)


# -- item 3 --------------------------------------------------------------------------------------------
def test_short_clip_takes_what_it_has_and_frames_is_named(work, tmp_path, run):
    done = run(work, "invert", "--video", "clip", "--source-prompt", SOURCE, "--frames", "5", *SMALL,
               "-o", tmp_path / "x")
    assert_refused(done, "has 3 frames but 5 are needed", "--frames 5")
    assert not (tmp_path / "x").exists() and not any(tmp_path.iterdir())


# -- item 4 --------------------------------------------------------------------------------------------
def _damage(folder: Path, case: str) -> None:
    if case == "truncated inversion.pt":
        data = (folder / "inversion.pt").read_bytes()
        (folder / "inversion.pt").write_bytes(data[: len(data) // 2])
    elif case == "invalid inversion.json":
        (folder / "inversion.json").write_text("{ not json")
    elif case == "deleted store step":
        (folder / "store" / "step_0001.pt").unlink()
    elif case == "truncated latent step":
        step = folder / "latents" / "step_0002.pt"
        step.write_bytes(step.read_bytes()[:100])


@pytest.mark.parametrize("case", ["truncated inversion.pt", "invalid inversion.json", "deleted store step",
                                  "truncated latent step"])
def test_damaged_inversion_is_refused_before_any_work(work, tmp_path, case, run):
    folder = tmp_path / "inv"
    shutil.copytree(work / "inv_disk", folder)
    _damage(folder, case)
    before = checksums(tmp_path)
    call = cli if case == "truncated inversion.pt" else run
    error = assert_refused(call(tmp_path, "edit", "--inversion", "inv", "--target-prompt", TARGET, "-o", "out"),
                           "is damaged")
    assert checksums(tmp_path) == before
    with pytest.raises(InputError) as api:  # the Python API says the same
        Inversion.load(folder)
    assert error == f"error: {api.value}".replace(str(folder), "inv")


# -- item 5 --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, fragment", [
    (("-o", "/proc/fatezero-out"), "not writable"),
    (("--fps", "0"), "--fps must be positive"),
    (("--device", "gpu"), "--device 'gpu' is not a device"),
    (("--guidance-scale", "nan"), "--guidance-scale must be a finite number"),
    (("--frames", "0"), "--frames 0 must be a positive number"),
    (("--frames", "-2"), "--frames -2"),
    (("--chunk-size", "0"), "--chunk-size must be a positive"),
], ids=["proc", "fps", "device", "guidance", "frames0", "frames-2", "chunk"])
def test_bad_values_fail_before_the_model_loads(work, extra, fragment, run):
    before = checksums(work)
    done = (cli if "/proc" in extra[-1] else run)(work, "edit", "--video", "clip", "--source-prompt", SOURCE,
                                                  "--target-prompt", TARGET, *SMALL, *extra)
    assert_refused(done, fragment)
    assert checksums(work) == before


def test_empty_target_prompt_is_refused(work, run):
    done = run(work, "edit", "--inversion", "inv", "--target-prompt", "", "-o", "o")
    assert_refused(done, "--target-prompt is empty")


def test_api_raises_the_same_messages(work, tiny_pipeline, run):
    from fatezero_fast.edit.pipeline import FateZeroPipeline

    for kwargs, flags in (({"chunk_size": 0}, ("--chunk-size", "0")), ({"device": "gpu"}, ("--device", "gpu"))):
        with pytest.raises(InputError) as api:
            FateZeroPipeline.tiny_random(**kwargs)
        done = run(work, "edit", "--inversion", "inv", "--target-prompt", TARGET, "-o", "o", *flags)
        assert assert_refused(done) == f"error: {api.value}"
    inversion = Inversion.load(work / "inv")
    with pytest.raises(InputError) as api:
        tiny_pipeline.edit(inversion, " ", progress=False)
    assert str(api.value) == "--target-prompt is empty: give the prompt the edit should follow"
    with pytest.raises(InputError) as api:
        save_video(torch.zeros(1, 3, 8, 8), work / "x.mp4", fps=0)
    done = run(work, "edit", "--inversion", "inv", "--target-prompt", TARGET, "-o", "o", "--fps", "0")
    assert assert_refused(done) == f"error: {api.value}"


# -- item 6 --------------------------------------------------------------------------------------------
def test_flags_fixed_by_the_inversion(work, tmp_path, run):
    done = cli(work, "edit", "--inversion", "inv", "--target-prompt", TARGET, "--steps", "3", "-o", tmp_path / "o")
    assert_refused(done, "--steps 3 contradicts the inversion inv, made with 2")
    done = run(work, "edit", "--inversion", "inv", "--target-prompt", TARGET, "--model", tmp_path, "-o", tmp_path / "o")
    assert_refused(done, "--model", "contradicts")
    done = assert_ok(run(work, "edit", "--inversion", "inv", "--target-prompt", TARGET, "--steps", "2",
                         "--frames", "3", "--width", "64", "-o", tmp_path / "agree"))
    notes = [line for line in done.stderr.splitlines() if "fixed by the inversion" in line]
    assert len(notes) == 3 and all(line.startswith("note:") for line in notes), done.stderr


CONFIG = """\
{model_key}: "{model}"
dataset_config:
    path: "clip"
    prompt: "{source}"
    n_sample_frame: {frames}
    image_size: 64
editing_config:
    editing_prompts: ["{target}"]
    num_inference_steps: 2
"""


def test_config_typos_and_missing_model(work, tiny_model_dir, tmp_path, run):
    def config(name, **values):
        values = {"model_key": "pretrained_model_path", "model": tiny_model_dir, "source": SOURCE, "target": TARGET,
                  "frames": 2, **values}
        (work / name).write_text(CONFIG.format(**values))
        return name

    done = cli(work, "edit", "--config", config("typo.yaml", model_key="pretrained_model_pth"), "-o", tmp_path / "a")
    assert_refused(done, "no pretrained_model_path")
    assert "did you mean 'pretrained_model_path'?" in done.stderr
    done = run(work, "edit", "--config", config("missing.yaml", model=tmp_path / "nope"), "-o", tmp_path / "b")
    assert_refused(done, "[pretrained_model_path] not found")
    done = run(work, "edit", "--config", config("frames.yaml", frames=0), "-o", tmp_path / "c")
    assert_refused(done, "--frames [dataset_config.n_sample_frame] 0")
    # a real model folder: diffusers' note about `accelerate` at most once
    done = assert_ok(cli(work, "edit", "--config", config("ok.yaml"), "-o", tmp_path / "d"))
    assert done.stderr.count("accelerate") <= 1, done.stderr
    assert not any(tmp_path.glob(".*"))


# -- item 7 --------------------------------------------------------------------------------------------
def test_help_version_and_bare_command(tmp_path):
    parser = build_parser()
    for command in ("edit", "invert"):
        sub = parser._subparsers._group_actions[0].choices[command]
        for action in sub._actions:
            if action.help != "show this help message and exit":
                assert action.help and "(default:" in action.help, (command, action.option_strings)
    done = cli(tmp_path, "--version")
    assert done.returncode == 0 and done.stdout.startswith("fatezero-fast ")
    done = cli(tmp_path)
    assert done.returncode == 2 and done.stderr.count("usage:") == 1
    assert "fatezero-fast fatezero-fast" not in done.stderr
    probe = "import sys; from fatezero_fast.io.cli import build_parser; build_parser().format_help(); " \
            "print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.stdout.strip() == "False", done.stderr  # --help loads no torch


# -- items 9 and 10 ------------------------------------------------------------------------------------
def test_setup_installs_numpy_before_building_and_the_demo_needs_no_triton():
    dry = subprocess.run(["make", "-n", "-B", "demo", "VENV=/nonexistent"], cwd=REPO, capture_output=True, text=True)
    commands = dry.stdout.splitlines()
    build = next(i for i, c in enumerate(commands) if "--no-build-isolation" in c)
    assert any("numpy" in c for c in commands[:build]), dry.stdout
    assert not any("triton" in c for c in commands), dry.stdout


def test_semantics_doc_has_every_cited_section():
    import re

    text = (REPO / "docs" / "semantics.md").read_text()
    sections = set(re.findall(r"^## §(\d+)", text, re.MULTILINE))
    assert sections == {str(i) for i in range(1, 9)}
    for path in (REPO / "fatezero_fast").rglob("*.py"):
        source = path.read_text()
        for cited in re.findall(r"docs/semantics\.md §(\d+)", source):
            assert cited in sections, (path, cited)
    for area in ("io", "edit", "semantics", "stores"):
        for path in (REPO / "fatezero_fast" / area).rglob("*.py"):
            assert "../shared" not in path.read_text() and "FATEZERO.md" not in path.read_text(), path


def test_the_torch_free_choices_are_the_stores_own():
    from fatezero_fast.edit.choices import STORE_FORMS, STORE_PLACEMENTS
    from fatezero_fast.stores import FORMS, PLACEMENTS

    assert STORE_FORMS == FORMS and STORE_PLACEMENTS == PLACEMENTS
