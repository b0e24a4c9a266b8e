"""The attention processors and clip-wide GroupNorm against hand-written materialized computations."""
import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention

from fatezero_fast.models import random_components
from fatezero_fast.models.tokenizer import clip_tokenizer
from fatezero_fast.semantics.frames import resolve_frame_index
from fatezero_fast.semantics.plan import EditOptions, EditPlan
from fatezero_fast.unet.groupnorm import ClipGroupNorm
from fatezero_fast.unet.processors import (
    FateZeroCrossAttnProcessor,
    FateZeroState,
    SpatioTemporalAttnProcessor,
    VideoAttentionConfig,
    install,
)

FRAMES = 3


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# --- hand-written materialized versions (the official code's way: concatenate K/V, build P) ---

def materialized_self_attention(attn, x, index_list, frames, p_override=None):
    """Official SparseCausalAttention: keys/values of the listed frames concatenated per frame."""
    bf, n, c = x.shape
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    idx = resolve_frame_index(index_list, frames)
    k5, v5 = k.view(-1, frames, n, c), v.view(-1, frames, n, c)
    k = torch.cat([k5[:, idx[:, r]] for r in range(idx.shape[1])], dim=2).reshape(bf, -1, c)
    v = torch.cat([v5[:, idx[:, r]] for r in range(idx.shape[1])], dim=2).reshape(bf, -1, c)
    heads = lambda t: t.view(bf, -1, attn.heads, c // attn.heads).transpose(1, 2)
    probs = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) * attn.scale, dim=-1)
    if p_override is not None:
        probs = p_override(probs)
    out = (probs @ heads(v)).transpose(1, 2).reshape(bf, n, c)
    return attn.to_out[0](out), probs


class MaterializedSelfProcessor:
    def __init__(self, index_list):
        self.index_list = index_list

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        return materialized_self_attention(attn, hidden_states, self.index_list, FRAMES)[0]


class PlainCrossProcessor:
    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        bf, n, c = hidden_states.shape
        heads = lambda t: t.view(bf, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)
        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(encoder_hidden_states)), \
            heads(attn.to_v(encoder_hidden_states))
        out = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1) @ v
        return attn.to_out[0](out.transpose(1, 2).reshape(bf, n, -1))


class Clip5DGroupNorm(torch.nn.Module):
    """GroupNorm over (channels of the group, all frames, h, w), written out by hand."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        bf, c, h, w = x.shape
        g = self.norm.num_groups
        y = x.view(bf // FRAMES, FRAMES, g, c // g, h, w)
        mean = y.mean(dim=(1, 3, 4, 5), keepdim=True)
        var = y.var(dim=(1, 3, 4, 5), keepdim=True, unbiased=False)
        y = ((y - mean) / torch.sqrt(var + self.norm.eps)).view(bf, c, h, w)
        return y * self.norm.weight[:, None, None] + self.norm.bias[:, None, None]


def test_clip_group_norm_matches_5d_statistics():
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 16)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    x = torch.randn(2 * FRAMES, 16, 5, 3) * 3 + torch.arange(2 * FRAMES).view(-1, 1, 1, 1)
    out = ClipGroupNorm(norm, lambda: FRAMES)(x)
    assert rel_err(out, Clip5DGroupNorm(norm)(x)) < 1e-5
    # and it differs from per-frame normalisation (frames have different means)
    assert rel_err(out, norm(x)) > 1e-2


@pytest.mark.parametrize("index_list,least_sc", [([-1, "first"], None), (["mid"], 48)])
def test_tiny_unet_equals_materialized_video_model(index_list, least_sc):
    torch.manual_seed(0)
    unet = random_components("tiny", seed=1)["unet"].float()
    ref = copy.deepcopy(unet)
    state = install(unet, VideoAttentionConfig(sparse_causal_index=index_list, least_sc_channel=least_sc))
    state.begin_call("plain", FRAMES, (16, 16))
    procs = {}
    for name in ref.attn_processors:
        width = ref.get_submodule(name.rsplit(".processor", 1)[0]).to_q.in_features
        narrow = least_sc is not None and width < least_sc
        procs[name] = MaterializedSelfProcessor([] if narrow else index_list) if "attn1" in name \
            else PlainCrossProcessor()
    ref.set_attn_processor(procs)
    for module in ref.modules():
        if type(module).__name__ == "ResnetBlock2D":
            module.norm1, module.norm2 = Clip5DGroupNorm(module.norm1), Clip5DGroupNorm(module.norm2)
    ref.conv_norm_out = Clip5DGroupNorm(ref.conv_norm_out)
    x, ctx = torch.randn(2 * FRAMES, 4, 16, 16), torch.randn(2 * FRAMES, 77, 32)
    with torch.no_grad():
        ours, expected = unet(x, 500, ctx).sample, ref(x, 500, ctx).sample
    assert rel_err(ours, expected) < 1e-5


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def _edit_state(tok, options, tokens_hw=(4, 4), source_maps=None):
    plan = EditPlan.build(options, "a jeep on a road", "a car on a road", 4, tok)
    state = FateZeroState(VideoAttentionConfig(sparse_causal_index=[-1, "first"]))
    state.begin_call("edit", FRAMES, tokens_hw, plan=plan, step=0, source_token_maps=source_maps)
    return state


def test_self_attention_replace_outputs_p_src_v(tok):
    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16).eval()
    state = _edit_state(tok, EditOptions(self_replace_steps=1.0))
    x = torch.randn(3 * FRAMES, 16, 32)  # [source, uncond, target] branches
    with torch.no_grad():
        out = SpatioTemporalAttnProcessor(state, [-1, "first"])(attn, x)
        plain, p_all = materialized_self_attention(attn, x, [-1, "first"], FRAMES)
        p_src = p_all[:FRAMES]
        edited, _ = materialized_self_attention(attn, x, [-1, "first"], FRAMES,
                                                p_override=lambda p: torch.cat([p[:2 * FRAMES], p_src]))
    assert rel_err(out[:2 * FRAMES], plain[:2 * FRAMES]) < 1e-5   # source and uncond: plain
    assert rel_err(out[2 * FRAMES:], edited[2 * FRAMES:]) < 1e-5  # target: P_src V_target
    assert rel_err(out[2 * FRAMES:], plain[2 * FRAMES:]) > 1e-3   # and that is a change


def test_self_attention_blend_uses_row_mask(tok):
    torch.manual_seed(1)
    attn = Attention(query_dim=32, heads=2, dim_head=16).eval()
    source_maps = torch.rand(FRAMES, 1, 1, 77) * 0.01
    source_maps[..., 2] = torch.tensor([1.0, 0.0, 1.0]).view(FRAMES, 1, 1)  # 'jeep' token seen in frames 0, 2
    # the mask level is the 1x1 grid of a 4x4 latent; blend words: jeep -> car
    state = _edit_state(tok, EditOptions(self_replace_steps=1.0, blend_words=[["jeep"], ["car"]],
                                         blend_self_attention=True), source_maps=source_maps)
    mask = state.self_blend_mask(16)
    assert mask.shape == (FRAMES, 16) and mask[0].eq(1).all() and mask[2].eq(1).all()
    x = torch.randn(3 * FRAMES, 16, 32)
    with torch.no_grad():
        out = SpatioTemporalAttnProcessor(state, [-1, "first"])(attn, x)
        m = mask[:, None, :, None]

        def blended(p):
            tgt = m * p[2 * FRAMES:] + (1 - m) * p[:FRAMES]
            return torch.cat([p[:2 * FRAMES], tgt])
        expected, _ = materialized_self_attention(attn, x, [-1, "first"], FRAMES, p_override=blended)
    assert rel_err(out, expected) < 1e-5


def test_self_attention_outside_window_is_plain(tok):
    attn = Attention(query_dim=32, heads=2, dim_head=16).eval()
    state = _edit_state(tok, EditOptions(self_replace_steps=(0.5, 1.0)))  # step 0 is outside [2, 4)
    x = torch.randn(3 * FRAMES, 16, 32)
    with torch.no_grad():
        out = SpatioTemporalAttnProcessor(state, [-1, "first"])(attn, x)
        plain, _ = materialized_self_attention(attn, x, [-1, "first"], FRAMES)
    assert rel_err(out, plain) < 1e-5


def test_cross_attention_fuses_target_with_source_and_records_maps(tok):
    torch.manual_seed(2)
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16).eval()
    state = _edit_state(tok, EditOptions(cross_replace_steps=1.0), tokens_hw=(4, 4))
    state.capture_branch = 2
    x, ctx = torch.randn(3 * FRAMES, 1, 32), torch.randn(3 * FRAMES, 77, 24)  # 1 token = the mask level
    with torch.no_grad():
        out = FateZeroCrossAttnProcessor(state, is_mask_layer=True)(attn, x, ctx)
        heads = lambda t: t.view(t.shape[0], -1, 2, 16).transpose(1, 2)
        q, k, v = heads(attn.to_q(x)), heads(attn.to_k(ctx)), heads(attn.to_v(ctx))
        p = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, -1)
        fused = state.plan.fuse_cross(p[:FRAMES], p[2 * FRAMES:], 0)
        expected = attn.to_out[0]((torch.cat([p[:2 * FRAMES], fused]) @ v).transpose(1, 2).reshape(-1, 1, 32))
    assert rel_err(out, expected) < 1e-5
    recorded = state.captured_token_maps()
    assert recorded.shape == (FRAMES, 1, 1, 77)
    assert rel_err(recorded.reshape(FRAMES, 77), p[2 * FRAMES:].mean(1).reshape(FRAMES, 77)) < 1e-6


def test_uncontrolled_layers_stay_plain(tok):
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=16).eval()
    state = _edit_state(tok, EditOptions(cross_replace_steps=1.0))
    state.config.max_control_tokens = 8  # a 16-token layer is not controlled
    x, ctx = torch.randn(3 * FRAMES, 16, 32), torch.randn(3 * FRAMES, 77, 24)
    with torch.no_grad():
        out = FateZeroCrossAttnProcessor(state, is_mask_layer=False)(attn, x, ctx)
        expected = PlainCrossProcessor()(attn, x, ctx)
    assert rel_err(out, expected) < 1e-5
