#!/usr/bin/env python
"""Train the toy-world model (fatezero_fast/toyworld/model) on this CPU, reproducibly from a seed.

    python tools/train_toyworld.py --work /tmp/toyworld-train [--seed 0] [--threads 1]

Three phases, each checkpointed in --work (a partial run is usable; a finished phase is skipped):
  1. data: N clips of the toy world (seeds 1_000_000 + i; the benchmark and the tests use seeds
     below 1_000_000), `--frames-per-clip` random frames of each, random horizontal flips;
  2. the VAE (AutoencoderKL, SD's block types, factor 2: 48x48 frames -> 24x24x4 latents) on pixel
     MSE + a small KL term; then the scaling factor is set to 1/std of the latents (as SD's 0.18215);
  3. the UNet (UNet2DConditionModel, SD's block types) and the text encoder (CLIPTextModel, real
     CLIP tokenizer), jointly, on the precomputed latent posteriors: epsilon prediction with SD's
     scaled-linear betas, min-SNR-5 loss weights, 10% empty captions (for classifier-free guidance),
     an EMA of the weights (the shipped ones).
Losses go to --work/{vae,unet}_loss.csv; --export writes the diffusers folder the package ships
(fp16 safetensors) and the loss-curve PNGs.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from fatezero_fast.models import SCHEDULER_CONFIG  # noqa: E402
from fatezero_fast.toyworld import world  # noqa: E402
from fatezero_fast.toyworld.model import build_components, save_folder  # noqa: E402

TRAIN_SEED0 = 1_000_000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
def make_data(work: Path, clips: int, per_clip: int, pairs: float, seed: int):
    path = work / "data.pt"
    if path.exists():
        return torch.load(path)
    rng = np.random.default_rng(seed)
    images = np.empty((clips * per_clip, world.SIZE, world.SIZE, 3), np.uint8)
    captions = []
    for i in range(clips):
        if rng.random() < pairs:  # two objects: each colour word must go to its own object
            first, second = world.sample_pair(TRAIN_SEED0 + i)
            clip = world.render(first, 8, others=(second,))
            clip.caption = world.pair_caption(first, second)
        else:
            clip = world.make_clip(TRAIN_SEED0 + i, num_frames=8)
        for j, f in enumerate(rng.choice(8, per_clip, replace=False)):
            image = clip.frames[f]
            if rng.random() < 0.5:
                image = image[:, ::-1]
            images[i * per_clip + j] = image
            captions.append(clip.caption)
        if i % 2000 == 0:
            log(f"data: {i}/{clips} clips")
    data = dict(images=torch.from_numpy(images), captions=captions)
    torch.save(data, path)
    return data


def to_tensor(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def save_ckpt(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
def train_vae(work: Path, data, parts, args):
    vae = parts["vae"]
    ckpt = work / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt)
        vae.load_state_dict(state["model"]), opt.load_state_dict(state["opt"])
        step = state["step"]
    if step >= args.vae_steps:
        return
    n = len(data["images"])
    out = open(work / "vae_loss.csv", "a", newline="")
    writer = csv.writer(out)
    vae.train()
    t0 = time.time()
    while step < args.vae_steps:
        g = torch.Generator().manual_seed(args.seed * 7919 + step)  # the batch of a step: resumable
        idx = torch.randint(0, n, (args.vae_batch,), generator=g)
        x = to_tensor(data["images"][idx])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.vae_steps, args.vae_lr, 100)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = posterior.kl().mean() / (z[0].numel())
        loss = mse + F.l1_loss(rec, x) * 0.5 + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        psnr = 10 * math.log10(4 / max(mse.item(), 1e-10))
        writer.writerow([step, f"{mse.item():.6f}", f"{kl.item():.4f}", f"{psnr:.3f}", f"{time.time() - t0:.1f}"])
        if step % 50 == 0 or step == args.vae_steps:
            out.flush()
            log(f"vae step {step}/{args.vae_steps} mse {mse.item():.5f} psnr {psnr:.2f} kl {kl.item():.3f} "
                f"({(time.time() - t0) / 60:.1f} min)")
        if step % 250 == 0 or step == args.vae_steps:
            save_ckpt(ckpt, model=vae.state_dict(), opt=opt.state_dict(), step=step)
    out.close()
    vae.eval()


@torch.no_grad()
def encode_latents(work: Path, data, vae):
    path = work / "latents.pt"
    if path.exists():
        return torch.load(path)
    vae.eval()
    means, stds = [], []
    for i in range(0, len(data["images"]), 256):
        post = vae.encode(to_tensor(data["images"][i:i + 256])).latent_dist
        means.append(post.mean.half()), stds.append(post.std.half())
    mean, std = torch.cat(means), torch.cat(stds)
    scale = float(1 / mean.float().std())
    lat = dict(mean=mean, std=std, scaling_factor=scale)
    torch.save(lat, path)
    log(f"latents {tuple(mean.shape)} scaling factor {scale:.4f}")
    return lat


# ---------------------------------------------------------------------------------------------
class ProbeCrossAttn:
    """A plain cross-attention processor that keeps its attention probabilities (for the entropy term)."""

    def __init__(self, kept: list):
        self.kept = kept

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, None)
        self.kept.append(probs)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def probe_cross_attention(unet) -> list:
    """Swap every cross-attention processor for ProbeCrossAttn; returns the list they fill each call."""
    from diffusers.models.attention_processor import AttnProcessor

    kept: list = []
    unet.set_attn_processor({name: ProbeCrossAttn(kept) if name.endswith("attn2.processor") else AttnProcessor()
                             for name in unet.attn_processors})
    return kept


def train_unet(work: Path, data, lat, parts, args):
    from diffusers import DDPMScheduler

    unet, text = parts["unet"], parts["text_encoder"]
    tok = parts["tokenizer"]
    ckpt = work / "unet.pt"
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=args.unet_lr, weight_decay=0.01)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    step = 0
    if ckpt.exists():
        state = torch.load(ckpt)
        unet.load_state_dict(state["unet"]), text.load_state_dict(state["text"]), opt.load_state_dict(state["opt"])
        ema_unet.load_state_dict(state["ema_unet"]), ema_text.load_state_dict(state["ema_text"])
        step = state["step"]
    if step >= min(args.unet_steps, args.stop_at or args.unet_steps):
        return ema_unet, ema_text
    sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one",)})
    ac = sched.alphas_cumprod
    snr = ac / (1 - ac)
    weights = torch.clamp(snr, max=args.min_snr) / snr  # min-SNR weighting for epsilon prediction
    captions = data["captions"]
    unique = sorted(set(captions)) + [""]
    ids_all = tok(unique, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    index = {c: i for i, c in enumerate(unique)}
    cap_idx = torch.tensor([index[c] for c in captions])
    empty = index[""]
    scale = lat["scaling_factor"]
    n = len(cap_idx)
    out = open(work / "unet_loss.csv", "a", newline="")
    writer = csv.writer(out)
    unet.train(), text.train()
    t0 = time.time()
    ema_loss = None
    kept = None
    stop = min(args.unet_steps, args.stop_at or args.unet_steps)
    while step < stop:
        if args.attn_entropy and step >= args.entropy_from and kept is None:
            kept = probe_cross_attention(unet)
            log(f"from step {step}: cross-attention entropy term, weight {args.attn_entropy}")
        g = torch.Generator().manual_seed(args.seed * 104729 + step)
        idx = torch.randint(0, n, (args.unet_batch,), generator=g)
        z = (lat["mean"][idx].float() + lat["std"][idx].float() *
             torch.randn(lat["mean"][idx].shape, generator=g)) * scale
        if torch.rand((), generator=g) < 0.5:  # flips of the latents (the data holds flips of the frames too)
            z = z.flip(-1)
        c = cap_idx[idx].clone()
        c[torch.rand(len(c), generator=g) < args.uncond] = empty
        t = torch.randint(0, 1000, (len(z),), generator=g)
        noise = torch.randn(z.shape, generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z + (1 - a).sqrt() * noise
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.unet_steps, args.unet_lr, 200)
        cond = text(ids_all[c])[0]
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        per = (pred - noise).pow(2).mean((1, 2, 3))
        loss = (per * weights[t]).mean()
        entropy = torch.zeros(())
        if kept is not None:  # mean entropy over the 77 tokens of every query, normalised to [0, 1]
            entropy = torch.stack([-(p * p.clamp_min(1e-9).log()).sum(-1).mean() for p in kept]).mean() / math.log(77)
            kept.clear()
            loss = loss + args.attn_entropy * entropy
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        mse = per.mean().item()
        ema_loss = mse if ema_loss is None else 0.98 * ema_loss + 0.02 * mse
        writer.writerow([step, f"{mse:.6f}", f"{loss.item():.6f}", f"{time.time() - t0:.1f}", f"{entropy.item():.4f}"])
        if step % 25 == 0 or step == args.unet_steps:
            out.flush()
            log(f"unet step {step}/{args.unet_steps} mse {mse:.4f} (avg {ema_loss:.4f}) entropy {entropy.item():.3f} "
                f"({(time.time() - t0) / 60:.1f} min)")
        if step % args.ckpt_every == 0 or step == stop:
            save_ckpt(ckpt, unet=unet.state_dict(), text=text.state_dict(), opt=opt.state_dict(),
                      ema_unet=ema_unet.state_dict(), ema_text=ema_text.state_dict(), step=step)
    out.close()
    from diffusers.models.attention_processor import AttnProcessor2_0

    for model in (unet, ema_unet):
        model.set_attn_processor(AttnProcessor2_0())
    return ema_unet, ema_text


# ---------------------------------------------------------------------------------------------
def plot_losses(work: Path, folder: Path) -> list[Path]:
    """Loss curves as PNGs drawn with PIL (no matplotlib here)."""
    from PIL import Image, ImageDraw

    written = []
    for name, col, title, ylog in (("vae", 3, "VAE reconstruction PSNR (dB, train batch)", False),
                                   ("unet", 1, "UNet noise-prediction MSE (train batch, log)", True)):
        path = work / f"{name}_loss.csv"
        if not path.exists():
            continue
        rows = [r for r in csv.reader(open(path))]
        xs = np.array([float(r[0]) for r in rows])
        ys = np.array([float(r[col]) for r in rows])
        if ylog:
            ys = np.log10(np.maximum(ys, 1e-6))
        k = max(1, len(ys) // 100)
        smooth = np.convolve(ys, np.ones(k) / k, mode="valid")
        sx = xs[k - 1:]
        W, H, m = 640, 360, 50
        img = Image.new("RGB", (W, H), "white")
        d = ImageDraw.Draw(img)
        lo, hi = float(np.percentile(ys, 1)), float(np.percentile(ys, 99.5))
        hi = hi if hi > lo else lo + 1

        def px(x, y):
            return (m + (x - xs.min()) / max(1, xs.max() - xs.min()) * (W - 2 * m),
                    H - m - (np.clip(y, lo, hi) - lo) / (hi - lo) * (H - 2 * m))

        d.rectangle([m, m, W - m, H - m], outline="black")
        d.line([px(x, y) for x, y in zip(xs[::max(1, len(xs) // 2000)], ys[::max(1, len(xs) // 2000)])],
               fill=(190, 200, 230))
        d.line([px(x, y) for x, y in zip(sx, smooth)], fill=(30, 60, 200), width=2)
        d.text((m, 15), title, fill="black")
        for frac in (0, 0.5, 1):
            yv = lo + frac * (hi - lo)
            label = f"{10 ** yv:.3g}" if ylog else f"{yv:.1f}"
            d.text((5, px(xs.min(), yv)[1] - 5), label, fill="black")
        d.text((m, H - m + 8), "step 0", fill="black")
        d.text((W - m - 60, H - m + 8), f"step {int(xs.max())}", fill="black")
        out = folder / f"loss_{name}.png"
        img.save(out)
        written.append(out)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/toyworld-train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clips", type=int, default=12000)
    p.add_argument("--frames-per-clip", type=int, default=2)
    p.add_argument("--pairs", type=float, default=0.5, help="fraction of clips with two objects (sample_pair)")
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--vae-from", default=None, help="start from this VAE checkpoint (vae.pt of an earlier run)")
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4)
    p.add_argument("--unet-steps", type=int, default=1000)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=6e-4)
    p.add_argument("--min-snr", type=float, default=5.0)
    p.add_argument("--uncond", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--stop-at", type=int, default=None, help="stop (and export) at this UNet step of the schedule")
    p.add_argument("--attn-entropy", type=float, default=0.0,
                   help="weight of the mean cross-attention entropy over tokens (sharper, word-specific maps)")
    p.add_argument("--entropy-from", type=int, default=0, help="UNet step the entropy term starts at")
    p.add_argument("--ckpt-every", type=int, default=100, help="UNet steps between checkpoints (resumable)")
    p.add_argument("--export", default=None, help="write the diffusers folder (fp16 safetensors) here")
    p.add_argument("--export-only", action="store_true", help="export the checkpoints in --work and stop")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not args.export_only:
        (work / "args.json").write_text(json.dumps(vars(args), indent=2))
    torch.manual_seed(args.seed)
    parts = build_components(seed=args.seed)
    data = make_data(work, args.clips, args.frames_per_clip, args.pairs, args.seed)
    if args.vae_from and not (work / "vae.pt").exists():
        shutil.copyfile(args.vae_from, work / "vae.pt")
    if not args.export_only:
        train_vae(work, data, parts, args)
    else:
        parts["vae"].load_state_dict(torch.load(work / "vae.pt")["model"])
    parts["vae"].eval()
    lat = encode_latents(work, data, parts["vae"])
    parts["vae"].register_to_config(scaling_factor=lat["scaling_factor"])
    if args.export_only:
        state = torch.load(work / "unet.pt")
        parts["unet"].load_state_dict(state["ema_unet"]), parts["text_encoder"].load_state_dict(state["ema_text"])
        log(f"exporting the EMA weights of UNet step {state['step']}")
    else:
        parts["unet"], parts["text_encoder"] = train_unet(work, data, lat, parts, args)
    if args.export:
        folder = save_folder(parts, args.export)
        plot_losses(work, folder)
        log(f"exported to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
