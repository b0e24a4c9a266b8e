"""FateZero semantics (control.py) on hand-computed cases with the real CLIP vocabulary."""
import pytest
import torch

from fatezero_fast.errors import FateZeroWarning, InputError
from fatezero_fast.models.tokenizer import VOCAB_SIZE, clip_tokenizer
from fatezero_fast.ops.reference import blend_mask_reference
from fatezero_fast.semantics import masks, schedules, tokens
from fatezero_fast.semantics.plan import EditOptions, EditPlan

JEEP = "a silver jeep driving down a curvy road in the countryside,"


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def test_tokenizer_is_clip(tok):
    assert len(tok) == VOCAB_SIZE
    # ids of OpenAI CLIP's vocabulary (as in every SD-1.x tokenizer)
    assert tok.encode("a cat") == [49406, 320, 2368, 49407]
    assert tok("a", padding="max_length", max_length=77).input_ids[3:5] == [49407, 49407]


def test_word_token_indices(tok):
    assert tokens.word_token_indices(JEEP, "jeep", tok) == [3]
    assert tokens.word_token_indices(JEEP, "a", tok) == [1, 6]
    # "countryside," is one space-separated word covering two tokens
    assert tokens.word_token_indices(JEEP, "countryside,", tok) == [11, 12]
    assert tokens.word_token_indices(JEEP, "countryside", tok) == []
    assert tokens.word_token_indices(JEEP, 2, tok) == [3]
    assert tokens.word_token_indices(JEEP, "car", tok) == []


def test_cross_replace_alpha_float_pair_and_words(tok):
    alpha = schedules.cross_replace_alpha("a silver jeep", 10, 0.8, tok)
    assert alpha.shape == (11, 77)
    assert alpha[:8].eq(1).all() and alpha[8:].eq(0).all()  # int(0.8 * 11) = 8 rows
    alpha = schedules.cross_replace_alpha("a silver jeep", 10, {"default_": (0.2, 0.6), "jeep": 1.0}, tok)
    others = torch.ones(77, dtype=torch.bool)
    others[3] = False
    assert alpha[2:6][:, others].eq(1).all() and alpha[:2][:, others].eq(0).all() and alpha[6:][:, others].eq(0).all()
    assert alpha[:, 3].eq(1).all()
    alpha = schedules.cross_replace_alpha("a silver jeep", 10, {"jeep": 0.5}, tok)  # default_ = (0, 1)
    assert alpha[:, 0].eq(1).all() and alpha[:5, 3].eq(1).all() and alpha[5:, 3].eq(0).all()


def test_cross_replace_alpha_rejects_bad_bounds(tok):
    with pytest.raises(InputError):
        schedules.cross_replace_alpha("a", 10, 1.5, tok)
    with pytest.raises(InputError):
        schedules.cross_replace_alpha("a", 10, (0.6, 0.2), tok)


def test_self_replace_window():
    assert schedules.self_replace_window(10, 0.75) == (0, 7)
    assert schedules.self_replace_window(50, (0.2, 0.5)) == (10, 25)
    assert schedules.self_replace_window(10, 1.0) == (0, 10)


def test_replacement_mapper_same_token_counts(tok):
    m = tokens.replacement_mapper("a silver jeep", "a red jeep", tok)
    assert torch.equal(m, torch.eye(77))


def test_replacement_mapper_split_word_and_trailing_quirk(tok):
    # "countryside," (2 tokens: 4, 5) -> "town" (1 token: 4)
    m = tokens.replacement_mapper("a car in countryside,", "a car in town", tok)
    expected = torch.zeros(77, 77)
    for i in range(4):
        expected[i, i] = 1
    expected[4, 4] = expected[5, 4] = 1
    for j in range(5, 76):  # after the last swap the official code fills m[j, j], not m[i, j]
        expected[j, j] = 1
    assert torch.equal(m, expected)
    assert m[:, 76].sum() == 0  # so the last column is zero


def test_replacement_mapper_one_to_two_tokens(tok):
    # "town" (1 token) -> "countryside," (2 tokens): each target token gets 1/2
    m = tokens.replacement_mapper("a car in town", "a car in countryside,", tok)
    assert m[4, 4] == 0.5 and m[4, 5] == 0.5
    assert m[5, 6] == 0 and m[6, 6] == 1  # j runs one ahead of i after the swap


def test_refinement_mapper_insertion(tok):
    mapper, alphas = tokens.refinement_mapper("a silver jeep", "watercolor painting of a silver jeep", tok)
    assert mapper[:8].tolist() == [0, -1, -1, -1, 1, 2, 3, 4]
    assert alphas[:8].tolist() == [1, 0, 0, 0, 1, 1, 1, 1]
    assert mapper[8:].tolist() == list(range(8, 77)) and alphas[8:].eq(1).all()


def test_blend_mask_pool_resize_normalise_threshold():
    maps = torch.zeros(2, 4, 4, 77)
    maps[0, 1, 1, 5] = 1.0          # frame 0: one hot cell on the blend token
    maps[0, 3, 3, 5] = 0.2          # weaker cell: 0.2 / max 1.0 = 0.2 -> below 0.3
    maps[1, 0, 0, 5] = 4.0          # frame 1: normalised by its own max
    maps[1, 2, 2, 9] = 100.0        # a token that is not a blend word
    weights = torch.zeros(77)
    weights[5] = 1
    mask = blend_mask_reference(maps, weights, 0.3, (8, 8))
    assert mask.shape == (2, 8, 8) and mask.dtype == torch.bool
    expected0 = torch.zeros(4, 4, dtype=torch.bool)
    expected0[0:3, 0:3] = True      # 3x3 max-pool around (1, 1)
    expected1 = torch.zeros(4, 4, dtype=torch.bool)
    expected1[0:2, 0:2] = True
    up = lambda m: m.repeat_interleave(2, 0).repeat_interleave(2, 1)  # nearest x2
    assert torch.equal(mask[0], up(expected0)) and torch.equal(mask[1], up(expected1))
    no_pool = blend_mask_reference(maps, weights, 0.3, (4, 4), use_pool=False)
    assert no_pool[0].sum() == 1 and no_pool[0, 1, 1]
    # threshold 2 (the configs' [2, 2]) gives an all-zero mask: full source
    assert not blend_mask_reference(maps, weights, 2.0, (4, 4)).any()


def test_fuse_cross_refine_with_equalizer(tok):
    src, tgt = "a silver jeep", "watercolor painting of a silver jeep"
    plan = EditPlan.build(EditOptions(cross_replace_steps=0.5, eq_params={"words": ["watercolor"], "values": [10]}),
                          src, tgt, 4, tok)
    p_src, p_edit = torch.rand(2, 3, 6, 77), torch.rand(2, 3, 6, 77)
    mapper, alphas = tokens.refinement_mapper(src, tgt, tok)
    base = p_src[..., mapper] * alphas + p_edit * (1 - alphas)
    eq = torch.ones(77)
    eq[1] = 10
    torch.testing.assert_close(plan.fuse_cross(p_src, p_edit, 0), base * eq)      # alpha 1 (int(0.5*5)=2 rows)
    torch.testing.assert_close(plan.fuse_cross(p_src, p_edit, 3), p_edit)          # alpha 0


def test_fuse_cross_replace(tok):
    plan = EditPlan.build(EditOptions(cross_replace_steps=1.0, is_replace_controller=True),
                          "a car in countryside,", "a car in town", 4, tok)
    p_src, p_edit = torch.rand(1, 2, 5, 77), torch.rand(1, 2, 5, 77)
    torch.testing.assert_close(plan.fuse_cross(p_src, p_edit, 2), p_src @ plan.replace_mapper)


def test_replace_with_different_word_counts_warns_and_refines(tok):
    with pytest.warns(FateZeroWarning, match="refining instead"):
        plan = EditPlan.build(EditOptions(is_replace_controller=True), "a jeep", "a red jeep", 4, tok)
    assert plan.replace_mapper is None and plan.refine_mapper is not None


def test_absent_blend_and_eq_words_warn_and_count_for_nothing(tok):
    with pytest.warns(FateZeroWarning) as record:
        plan = EditPlan.build(EditOptions(blend_words=[["jeep"], ["car"]], blend_self_attention=True,
                                          eq_params={"words": ["watercolor"], "values": [10]}),
                              JEEP, JEEP, 4, tok)
    messages = [str(r.message) for r in record]
    assert any("'car'" in m for m in messages) and any("'watercolor'" in m for m in messages)
    assert all("\n" not in m for m in messages)
    assert plan.blend_target_weights.sum() == 0 and plan.equalizer.eq(1).all()
    assert plan.blend_source_weights[3] == 1


def test_self_blend_mask_only_with_blend_words(tok):
    plan = EditPlan.build(EditOptions(blend_self_attention=True, blend_th=(2, 2)), "a jeep", "a car", 4, tok)
    assert masks.self_blend_mask(plan, torch.rand(2, 4, 4, 77), (4, 4)) is None  # no words: full source


def test_latent_blend_window_and_union(tok):
    plan = EditPlan.build(EditOptions(blend_words=[["jeep"], ["car"]], blend_latents=True, blend_th=(0.5, 0.5)),
                          "a jeep", "a car", 10, tok)
    src_maps, edit_maps = torch.zeros(1, 2, 2, 77), torch.zeros(1, 2, 2, 77)
    src_maps[0, 0, 0, 2] = 1   # source word 'jeep' at the top-left
    edit_maps[0, 1, 1, 2] = 1  # target word 'car' at the bottom-right
    assert masks.latent_blend_mask(plan, 0, src_maps, edit_maps, (2, 2)) is None   # step 1 <= int(0.2*10)
    assert masks.latent_blend_mask(plan, 7, src_maps, edit_maps, (2, 2)) is None   # step 8 >= int(0.8*10)
    mask = masks.latent_blend_mask(plan, 3, src_maps, edit_maps, (2, 2))
    assert mask.all()  # 3x3 pooling spreads each 2x2 cell everywhere; the union covers both
    x, x_src = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    mask = torch.tensor([[[True, False], [False, False]]])
    out = masks.blend_latents(x, x_src, mask)
    assert out[0, :, 0, 0].eq(1).all() and out[0, :, 1, 1].eq(0).all()


@pytest.mark.parametrize("th", [(-0.1, 0.3), (0.3, 2.5), (3, 3)])
def test_thresholds_outside_0_2_are_errors(th):
    with pytest.raises(InputError, match="blend_th"):
        EditOptions(blend_th=th)


def test_blend_words_may_leave_out_the_target_list():
    assert EditOptions(blend_words=[["man"]]).blend_words == [["man"], []]
