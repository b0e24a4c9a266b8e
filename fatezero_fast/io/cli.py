"""`fatezero-fast`: edit a clip (flags or an official config), save an inversion, show the setup.

    fatezero-fast edit  [--config FILE] [--model DIR] [--video PATH] --target-prompt ... -o OUT
    fatezero-fast invert --video PATH --source-prompt ... -o INVERSION_DIR
    fatezero-fast info

Bad input prints one line `error: ...` and exits with code 2, before anything is written.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from dataclasses import asdict, replace
from pathlib import Path

from ..errors import InputError

DEMO_SOURCE = "a red car driving down a road"
DEMO_TARGETS = ("a red car driving down a road", "a blue car driving down a road")
DEMO_SIZE = 128  # the built-in tiny model runs at 128x128 (16x16 latents)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local diffusers-format Stable Diffusion folder "
                                   "(default: the config's pretrained_model_path, else a built-in random tiny model)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="model dtype (default: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "cuda", "cpu", "reference"],
                   help="attention kernel backend")
    p.add_argument("--seed", type=int, default=None, help="seed of the VAE posterior sample (default 0)")
    p.add_argument("--chunk-size", type=_chunk_size, default=None,
                   help="run the UNet over this many frames at a time (exact; memory then depends on the "
                        "chunk, not the clip length), or 'auto': chosen from the free GPU memory (all at once "
                        "on the CPU); default: all frames at once")


def _chunk_size(text: str):
    """--chunk-size: an int (checked positive with the other flags) or 'auto'."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of frames or 'auto'") from None


def _add_video_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video", help="mp4/gif/webm file or folder of PNG/JPG frames (default: a built-in sample clip)")
    p.add_argument("--source-prompt", help="prompt describing the input clip")
    p.add_argument("--frames", type=int, default=None, help="number of frames to take (n_sample_frame; -1 = all)")
    p.add_argument("--sampling-rate", type=int, default=None, help="take every N-th frame")
    p.add_argument("--start-frame", type=int, default=None, help="first frame to take")
    p.add_argument("--width", type=int, default=None, help="output width, a multiple of 8")
    p.add_argument("--height", type=int, default=None, help="output height, a multiple of 8")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50)")
    p.add_argument("--index", nargs="+", default=None,
                   help="sparse-causal frames each frame attends to: ints (relative) or first/last/mid "
                        "(default: -1 first)")
    p.add_argument("--least-sc-channel", type=int, default=None,
                   help="blocks narrower than this use per-frame self-attention")
    p.add_argument("--max-control-tokens", type=int, default=None,
                   help="layers with at most this many query tokens are controlled (default 1024)")


def _add_store_args(p: argparse.ArgumentParser) -> None:
    from ..stores import FORMS, PLACEMENTS

    p.add_argument("--store", default="recompute", choices=FORMS,
                   help="how the source attention is kept: recompute (default, exact, ~nothing stored), qk, "
                        "full (official fp32 maps), fp16, fp8, lowrank")
    p.add_argument("--store-placement", default="host", choices=PLACEMENTS,
                   help="where a stored form lives: device, host (pinned, prefetched) or disk")
    p.add_argument("--store-rank", type=int, default=None, help="lowrank: rank per map (default 16)")
    p.add_argument("--store-error", type=float, default=None,
                   help="lowrank: smallest rank with relative error <= this, instead of --store-rank")
    p.add_argument("--latents-dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="dtype of the inversion latents kept for the edits (default: the model's, exact; "
                        "fp16 halves an fp32 model's: 1.7 GB instead of 3.4 for 1,024 frames at 512x512, 50 steps)")
    p.add_argument("--latents-placement", default="host", choices=["host", "disk"],
                   help="keep the inversion latents and the source token maps of the mask level (4 GB for "
                        "1,024 frames at 512x512, 50 steps) in host memory (default) or on disk, one file per "
                        "step, read back a step at a time while editing")


def _make_store(args):
    """The store the flags ask for; a disk store writes into a temporary folder until saved."""
    import tempfile

    from ..stores import make_store

    folder = tempfile.mkdtemp(prefix="fatezero_fast_store_") if args.store_placement == "disk" else None
    return make_store(args.store, placement=args.store_placement, folder=folder, rank=args.store_rank,
                      error_budget=args.store_error)


def _latents_folder(args):
    """A temporary folder for latents kept on disk (the inversion folder gets them when saved), else None."""
    import tempfile

    return tempfile.mkdtemp(prefix="fatezero_fast_latents_") if args.latents_placement == "disk" else None


def _invert(pipe, clip, run, args, store):
    """Inversion with the store and latent keeping the flags ask for; returns it and the latents' temp folder."""
    folder = _latents_folder(args)
    inversion = pipe.invert(clip, run.source_prompt, run.num_inference_steps, seed=run.seed, store=store,
                            latents_dtype=args.latents_dtype, latents_folder=folder)
    return inversion, folder


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default="out", help="output folder (default: out)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line with exit code 2, like every other bad input."""

    def error(self, message):
        self.exit(2, f"error: {message} (see fatezero-fast {self.prog.split()[-1]} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="fatezero-fast", description="FateZero zero-shot video editing, "
                                     "memory-optimized.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    edit = sub.add_parser("edit", help="invert a clip (or load an inversion) and edit it with target prompts")
    edit.add_argument("--config", help="an official FateZero YAML config (its keys as they are)")
    edit.add_argument("--inversion", help="a folder written by `fatezero-fast invert` (skips inversion)")
    _add_model_args(edit)
    _add_video_args(edit)
    _add_store_args(edit)
    edit.add_argument("--target-prompt", action="append", help="target prompt (repeat for several edits)")
    edit.add_argument("--cross-replace-steps", type=float, default=0.8)
    edit.add_argument("--self-replace-steps", type=float, default=0.8)
    edit.add_argument("--replace", action="store_true", help="word-swap replace instead of refine (same word count)")
    edit.add_argument("--blend-words", nargs=2, metavar=("SOURCE", "TARGET"),
                      help="comma-separated source and target words whose mask keeps the edit local")
    edit.add_argument("--blend-th", nargs=2, type=float, default=(0.3, 0.3))
    edit.add_argument("--blend-self-attention", action="store_true")
    edit.add_argument("--blend-latents", action="store_true")
    edit.add_argument("--eq", nargs="+", metavar="WORD=VALUE", help="reweight target words, e.g. watercolor=10")
    edit.add_argument("--guidance-scale", type=float, default=7.5)
    edit.add_argument("--fps", type=int, default=8)
    _add_output_args(edit)

    invert = sub.add_parser("invert", help="DDIM-invert a clip and save the inversion for later edits")
    _add_model_args(invert)
    _add_video_args(invert)
    _add_store_args(invert)
    _add_output_args(invert)

    info = sub.add_parser("info", help="backends, device and versions (with --model: what the model folder holds)")
    info.add_argument("--model", help="a model folder: print its format, LoRA rank, temporal layers, prediction type")
    info.add_argument("--lora", type=int, help="the LoRA rank of the run's model_config, checked against the weights")
    return parser


def _parse_index(entries):
    parsed = []
    for e in entries:
        try:
            parsed.append(int(e))
        except ValueError:
            parsed.append(e)
    return parsed


def _edit_options_from_flags(args):
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
                       eq_params=eq, guidance_scale=args.guidance_scale)


def _run_config(args):
    """RunConfig from --config (if any) overridden by explicit flags."""
    from .config import RunConfig, load_config

    run = load_config(args.config) if getattr(args, "config", None) else RunConfig()
    for note in run.notes:
        print(f"note: {note}", file=sys.stderr)
    v = run.video
    overrides = dict(path=args.video, n_sample_frame=args.frames, sampling_rate=args.sampling_rate,
                     start_sample_frame=args.start_frame, width=args.width, height=args.height)
    for key, value in overrides.items():
        if value is not None:
            setattr(v, key, value)
    if args.model:
        run.model = args.model
    if args.source_prompt is not None:
        run.source_prompt = args.source_prompt
    if args.steps is not None:
        run.num_inference_steps = args.steps
    if args.seed is not None:
        run.seed = args.seed
    if args.index is not None:  # replace() re-validates the entries now, before any model work
        run.attention = replace(run.attention, sparse_causal_index=_parse_index(args.index))
    if args.least_sc_channel is not None:
        run.attention.least_sc_channel = args.least_sc_channel
    if args.max_control_tokens is not None:
        run.attention.max_control_tokens = args.max_control_tokens
    run.attention.backend = args.backend
    chunk_size = getattr(args, "chunk_size", None)
    if isinstance(chunk_size, int) and chunk_size <= 0:
        raise InputError(f"--chunk-size must be a positive number of frames or 'auto', got {chunk_size}")
    if run.num_inference_steps <= 0:
        raise InputError(f"--steps must be positive, got {run.num_inference_steps}")
    return run


def _prepare_output(folder: Path, overwrite: bool) -> None:
    from .video import check_writable

    if folder.exists() and not folder.is_dir():
        raise InputError(f"output {folder} is a file, not a folder: choose another --output")
    if folder.exists() and any(folder.iterdir()):
        if not overwrite:
            raise InputError(f"output {folder} already exists: pass --overwrite or choose another --output")
    check_writable(folder)


def _default_size(run, args) -> None:
    """The built-in tiny model runs at DEMO_SIZE unless a size is given."""
    if run.model is None and args.width is None and args.height is None:
        run.video.width = run.video.height = DEMO_SIZE


def _load_pipeline(run, args, device):
    import torch

    from ..edit.pipeline import FateZeroPipeline

    dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    if run.model is None:
        print("note: no --model given: using the built-in tiny model with RANDOM weights, so the frames are "
              "noise-like; pass --model /path/to/stable-diffusion-v1-4 (a local diffusers-format folder) "
              "for real edits", file=sys.stderr)
        if device.type == "cpu":
            torch.set_num_threads(1)  # the tiny model's tensors are too small to share between threads
        return FateZeroPipeline.tiny_random(seed=0, device=device, dtype=dtype, attention=run.attention,
                                            chunk_size=args.chunk_size)
    torch.manual_seed(run.seed)
    return FateZeroPipeline.from_pretrained(run.model, device=device, dtype=dtype, attention=run.attention,
                                            chunk_size=args.chunk_size, lora=run.lora)


def _load_clip(run):
    from .video import check_size, load_video, make_sample_clip

    v = run.video
    check_size(v.width, v.height)
    if v.path is None:
        print("note: no --video given: using the built-in sample clip (a car driving by)", file=sys.stderr)
        if not run.source_prompt:
            run.source_prompt = DEMO_SOURCE
        frames = v.n_sample_frame if v.n_sample_frame > 0 else 8
        return make_sample_clip(frames, v.width, v.height)
    return load_video(v.path, n_sample_frame=v.n_sample_frame, sampling_rate=v.sampling_rate,
                      start_sample_frame=v.start_sample_frame, offset=v.offset, width=v.width, height=v.height)


def _check_edits(pipe, run, source_prompt: str, steps: int) -> None:
    """Build every edit's plan once (warnings silenced: the edits give them) so bad options fail before inverting."""
    from ..semantics.plan import EditPlan

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for prompt, options in run.edits:
            EditPlan.build(options, source_prompt, prompt, steps, pipe.tokenizer)


def _report_store(inversion) -> None:
    import torch

    store, latents = inversion.store, inversion.latents
    where = "on disk" if not isinstance(latents, torch.Tensor) else "in memory"
    print(f"attention store ({store.form}): {store.nbytes() / 1e6:.1f} MB; latents ({where}, "
          f"{str(latents.dtype).removeprefix('torch.')}): {latents.nbytes / 1e6:.1f} MB; mask maps: "
          f"{inversion.token_maps.nbytes / 1e6:.1f} MB", file=sys.stderr)


def cmd_invert(args) -> None:
    from ..edit.pipeline import resolve_device

    run = _run_config(args)
    out = Path(args.output)
    _prepare_output(out, args.overwrite)
    device = resolve_device(args.device)
    _default_size(run, args)
    clip = _load_clip(run)
    if not run.source_prompt:
        raise InputError("no source prompt: pass --source-prompt (it describes the input clip)")
    store = _make_store(args)
    pipe = _load_pipeline(run, args, device)
    inversion, latents_folder = _invert(pipe, clip, run, args, store)
    _report_store(inversion)
    inversion.model = run.model
    if out.exists():
        shutil.rmtree(out)
    inversion.save(out)
    for folder in (store.folder if store.placement == "disk" else None, latents_folder):
        if folder is not None:  # its steps were copied into the inversion folder
            shutil.rmtree(folder, ignore_errors=True)
    print(f"saved the inversion ({inversion.num_frames} frames, {inversion.num_inference_steps} steps) to {out}")


def cmd_edit(args) -> None:
    from ..edit.inversion import Inversion
    from ..edit.pipeline import resolve_device
    from .video import save_frames, save_masks, save_video, side_by_side

    run = _run_config(args)
    if args.target_prompt:
        options = _edit_options_from_flags(args)
        run.edits = [(p, options) for p in args.target_prompt]
    out = Path(args.output)
    _prepare_output(out, args.overwrite)
    inversion = Inversion.load(args.inversion) if args.inversion else None
    if inversion is not None:
        run.attention = replace(inversion.attention, backend=args.backend)
        run.source_prompt = inversion.source_prompt
        run.model = args.model or inversion.model
    device = resolve_device(args.device)
    clip = None
    if inversion is None:  # everything about the input is checked before the model is loaded
        _default_size(run, args)
        clip = _load_clip(run)
        if not run.edits and run.video.path is None:
            run.edits = [(p, _edit_options_from_flags(args)) for p in DEMO_TARGETS]
    if not run.edits:
        raise InputError("no target prompt: pass --target-prompt or a --config with editing_prompts")
    if not run.source_prompt:
        raise InputError("no source prompt: pass --source-prompt (it describes the input clip)")
    store = _make_store(args) if inversion is None else None
    pipe = _load_pipeline(run, args, device)
    steps = inversion.num_inference_steps if inversion is not None else run.num_inference_steps
    _check_edits(pipe, run, run.source_prompt, steps)
    latents_folder = None
    if inversion is None:
        inversion, latents_folder = _invert(pipe, clip, run, args, store)
        _report_store(inversion)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    source = inversion.frames if inversion.frames is not None else pipe.decode_latents(inversion.latents[0])
    save_video(source, out / "source.mp4", fps=args.fps)
    summary = []
    for i, (prompt, options) in enumerate(run.edits):
        result = pipe.edit(inversion, prompt, options)
        folder = out / f"edit_{i:02d}"
        save_video(result.frames, folder / "edit.mp4", fps=args.fps)
        save_video(result.frames, folder / "edit.gif", fps=args.fps)
        save_frames(result.frames, folder / "frames")
        save_video(side_by_side(source, result.frames), folder / "side_by_side.mp4", fps=args.fps)
        for name, masks in result.masks.items():
            save_masks(masks, folder / "masks" / name)
        summary.append({"target_prompt": prompt, "folder": folder.name, "options": asdict(options)})
        print(f"edit {i}: {prompt!r} -> {folder}")
    (out / "run.json").write_text(json.dumps({"source_prompt": inversion.source_prompt, "model": run.model,
                                              "steps": inversion.num_inference_steps, "edits": summary},
                                             indent=2, default=str))
    for folder in (store.folder if store is not None and store.placement == "disk" else None, latents_folder):
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


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
    if args.model:
        from ..models.formats import describe

        lines.append(describe(args.model, args.lora))
    print("\n".join(lines))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # one line each on stderr; the caller's warning setup is left as it was
        warnings.showwarning = _show_warning
        try:
            {"edit": cmd_edit, "invert": cmd_invert, "info": cmd_info}[args.command](args)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
