"""`fatezero-fast`: edit a clip (flags or an official config), save an inversion, show the setup.

    fatezero-fast edit  [--config FILE] [--model DIR] [--video PATH] --target-prompt ... -o OUT
    fatezero-fast invert --video PATH --source-prompt ... -o INVERSION_DIR
    fatezero-fast info [--selftest [--json PATH]]

The flags are in io.flags, the checks of the input in io.inputs.

Every input is checked before the first model load; bad input prints one line `error: ...` and
exits with code 2. Results are written into a temporary sibling of --output and moved into place
only when the run succeeds (io.output), so a failed run leaves every earlier result as it was.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

from .. import __version__
from ..errors import InputError
from .flags import (
    OneLineParser,
    add_edit_args,
    add_model_args,
    add_output_args,
    add_store_args,
    add_video_args,
)
from .inputs import (
    check_model,
    edit_options_from_flags,
    job_from,
    name_flags,
    note,
    reconcile,
    run_config,
    set_edits,
)

DEMO_SOURCE = "a red car driving down a road"
DEMO_TARGETS = ("a red car driving down a road", "a blue car driving down a road")
DEMO_SIZE = 128  # the built-in tiny model runs at 128x128 (16x16 latents)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="fatezero-fast", description="FateZero zero-shot video editing, memory-optimized.")
    parser.add_argument("--version", action="version", version=f"fatezero-fast {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser, metavar="{edit,invert,info}")

    edit = sub.add_parser("edit", help="invert a clip (or load an inversion) and edit it with target prompts")
    edit.add_argument("--config", help="an official FateZero YAML config, its keys as they are (default: none)")
    edit.add_argument("--inversion", help="a folder written by `fatezero-fast invert`; skips inversion (default: none)")
    add_model_args(edit)
    add_video_args(edit)
    add_store_args(edit)
    add_edit_args(edit)
    add_output_args(edit, "out/edit")

    invert = sub.add_parser("invert", help="DDIM-invert a clip and save the inversion for later edits")
    add_model_args(invert)
    add_video_args(invert)
    add_store_args(invert)
    add_output_args(invert, "out/inversion")

    info = sub.add_parser("info", help="backends (auto's order and why one is passed over), device and versions "
                                       "(with --model: what the model folder holds)")
    info.add_argument("--model", help="a model folder: print its format, LoRA rank, temporal layers, prediction type")
    info.add_argument("--lora", type=int, help="the LoRA rank of the run's model_config, checked against the weights")
    info.add_argument("--selftest", action="store_true",
                      help="run every available backend over a fixed matrix against the reference; one row per "
                           "case; exit code 1 if any case fails")
    info.add_argument("--json", metavar="PATH", help="with --selftest: also write the rows and versions as JSON")
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


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
    pipe = _build_pipeline(job, run)
    pipe.distribute()  # under torchrun: this rank's frames (docs/design.md, "Several GPUs")
    return pipe


def _build_pipeline(job, run):
    import torch

    from ..edit.pipeline import FateZeroPipeline
    from ..unet.shard import shard_from_env

    shard_from_env()  # under torchrun: the process group (and this rank's GPU) before the model loads
    if job.model is None:
        note("no --model given: using the built-in tiny model with RANDOM weights, so the frames are noise-like; "
             "pass --model /path/to/stable-diffusion-v1-4 (a local diffusers-format folder) for real edits")
        if run.device.type == "cpu":
            torch.set_num_threads(1)  # the tiny model's tensors are too small to share between threads
        return FateZeroPipeline.tiny_random(seed=0, run=run)
    torch.manual_seed(job.seed)
    return FateZeroPipeline.from_pretrained(job.model, run=run, lora=job.lora)


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
    from ..unet.shard import is_main_process
    from .output import RankOutput, StagedOutput

    if not is_main_process():
        return RankOutput()  # a multi-rank run: rank 0 writes --output
    return StagedOutput.open(args.output, args.overwrite, {k: v for k, v in reads.items() if v is not None})


def cmd_invert(args) -> None:
    from .record import RunRecord

    job = job_from(args)
    run = run_config(args, job)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and run.store != "recompute" and run.store_placement == "disk":
        raise InputError(f"--store {run.store} on disk cannot be kept over several ranks: use --store-placement "
                         "host (rank 0 saves the gathered store) or --store recompute")
    _default_size(job, args)
    check_model(job)
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

    job = job_from(args)
    set_edits(args, job)
    inversion = Inversion.load(args.inversion) if args.inversion else None
    if inversion is not None:
        reconcile(args, job, inversion, args.inversion)
    else:
        _default_size(job, args)
        if not job.edits and job.video.path is None:
            scale = 7.5 if args.guidance_scale is None else args.guidance_scale
            job.edits = [(p, edit_options_from_flags(args, scale)) for p in DEMO_TARGETS]
    if not job.edits:
        raise InputError("no target prompt: pass --target-prompt or a --config with editing_prompts")
    run = run_config(args, job)
    check_model(job)
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


MASK_KINDS = ("self_attention", "latents")  # the order of their rows in masks.png


def _write_edits(pipe, inversion, job, args, out: Path, record) -> list[dict]:
    import torch

    from ..unet.shard import is_main_process
    from .video import save_frames, save_masks, save_video, side_by_side

    writes = is_main_process()  # every rank edits; rank 0 decodes and writes
    source = inversion.frames if inversion.frames is not None or not writes else \
        pipe.decode_latents(inversion.latents[0])
    if writes:
        save_video(source, out / "source.mp4", fps=args.fps)
    summary = []
    for i, (prompt, options) in enumerate(job.edits):
        folder = out / f"edit_{i:02d}"
        with record.phase(f"edit_{i:02d}"):
            result = pipe.edit(inversion, prompt, options)
        summary.append({"target_prompt": result.target_prompt, "folder": folder.name, "options": asdict(options)})
        if not writes:
            continue
        save_video(result.frames, folder / "edit.mp4", fps=args.fps)
        save_video(result.frames, folder / "edit.gif", fps=args.fps)
        save_frames(result.frames, folder / "frames")
        save_video(side_by_side(source, result.frames), folder / "side_by_side.mp4", fps=args.fps)
        if result.masks:  # one picture per edit: the self-attention masks' rows, then the latent masks'
            save_masks(torch.cat([result.masks[k] for k in MASK_KINDS if k in result.masks]), folder / "masks.png")
        if args.save_latents:
            torch.save(result.latents, folder / "latents.pt")
        print(f"edit {i}: {prompt!r} -> {args.output}/{folder.name}")
    return summary


def cmd_info(args) -> int:
    import platform

    import torch

    from .. import __version__, ops
    from ..ops import dispatch, selftest
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
    devices = ["cpu"] + (["cuda"] if cuda else [])
    for device in devices:
        lines.append(f"blended_attention backends on {device}: {', '.join(ops.available_backends(device))}")
    for device in devices:
        lines += dispatch.explain(device)
    lines.append("self-check at first use: " + ("on" if ops.selfcheck.enabled() else
                                                f"off ({ops.selfcheck.ENV_SWITCH}=0)"))
    if args.model:
        from ..models.formats import describe

        lines.append(describe(args.model, args.lora))
    print("\n".join(lines), flush=True)
    if not args.selftest:
        return 0
    print()
    environment = ops.selfcheck.environment()

    def write(rows, complete=False):  # after every case: a run cut short keeps its rows
        if args.json:
            failed = sum(r["status"] != "pass" for r in rows)
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"environment": environment, "info": lines, "complete": complete,
                                                   "passed": len(rows) - failed, "failed": failed, "rows": rows},
                                                  indent=1))

    rows = selftest.selftest(report=lambda line: print(line, flush=True), on_row=write)
    write(rows, complete=True)
    failed = sum(r["status"] != "pass" for r in rows)
    print(f"selftest: {len(rows) - failed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # run.json records the command line
    if args.command is None:
        parser.print_usage(sys.stderr)
        print("error: choose a command: edit, invert or info (see fatezero-fast --help)", file=sys.stderr)
        return 2
    from ..unet.shard import is_main_process

    quiet = not is_main_process()  # under torchrun rank 0 speaks; the others only report their errors
    stdout, stderr = sys.stdout, sys.stderr
    with warnings.catch_warnings(), open(os.devnull, "w") as devnull:
        warnings.showwarning = _show_warning  # one line each on stderr; the caller's setup is left as it was
        if quiet:
            sys.stdout = sys.stderr = devnull
        try:
            rc = {"edit": cmd_edit, "invert": cmd_invert, "info": cmd_info}[args.command](args)
        except InputError as exc:
            print(f"error: {name_flags(str(exc), getattr(args, 'from_config', set()))}", file=stderr)
            return 2
        finally:
            sys.stdout, sys.stderr = stdout, stderr
    return rc or 0


if __name__ == "__main__":
    sys.exit(main())
