"""Scale schedules: Infinity's templates and pixel budgets, token offsets and the per-token tables the transformer
uses, and an error for every input that has no schedule."""

import pytest
import torch

from var_erase.schedules import INFINITY_TEMPLATES, PIXEL_BUDGETS, ScaleSchedule, nearest_template


def test_infinity_1024_square_is_13_scales_and_10521_tokens():
    s = ScaleSchedule.from_infinity(1.0, "1M")
    assert (s.num_scales, s.total_tokens, s.height, s.width) == (13, 10_521, 1024, 1024)
    assert s.grids[0] == (1, 1) and s.latent_grid == (64, 64)


@pytest.mark.parametrize(("pixels", "scales", "side"), [("0.06M", 7, 256), ("0.25M", 10, 512), ("0.60M", 12, 768)])
def test_smaller_budgets_are_prefixes_of_the_1m_schedule_with_its_rope_reference(pixels, scales, side):
    full, s = ScaleSchedule.from_infinity(1.0, "1M"), ScaleSchedule.from_infinity(1.0, pixels)
    assert s.num_scales == scales and s.grids == full.grids[:scales]
    assert (s.height, s.width) == (side, side)
    assert s.reference_grid == (64, 64)  # positions are laid onto the 1M grid even at a smaller budget


def test_fifteen_templates_and_inverse_ratios_are_transposed():
    assert len(INFINITY_TEMPLATES) == 15 and all(len(g) == 13 for g in INFINITY_TEMPLATES.values())
    assert INFINITY_TEMPLATES[0.5] == tuple((w, h) for h, w in INFINITY_TEMPLATES[2.0])
    tall, wide = ScaleSchedule.from_infinity(2.0), ScaleSchedule.from_infinity(0.5)
    assert tall.height == wide.width and tall.width == wide.height and tall.height > tall.width
    assert nearest_template(1.02) == 1.0 and nearest_template(0.49) == 0.5


def test_var_patch_nums_schedule_has_680_tokens():
    s = ScaleSchedule.from_patch_nums([1, 2, 3, 4, 5, 6, 8, 10, 13, 16])
    assert s.total_tokens == 680 and s.latent_grid == (16, 16) and s.height == 256


def test_offsets_partition_the_sequence_and_scale_ids_agree():
    s = ScaleSchedule(((1, 1), (2, 3), (4, 4)))
    assert s.offsets == (0, 1, 7, 23) and s.token_counts == (1, 6, 16)
    ids = s.scale_ids()
    assert ids.shape == (23,)
    for k in range(s.num_scales):
        assert (ids[s.scale_slice(k)] == k).all()


def test_block_causal_mask_sees_own_and_coarser_scales_only():
    s = ScaleSchedule(((1, 1), (2, 2), (3, 3)))
    mask = s.block_causal_mask()
    first, middle, last = s.scale_slice(0), s.scale_slice(1), s.scale_slice(2)
    assert mask[middle, first].all() and mask[middle, middle].all() and not mask[middle, last].any()
    assert mask[last].all() and not mask[first, middle].any() and mask[first, first].all()


def test_rope_positions_lay_each_scale_onto_the_reference_grid():
    s = ScaleSchedule(((1, 1), (2, 2), (4, 4)))
    pos = s.rope_positions()
    assert pos.shape == (s.total_tokens, 2) and pos.dtype == torch.long
    assert pos[s.scale_slice(0)].tolist() == [[0, 0]]
    assert pos[s.scale_slice(1)].tolist() == [[0, 0], [0, 2], [2, 0], [2, 2]]  # every other cell of the 4x4 grid
    last = pos[s.scale_slice(2)]
    assert last[:, 0].tolist() == [r for r in range(4) for _ in range(4)] and last[:, 1].tolist() == [0, 1, 2, 3] * 4


def test_rope_positions_stay_inside_the_reference_at_every_budget():
    for pixels in PIXEL_BUDGETS:
        s = ScaleSchedule.from_infinity(0.75, pixels)
        pos, (ref_h, ref_w) = s.rope_positions(), s.reference_grid
        assert pos.min() >= 0 and pos[:, 0].max() < ref_h and pos[:, 1].max() < ref_w


def test_for_image_size_picks_the_nearest_template_and_budget():
    assert ScaleSchedule.for_image_size(512, 512).grids == ScaleSchedule.from_infinity(1.0, "0.25M").grids
    wide = ScaleSchedule.for_image_size(512, 1024)
    assert wide.width == 2 * wide.height
    assert ScaleSchedule.for_image_size(1024, 1024, max_scales=7).num_scales == 7  # the model has 7 scale embeddings


def test_truncated_keeps_the_reference_and_round_trips_through_a_dict():
    s = ScaleSchedule.from_infinity(1.0, "1M")
    t = s.truncated(4)
    assert t.grids == s.grids[:4] and t.reference_grid == s.reference_grid
    assert ScaleSchedule.from_dict(t.to_dict()) == t
    assert ScaleSchedule.from_dict({"grids": [[1, 1], [2, 2]]}) == ScaleSchedule(((1, 1), (2, 2)))


@pytest.mark.parametrize(("make", "match"), [
    (lambda: ScaleSchedule(()), "at least one scale"),
    (lambda: ScaleSchedule(((1, 1), (0, 2))), "must be positive"),
    (lambda: ScaleSchedule(((1, 1),), vae_stride=0), "vae_stride must be positive"),
    (lambda: ScaleSchedule.from_infinity(1.0, "2M"), "unknown pixel budget '2M'"),
    (lambda: ScaleSchedule.from_infinity(5.0), "between 1/3 and 3"),
    (lambda: nearest_template(0.0), "must be positive"),
    (lambda: ScaleSchedule.for_image_size(512.0, 512), "positive integers"),
    (lambda: ScaleSchedule.for_image_size(-1, 512), "positive integers"),
    (lambda: ScaleSchedule.for_image_size(512, 512, max_scales=5), "smallest uses 7 scales"),
    (lambda: ScaleSchedule.from_infinity(1.0).truncated(14), r"num_scales must be in \[1, 13\]"),
])
def test_inputs_without_a_schedule_raise_a_clear_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()
