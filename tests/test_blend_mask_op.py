"""The fused blend-mask op (torch.ops.fatezero_fast.blend_mask) against control.blend_mask, bit for bit.

control.blend_mask (FATEZERO.md item 7) is the oracle: weighted token sum, 3x3 max-pool, nearest
resize, division by each frame's maximum, strictly-greater threshold. Every comparison is
torch.equal on the bool masks, on fresh random maps (uniform, and softmax-like with a wide range
of exponents), with `out` pre-filled with True so an element the kernel forgets to write fails.
The threshold sweeps check more than masks: thresholds placed at every normalized value of the
reference (and one float below it) prove the op's normalized values are the same floats.
GPU tests (marked `gpu`) run the CUDA op when CUDA is usable and the op was built for it.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from fatezero_fast import ops
from fatezero_fast.ops.backends import mask as mask_backend
from fatezero_fast.ops.reference import blend_mask_reference
from fatezero_fast.semantics import masks
from fatezero_fast.semantics.plan import EditPlan

if not mask_backend.available():
    pytest.skip(f"the blend_mask op is not built ({mask_backend.load_error()}): "
                "run `pip install --no-build-isolation -e .`", allow_module_level=True)

MAP_SIZES = [(16, 16), (4, 4), (14, 24)]
OUT_SIZES = [(32, 32), (64, 64), (27, 48), (8, 8)]
THRESHOLDS = (0.0, 0.3, 0.9, 2.0)
SELECTED = (1, 2, 3)
FRAMES = 3


def random_maps(gen, frames, rh, rw, kind, device="cpu"):
    if kind == "uniform":
        maps = torch.rand(frames, rh, rw, 77, generator=gen)
    else:  # softmax over tokens: probabilities spread over many binades, as real cross-attention maps
        maps = torch.softmax(4 * torch.randn(frames, rh, rw, 77, generator=gen), dim=-1)
    return maps.to(device)


def selection(gen, count, device="cpu"):
    weights = torch.zeros(77)
    weights[torch.randperm(77, generator=gen)[:count]] = 1
    return weights.to(device)


def op_mask(maps, weights, threshold, size, use_pool):
    out = torch.ones(maps.shape[0], *size, dtype=torch.bool, device=maps.device)  # poisoned
    torch.ops.fatezero_fast.blend_mask(maps, weights, float(threshold), size[0], size[1], use_pool, out)
    return out


def normalized_reference(maps, weights, size, use_pool):
    """The reference's float maps just before the threshold (the same torch calls as control.blend_mask)."""
    m = (maps * weights.to(maps)).sum(-1)[None]
    if use_pool:
        m = F.max_pool2d(m, (3, 3), (1, 1), padding=(1, 1))
    m = F.interpolate(m, size=size)
    return (m / m.amax(dim=(-2, -1), keepdim=True))[0]


def sweep_thresholds(values):
    """Every finite normalized value v, the float just below it, and a double between the two
    (which rounds to v: torch compares in float32, not in double)."""
    v = values[torch.isfinite(values)].unique()
    below = torch.nextafter(v, torch.tensor(float("-inf")))
    between = v.double() - (v.double() - below.double()) / 4
    return torch.cat([v.double(), below.double(), between]).tolist()


def assert_sweep_equal(maps, weights, size, use_pool, op=op_mask):
    for th in sweep_thresholds(normalized_reference(maps.cpu(), weights.cpu(), size, use_pool)):
        ref = blend_mask_reference(maps.cpu(), weights.cpu(), th, size, use_pool)
        assert torch.equal(op(maps, weights, th, size, use_pool).cpu(), ref), th


# --- CPU --------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_pool", (True, False))
@pytest.mark.parametrize("out_size", OUT_SIZES)
@pytest.mark.parametrize("map_size", MAP_SIZES)
def test_op_equals_reference(map_size, out_size, use_pool):
    case = MAP_SIZES.index(map_size) * 100 + OUT_SIZES.index(out_size) * 10 + int(use_pool)
    for seed in range(4):
        gen = torch.Generator().manual_seed(1000 * case + seed)
        for count in SELECTED:
            maps = random_maps(gen, FRAMES, *map_size, ("uniform", "softmax")[seed % 2])
            weights = selection(gen, count)
            for th in THRESHOLDS:
                ref = blend_mask_reference(maps, weights, th, out_size, use_pool)
                assert torch.equal(op_mask(maps, weights, th, out_size, use_pool), ref), (seed, count, th)


@pytest.mark.parametrize("use_pool", (True, False))
def test_frames_without_attention_on_the_words_are_all_false(use_pool):
    gen = torch.Generator().manual_seed(7)
    maps = random_maps(gen, 4, 14, 24, "uniform")
    weights = selection(gen, 2)
    maps[1] = 0                                # no attention at all: 0/0
    maps[2][..., weights.bool()] = 0           # attention elsewhere, none on the words: 0/0
    for th in THRESHOLDS:
        out = op_mask(maps, weights, th, (27, 48), use_pool)
        assert not out[1].any() and not out[2].any()
        assert torch.equal(out, blend_mask_reference(maps, weights, th, (27, 48), use_pool))
    assert op_mask(maps, weights, 0.0, (27, 48), use_pool)[0].any()


@pytest.mark.parametrize("use_pool", (True, False))
@pytest.mark.parametrize("out_size", [(4, 6), (8, 12), (7, 5), (3, 3)])
@pytest.mark.parametrize("weights_kind", ["three", "five", "dense"])
def test_normalized_values_are_the_same_floats(weights_kind, out_size, use_pool):
    """Threshold sweeps: the op's sums, maxima and quotients are torch's to the last bit."""
    gen = torch.Generator().manual_seed(len(weights_kind) * 100 + out_size[0] * 10 + out_size[1] + int(use_pool))
    maps = random_maps(gen, 2, 4, 6, "softmax" if use_pool else "uniform")
    if weights_kind == "dense":  # general weights: the whole summation order of torch's CPU kernel
        weights = torch.randn(77, generator=gen)
    else:
        weights = selection(gen, 3 if weights_kind == "three" else 5)
    assert_sweep_equal(maps, weights, out_size, use_pool)


def test_edge_shapes():
    gen = torch.Generator().manual_seed(3)
    for (rh, rw), size, tokens in itertools.product([(1, 1), (1, 5), (3, 1), (2, 3)], [(1, 1), (5, 2), (6, 6)],
                                                    [77, 5, 8, 33]):
        maps = torch.rand(2, rh, rw, tokens, generator=gen)
        weights = (torch.rand(tokens, generator=gen) < 0.3).float()
        for th, pool in itertools.product((0.0, 0.5), (True, False)):
            ref = blend_mask_reference(maps, weights, th, size, pool)
            assert torch.equal(op_mask(maps, weights, th, size, pool), ref), ((rh, rw), size, tokens, th, pool)
    empty = torch.empty(0, 4, 4, 77)
    assert ops.blend_mask(empty, torch.ones(77), 0.3, (8, 8), backend="cpu").shape == (0, 8, 8)


def test_dispatch_and_wrapper():
    gen = torch.Generator().manual_seed(11)
    maps = random_maps(gen, 2, 16, 16, "softmax")
    weights = selection(gen, 2).double()          # any dtype: cast like weights.to(token_maps)
    ref = blend_mask_reference(maps, weights, 0.3, (32, 32))
    for backend in ("auto", "cpu", "reference"):
        assert torch.equal(ops.blend_mask(maps, weights, 0.3, (32, 32), backend=backend), ref)
    # non-contiguous maps with the token axis innermost
    wide = torch.rand(2, 16, 16, 100, generator=gen)
    view = wide[..., :77]
    assert torch.equal(ops.blend_mask(view, weights, 0.3, (32, 32), backend="cpu"),
                       blend_mask_reference(view, weights, 0.3, (32, 32)))
    # float64 maps: auto falls back to the reference; the op itself takes float32 only
    maps64 = maps.double()
    assert torch.equal(ops.blend_mask(maps64, weights, 0.3, (32, 32)), blend_mask_reference(maps64, weights, 0.3, (32, 32)))
    with pytest.raises(ValueError, match="float32"):
        ops.blend_mask(maps64, weights, 0.3, (32, 32), backend="cpu")
    with pytest.raises(ValueError, match="cuda"):
        ops.blend_mask(maps, weights, 0.3, (32, 32), backend="cuda")
    with pytest.raises(ValueError, match="unknown"):
        ops.blend_mask(maps, weights, 0.3, (32, 32), backend="triton")
    with pytest.raises(RuntimeError, match="weights"):
        op_mask(maps, torch.ones(76), 0.3, (32, 32), True)


def test_unaveraged_maps_are_averaged_over_layers_and_heads_first():
    gen = torch.Generator().manual_seed(5)
    layers, frames, heads = 5, 2, 8
    per_head = torch.softmax(3 * torch.randn(layers, frames, heads, 16 * 16, 77, generator=gen), dim=-1)
    weights = selection(gen, 3)
    averaged = per_head.mean(dim=(0, 2)).reshape(frames, 16, 16, 77)
    ref = blend_mask_reference(averaged, weights, 0.3, (64, 64))
    for backend in ("auto", "cpu", "reference"):
        assert torch.equal(ops.blend_mask(per_head, weights, 0.3, (64, 64), backend=backend), ref)
    wide = torch.rand(layers, frames, heads, 14 * 24, 77, generator=gen)
    ref = blend_mask_reference(wide.mean(dim=(0, 2)).reshape(frames, 14, 24, 77), weights, 0.3, (27, 48))
    assert torch.equal(ops.blend_mask(wide, weights, 0.3, (27, 48), map_size=(14, 24)), ref)
    with pytest.raises(ValueError, match="square"):
        ops.blend_mask(wide, weights, 0.3, (27, 48))


def test_edit_plan_masks_go_through_the_op(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    plan = EditPlan(num_steps=10, cross_alpha=torch.ones(11, 77), self_window=(0, 8), replace_mapper=None,
                    refine_mapper=torch.arange(77), refine_alphas=torch.ones(77), equalizer=None,
                    blend_source_weights=selection(gen, 1), blend_target_weights=selection(gen, 2),
                    subtract_source_weights=selection(gen, 1), subtract_target_weights=selection(gen, 1),
                    blend_th=(0.3, 0.5), blend_self_attention=True, blend_latents=True, latent_blend_window=(2, 8))
    src, edit = random_maps(gen, 2, 4, 4, "softmax"), random_maps(gen, 2, 4, 4, "softmax")
    calls = []
    real = mask_backend.blend_mask
    monkeypatch.setattr(mask_backend, "blend_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    self_mask = masks.self_blend_mask(plan, src, (8, 8))
    latent_mask = masks.latent_blend_mask(plan, 4, src, edit, (8, 8))
    assert len(calls) == 2 + 4
    th = plan.blend_th
    ref_self = blend_mask_reference(src, plan.blend_source_weights, th[0], (8, 8)) & \
        ~blend_mask_reference(src, plan.subtract_source_weights, th[1], (8, 8), False)
    assert torch.equal(self_mask, ref_self.flatten(1).float())
    ref_latent = (blend_mask_reference(src, plan.blend_source_weights, th[0], (8, 8)) |
                  blend_mask_reference(edit, plan.blend_target_weights, th[0], (8, 8))) & \
        ~(blend_mask_reference(src, plan.subtract_source_weights, th[1], (8, 8), False) |
          blend_mask_reference(edit, plan.subtract_target_weights, th[1], (8, 8), False))
    assert torch.equal(latent_mask, ref_latent)


# --- CUDA -------------------------------------------------------------------------------------

_HAVE_CUDA_OP = torch.cuda.is_available() and mask_backend.available("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not _HAVE_CUDA_OP, reason="needs CUDA and the blend_mask op built with CUDA")
class TestCuda:
    """The CUDA op sums in torch's CPU order: equal to the CPU reference always, and to the
    reference run on CUDA tensors whenever a pixel has at most two nonzero products."""

    @pytest.mark.parametrize("use_pool", (True, False))
    @pytest.mark.parametrize("map_size", MAP_SIZES)
    def test_equals_cpu_reference(self, map_size, use_pool):
        gen = torch.Generator().manual_seed(MAP_SIZES.index(map_size) * 2 + int(use_pool))
        for seed, count, out_size in itertools.product(range(3), SELECTED, OUT_SIZES):
            maps = random_maps(gen, FRAMES, *map_size, ("uniform", "softmax")[seed % 2])
            weights = selection(gen, count)
            for th in THRESHOLDS:
                ref = blend_mask_reference(maps, weights, th, out_size, use_pool)
                got = op_mask(maps.cuda(), weights.cuda(), th, out_size, use_pool)
                assert got.is_cuda and torch.equal(got.cpu(), ref), (seed, count, out_size, th)

    @pytest.mark.parametrize("count", (1, 2))
    def test_equals_cuda_reference_for_one_or_two_tokens(self, count):
        gen = torch.Generator().manual_seed(40 + count)
        for map_size, out_size, use_pool in itertools.product(MAP_SIZES, OUT_SIZES, (True, False)):
            maps = random_maps(gen, FRAMES, *map_size, "softmax", device="cuda")
            weights = selection(gen, count, device="cuda")
            for th in THRESHOLDS:
                ref = blend_mask_reference(maps, weights, th, out_size, use_pool)
                assert torch.equal(ops.blend_mask(maps, weights, th, out_size, use_pool), ref)

    @pytest.mark.parametrize("weights_kind", ["three", "dense"])
    def test_normalized_values_are_the_cpu_floats(self, weights_kind):
        gen = torch.Generator().manual_seed(77)
        maps = random_maps(gen, 2, 4, 6, "softmax")
        weights = torch.randn(77, generator=gen) if weights_kind == "dense" else selection(gen, 3)
        cuda_op = lambda m, w, th, size, pool: op_mask(m.cuda(), w.cuda(), th, size, pool)  # noqa: E731
        for out_size, use_pool in itertools.product([(4, 6), (7, 5)], (True, False)):
            assert_sweep_equal(maps, weights, out_size, use_pool, op=cuda_op)

    def test_zero_frame_and_dispatch(self):
        gen = torch.Generator().manual_seed(9)
        maps = random_maps(gen, 3, 16, 16, "uniform", device="cuda")
        weights = selection(gen, 2, device="cuda")
        maps[1] = 0
        out = ops.blend_mask(maps, weights, 0.3, (64, 64), backend="cuda")
        assert out.is_cuda and out.dtype == torch.bool and not out[1].any() and out[0].any()
        assert torch.equal(out, blend_mask_reference(maps, weights, 0.3, (64, 64)))
        with pytest.raises(ValueError, match="cpu"):
            ops.blend_mask(maps, weights, 0.3, (64, 64), backend="cpu")
