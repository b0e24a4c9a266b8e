"""The oracle itself (reference.py) on hand-computed cases."""
import pytest
import torch

from fatezero_fast.errors import InputError
from fatezero_fast.ops import reference
from fatezero_fast.semantics.ddim import ddim_inversion_step
from fatezero_fast.semantics.frames import resolve_frame_index


def test_resolve_frame_index_entries():
    idx = resolve_frame_index([-1, "first"], 4)
    assert idx.tolist() == [[0, 0], [0, 0], [1, 0], [2, 0]]
    assert resolve_frame_index(["mid"], 4).tolist() == [[1]] * 4
    assert resolve_frame_index(["middle", "last"], 5).tolist() == [[2, 4]] * 5
    assert resolve_frame_index([2, -2], 4).tolist() == [[2, 0], [3, 0], [3, 0], [3, 1]]
    assert resolve_frame_index([], 3).tolist() == [[0], [1], [2]]  # plain per-frame


@pytest.mark.parametrize("entry", ["centre", 1.5, None, True])
def test_resolve_frame_index_rejects_unknown(entry):
    with pytest.raises(InputError, match="index entry"):
        resolve_frame_index([entry], 4)


def test_gather_frames_concatenates_in_order():
    x = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 1, 2, 1)  # frame f holds value f
    g = reference.gather_frames(x, torch.tensor([[2, 0], [1, 1], [0, 2]]))
    assert g[:, 0, :, 0].tolist() == [[2, 2, 0, 0], [1, 1, 1, 1], [0, 0, 2, 2]]


def test_uniform_scores_average_the_values():
    q = torch.zeros(2, 1, 3, 8)
    k = torch.randn(2, 1, 4, 8)
    v = torch.randn(2, 1, 4, 8)
    out = reference.blended_attention_reference(q, k, v, kv_frames=torch.tensor([[0, 1], [1, 1]]))
    torch.testing.assert_close(out[0, 0, 0], torch.cat([v[0, 0], v[1, 0]]).mean(0))
    torch.testing.assert_close(out[1, 0, 2], v[1, 0].mean(0))


def test_mask_blends_edit_and_source_rows():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    p_src = torch.softmax(torch.randn(1, 2, 3, 5), -1)
    kv = torch.tensor([[0]])
    mask = torch.tensor([[1.0, 0.0, 0.25]])
    out = reference.blended_attention_reference(q, k, v, kv_frames=kv, source=("probs", p_src), mask=mask)
    p_edit = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)
    expected = (mask[0, :, None] * p_edit + (1 - mask[0, :, None]) * p_src) @ v
    torch.testing.assert_close(out, expected)
    full_source = reference.blended_attention_reference(q, k, v, kv_frames=kv, source=("probs", p_src))
    torch.testing.assert_close(full_source, p_src @ v)


def test_source_forms_agree():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 1, 4, 8), torch.randn(2, 1, 3, 8), torch.randn(2, 1, 3, 8)
    q_s, k_s = torch.randn_like(q), torch.randn_like(k)
    kv = torch.tensor([[1, 0], [0, 0]])
    p_s = torch.softmax(q_s @ reference.gather_frames(k_s, kv).transpose(-1, -2) / 8 ** 0.5, -1)
    via_qk = reference.blended_attention_reference(q, k, v, kv_frames=kv, source=("qk", q_s, k_s))
    via_probs = reference.blended_attention_reference(q, k, v, kv_frames=kv, source=("probs", p_s))
    u, s, w = torch.linalg.svd(p_s, full_matrices=False)
    via_lowrank = reference.blended_attention_reference(q, k, v, kv_frames=kv,
                                                        source=("lowrank", u * s[..., None, :], w))
    scale = p_s.amax(-1)
    via_scaled = reference.blended_attention_reference(q, k, v, kv_frames=kv,
                                                       source=("probs", p_s / scale[..., None], scale))
    for other in (via_probs, via_lowrank, via_scaled):
        torch.testing.assert_close(via_qk, other, rtol=1e-5, atol=1e-5)


def test_ddim_inversion_step_formula():
    alphas = torch.linspace(0.99, 0.01, 1000)
    z, eps = torch.randn(4), torch.randn(4)
    out = ddim_inversion_step(eps, 21, z, alphas, torch.tensor(0.5), 1000, 50)
    a_cur, a_next = alphas[1], alphas[21]  # t - 1000/50 = 1
    expected = a_next.sqrt() * (z - (1 - a_cur).sqrt() * eps) / a_cur.sqrt() + (1 - a_next).sqrt() * eps
    torch.testing.assert_close(out, expected)
    first = ddim_inversion_step(eps, 1, z, alphas, torch.tensor(0.5), 1000, 50)  # 1 - 20 < 0
    a_cur = torch.tensor(0.5)
    expected = alphas[1].sqrt() * (z - (1 - a_cur).sqrt() * eps) / a_cur.sqrt() + (1 - alphas[1]).sqrt() * eps
    torch.testing.assert_close(first, expected)
