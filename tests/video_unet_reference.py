"""An independent plain-PyTorch forward of the official video UNets, from a saved tuned model folder.

Written from the official math (FateZero's UNetPseudo3DConditionModel, Tune-A-Video's
UNet3DConditionModel), on (b, c, f, h, w) tensors and the raw state dict with the official key
names; it uses neither diffusers nor fatezero_fast. What it computes:
- every Conv2d with a kernel > 1 runs per frame, then (FateZero) its conv_temporal over frames at
  each pixel: x + up(down(x)) (LoRA) or conv(x) (full), Conv1d k=3 zero-padded at the clip ends;
- the ResNets' GroupNorms and conv_norm_out normalise over the channels of a group and all
  frames; the transformers' GroupNorm is per frame;
- transformer blocks: x += attn1(LN x) with the keys/values of the frames the sparse-causal
  index list names; x += attn2(LN x, text); x += FF(LN x) (GEGLU); x += attn_temporal(LN x)
  over the frames at each token position.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F


def load_folder(folder):
    unet = Path(folder) / "unet"
    config = json.loads((unet / "config.json").read_text())
    state = torch.load(unet / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True)
    return config, state


def kv_frames(index_list, f):
    """For each frame, the frames its self-attention reads (the official resolution of the list)."""
    if not index_list:
        return [[i] for i in range(f)]
    rows = []
    for i in range(f):
        row = []
        for e in index_list:
            if e == "first":
                row.append(0)
            elif e == "last":
                row.append(f - 1)
            elif e in ("mid", "middle"):
                row.append((f - 1) // 2)
            else:
                row.append(min(max(i + e, 0), f - 1))
        rows.append(row)
    return rows


class VideoUNetReference:
    def __init__(self, config: dict, state: dict, dtype=torch.float64, index_list=(-1, "first")):
        self.c = config
        self.w = {k: v.to(dtype) for k, v in state.items()}
        self.index = list(index_list)
        self.temporal_attn = "attn_temporal" if any(".attn_temporal." in k for k in state) else \
            "attn_temp" if any(".attn_temp." in k for k in state) else None
        heads = config["attention_head_dim"]
        n = len(config["block_out_channels"])
        self.heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * n

    # -- layers
    def lin(self, p, x):
        return F.linear(x, self.w[p + ".weight"], self.w.get(p + ".bias"))

    def conv(self, p, x, stride=1):
        """A pseudo-3D conv on (b, c, f, h, w): per frame, then the temporal conv if the weights have one."""
        b, c, f, h, w = x.shape
        weight = self.w[p + ".weight"]
        pad = weight.shape[-1] // 2
        y = F.conv2d(x.transpose(1, 2).reshape(b * f, c, h, w), weight, self.w.get(p + ".bias"), stride, pad)
        y = y.reshape(b, f, *y.shape[1:]).transpose(1, 2)
        if weight.shape[-1] == 1:
            return y
        t = p + ".conv_temporal"
        if t + ".down.weight" not in self.w and t + ".weight" not in self.w:
            return y
        b, c, f, h, w = y.shape
        rows = y.permute(0, 3, 4, 1, 2).reshape(b * h * w, c, f)  # b c f h w -> (b h w) c f
        if t + ".down.weight" in self.w:
            out = rows + F.conv1d(F.conv1d(rows, self.w[t + ".down.weight"], padding=1),
                                  self.w[t + ".up.weight"], padding=1)
        else:
            out = F.conv1d(rows, self.w[t + ".weight"], self.w[t + ".bias"], padding=1)
        return out.reshape(b, h, w, c, f).permute(0, 3, 4, 1, 2)

    def gn_clip(self, p, x, eps):
        return F.group_norm(x, self.c["norm_num_groups"], self.w[p + ".weight"], self.w[p + ".bias"], eps)

    def ln(self, p, x):
        return F.layer_norm(x, x.shape[-1:], self.w[p + ".weight"], self.w[p + ".bias"], 1e-5)

    @staticmethod
    def attend(q, k, v, heads):
        """softmax(q k^T / sqrt(d)) v per head; q (n, lq, C), k/v (n, lk, C)."""
        n, lq, c = q.shape
        d = c // heads
        q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        return (p @ v).permute(0, 2, 1, 3).reshape(n, lq, c)

    # -- blocks
    def resnet(self, p, x, emb):
        eps = self.c.get("norm_eps", 1e-5)
        h = self.conv(p + ".conv1", F.silu(self.gn_clip(p + ".norm1", x, eps)))
        h = h + self.lin(p + ".time_emb_proj", F.silu(emb))[:, :, None, None, None]
        h = self.conv(p + ".conv2", F.silu(self.gn_clip(p + ".norm2", h, eps)))
        if p + ".conv_shortcut.weight" in self.w:
            x = self.conv(p + ".conv_shortcut", x)
        return x + h

    def block(self, p, x, ctx, heads, f):
        """x ((b f), n, C) rows of clips of f frames; ctx ((b f), L, D)."""
        bf, n, c = x.shape
        h = self.ln(p + ".norm1", x)
        q, k, v = (self.lin(p + f".attn1.to_{s}", h) for s in "qkv")
        frames = kv_frames(self.index, f)
        k, v = (t.reshape(bf // f, f, n, c) for t in (k, v))
        k = torch.stack([torch.cat([k[:, j] for j in row], 1) for row in frames], 1).reshape(bf, -1, c)
        v = torch.stack([torch.cat([v[:, j] for j in row], 1) for row in frames], 1).reshape(bf, -1, c)
        x = x + self.lin(p + ".attn1.to_out.0", self.attend(q, k, v, heads))
        h = self.ln(p + ".norm2", x)
        q, k, v = self.lin(p + ".attn2.to_q", h), self.lin(p + ".attn2.to_k", ctx), self.lin(p + ".attn2.to_v", ctx)
        x = x + self.lin(p + ".attn2.to_out.0", self.attend(q, k, v, heads))
        hidden, gate = self.lin(p + ".ff.net.0.proj", self.ln(p + ".norm3", x)).chunk(2, dim=-1)
        x = x + self.lin(p + ".ff.net.2", hidden * F.gelu(gate))
        if self.temporal_attn is None:
            return x
        a, nrm = p + "." + self.temporal_attn, p + ".norm_" + self.temporal_attn.split("_")[1]
        t = x.reshape(bf // f, f, n, c).transpose(1, 2).reshape(-1, f, c)  # (b f) n c -> (b n) f c
        h = self.ln(nrm, t)
        t = t + self.lin(a + ".to_out.0", self.attend(*(self.lin(a + f".to_{s}", h) for s in "qkv"), heads))
        return t.reshape(bf // f, n, f, c).transpose(1, 2).reshape(bf, n, c)

    def transformer(self, p, x, ctx, heads):
        b, c, f, hh, ww = x.shape
        rows = x.transpose(1, 2).reshape(b * f, c, hh, ww)
        h = F.group_norm(rows, self.c["norm_num_groups"], self.w[p + ".norm.weight"], self.w[p + ".norm.bias"], 1e-6)
        linear = self.c.get("use_linear_projection", False)
        if linear:
            h = self.lin(p + ".proj_in", h.permute(0, 2, 3, 1).reshape(b * f, hh * ww, c))
        else:
            h = F.conv2d(h, self.w[p + ".proj_in.weight"], self.w[p + ".proj_in.bias"])
            h = h.permute(0, 2, 3, 1).reshape(b * f, hh * ww, -1)
        h = self.block(p + ".transformer_blocks.0", h, ctx.repeat_interleave(f, 0), heads, f)
        if linear:
            h = self.lin(p + ".proj_out", h).reshape(b * f, hh, ww, c).permute(0, 3, 1, 2)
        else:
            h = F.conv2d(h.reshape(b * f, hh, ww, -1).permute(0, 3, 1, 2), self.w[p + ".proj_out.weight"],
                         self.w[p + ".proj_out.bias"])
        return x + h.reshape(b, f, c, hh, ww).transpose(1, 2)

    def time_embedding(self, t, b):
        dim = self.c["block_out_channels"][0]
        half = dim // 2
        # the sinusoids are computed in float32 (as the official Timesteps does), then cast
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = torch.full((b,), float(t), dtype=torch.float32)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.w["conv_in.weight"].dtype)
        return self.lin("time_embedding.linear_2", F.silu(self.lin("time_embedding.linear_1", emb)))

    def __call__(self, sample, t, ctx):
        """sample (b, 4, f, h, w), ctx (b, L, D) -> (b, 4, f, h, w)."""
        emb = self.time_embedding(t, sample.shape[0])
        x = self.conv("conv_in", sample)
        skips = [x]
        nb = len(self.c["block_out_channels"])
        lpb = self.c["layers_per_block"]
        for i, kind in enumerate(self.c["down_block_types"]):
            for j in range(lpb):
                x = self.resnet(f"down_blocks.{i}.resnets.{j}", x, emb)
                if kind.startswith("CrossAttn"):
                    x = self.transformer(f"down_blocks.{i}.attentions.{j}", x, ctx, self.heads[i])
                skips.append(x)
            if i < nb - 1:
                x = self.conv(f"down_blocks.{i}.downsamplers.0.conv", x, stride=2)
                skips.append(x)
        x = self.resnet("mid_block.resnets.0", x, emb)
        x = self.transformer("mid_block.attentions.0", x, ctx, self.heads[-1])
        x = self.resnet("mid_block.resnets.1", x, emb)
        for i, kind in enumerate(self.c["up_block_types"]):
            for j in range(lpb + 1):
                x = self.resnet(f"up_blocks.{i}.resnets.{j}", torch.cat([x, skips.pop()], 1), emb)
                if kind.startswith("CrossAttn"):
                    x = self.transformer(f"up_blocks.{i}.attentions.{j}", x, ctx, self.heads[nb - 1 - i])
            if i < nb - 1:
                f, h, w = x.shape[2:]
                x = F.interpolate(x, size=(f, 2 * h, 2 * w), mode="nearest")
                x = self.conv(f"up_blocks.{i}.upsamplers.0.conv", x)
        x = F.silu(self.gn_clip("conv_norm_out", x, self.c.get("norm_eps", 1e-5)))
        return self.conv("conv_out", x)
