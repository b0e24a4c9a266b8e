"""Checking a command's input before any model loads: the job, its edits, the run configuration.

`job_from` reads --config and the flags into a JobConfig, `set_edits` the target prompts,
`run_config` builds the edit.run_config.RunConfig; `reconcile` holds the flags against a loaded
inversion, and `name_flags` rewrites an error so it names the flag the user typed (with the
config key in brackets when the value came from the config).
"""
from __future__ import annotations

import re
import sys
from dataclasses import replace
from pathlib import Path

from ..errors import InputError

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


def note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _parse_index(entries):
    parsed = []
    for e in entries:
        try:
            parsed.append(int(e))
        except ValueError:
            parsed.append(e)
    return parsed


def edit_options_from_flags(args, guidance_scale: float):
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


def job_from(args):
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


def set_edits(args, job) -> None:
    """job.edits from --target-prompt (or the config's), each checked, and --fps checked."""
    from ..edit.run_config import check_prompt_and_scale
    from .video import check_fps

    check_fps(args.fps)
    if args.guidance_scale is not None:
        job.from_config.discard("editing_config.guidance_scale")
        job.edits = [(p, replace(o, guidance_scale=args.guidance_scale)) for p, o in job.edits]
    if args.target_prompt:
        job.from_config.discard("editing_config.p2p_config")
        options = edit_options_from_flags(args, 7.5 if args.guidance_scale is None else args.guidance_scale)
        job.edits = [(p, options) for p in args.target_prompt]
    for prompt, options in job.edits:
        check_prompt_and_scale(prompt, options)


def run_config(args, job):
    """The run configuration (edit.run_config) the flags ask for."""
    from ..edit.run_config import RunConfig

    return RunConfig(device=args.device, dtype=args.dtype, attention=job.attention,
                     chunk_size=args.chunk_size, store=args.store or "recompute",
                     store_placement=args.store_placement or "host", store_rank=args.store_rank,
                     store_error=args.store_error, latents_dtype=args.latents_dtype,
                     latents_placement=args.latents_placement or "host")


def check_model(job) -> None:
    from ..models.loading import check_model_folder

    if job.model is not None:
        check_model_folder(job.model)


def reconcile(args, job, inversion, folder: str) -> None:
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


def name_flags(message: str, from_config: set[str]) -> str:
    """Name the flag the user would type; with the config key in brackets when the value came from the config."""
    for flag, key, section in _FLAG_KEYS:
        pattern = rf"(?<![\w-])({re.escape(flag)}|{re.escape(key)})(?![\w-])"
        config_key = section if section.endswith(key) or " " in key else f"{section}.{key}"
        message = re.sub(pattern, f"{flag} [{config_key}]" if section in from_config else flag, message, count=1)
    return message
