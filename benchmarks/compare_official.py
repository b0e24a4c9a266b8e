"""Run the official FateZero pipeline with and without fatezero_fast.compat.fatezero.patch().

    FATEZERO_SRC=/path/to/FateZero python benchmarks/compare_official.py [--cases style,shape] [--steps 10]

The official code is imported from the checkout FATEZERO_SRC (or --src) and run unmodified,
through its own entry point (test_fatezero.py's click command `run --config ...`) on its own
teaser configs, shrunk for the machine: the model is a random-weight one in the official format
(built here: unet/*.bin with SD-1.4's config keys, text encoder pytorch_model.bin, CLIP tokenizer),
the clip is the package's procedural sample clip, and frames, size and steps are small. Each case
runs in fresh processes (official, patched; --variants adds official-1thread, the official code's
own rounding floor), and the script prints and writes JSON with the max abs difference of the
inverted and final edited latents (each edit prompt) against the first variant, peak host RSS,
times and the bytes the attention stores hold. The `tuned` case runs a FateZero-tuned checkpoint
that the official code builds and saves (random temporal weights, see build_tuned_model). The
`cli` variant runs this project's own `fatezero-fast edit --config` on the same shrunk config with
--cli-python (a venv with current diffusers), and compares its final edited latents.

It needs an environment where the official code runs: diffusers 0.11.1, transformers 4.25.1,
accelerate 0.15.0, einops, omegaconf, click, imageio(-ffmpeg), opencv (see the shared notes on
running the official code), plus this package (pip install --no-build-isolation --no-deps -e .).
The CPU stand-ins the official code needs are installed here, in the running process, never by
editing the checkout: torch.cuda.get_device_name (called while building blocks), print_pipeline
(calls .cuda()), a torchvision stand-in when torchvision cannot be imported (only its
utils.save_image and transforms.ToPILImage are used, to write debug images), re-seeding before
the random temporal layers are drawn and before inversion, and zeroed temporal-attention output
biases (random in the official model with plain SD weights; a tuned checkpoint keeps its own).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Each case: an official config, shrunk. SpatialBlender (blend words) takes the cross maps of
# down-block entries [2:4] and up-block entries [:3], which are one resolution only when the
# largest level is uncontrolled (> 32*32 tokens): the blend cases need 64x64 latents (512 px).
CASES = {
    "style": dict(config="config/teaser/jeep_watercolor.yaml", frames=4, size=256, heads=2,
                  about="refine (+ eq_params on the 2nd prompt), self-replace, no blend"),
    "shape": dict(config="config/teaser/jeep_posche_local_latent_blend.yaml", frames=3, size=512, heads=1,
                  blend_th=0.8, about="replace + blend words + blend_self_attention + blend_latents"),
    "posche": dict(config="config/teaser/jeep_posche.yaml", frames=3, size=512, heads=1, blend_th=0.8,
                   about="refine + eq + blend words, then replace + blend words"),
    # a FateZero-tuned checkpoint (built by the official code, random temporal weights); no attention at the
    # largest level, so the blend layers are one resolution at 256 px; LoRA rank 48: the 32-channel layers
    # get 16 (the official rank clamp), the 64-channel ones 48
    "tuned": dict(config="config/teaser/jeep_posche.yaml", frames=3, size=256, heads=2, blend_th=0.8,
                  tuned=True, lora=48, top_attention=False,
                  about="tuned checkpoint (LoRA temporal convs, temporal attention): refine + eq + blend, "
                        "replace + blend"),
}
# blend_th: the random text encoder's cross maps are flat: at the configs' 0.3 every blend mask is all
# ones (edit everywhere, the source unused); at 0.8 about 70% of the rows edit, 30% keep the source.

SD14_WIDTHS = (320, 640, 1280, 1280)
MODELS = {
    # SD-1.4's block structure at toy widths; `heads` is SD's attention_head_dim (= number of heads)
    "tiny": dict(block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, norm_num_groups=8,
                 text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           projection_dim=32),
                 vae=dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8)),
    "sd14": dict(block_out_channels=SD14_WIDTHS, cross_attention_dim=768, norm_num_groups=32,
                 text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           projection_dim=768),
                 vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)),
}


# ---------------------------------------------------------------- inputs

def build_model(folder: Path, kind: str = "tiny", heads: int = 2, seed: int = 0, top_attention: bool = True) -> Path:
    """A random-weight SD model folder in the format the official code loads.

    top_attention=False: the largest level has no attention blocks (a cheap model whose blend-mask
    layers are still one resolution at small latents; for unit tests).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from fatezero_fast.models import SCHEDULER_CONFIG
    from fatezero_fast.models.tokenizer import VOCAB_SIZE, clip_tokenizer

    spec = MODELS[kind]
    torch.manual_seed(seed)
    unet_config = {  # the original SD-1.4 keys only: from_2d_model maps nothing else
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.2.2", "act_fn": "silu",
        "attention_head_dim": heads, "block_out_channels": list(spec["block_out_channels"]),
        "center_input_sample": False, "cross_attention_dim": spec["cross_attention_dim"],
        "down_block_types": ["CrossAttnDownBlock2D" if top_attention else "DownBlock2D"]
        + ["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"], "downsample_padding": 1,
        "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": spec["norm_num_groups"],
        "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2
        + ["CrossAttnUpBlock2D" if top_attention else "UpBlock2D"],
    }
    unet = UNet2DConditionModel(**{k: v for k, v in unet_config.items() if not k.startswith("_")})
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    torch.save(unet.state_dict(), folder / "unet" / "diffusion_pytorch_model.bin")
    (folder / "unet" / "config.json").write_text(json.dumps(unet_config, indent=2))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        **spec["vae"])
    vae.save_pretrained(folder / "vae")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=77, hidden_act="quick_gelu",
                                        **spec["text"]))
    try:
        text.save_pretrained(folder / "text_encoder", safe_serialization=False)
    except TypeError:
        text.save_pretrained(folder / "text_encoder")
    clip_tokenizer().save_pretrained(folder / "tokenizer")
    DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    return folder


def build_tuned_model(folder: Path, base: Path, src: Path, model_config: dict, seed: int = 0) -> Path:
    """A random FateZero-tuned pipeline folder, made by the official code as its training saves one.

    The official UNetPseudo3DConditionModel is built from the SD folder `base` (from_2d_model with the
    run's model_config), every temporal weight gets random values that change the output clearly
    (fatezero_fast.models.tuned.randomize_temporal: the zero-initialised LoRA up weights and temporal
    attention outputs too), and the official pipeline class saves it with save_pretrained."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from fatezero_fast.models.tuned import randomize_temporal

    _official_setup(src)
    from video_diffusion.models.unet_3d_condition import UNetPseudo3DConditionModel
    from video_diffusion.pipelines.stable_diffusion import (
        SpatioTemporalStableDiffusionPipeline,
    )

    torch.manual_seed(seed)
    unet = UNetPseudo3DConditionModel.from_2d_model(str(base / "unet"), model_config=dict(model_config))
    randomize_temporal(unet, seed + 1)
    pipe = SpatioTemporalStableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(str(base / "vae")), unet=unet,
        text_encoder=CLIPTextModel.from_pretrained(str(base / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(str(base / "tokenizer")),
        scheduler=DDIMScheduler.from_pretrained(str(base / "scheduler")))
    pipe.save_pretrained(str(folder))
    return folder


def make_frames(folder: Path, frames: int, size: int) -> Path:
    from fatezero_fast.io.video import make_sample_clip, save_frames

    save_frames(make_sample_clip(frames, size, size), folder)
    return folder


def write_config(src: Path, case: dict, model: Path, frames_dir: Path, logdir: Path, steps: int, precision: str,
                 model_kind: str, out: Path) -> Path:
    """The official config of the case with paths, sizes, steps and precision replaced."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(src / case["config"])
    cfg.pretrained_model_path = str(model)
    cfg.logdir = str(logdir)
    cfg.mixed_precision = "no" if precision == "fp32" else precision
    cfg.dataset_config.path = str(frames_dir)
    cfg.dataset_config.n_sample_frame = case["frames"]
    cfg.dataset_config.image_size = case["size"]
    cfg.editing_config.num_inference_steps = steps
    if case.get("lora") is not None:
        cfg.model_config.lora = case["lora"]
    if case.get("blend_th") is not None:
        for entry in (cfg.editing_config.get("p2p_config") or {}).values():
            if "blend_th" in entry:
                entry.blend_th = [case["blend_th"]] * 2
    least = cfg.get("model_config", {}).get("least_sc_channel")
    if least is not None and model_kind != "sd14":  # the same levels as SD-1.4: map SD's widths to the model's
        widths = MODELS[model_kind]["block_out_channels"]
        level = next((i for i, w in enumerate(SD14_WIDTHS) if w >= least), None)
        cfg.model_config.least_sc_channel = widths[level] if level is not None else max(widths) + 1
    OmegaConf.save(cfg, out)
    return out


# ---------------------------------------------------------------- one run (child process)

def _torchvision_stand_in():
    """Only torchvision.utils.save_image and transforms.ToPILImage are used (debug images)."""
    import numpy as np
    from PIL import Image

    def save_image(tensor, fp, normalize=False, **_):
        x = tensor.detach().float().cpu()
        if x.dim() == 3:
            x = x[None]
        if normalize:
            x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-5)
        grid = torch.cat(list(x.clamp(0, 1)), dim=-1)  # side by side
        array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(fp)

    class ToPILImage:
        def __call__(self, x):
            array = (x.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)

    root = types.ModuleType("torchvision")
    root.utils = types.ModuleType("torchvision.utils")
    root.utils.save_image = save_image
    root.transforms = types.ModuleType("torchvision.transforms")
    root.transforms.ToPILImage = ToPILImage
    sys.modules.update({"torchvision": root, "torchvision.utils": root.utils,
                        "torchvision.transforms": root.transforms})


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


def _official_setup(src: Path) -> None:
    """The CPU stand-ins the official code needs, and its checkout on sys.path."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # not installed, or a build for another torch
        _torchvision_stand_in()
    if not torch.cuda.is_available():
        torch.cuda.get_device_name = lambda *args, **kwargs: "cpu"
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))


def _is_2d(model_path) -> bool:
    """Whether a UNet folder holds plain SD weights (the official model's temporal layers are then random)."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    return config.get("_class_name") == "UNet2DConditionModel"


def run_once(src: Path, config: Path, variant: str, store: str, seed: int, result: Path, threads: int | None = None
             ) -> None:
    """Run test_fatezero's `run --config` in this process; write latents and numbers to `result`."""
    if threads:
        torch.set_num_threads(threads)
    _official_setup(src)
    import test_fatezero
    from video_diffusion.models.unet_3d_condition import UNetPseudo3DConditionModel
    from video_diffusion.pipelines.p2p_ddim_spatial_temporal import (
        P2pDDIMSpatioTemporalPipeline,
    )

    record = {"variant": variant, "edits_s": [], "final_latents": [], "inverted_latents": []}
    if variant.endswith("-1thread"):  # the same computation summed in another order: the rounding floor
        torch.set_num_threads(1)
    from_2d = UNetPseudo3DConditionModel.from_2d_model.__func__

    def from_2d_model(cls, model_path, *args, **kwargs):
        torch.manual_seed(seed)
        model = from_2d(cls, model_path, *args, **kwargs)
        if not _is_2d(model_path):  # a tuned checkpoint: its temporal weights are its own
            return model
        for name, module in model.named_modules():
            if name.endswith("attn_temporal") and module.to_out[0].bias is not None:
                torch.nn.init.zeros_(module.to_out[0].bias)
        return model

    invert = P2pDDIMSpatioTemporalPipeline.prepare_latents_ddim_inverted
    call = P2pDDIMSpatioTemporalPipeline.__call__
    decode = P2pDDIMSpatioTemporalPipeline.decode_latents

    def prepare_latents_ddim_inverted(self, *args, **kwargs):
        torch.manual_seed(seed)
        start = time.perf_counter()
        out = invert(self, *args, **kwargs)
        record["inversion_s"] = time.perf_counter() - start
        record["inverted_latents"].append(out[-1].detach().float().cpu().clone())
        controller = self.store_controller
        record["official_store_bytes"] = _tensor_bytes(controller.attention_store_all_step) + \
            _tensor_bytes(controller.attention_store)
        record["official_self_maps"] = sum(len(controller.attention_store_all_step[s][k])
                                           for s in range(len(controller.attention_store_all_step))
                                           for k in ("down_self", "mid_self", "up_self")
                                           if not isinstance(controller.attention_store_all_step[s], str))
        if variant.startswith("patched"):
            from fatezero_fast.compat import fatezero
            side = fatezero.source_store(controller)
            record["side_store_bytes"] = 0 if side is None else side.nbytes()
        return out

    def timed_call(self, *args, **kwargs):
        start = time.perf_counter()
        out = call(self, *args, **kwargs)
        record["edits_s"].append(time.perf_counter() - start)
        masks = out.get("mask_list") if isinstance(out, dict) else None
        record.setdefault("latent_blend_mask_mean", []).append(
            float(torch.cat([m.flatten() for m in masks]).mean()) if masks else None)
        return out

    def decode_latents(self, latents):
        record["final_latents"].append(latents.detach().float().cpu().clone())
        return decode(self, latents)

    UNetPseudo3DConditionModel.from_2d_model = classmethod(from_2d_model)
    P2pDDIMSpatioTemporalPipeline.prepare_latents_ddim_inverted = prepare_latents_ddim_inverted
    P2pDDIMSpatioTemporalPipeline.__call__ = timed_call
    P2pDDIMSpatioTemporalPipeline.decode_latents = decode_latents
    P2pDDIMSpatioTemporalPipeline.print_pipeline = lambda self, logger: None  # it calls .cuda() and nvcc
    if variant.startswith("patched"):
        from fatezero_fast.compat import fatezero
        fatezero.patch(store=store)

    start = time.perf_counter()
    test_fatezero.run.main(args=["--config", str(config)], standalone_mode=False)
    record["wall_s"] = time.perf_counter() - start
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.save({"final": record.pop("final_latents"), "inverted": record.pop("inverted_latents")},
               str(result) + ".latents.pt")
    result.write_text(json.dumps(record, indent=2))


# ---------------------------------------------------------------- driver

def compare(official: list, patched: list) -> list[dict]:
    """Per latent pair: max |a - b|, max |a|, and their ratio (the relative error)."""
    rows = []
    for a, b in zip(official, patched):
        diff = (a - b).abs().max().item()
        scale = a.abs().max().item()
        rows.append({"max_abs_diff": diff, "max_abs_official": scale, "rel_diff": diff / max(scale, 1e-30),
                     "shape": list(a.shape)})
    return rows


def case_model(case: dict, args, src: Path, work: Path) -> Path:
    """The case's model folder (built once per workdir): plain SD, or FateZero-tuned when case["tuned"]."""
    top = case.get("top_attention", True)
    model = work / f"model-{args.model}-h{case['heads']}{'' if top else '-notop'}"
    if not (model / "unet" / "config.json").exists():
        build_model(model, args.model, case["heads"], top_attention=top)
    if not case.get("tuned"):
        return model
    tuned = work / f"{model.name}-tuned-lora{case['lora']}"
    if not (tuned / "unet" / "config.json").exists():
        build_tuned_model(tuned, model, src, {"lora": case["lora"]}, args.seed)
    return tuned


def _child(cmd: list, run_dir: Path, what: str, timeout: float, pythonpath: bool = True) -> None:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, check=False, cwd=run_dir, env=env, capture_output=True, text=True, timeout=timeout)
    (run_dir / "output.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}); last output:\n" + (proc.stdout + proc.stderr)[-4000:])


def run_official(variant: str, config: Path, run_dir: Path, args, src: Path) -> tuple[dict, dict]:
    """One run of the official code (patched or not) in a child process: (record, latents)."""
    result = run_dir / "result.json"
    cmd = [sys.executable, os.path.abspath(__file__), "--_run", variant, "--_config", str(config),
           "--_result", str(result), "--src", str(src), "--store", args.store, "--seed", str(args.seed)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    _child(cmd, run_dir, f"{run_dir.name}", args.timeout)
    return json.loads(result.read_text()), torch.load(str(result) + ".latents.pt")


def run_cli(config: Path, run_dir: Path, args) -> tuple[dict, dict]:
    """This project's own CLI on the same official config, with --cli-python: (record, latents).

    Its final latents (F, 4, h, w) per edit are put in the official layout (1, 4, F, h, w); it keeps
    no inverted latents, so only the edits are compared."""
    out = run_dir / "out"
    cmd = [args.cli_python, "-m", "fatezero_fast", "edit", "--config", str(config), "--save-latents",
           "--seed", str(args.seed), "--overwrite", "-o", str(out)]
    _child(cmd, run_dir, f"{run_dir.name}", args.timeout)
    run = json.loads((out / "run.json").read_text())
    final = [torch.load(f, map_location="cpu").float().permute(1, 0, 2, 3)[None]
             for f in sorted(out.glob("edit_*/latents.pt"))]
    seconds = run["seconds"]
    record = {"variant": "cli", "versions": run["versions"], "wall_s": run["total_seconds"],
              "inversion_s": seconds.get("invert", 0),
              "edits_s": [v for k, v in sorted(seconds.items()) if k.startswith("edit_")],
              "peak_rss_mb": run["peak_memory"]["host_bytes"] / 2**20}
    return record, {"final": final, "inverted": []}


def run_case(name: str, case: dict, args, src: Path, work: Path) -> dict:
    model = case_model(case, args, src, work)
    frames = work / f"frames-{case['frames']}-{case['size']}"
    if not frames.exists():
        make_frames(frames, case["frames"], case["size"])
    out = {"case": name, "about": case["about"], "config": case["config"], "frames": case["frames"],
           "size": case["size"], "heads": case["heads"], "blend_th": case.get("blend_th"), "steps": args.steps,
           "model": args.model, "tuned_lora": case.get("lora") if case.get("tuned") else None,
           "precision": args.precision, "store": args.store, "threads": args.threads or torch.get_num_threads()}
    latents = {}
    for variant in args.variants:
        run_dir = work / f"{name}-{variant}"
        run_dir.mkdir(parents=True, exist_ok=True)
        config = write_config(src, case, model, frames, run_dir / "log", args.steps, args.precision, args.model,
                              run_dir / "config.yaml")
        start = time.perf_counter()
        if variant == "cli":
            record, latents[variant] = run_cli(config, run_dir, args)
        else:
            record, latents[variant] = run_official(variant, config, run_dir, args, src)
        record["process_s"] = time.perf_counter() - start
        out[variant] = record
    reference, *others = args.variants
    out["variants"] = list(args.variants)
    out["compared"] = {}
    for other in others:
        out["compared"][other] = {"inversion": compare(latents[reference]["inverted"], latents[other]["inverted"]),
                                  "edits": compare(latents[reference]["final"], latents[other]["final"])}
        if len(latents[reference]["final"]) != len(latents[other]["final"]):
            raise RuntimeError(f"{name}: {reference} made {len(latents[reference]['final'])} edits, "
                               f"{other} {len(latents[other]['final'])}")
    first = out["compared"][others[0]]
    out["inversion"], out["edits"] = first["inversion"], first["edits"]  # reference vs the second variant
    return out


def environment(argv: list[str]) -> dict:
    """Where and with what the official runs ran, and the command that ran them."""
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    return {"device": device, "load_average": [round(x, 2) for x in os.getloadavg()], "official_versions": versions,
            "command": " ".join(["python", "benchmarks/compare_official.py", *argv])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", default=os.environ.get("FATEZERO_SRC"), help="official checkout (FATEZERO_SRC)")
    parser.add_argument("--cases", default="style,shape", help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--frames", type=int, help="override every case's frame count")
    parser.add_argument("--size", type=int, help="override every case's frame size (px, multiple of 8)")
    parser.add_argument("--heads", type=int, help="override every case's head count")
    parser.add_argument("--blend-th", type=float, help="override the blend threshold of every case that blends")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument("--store", default="qk", help="patch(store=...): qk, full, fp16, fp8, lowrank")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads of each run (default: torch's; -1thread runs: 1)")
    parser.add_argument("--workdir", help="where models, clips and runs go (default: a temporary folder)")
    parser.add_argument("--out", help="write the JSON here too")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--variants", default="official,patched",
                        help="runs compared with the first: official, patched, or either with -1thread (one torch "
                             "thread: the same sums in another order; official,patched,official-1thread also "
                             "measures the rounding floor of the official code itself), or cli (this project's "
                             "`fatezero-fast edit --config` on the same config, run by --cli-python)")
    parser.add_argument("--cli-python", default=os.environ.get("FATEZERO_FAST_PYTHON", sys.executable),
                        help="the Python (with this package and its dependencies) that runs the cli variant "
                             "(default: FATEZERO_FAST_PYTHON, else this one)")
    parser.add_argument("--_run", help=argparse.SUPPRESS)
    parser.add_argument("--_config", help=argparse.SUPPRESS)
    parser.add_argument("--_result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.src:
        parser.error("name the official FateZero checkout with --src or FATEZERO_SRC")
    src = Path(args.src).resolve()
    args.variants = [v.strip() for v in args.variants.split(",")]
    allowed = ("official", "patched", "official-1thread", "patched-1thread", "cli")
    if len(args.variants) < 2 or len(set(args.variants)) != len(args.variants) or \
            any(v not in allowed for v in args.variants) or args.variants[0] == "cli":
        parser.error("--variants: two or more different names of official, patched, official-1thread, "
                     "patched-1thread, cli (cli not first: it keeps no inverted latents)")
    if args._run:
        run_once(src, Path(args._config), args._run, args.store, args.seed, Path(args._result), args.threads)
        return 0
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}: use {', '.join(CASES)}")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="compare_official_"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        case = dict(CASES[name])
        for key in ("frames", "size", "heads", "blend_th"):
            if getattr(args, key) is not None:
                case[key] = getattr(args, key)
        result = run_case(name, case, args, src, work)
        results.append(result)
        for other, found in result["compared"].items():
            for what in ("inversion", "edits"):
                for i, row in enumerate(found[what]):
                    print(f"{name} {args.variants[0]} vs {other}: {what} {i}: max|diff| {row['max_abs_diff']:.3e} "
                          f"(relative {row['rel_diff']:.3e})")
        for variant in args.variants:
            r = result[variant]
            edits = ", ".join(f"{t:.1f}" for t in r["edits_s"])
            print(f"{name} {variant:8s}: peak RSS {r['peak_rss_mb']:8.1f} MB, run {r['wall_s']:7.1f} s "
                  f"(inversion {r.get('inversion_s', 0):.1f} s, edits {edits} s), "
                  f"official store {r.get('official_store_bytes', 0) / 2**20:.1f} MiB"
                  + (f", side store {r['side_store_bytes'] / 2**20:.1f} MiB" if 'side_store_bytes' in r else ""),
                  flush=True)
    text = json.dumps({**environment(sys.argv[1:] if argv is None else argv), "workdir": str(work),
                       "results": results}, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
