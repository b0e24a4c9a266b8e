"""Temporal modules of tuned video checkpoints, on a stock diffusers UNet2DConditionModel.

FateZero's UNetPseudo3DConditionModel and Tune-A-Video's UNet3DConditionModel are SD's UNet plus:

- **temporal attention** in every transformer block, after the feed-forward. With x the block's
  output (B*F, N, C), each token position n of each clip attends over the clip's F frames:
      x[b, :, n] <- x[b, :, n] + W_o softmax(Q K^T / sqrt(d)) V + b_o,  Q, K, V = LN(x[b, :, n]) W_{q,k,v}
  per head, with attn1's heads and head dim d, no positional encoding (FateZero: attn_temporal /
  norm_temporal; Tune-A-Video: attn_temp / norm_temp);
- **temporal conv** (FateZero only), after every Conv2d with a kernel larger than 1 (conv_in, the
  resnets' conv1/conv2, the samplers' convs, conv_out): a k=3 convolution over the frames of each
  pixel, zero-padded at the clip's ends, either a residual LoRA pair
      y = x + up(down(x)),  down: C -> r, up: r -> C (Conv1d k=3, pad 1, no bias)
  whose rank r is the model's rank, or C // 2 where the rank exceeds the width C, or a full
  Conv1d(C, C, 3, pad 1) with bias that replaces x.

The modules are attached as submodules under the checkpoint's own names (so the UNet's state
dict has the checkpoint's keys) and run as forward hooks that know the clip length from the
FateZeroState (`install_hooks`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_NAMES = {"fatezero": ("attn_temporal", "norm_temporal"), "tuneavideo": ("attn_temp", "norm_temp")}


@dataclass(frozen=True)
class TemporalSpec:
    """Which temporal modules a checkpoint has."""

    attention: str | None = None   # "fatezero" | "tuneavideo" (the key names) | None
    conv: str | None = None        # "lora" | "full" | None
    rank: int | None = None        # LoRA rank of the model (None: larger than every layer's width)


def lora_rank(rank: int | None, channels: int) -> int:
    """The rank a LoRA temporal conv of `channels` channels gets: the model's, or channels // 2 if it is larger."""
    return channels // 2 if rank is None or rank > channels else rank


class TemporalAttention(nn.Module):
    """Attention over the frames of each token position: (N, F, C) normalised rows -> (N, F, C)."""

    def __init__(self, dim: int, heads: int, upcast: bool = False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.scale = (dim // heads) ** -0.5
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        nn.init.zeros_(self.to_out[0].weight)  # an identity until trained
        nn.init.zeros_(self.to_out[0].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, f, c = x.shape
        q, k, v = (p(x).view(n, f, self.heads, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        dtype = torch.float32 if self.upcast and q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), scale=self.scale)
        out = out.to(x.dtype).transpose(1, 2).reshape(n, f, c)
        return self.to_out[1](self.to_out[0](out))


class LoRATemporalConv(nn.Module):
    """Residual LoRA pair over frames: x + up(down(x)) (Conv1d k=3, pad 1, no bias)."""

    def __init__(self, channels: int, rank: int):
        super().__init__()
        self.down = nn.Conv1d(channels, rank, 3, padding=1, bias=False)
        self.up = nn.Conv1d(rank, channels, 3, padding=1, bias=False)
        nn.init.zeros_(self.up.weight)  # an identity until trained


def full_temporal_conv(channels: int) -> nn.Conv1d:
    conv = nn.Conv1d(channels, channels, 3, padding=1)
    nn.init.dirac_(conv.weight)  # an identity until trained
    nn.init.zeros_(conv.bias)
    return conv


def _frame_conv(y: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """A Conv1d (no padding) over the frame axis of y (B, C, F, H, W), at every pixel."""
    return F.conv3d(y, conv.weight[..., None, None], conv.bias)


def temporal_conv_frames(module: nn.Module, y: torch.Tensor, halo: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """The temporal conv on y (B, C, F', H, W), frames on axis 2, zero-padded at the clip's ends.

    halo = (l, r): y's first l and last r frames are neighbours beyond the frames wanted (a chunk
    of a longer clip), up to the conv's reach (`conv_reach`); a side with less than the reach ends
    at the clip's end, where the zero padding applies. Returns the F' - l - r wanted frames.
    """
    lo, hi = halo
    reach = conv_reach(module)
    if not all(0 <= h <= reach for h in halo):
        raise ValueError(f"the halo of this temporal conv is 0 to {reach} frames per side, got {halo}")
    if isinstance(module, LoRATemporalConv):
        # two stacked k=3 convs: x is zero-padded where its neighbour frame is outside the clip,
        # and so is the intermediate down(x), whose frames outside the clip are zero too
        d = _frame_conv(F.pad(y, (0, 0, 0, 0, int(lo < 2), int(hi < 2))), module.down)
        d = F.pad(d, (0, 0, 0, 0, int(lo < 1), int(hi < 1)))
        x = y[:, :, lo:y.shape[2] - hi]
        return x + _frame_conv(d, module.up).to(x.dtype)
    return _frame_conv(F.pad(y, (0, 0, 0, 0, 1 - lo, 1 - hi)), module)


def conv_reach(module: nn.Module) -> int:
    """Frames on each side that one output frame of the temporal conv depends on."""
    return 2 if isinstance(module, LoRATemporalConv) else 1


def temporal_attention_rows(block: nn.Module, x: torch.Tensor, frames: int) -> torch.Tensor:
    """The block's temporal attention with residual on x (B*F, N, C), clips of `frames` frames."""
    attn, norm = (getattr(block, n) for n in block._fz_temporal_names)
    bf, n, c = x.shape
    y = x.view(bf // frames, frames, n, c).transpose(1, 2).reshape(-1, frames, c)  # (b f) n c -> (b n) f c
    y = y + attn(norm(y))
    return y.view(bf // frames, n, frames, c).transpose(1, 2).reshape(bf, n, c)


def temporal_attention_tokens(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's temporal attention with residual on x (F, B, n, C): all F frames of n token positions."""
    f, b, n, c = x.shape
    y = temporal_attention_rows(block, x.permute(1, 0, 2, 3).reshape(b * f, n, c), f)
    return y.view(b, f, n, c).transpose(0, 1)


def temporal_conv_rows(conv: nn.Module, x: torch.Tensor, frames: int) -> torch.Tensor:
    """The temporal conv on x (B*F, C, H, W), clips of `frames` frames."""
    bf, c, h, w = x.shape
    y = x.view(bf // frames, frames, c, h, w).transpose(1, 2)
    return temporal_conv_frames(conv, y).transpose(1, 2).reshape(bf, c, h, w)


def conv_sites(unet: nn.Module) -> dict[str, nn.Conv2d]:
    """The Conv2d layers that get a temporal conv: every one with a kernel larger than 1."""
    return {name: m for name, m in unet.named_modules()
            if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1 and not name.endswith("conv_temporal")}


def attention_sites(unet: nn.Module) -> dict[str, nn.Module]:
    """The transformer blocks that get a temporal attention."""
    return {name: m for name, m in unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"}


def attach(unet: nn.Module, spec: TemporalSpec) -> None:
    """Add the (identity-initialised) temporal modules of `spec` to a stock UNet under the checkpoint's names."""
    if spec.attention is not None:
        attn_name, norm_name = ATTENTION_NAMES[spec.attention]
        for block in attention_sites(unet).values():
            dim = block.attn1.to_q.in_features
            block.add_module(attn_name, TemporalAttention(dim, block.attn1.heads, block.attn1.upcast_attention))
            block.add_module(norm_name, nn.LayerNorm(dim))
            block._fz_temporal_names = (attn_name, norm_name)
    if spec.conv is not None:
        for conv in conv_sites(unet).values():
            c = conv.out_channels
            conv.add_module("conv_temporal", LoRATemporalConv(c, lora_rank(spec.rank, c)) if spec.conv == "lora"
                            else full_temporal_conv(c))


class TemporalControl:
    """How the temporal hooks of one UNet find the clip: whole clips of state.num_frames frames, or,
    in a layer-major run (fatezero_fast.unet.runner), a chunk of frames with its halo."""

    def __init__(self, state):
        self.state = state
        self.layer_major = False
        self.halo: tuple[int, int, int] | None = None  # (frames before, frames after, branches) of the chunk rows

    def frames(self, rows: int) -> int:
        f = self.state.num_frames
        if rows % f:
            raise ValueError(f"a batch of {rows} frames is not a whole number of {f}-frame clips")
        return f


def install_hooks(unet: nn.Module, state) -> int:
    """Run the attached temporal modules as forward hooks (clips of state.num_frames frames); returns the count.

    Installing again replaces the hooks (the latest state drives them)."""
    control = TemporalControl(state)
    unet._fz_temporal = control
    count = 0
    for module in unet.modules():
        # earlier hooks go (found by their mark, so that a deep copy of a hooked UNet loses them too)
        for key in [k for k, fn in module._forward_hooks.items() if getattr(fn, "fz_temporal", False)]:
            del module._forward_hooks[key]
        if hasattr(module, "_fz_temporal_names"):
            hook = _attention_hook(control)
        elif isinstance(module, nn.Conv2d) and hasattr(module, "conv_temporal"):
            hook = _conv_hook(control)
        else:
            continue
        hook.fz_temporal = True
        module.register_forward_hook(hook)
        count += 1
    return count


def _attention_hook(control: TemporalControl):
    def hook(block, args, output):
        if control.layer_major:
            raise RuntimeError("the layer-major runner applies temporal attention itself")
        return temporal_attention_rows(block, output, control.frames(output.shape[0]))
    return hook


def _conv_hook(control: TemporalControl):
    def hook(conv, args, output):
        if not control.layer_major:
            return temporal_conv_rows(conv.conv_temporal, output, control.frames(output.shape[0]))
        if control.halo is None:
            raise RuntimeError("a layer-major run called a temporal conv outside a chunk with halo")
        lo, hi, branches = control.halo
        bf, c, h, w = output.shape
        y = output.view(branches, bf // branches, c, h, w).transpose(1, 2)
        y = temporal_conv_frames(conv.conv_temporal, y, (lo, hi))
        return y.transpose(1, 2).reshape(-1, c, h, w)
    return hook


def reach_of(*modules: nn.Module) -> int:
    """Halo frames a chunk function calling these Conv2d (or modules holding them) needs on each side."""
    return max([conv_reach(m.conv_temporal) for module in modules if module is not None
                for m in module.modules() if isinstance(m, nn.Conv2d) and hasattr(m, "conv_temporal")], default=0)
