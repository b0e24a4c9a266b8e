#!/usr/bin/env python
"""Pipeline benchmark: memory and time of inversion + one edit against clip length.

    python benchmarks/bench_pipeline.py --model tiny --frames 8,32,128 --steps 5 --device cpu
    python benchmarks/bench_pipeline.py --model sd14 --frames 8,32,128,512,1024 --steps 50,20,5,2,1 \\
        --chunk-size none,none,none,64,64 --device cuda

For every frame count, one configuration in its own subprocess (so that peak host RSS and peak
GPU memory are its own): a random-weight model (fatezero_fast.models: `tiny`, or `sd14` with
SD-1.4's exact shape) encodes a random clip through the VAE, inverts it with the source prompt,
makes one local edit (word swap, blend words, both blend masks), and decodes it. Recorded per
configuration: seconds per phase (encode, inversion, edit, decode), seconds per frame-step of
inversion and edit, peak GPU memory (allocated and reserved), peak host RSS (ru_maxrss of the
child) and RSS once the model is built, the chunk sizes used (`auto` resolved), and the bare
UNet forward at the same batch (stock diffusers UNet, its default SDPA attention, branches x
chunk frames per call: 1 branch for inversion, the edit's 3 for recompute + guidance), timed
after the pipeline on a fresh UNet, with the ratio of each phase to it. The official FateZero
store for the configuration (fp32 maps at 4 bytes, 2 in an fp16 run) is computed alongside, at
the run's steps and at 50. A benchmark, not a test: it asserts nothing; a configuration that
fails (out of memory, timeout) is recorded with its error and the run goes on.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the checkout's package when it is not installed (the device machine)
    sys.path.insert(0, str(REPO))

SOURCE, TARGET = "a red car driving down a road", "a blue car driving down a road"
EDIT = dict(is_replace_controller=True, blend_words=[["car"], ["car"]], blend_self_attention=True,
            blend_latents=True)
DEFAULT_SIZE = {"tiny": 128, "sd14": 512}


# ---------------------------------------------------------------------------------------------
# the child: one configuration
# ---------------------------------------------------------------------------------------------
def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _bare_unet(config: dict, unet_config: dict, device, dtype, branches: int, chunk: int, reps: int) -> dict:
    """Seconds per call of a stock UNet on branches*chunk rows (after one warm-up call), per frame-step."""
    import torch
    from diffusers import UNet2DConditionModel

    from fatezero_fast.models.random import _DOWN, _UP

    with torch.device(device):
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, down_block_types=_DOWN, up_block_types=_UP,
                                    **unet_config).to(dtype).eval()
    latent = config["size"] // 8
    rows = branches * chunk
    sample = torch.randn(rows, 4, latent, latent, device=device, dtype=dtype)
    context = torch.randn(rows, 77, unet_config["cross_attention_dim"], device=device, dtype=dtype)
    try:
        with torch.no_grad():
            unet(sample, 500, encoder_hidden_states=context)
            _sync(device)
            start = time.perf_counter()
            for _ in range(reps):
                unet(sample, 500, encoder_hidden_states=context)
            _sync(device)
        seconds = (time.perf_counter() - start) / reps
        return {"branches": branches, "frames_per_call": chunk, "s_per_call": seconds,
                "s_per_frame_step": seconds / chunk, "status": "ok"}
    except Exception as exc:  # an OOM of the bare UNet is a finding too
        return {"branches": branches, "frames_per_call": chunk, "status": _error(exc)}
    finally:
        del unet, sample, context
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _error(exc: BaseException) -> str:
    import torch

    kind = "OOM" if isinstance(exc, torch.OutOfMemoryError) else type(exc).__name__
    lines = str(exc).strip().splitlines()
    return f"error: {kind}: {lines[0] if lines else ''}"[:300]


def run_child(config: dict, out_path: str) -> int:
    import torch

    from fatezero_fast.edit.pipeline import FateZeroPipeline
    from fatezero_fast.models import CONFIGS, random_components

    record = dict(config)
    phases = record["seconds"] = {}
    device, dtype = torch.device(config["device"]), {"fp32": torch.float32, "fp16": torch.float16,
                                                     "bf16": torch.bfloat16}[config["dtype"]]
    cuda = device.type == "cuda"
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    record["device_name"] = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"

    def write(status):
        record["status"] = status
        # ru_maxrss misses RSS that was returned with madvise before the kernel's high-water mark saw it
        record["peak_rss_bytes"] = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                       record.get("rss_after_setup_bytes", 0), _rss_now())
        if cuda:
            record["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            record["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        Path(out_path).write_text(json.dumps(record, indent=2))

    latents_folder = tempfile.mkdtemp(prefix="bench_latents_") if config["latents_placement"] == "disk" else None
    try:
        frames, steps, chunk = config["frames"], config["steps"], config["chunk_size"]
        start = time.perf_counter()
        with torch.device(device):  # random init where the model runs (seconds for sd14 on a GPU)
            parts = random_components(config["model"], seed=0)
        pipe = FateZeroPipeline(**parts, device=device, dtype=dtype, chunk_size=chunk)
        torch.manual_seed(0)
        video = torch.rand(frames, 3, config["size"], config["size"]) * 2 - 1  # the clip, fp32 on the host
        _sync(device)
        phases["setup"] = time.perf_counter() - start

        def timed(name, fn):
            _sync(device)
            t0 = time.perf_counter()
            result = fn()
            _sync(device)
            phases[name] = time.perf_counter() - t0
            return result

        # warm-up (one-time costs: kernel compilation, allocator growth): one step on 2 frames, same settings
        few = video[:min(2, frames)]
        timed("warmup", lambda: pipe.edit(pipe.invert(few, SOURCE, 1, store=config["store"], progress=False),
                                          TARGET, progress=False, **EDIT))
        record["rss_after_setup_bytes"] = _rss_now()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            record["gpu_after_setup_bytes"] = torch.cuda.memory_allocated(device)
        z0 = timed("encode", lambda: pipe.encode_video(video, torch.Generator(device).manual_seed(0)))
        inversion = timed("inversion", lambda: pipe.invert(
            latents=z0, source_prompt=SOURCE, num_inference_steps=steps, store=config["store"], progress=False,
            latents_dtype=config["latents_dtype"], latents_folder=latents_folder))
        result = timed("edit", lambda: pipe.edit(inversion, TARGET, decode=False, progress=False, **EDIT))
        timed("decode", lambda: pipe.decode_latents(result.latents))
        latent_size = tuple(z0.shape[-2:])
        branches = {"inversion": 1, "edit": (2 if inversion.store.recompute else 1) + 1}  # [source,] uncond, target
        used = {}
        for phase, b in branches.items():
            used[phase] = pipe.auto_chunk_size(frames, b, latent_size) if chunk == "auto" else chunk
            record[f"{phase}_s_per_frame_step"] = phases[phase] / (frames * steps)
        record["chunk_used"] = used
        record["edit_branches"] = branches["edit"]
        record["store_bytes"] = inversion.store.nbytes()
        record["latents_bytes"] = inversion.latents.nbytes
        record["token_maps_bytes"] = inversion.token_maps.nbytes
        write("ok")  # the pipeline's peaks, before the baseline allocates anything

        unet_config = dict(CONFIGS[config["model"]]["unet"])
        del pipe, inversion, result, parts
        if cuda:
            torch.cuda.empty_cache()
        bare = record["bare_unet"] = {}
        for phase, b in branches.items():
            bare[phase] = _bare_unet(config, unet_config, device, dtype, b, used[phase] or frames, config["reps"])
            if bare[phase]["status"] == "ok":
                record[f"{phase}_vs_bare"] = record[f"{phase}_s_per_frame_step"] / bare[phase]["s_per_frame_step"]
        Path(out_path).write_text(json.dumps(record, indent=2))
        return 0
    except BaseException as exc:  # recorded with whatever phases finished
        write(_error(exc))
        traceback.print_exc()
        return 1
    finally:
        if latents_folder is not None:
            shutil.rmtree(latents_folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the parent: one subprocess per configuration
# ---------------------------------------------------------------------------------------------
def _per_frames(text: str, count: int, name: str, parse) -> list:
    values = [parse(v) for v in text.split(",")]
    if len(values) == 1:
        values *= count
    if len(values) != count:
        raise SystemExit(f"error: --{name} has {len(values)} values for {count} frame counts: give 1 or {count}")
    return values


def _chunk(value: str):
    return None if value == "none" else value if value == "auto" else int(value)


def _versions() -> dict:
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("diffusers", "transformers", "triton"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            versions[name] = None
    return versions


def run_config(config: dict, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        out = Path(tmp) / "record.json"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(config), str(out)]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
            tail = done.stderr.strip().splitlines()[-3:]
            status = None if out.is_file() else f"error: exit code {done.returncode}: {' | '.join(tail)}"
        except subprocess.TimeoutExpired:
            status = f"error: timeout after {timeout:g} s"
        record = json.loads(out.read_text()) if out.is_file() else dict(config)
        if status is not None and record.get("status", "ok") == "ok":
            record["status"] = status
        record["wall_s"] = time.perf_counter() - start
        return record


def official_bytes(config: dict) -> dict:
    from fatezero_fast.models import CONFIGS
    from fatezero_fast.stores import official_store_bytes
    from fatezero_fast.unet.processors import VideoAttentionConfig

    unet = dict(CONFIGS[config["model"]]["unet"])
    index = VideoAttentionConfig().sparse_causal_index
    per_value = 4 if config["dtype"] == "fp32" else 2
    size, frames = config["size"], config["frames"]
    return {"official_store_bytes": official_store_bytes(unet, size, size, frames, config["steps"], index,
                                                         bytes_per_value=per_value),
            "official_store_bytes_50_steps": official_store_bytes(unet, size, size, frames, 50, index,
                                                                  bytes_per_value=per_value)}


def _gb(value) -> str:
    return "-" if value is None else f"{value / 1e9:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="memory and time of inversion + one edit against clip length")
    p.add_argument("--model", default="tiny", choices=["tiny", "sd14"])
    p.add_argument("--frames", default="8,32,128", help="comma-separated frame counts, one config each")
    p.add_argument("--steps", default="50", help="DDIM steps: one value, or one per frame count")
    p.add_argument("--chunk-size", default="none", help="none, auto or frames: one value, or one per frame count")
    p.add_argument("--size", type=int, default=None, help="width = height in pixels (default: 128 tiny, 512 sd14)")
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default: fp16 cuda, fp32 cpu")
    p.add_argument("--store", default="recompute", help="attention store form (fatezero_fast.store.FORMS)")
    p.add_argument("--latents-dtype", default=None, choices=["fp32", "fp16", "bf16"],
                   help="inversion latents (default: the model's)")
    p.add_argument("--latents-placement", default="host", choices=["host", "disk"])
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of each child (default: torch's)")
    p.add_argument("--reps", type=int, default=2, help="timed calls of the bare UNet (after one warm-up)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per configuration")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/pipeline_<device>.json)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return run_child(json.loads(args.child[0]), args.child[1])

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")  # no CUDA context in the parent
    frames = [int(f) for f in args.frames.split(",")]
    steps = _per_frames(args.steps, len(frames), "steps", int)
    chunks = _per_frames(args.chunk_size, len(frames), "chunk-size", _chunk)
    size = args.size or DEFAULT_SIZE[args.model]
    dtype = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    out = Path(args.out or REPO / "benchmarks" / "results" / f"pipeline_{device.split(':')[0]}.json")
    result = {"command": " ".join(["benchmarks/bench_pipeline.py"] + list(sys.argv[1:] if argv is None else argv)),
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "environment": dict(_versions(), platform=platform.platform(), cpus=os.cpu_count(),
                                  loadavg_start=os.getloadavg()[0]),
              "records": []}
    print(f"{'frames':>6} {'steps':>5} {'chunk':>9} {'enc s':>7} {'inv s':>8} {'edit s':>8} {'dec s':>7} "
          f"{'inv/bare':>8} {'edit/bare':>9} {'GPU GB':>7} {'RSS GB':>7}  status")
    for f, s, c in zip(frames, steps, chunks):
        config = dict(model=args.model, frames=f, steps=s, chunk_size=c, size=size, dtype=dtype, store=args.store,
                      latents_dtype=args.latents_dtype, latents_placement=args.latents_placement, device=device,
                      threads=args.threads, reps=args.reps)
        record = dict(run_config(config, args.timeout), **official_bytes(config))
        result["records"].append(record)
        sec = record.get("seconds", {})
        used = record.get("chunk_used", {}).get("edit", c)
        ratio = {k: f"{record[k]:.2f}" if k in record else "-" for k in ("inversion_vs_bare", "edit_vs_bare")}
        print(f"{f:>6} {s:>5} {str(used):>9} " + " ".join(
            f"{sec[k]:>{w}.2f}" if k in sec else f"{'-':>{w}}" for k, w in
            (("encode", 7), ("inversion", 8), ("edit", 8), ("decode", 7))) +
            f" {ratio['inversion_vs_bare']:>8} {ratio['edit_vs_bare']:>9} "
            f"{_gb(record.get('peak_gpu_allocated_bytes')):>7} {_gb(record.get('peak_rss_bytes')):>7}  "
            f"{record.get('status')}", flush=True)
        names = {r.get("device_name") for r in result["records"] if r.get("device_name")}
        result["environment"]["device"] = ", ".join(sorted(names)) or device
        result["environment"]["loadavg_end"] = os.getloadavg()[0]
        if str(out) != "-":  # after every configuration: a run cut short keeps what it measured
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")
    if str(out) != "-":
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
