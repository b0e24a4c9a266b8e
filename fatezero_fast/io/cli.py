"""`fatezero-fast`: edit a clip (flags or an official config), save an inversion, show the setup.

    fatezero-fast edit  [--config FILE] [--model DIR] [--video PATH] --target-prompt ... -o OUT
    fatezero-fast invert --video PATH --source-prompt ... -o INVERSION_DIR
    fatezero-fast info

Every input is checked before the first model load; bad input prints one line `error: ...` and
exits with code 2. Results are written into a temporary sibling of --output and moved into place
only when the run succeeds (io.output), so a failed run leaves every earlier result as it was.
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from dataclasses import asdict, replace
from pathlib import Path

from .. import __version__
from ..edit.choices import (
    BACKENDS,
    DTYPE_NAMES,
    LATENTS_PLACEMENTS,
    STORE_FORMS,
    STORE_PLACEMENTS,
)
from ..errors import InputError

DEMO_SOURCE = "a red car driving down a road"
DEMO_TARGETS = ("a red car driving down a road", "a blue car driving down a road")
DEMO_SIZE = 128  # the built-in tiny model runs at 128x128 (16x16 latents)
# flag, its name in EditOptions / load_video / the pipeline, and the config section it comes from
_FLAG_KEYS = (("--frames", "n_sample_frame", "dataset_config.n_sample_frame"),
              ("--sampling-rate", "sampling_rate", "dataset_config.sampling_rate"),
              ("--start-frame", "start_sample_frame", "dataset_config.start_sample_frame"),
              ("--steps", "num_inference_steps", "editing_config.num_inference_steps"),
              ("--guidance-scale", "guidance_scale", "editing_config.guidance_scale"),
              ("--cross-replace-steps", "cross_replace_steps", "editing_config.p2p_config"),
              ("--self-replace-steps", "self_replace_steps", "editing_config.p2p_config"),
              ("--blend-words", "blend_words", "editing_config.p2p_config"),
              ("--blend-th", "blend_th", "editing_config.p2p_config"),
              ("--eq", "eq_params", "editing_config.p2p_config"),
              ("--model folder", "model folder", "pretrained_model_path"))


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# the parser (torch-free, so --help is fast)
# ---------------------------------------------------------------------------------------------
def _chunk_size(text: str):
    """--chunk-size: an int (checked positive with the other options) or 'auto'."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of frames or 'auto'") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local diffusers-format Stable Diffusion folder (default: the config's "
                                   "pretrained_model_path, else a built-in random tiny model)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help="model dtype (default: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="attention kernel backend (default: auto, the fastest available)")
    p.add_argument("--seed", type=int, default=None, help="seed of the VAE posterior sample (default: 0)")
    p.add_argument("--chunk-size", type=_chunk_size, default=None,
                   help="run the UNet over this many frames at a time (exact; memory then depends on the "
                        "chunk, not the clip length), or 'auto': chosen from the free GPU memory (all at once "
                        "on the CPU) (default: all frames at once)")


def _add_video_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video", help="mp4/gif/webm file, a PNG/JPG image (an image edit) or a folder of PNG/JPG "
                                   "frames (default: a built-in sample clip)")
    p.add_argument("--source-prompt", help="prompt describing the input clip (default: the config's)")
    p.add_argument("--frames", type=int, default=None,
                   help="number of frames to take, -1 for all (default: what the clip has, up to 8)")
    p.add_argument("--sampling-rate", type=int, default=None, help="take every N-th frame (default: 1)")
    p.add_argument("--start-frame", type=int, default=None, help="first frame to take (default: 0)")
    p.add_argument("--width", type=int, default=None,
                   help="output width, a multiple of 8 (default: 512, 128 on the built-in model)")
    p.add_argument("--height", type=int, default=None,
                   help="output height, a multiple of 8 (default: 512, 128 on the built-in model)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 50)")
    p.add_argument("--index", nargs="+", default=None,
                   help="sparse-causal frames each frame attends to: ints (relative) or first/last/mid "
                        "(default: -1 first)")
    p.add_argument("--least-sc-channel", type=int, default=None,
                   help="blocks narrower than this use per-frame self-attention (default: none)")
    p.add_argument("--max-control-tokens", type=int, default=None,
                   help="layers with at most this many query tokens are controlled (default: 1024)")


def _add_store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", choices=STORE_FORMS,
                   help="how the source attention is kept: recompute (exact, ~nothing stored), qk, full "
                        "(official fp32 maps), fp16, fp8, lowrank (default: recompute)")
    p.add_argument("--store-placement", choices=STORE_PLACEMENTS,
                   help="where a stored form lives: device, host (pinned, prefetched) or disk (default: host)")
    p.add_argument("--store-rank", type=int, default=None, help="lowrank: rank per map (default: 16)")
    p.add_argument("--store-error", type=float, default=None,
                   help="lowrank: smallest rank with relative error <= this, instead of --store-rank "
                        "(default: unset)")
    p.add_argument("--latents-dtype", choices=DTYPE_NAMES,
                   help="dtype of the inversion latents kept for the edits; fp16 halves an fp32 model's: "
                        "1.7 GB instead of 3.4 for 1,024 frames at 512x512, 50 steps (default: the model's, exact)")
    p.add_argument("--latents-placement", choices=LATENTS_PLACEMENTS,
                   help="keep the inversion latents and the source token maps of the mask level (4 GB for "
                        "1,024 frames at 512x512, 50 steps) in host memory or on disk, one file per step, read "
                        "back a step at a time while editing (default: host)")


def _add_edit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target-prompt", action="append",
                   help="target prompt; repeat for several edits (default: the config's editing_prompts)")
    p.add_argument("--cross-replace-steps", type=float, default=0.8,
                   help="fraction of the steps whose cross-attention is fused from the source (default: 0.8)")
    p.add_argument("--self-replace-steps", type=float, default=0.8,
                   help="fraction of the steps whose self-attention is fused from the source (default: 0.8)")
    p.add_argument("--replace", action="store_true",
                   help="word-swap replace instead of refine, for prompts with the same word count (default: refine)")
    p.add_argument("--blend-words", nargs=2, metavar=("SOURCE", "TARGET"),
                   help="comma-separated source and target words whose mask keeps the edit local (default: none)")
    p.add_argument("--blend-th", nargs=2, type=float, default=(0.3, 0.3),
                   help="thresholds in [0, 2] of the self-attention and latent blend masks (default: 0.3 0.3)")
    p.add_argument("--blend-self-attention", action="store_true",
                   help="blend the fused self-attention with the blend-word mask (default: off)")
    p.add_argument("--blend-latents", action="store_true",
                   help="blend the latents with the blend-word mask, for local shape edits (default: off)")
    p.add_argument("--eq", nargs="+", metavar="WORD=VALUE",
                   help="reweight target words, e.g. watercolor=10 (default: none)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale (default: the config's, else 7.5)")
    p.add_argument("--fps", type=int, default=8, help="frames per second of the saved videos (default: 8)")
    p.add_argument("--save-latents", action="store_true",
                   help="also write each edit's final latents to edit_NN/latents.pt (default: off)")


def _add_output_args(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("-o", "--output", default=default, help=f"output folder (default: {default})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder once the run has succeeded (default: off)")


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line with exit code 2, like every other bad input."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="fatezero-fast", description="FateZero zero-shot video editing, memory-optimized.")
    parser.add_argument("--version", action="version", version=f"fatezero-fast {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_OneLineParser, metavar="{edit,invert,info}")

    edit = sub.add_parser("edit", help="invert a clip (or load an inversion) and edit it with target prompts")
    edit.add_argument("--config", help="an official FateZero YAML config, its keys as they are (default: none)")
    edit.add_argument("--inversion", help="a folder written by `fatezero-fast invert`; skips inversion (default: none)")
    _add_model_args(edit)
    _add_video_args(edit)
    _add_store_args(edit)
    _add_edit_args(edit)
    _add_output_args(edit, "out/edit")

    invert = sub.add_parser("invert", help="DDIM-invert a clip and save the inversion for later edits")
    _add_model_args(invert)
    _add_video_args(invert)
    _add_store_args(invert)
    _add_output_args(invert, "out/inversion")

    sub.add_parser("info", help="backends, device and versions")
    return parser


# ---------------------------------------------------------------------------------------------
# checking the input (before any model is loaded)
# ---------------------------------------------------------------------------------------------
def _parse_index(entries):
    parsed = []
    for e in entries:
        try:
            parsed.append(int(e))
        except ValueError:
            parsed.append(e)
    return parsed


def _edit_options_from_flags(args, guidance_scale: float):
    from ..semantics.plan import EditOptions

    eq = None
    if args.eq:
        words, values = [], []
        for item in args.eq:
            word, sep, value = item.partition("=")
            try:
                values.append(float(value))
            except ValueError:
                sep = ""
            if not sep or not word:
                raise InputError(f"--eq {item!r} must be WORD=NUMBER, e.g. watercolor=10")
            words.append(word)
        eq = {"words": words, "values": values}
    blend = None if not args.blend_words else [w.split(",") for w in args.blend_words]
    return EditOptions(cross_replace_steps=args.cross_replace_steps, self_replace_steps=args.self_replace_steps,
                       is_replace_controller=args.replace, blend_words=blend, blend_th=tuple(args.blend_th),
                       blend_self_attention=args.blend_self_attention, blend_latents=args.blend_latents,
                       eq_params=eq, guidance_scale=guidance_scale)


def _job(args):
    """The JobConfig from --config (if any) overridden by explicit flags, its plain values checked."""
    from ..edit.run_config import check_steps
    from .config import JobConfig, load_config
    from .video import check_frames

    job = load_config(args.config) if getattr(args, "config", None) else JobConfig()
    args.from_config = job.from_config  # what error messages name in brackets (kept up to date below)
    for message in job.notes:
        note(message)
    v = job.video
    overrides = dict(path=args.video, n_sample_frame=args.frames, sampling_rate=args.sampling_rate,
                     start_sample_frame=args.start_frame, width=args.width, height=args.height)
    for key, value in overrides.items():
        if value is not None:
            setattr(v, key, value)
            job.from_config.discard(f"dataset_config.{key}")
    for flag, value, key in ((args.model, "model", "pretrained_model_path"),
                             (args.source_prompt, "source_prompt", "dataset_config.prompt"),
                             (args.steps, "num_inference_steps", "editing_config.num_inference_steps"),
                             (args.seed, "seed", "seed")):
        if flag is not None:
            setattr(job, value, flag)
            job.from_config.discard(key)
    if args.index is not None:  # replace() re-validates the entries now, before any model work
        job.attention = replace(job.attention, sparse_causal_index=_parse_index(args.index))
    if args.least_sc_channel is not None:
        job.attention.least_sc_channel = args.least_sc_channel
    if args.max_control_tokens is not None:
        job.attention.max_control_tokens = args.max_control_tokens
    job.attention.backend = args.backend
    check_steps(job.num_inference_steps)
    check_frames(v.n_sample_frame)
    return job


def _edits(args, job) -> None:
    """job.edits from --target-prompt (or the config's), each checked, and --fps checked."""
    from ..edit.run_config import check_prompt_and_scale
    from .video import check_fps

    check_fps(args.fps)
    if args.guidance_scale is not None:
        job.from_config.discard("editing_config.guidance_scale")
        job.edits = [(p, replace(o, guidance_scale=args.guidance_scale)) for p, o in job.edits]
    if args.target_prompt:
        job.from_config.discard("editing_config.p2p_config")
        options = _edit_options_from_flags(args, 7.5 if args.guidance_scale is None else args.guidance_scale)
        job.edits = [(p, options) for p in args.target_prompt]
    for prompt, options in job.edits:
        check_prompt_and_scale(prompt, options)


def _run_config(args, job):
    """The run configuration (edit.run_config) the flags ask for."""
    from ..edit.run_config import RunConfig

    return RunConfig(device=args.device, dtype=args.dtype, attention=job.attention,
                     chunk_size=args.chunk_size, store=args.store or "recompute",
                     store_placement=args.store_placement or "host", store_rank=args.store_rank,
                     store_error=args.store_error, latents_dtype=args.latents_dtype,
                     latents_placement=args.latents_placement or "host")


def _check_model(job) -> None:
    from ..edit.pipeline import check_model_folder

    if job.model is not None:
        check_model_folder(job.model)


def _reconcile(args, job, inversion, folder: str) -> None:
    """Flags the inversion already fixes: an error when they contradict it, a note when they agree."""
    from ..edit.steps import DiskSteps

    latents = inversion.latents.shape
    height, width = (inversion.frames.shape[-2:] if inversion.frames is not None else (None, None))
    fixed = (("--model", args.model, inversion.model or "the built-in model", _same_path),
             ("--video", args.video, inversion.video, _same_path),
             ("--source-prompt", args.source_prompt, inversion.source_prompt, str.__eq__),
             ("--steps", args.steps, inversion.num_inference_steps, int.__eq__),
             ("--frames", args.frames, latents[1], lambda a, b: a in (b, -1)),
             ("--width", args.width, width, int.__eq__),
             ("--height", args.height, height, int.__eq__),
             ("--store", args.store, inversion.store.form, str.__eq__),
             ("--store-placement", args.store_placement, inversion.store.placement, str.__eq__),
             ("--latents-placement", args.latents_placement,
              "disk" if isinstance(inversion.latents, DiskSteps) else "host", str.__eq__))
    for flag, given, made, same in fixed:
        if given is None:
            continue
        if made is None:
            note(f"{flag} is ignored: the inversion {folder} fixes it and does not record it")
        elif not same(given, made):
            raise InputError(f"{flag} {given} contradicts the inversion {folder}, made with {made}: leave "
                             f"{flag} out, or invert again")
        else:
            note(f"{flag} {given} is what the inversion {folder} was made with; it is fixed by the inversion")
    if job.model is None or args.model is None:
        job.model = inversion.model
    job.source_prompt = inversion.source_prompt
    job.attention = replace(inversion.attention, backend=args.backend)


def _same_path(a, b) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _name_flags(message: str, from_config: set[str]) -> str:
    """Name the flag the user would type; with the config key in brackets when the value came from the config."""
    for flag, key, section in _FLAG_KEYS:
        pattern = rf"(?<![\w-])({re.escape(flag)}|{re.escape(key)})(?![\w-])"
        config_key = section if section.endswith(key) or " " in key else f"{section}.{key}"
        message = re.sub(pattern, f"{flag} [{config_key}]" if section in from_config else flag, message, count=1)
    return message


# ---------------------------------------------------------------------------------------------
# the work
# ---------------------------------------------------------------------------------------------
def _default_size(job, args) -> None:
    """The built-in tiny model runs at DEMO_SIZE unless a size is given."""
    if job.model is None and args.width is None and args.height is None:
        job.video.width = job.video.height = DEMO_SIZE


def _load_clip(job):
    from .video import DEFAULT_FRAMES, check_size, load_video, make_sample_clip

    v = job.video
    check_size(v.width, v.height)
    if v.path is None:
        note("no --video given: using the built-in sample clip (a car driving by)")
        if not job.source_prompt:
            job.source_prompt = DEMO_SOURCE
        return make_sample_clip(v.n_sample_frame if (v.n_sample_frame or 0) > 0 else DEFAULT_FRAMES, v.width, v.height)
    clip = load_video(v.path, n_sample_frame=v.n_sample_frame, sampling_rate=v.sampling_rate,
                      start_sample_frame=v.start_sample_frame, offset=v.offset, width=v.width, height=v.height)
    if v.n_sample_frame is None and len(clip) < DEFAULT_FRAMES:
        note(f"{v.path} has {len(clip)} frame{'s' * (len(clip) > 1)}: editing {'them all' if len(clip) > 1 else 'it'} "
             f"(--frames picks a number)")
    return clip


def _load_pipeline(job, run):
    import torch

    from ..edit.pipeline import FateZeroPipeline

    if job.model is None:
        note("no --model given: using the built-in tiny model with RANDOM weights, so the frames are noise-like; "
             "pass --model /path/to/stable-diffusion-v1-4 (a local diffusers-format folder) for real edits")
        if run.device.type == "cpu":
            torch.set_num_threads(1)  # the tiny model's tensors are too small to share between threads
        return FateZeroPipeline.tiny_random(seed=0, run=run)
    torch.manual_seed(job.seed)
    return FateZeroPipeline.from_pretrained(job.model, run=run)


def _check_edits(pipe, job, steps: int) -> None:
    """Build every edit's plan once (warnings silenced: the edits give them) so bad options fail before inverting."""
    from ..edit.run_config import check_edit
    from ..semantics.plan import EditPlan
    from ..semantics.tokens import fit_prompt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = fit_prompt(job.source_prompt, pipe.tokenizer, "source")
        for prompt, options in job.edits:
            EditPlan.build(options, source, check_edit(prompt, options, pipe.tokenizer), steps, pipe.tokenizer)


def _invert(pipe, clip, job, run, work: Path):
    """The inversion the flags ask for; what is kept on disk goes into `work`."""
    inversion = pipe.invert(clip, job.source_prompt, job.num_inference_steps, seed=job.seed,
                            latents_folder=work / "latents" if run.latents_placement == "disk" else None,
                            store_folder=work / "store")
    inversion.model, inversion.video = job.model, job.video.path
    store, latents = inversion.store, inversion.latents
    where = "on disk" if run.latents_placement == "disk" else "in memory"
    print(f"attention store ({store.form}): {store.nbytes() / 1e6:.1f} MB; latents ({where}, "
          f"{str(latents.dtype).removeprefix('torch.')}): {latents.nbytes / 1e6:.1f} MB; mask maps: "
          f"{inversion.token_maps.nbytes / 1e6:.1f} MB", file=sys.stderr)
    return inversion


def _settings(job, run, inversion=None) -> dict:
    """What run.json records about the input and the options."""
    v = job.video
    size = [v.width, v.height]
    if inversion is not None and inversion.frames is not None:
        size = list(inversion.frames.shape[-1:-3:-1])
    return {"model": job.model, "model_format": "diffusers folder" if job.model else "built-in random tiny model",
            "video": v.path, "frames": inversion.num_frames if inversion is not None else v.n_sample_frame,
            "size": size, "sampling_rate": v.sampling_rate, "start_frame": v.start_sample_frame,
            "offset": v.offset, "seed": job.seed, "source_prompt": job.source_prompt,
            "steps": inversion.num_inference_steps if inversion else job.num_inference_steps,
            "run_config": {**asdict(run), "device": str(run.device), "dtype": str(run.dtype)}}


def _staged(args, reads: dict):
    from .output import StagedOutput

    return StagedOutput.open(args.output, args.overwrite, {k: v for k, v in reads.items() if v is not None})


def cmd_invert(args) -> None:
    from .record import RunRecord

    job = _job(args)
    run = _run_config(args, job)
    _default_size(job, args)
    _check_model(job)
    out = _staged(args, {"input video": job.video.path})
    try:
        clip = _load_clip(job)
        if not job.source_prompt:
            raise InputError("no source prompt: pass --source-prompt (it describes the input clip)")
        record = RunRecord("invert", args.argv, _settings(job, run))
        with record.phase("load model"):
            pipe = _load_pipeline(job, run)
        with record.phase("invert"):
            inversion = _invert(pipe, clip, job, run, out.path)
        inversion.save(out.path)
        record.write(out.path, frames=inversion.num_frames, source_prompt=inversion.source_prompt)
        out.commit()
    except BaseException:
        out.discard()
        raise
    print(record.summary(f"the inversion ({inversion.num_frames} frames, {inversion.num_inference_steps} steps)",
                         out.target))


def cmd_edit(args) -> None:
    import shutil

    from ..edit.inversion import Inversion
    from .record import RunRecord

    job = _job(args)
    _edits(args, job)
    inversion = Inversion.load(args.inversion) if args.inversion else None
    if inversion is not None:
        _reconcile(args, job, inversion, args.inversion)
    else:
        _default_size(job, args)
        if not job.edits and job.video.path is None:
            scale = 7.5 if args.guidance_scale is None else args.guidance_scale
            job.edits = [(p, _edit_options_from_flags(args, scale)) for p in DEMO_TARGETS]
    if not job.edits:
        raise InputError("no target prompt: pass --target-prompt or a --config with editing_prompts")
    run = _run_config(args, job)
    _check_model(job)
    out = _staged(args, {"--inversion folder": args.inversion, "input video": job.video.path})
    try:
        clip = _load_clip(job) if inversion is None else None
        if not job.source_prompt:
            raise InputError("no source prompt: pass --source-prompt (it describes the input clip)")
        record = RunRecord("edit", args.argv, _settings(job, run, inversion))
        with record.phase("load model"):
            pipe = _load_pipeline(job, run)
        steps = inversion.num_inference_steps if inversion is not None else job.num_inference_steps
        _check_edits(pipe, job, steps)
        if inversion is not None and inversion.latents.shape[2] != pipe.unet.config.in_channels:
            raise InputError(f"the inversion {args.inversion} has {inversion.latents.shape[2]}-channel latents but "
                             f"the model takes {pipe.unet.config.in_channels}: use the model it was made with")
        if inversion is None:
            with record.phase("invert"):
                inversion = _invert(pipe, clip, job, run, out.path / ".inversion")
        edits = _write_edits(pipe, inversion, job, args, out.path, record)
        shutil.rmtree(out.path / ".inversion", ignore_errors=True)
        record.write(out.path, source_prompt=inversion.source_prompt, edits=edits)
        out.commit()
    except BaseException:
        out.discard()
        raise
    print(record.summary(f"{len(edits)} edit{'s' * (len(edits) > 1)}", out.target))


def _write_edits(pipe, inversion, job, args, out: Path, record) -> list[dict]:
    import torch

    from .video import save_frames, save_masks, save_video, side_by_side

    source = inversion.frames if inversion.frames is not None else pipe.decode_latents(inversion.latents[0])
    save_video(source, out / "source.mp4", fps=args.fps)
    summary = []
    for i, (prompt, options) in enumerate(job.edits):
        folder = out / f"edit_{i:02d}"
        with record.phase(f"edit_{i:02d}"):
            result = pipe.edit(inversion, prompt, options)
        save_video(result.frames, folder / "edit.mp4", fps=args.fps)
        save_video(result.frames, folder / "edit.gif", fps=args.fps)
        save_frames(result.frames, folder / "frames")
        save_video(side_by_side(source, result.frames), folder / "side_by_side.mp4", fps=args.fps)
        for name, masks in result.masks.items():
            save_masks(masks, folder / "masks" / f"{name}.png")
        if args.save_latents:
            torch.save(result.latents, folder / "latents.pt")
        summary.append({"target_prompt": result.target_prompt, "folder": folder.name, "options": asdict(options)})
        print(f"edit {i}: {prompt!r} -> {args.output}/{folder.name}")
    return summary


def cmd_info(args) -> None:
    import platform

    import torch

    from .. import __version__, ops
    from ..ops.backends import cpu as cpu_backend
    from ..ops.backends import cuda as cuda_backend

    lines = [f"fatezero-fast {__version__}", f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in ("triton", "diffusers", "transformers"):
        try:
            module = __import__(name)
            lines.append(f"{name} {module.__version__}")
        except Exception:
            lines.append(f"{name}: not installed")
    cuda = torch.cuda.is_available()
    lines.append(f"device: {torch.cuda.get_device_name(0) if cuda else 'cpu (no CUDA)'}")
    lines.append(f"C++ CPU ops: {'built' if cpu_backend.available() else 'not built'}; "
                 f"CUDA ops: {'built' if cuda_backend.available() else 'not available'}")
    lines.append(f"blended_attention backends on cpu: {', '.join(ops.available_backends('cpu'))}")
    if cuda:
        lines.append(f"blended_attention backends on cuda: {', '.join(ops.available_backends('cuda'))}")
    print("\n".join(lines))


def main(argv=None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # run.json records the command line
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("error: choose a command: edit, invert or info (see fatezero-fast --help)", file=sys.stderr)
        return 2
    with warnings.catch_warnings():  # one line each on stderr; the caller's warning setup is left as it was
        warnings.showwarning = _show_warning
        try:
            {"edit": cmd_edit, "invert": cmd_invert, "info": cmd_info}[args.command](args)
        except InputError as exc:
            print(f"error: {_name_flags(str(exc), getattr(args, 'from_config', set()))}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
