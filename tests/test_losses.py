"""Erasure losses: hand-computed cases, and equality with the reference code's lines (ndhg1213/S-VARE)."""

import math

import pytest
import torch
import torch.nn.functional as F

from var_erase.erasure.losses import (
    FilteredCEOutput,
    bitwise_cross_entropy,
    equal_scale_weights,
    esd_loss,
    esd_target_logits,
    filtered_cross_entropy,
    naive_loss,
    preservation_kl,
    probability_mse,
    scale_reweight_weights,
    vare_basic_loss,
)
from var_erase.schedules import ScaleSchedule


def bit_logits(p1_BLd: torch.Tensor) -> torch.Tensor:
    """(B, L, 2d) logits whose per-bit probability of class 1 is ``p1``."""
    return torch.stack([torch.zeros_like(p1_BLd), torch.logit(p1_BLd.double()).float()], dim=-1).flatten(-2)


def random_case(B=2, L=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, L, 2 * d, generator=g) * 2, torch.randint(0, 2, (B, L, d), generator=g)


# ---------------------------------------------------------------------------------------------------------------------
# filtered cross-entropy


def reference_fce(logits, bits):
    """erase_trainer.py, InfinityTrainer.train_step, step 1 (verbatim apart from names)."""
    B, L = logits.shape[:2]
    bit_loss = torch.nn.CrossEntropyLoss(reduction="none")(logits.reshape(B, L, -1, 2).permute(0, 3, 1, 2), bits)
    bit_error = (bit_loss.detach() > math.log(2.0)).float()
    token_error_rate = bit_error.mean(dim=-1)
    loss = bit_loss.mean(dim=-1)
    token_keep_mask = (token_error_rate >= 0.25).float()
    loss = loss * token_keep_mask
    return loss.mul(1.0 / L).sum(dim=-1).mean()


def test_filtered_ce_equals_reference_code():
    logits, bits = random_case()
    out = filtered_cross_entropy(logits, bits)
    assert isinstance(out, FilteredCEOutput)
    torch.testing.assert_close(out.loss, reference_fce(logits, bits), rtol=0, atol=0)


def test_filtered_ce_equals_manual_loop():
    logits, bits = random_case(B=2, L=5, d=4, seed=1)
    B, L, d = bits.shape
    total, kept = 0.0, 0
    for b in range(B):
        per_sample = 0.0
        for t in range(L):
            ces = []
            for k in range(d):
                l0, l1 = logits[b, t, 2 * k].item(), logits[b, t, 2 * k + 1].item()
                p_target = math.exp([l0, l1][bits[b, t, k]]) / (math.exp(l0) + math.exp(l1))
                ces.append(-math.log(p_target))
            wrong_share = sum(ce > math.log(2) for ce in ces) / d
            if wrong_share >= 0.25:
                per_sample += sum(ces) / d / L
                kept += 1
        total += per_sample / B
    out = filtered_cross_entropy(logits, bits)
    assert out.loss.item() == pytest.approx(total, rel=1e-5)
    assert out.kept_ratio.item() == pytest.approx(kept / (B * L))


def test_filtered_ce_hand_computed_token_mask():
    # one token, 4 bits, target all 1; p(1) = 0.9, 0.9, 0.9, 0.4 -> one wrong bit out of 4 = 25%: kept with '>='
    p1 = torch.tensor([[[0.9, 0.9, 0.9, 0.4]]])
    bits = torch.ones(1, 1, 4, dtype=torch.long)
    expected = -(3 * math.log(0.9) + math.log(0.4)) / 4
    out = filtered_cross_entropy(bit_logits(p1), bits)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.kept_ratio.item() == 1.0 and out.bit_error_rate.item() == 0.25
    # the paper's strict '>' drops it (25% does not exceed 25%)
    strict = filtered_cross_entropy(bit_logits(p1), bits, comparison=">")
    assert strict.loss.item() == 0.0 and strict.kept_ratio.item() == 0.0


def test_tokens_below_threshold_get_no_gradient():
    # token 0: 1 wrong bit of 8 (12.5%) -> dropped; token 1: 4 wrong of 8 -> kept
    p1 = torch.tensor([[[0.3] + [0.8] * 7, [0.3] * 4 + [0.8] * 4]])
    logits = bit_logits(p1).requires_grad_(True)
    out = filtered_cross_entropy(logits, torch.ones(1, 2, 8, dtype=torch.long))
    out.loss.backward()
    assert torch.all(logits.grad[0, 0] == 0)
    assert torch.all(logits.grad[0, 1].abs() > 0)  # every bit of a kept token gets gradient, even correct ones
    assert out.kept_ratio.item() == 0.5


def test_perfect_prediction_gives_zero_loss_and_nothing_kept():
    bits = torch.randint(0, 2, (2, 6, 8), generator=torch.Generator().manual_seed(3))
    logits = F.one_hot(bits, 2).float().flatten(-2) * 50.0  # +50 on the target class of every bit
    out = filtered_cross_entropy(logits, bits)
    assert out.loss.item() == 0.0 and out.kept_ratio.item() == 0.0 and out.bit_error_rate.item() == 0.0


def test_alpha_zero_keeps_every_token_with_code_comparison():
    # reference: token_error_rate >= 0.0 is always true, so alpha = 0 is the unfiltered bitwise CE
    logits, bits = random_case(seed=4)
    out = filtered_cross_entropy(logits, bits, token_threshold=0.0)
    assert out.kept_ratio.item() == 1.0
    torch.testing.assert_close(out.loss, bitwise_cross_entropy(logits, bits))


def test_normalize_all_tokens_vs_kept_tokens():
    # sample of 4 tokens, only token 0 wrong (all bits p(target) = 0.2): all_tokens divides by 4, kept_tokens by 1
    p1 = torch.tensor([[[0.2] * 4, [0.9] * 4, [0.9] * 4, [0.9] * 4]])
    bits = torch.ones(1, 4, 4, dtype=torch.long)
    ce = -math.log(0.2)
    assert filtered_cross_entropy(bit_logits(p1), bits).loss.item() == pytest.approx(ce / 4, rel=1e-6)
    kept = filtered_cross_entropy(bit_logits(p1), bits, normalize="kept_tokens")
    assert kept.loss.item() == pytest.approx(ce, rel=1e-6)
    # nothing kept: 0, not nan, and no nan gradient
    logits = bit_logits(torch.full((1, 3, 4), 0.9)).requires_grad_(True)
    none_kept = filtered_cross_entropy(logits, torch.ones(1, 3, 4, dtype=torch.long), normalize="kept_tokens")
    none_kept.loss.backward()
    assert none_kept.loss.item() == 0.0 and torch.all(logits.grad == 0)


def test_filtered_ce_token_weights():
    logits, bits = random_case(L=5, seed=5)
    uniform = torch.full((5,), 1 / 5)
    torch.testing.assert_close(filtered_cross_entropy(logits, bits, token_weight_L=uniform).loss,
                               filtered_cross_entropy(logits, bits).loss)
    # zero weight on the last two tokens = the loss of the first three with weights 1/5, ratios over those three
    w = torch.tensor([0.2, 0.2, 0.2, 0.0, 0.0])
    out = filtered_cross_entropy(logits, bits, token_weight_L=w)
    head = filtered_cross_entropy(logits[:, :3], bits[:, :3])
    torch.testing.assert_close(out.loss, head.loss * 3 / 5)
    torch.testing.assert_close(out.kept_ratio, head.kept_ratio)
    torch.testing.assert_close(out.bit_error_rate, head.bit_error_rate)


def test_filtered_ce_shape_and_option_errors():
    logits, bits = random_case(B=2, L=7, d=8)
    with pytest.raises(ValueError, match=r"\(2, 7, 8\).*got \(2, 7, 4\)"):
        filtered_cross_entropy(logits, bits[..., :4])
    with pytest.raises(ValueError, match="even last dimension"):
        filtered_cross_entropy(logits[..., :15], bits)
    with pytest.raises(ValueError, match="integer"):
        filtered_cross_entropy(logits, bits.float())
    with pytest.raises(ValueError, match="comparison"):
        filtered_cross_entropy(logits, bits, comparison="=>")
    with pytest.raises(ValueError, match="normalize"):
        filtered_cross_entropy(logits, bits, normalize="mean")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        filtered_cross_entropy(logits, bits, token_threshold=25)
    with pytest.raises(ValueError, match=r"\(L,\) = \(7,\)"):
        filtered_cross_entropy(logits, bits, token_weight_L=torch.ones(6))


def test_bf16_logits_are_upcast():
    logits, bits = random_case(seed=6)
    out = filtered_cross_entropy(logits.bfloat16(), bits)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, reference_fce(logits.bfloat16().float(), bits))


# ---------------------------------------------------------------------------------------------------------------------
# preservation KL


def reference_kl(student, teacher):
    """erase_trainer.py, InfinityTrainer.train_step, step 2 (without reg_lambda)."""
    B, L = student.shape[:2]
    teacher_probs = torch.softmax(teacher.reshape(B, -1, 2), dim=-1)
    student_log_probs = torch.log_softmax(student.reshape(B, -1, 2), dim=-1)
    distill = F.kl_div(student_log_probs, teacher_probs, reduction="none").reshape(B, L, -1).mean(dim=-1)
    return distill.mul(1.0 / L).sum(dim=-1).mean()


def test_kl_zero_for_identical_logits_and_non_negative():
    student, _ = random_case(seed=7)
    assert preservation_kl(student, student.clone()).abs().item() < 1e-7
    for seed in range(5):
        teacher, _ = random_case(seed=100 + seed)
        assert preservation_kl(student, teacher).item() > 0


def test_kl_equals_reference_code_and_manual_formula():
    student, _ = random_case(seed=8)
    teacher, _ = random_case(seed=9)
    torch.testing.assert_close(preservation_kl(student, teacher), reference_kl(student, teacher), rtol=0, atol=0)
    # manual: per bit KL(q || p) = sum_j q_j log(q_j / p_j); the code averages over the 2d entries, i.e. ½ per bit
    B, L, two_d = student.shape
    q = torch.softmax(teacher.double().reshape(B, L, -1, 2), -1)
    p = torch.softmax(student.double().reshape(B, L, -1, 2), -1)
    kl_per_bit = (q * (q.log() - p.log())).sum(-1)  # (B, L, d)
    code_form = (kl_per_bit.sum(-1) / two_d).mean()
    paper_form = kl_per_bit.mean()
    assert preservation_kl(student, teacher).item() == pytest.approx(code_form.item(), rel=1e-5)
    assert preservation_kl(student, teacher, reduction_code=False).item() == pytest.approx(paper_form.item(), rel=1e-5)
    assert paper_form.item() == pytest.approx(2 * code_form.item(), rel=1e-12)


def test_kl_hand_computed_single_bit():
    # teacher p(1) = 0.5, student p(1) = 0.8: KL = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2); code form halves it
    kl = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    student, teacher = bit_logits(torch.tensor([[[0.8]]])), bit_logits(torch.tensor([[[0.5]]]))
    assert preservation_kl(student, teacher).item() == pytest.approx(kl / 2, rel=1e-6)
    assert preservation_kl(student, teacher, reduction_code=False).item() == pytest.approx(kl, rel=1e-6)


def test_kl_gradient_only_reaches_the_student():
    student, _ = random_case(seed=10)
    teacher, _ = random_case(seed=11)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    preservation_kl(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None


def test_kl_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"same shape.*\(1, 4, 8\) and \(1, 4, 6\)"):
        preservation_kl(torch.zeros(1, 4, 8), torch.zeros(1, 4, 6))


# ---------------------------------------------------------------------------------------------------------------------
# VARE basic (Eq. 7), naive (Eq. 6), ESD


def test_probability_mse_hand_computed_and_wrappers():
    # 2 tokens x 2 bits: p* = (0.9, 0.5 | 0.2, 0.2), p = (0.6, 0.5 | 0.2, 0.7)
    student = bit_logits(torch.tensor([[[0.9, 0.5], [0.2, 0.2]]]))
    teacher = bit_logits(torch.tensor([[[0.6, 0.5], [0.2, 0.7]]]))
    expected = ((0.3**2 + 0) / 2 + (0 + 0.5**2) / 2) / 2
    assert probability_mse(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert vare_basic_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert naive_loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    assert probability_mse(student, student).item() == 0.0


def test_esd_target_moves_away_from_the_concept():
    """Hand-computed: the target sits on the far side of the unconditional logits from the conditional ones, eta
    times as far; eta = 0 is the unconditional model itself."""
    e_p, e_0 = torch.tensor([[[1.0, 3.0]]]), torch.tensor([[[2.0, 2.0]]])
    torch.testing.assert_close(esd_target_logits(e_p, e_0, 1.0), torch.tensor([[[3.0, 1.0]]]))
    torch.testing.assert_close(esd_target_logits(e_p, e_0, 2.5), torch.tensor([[[4.5, -0.5]]]))
    torch.testing.assert_close(esd_target_logits(e_p, e_0, 0.0), e_0)
    assert not esd_target_logits(e_p.requires_grad_(True), e_0).requires_grad


def test_esd_loss_is_mse_and_per_scale_mean():
    schedule = ScaleSchedule.from_patch_nums((1, 2, 3))  # 1 + 4 + 9 = 14 tokens
    g = torch.Generator().manual_seed(13)
    student, target = torch.randn(2, 14, 8, generator=g), torch.randn(2, 14, 8, generator=g)
    torch.testing.assert_close(esd_loss(student, target), F.mse_loss(student, target))
    # EraseInfinity: the mean over scales of each scale's MSE
    per_scale = [F.mse_loss(student[:, s], target[:, s]) for s in map(schedule.scale_slice, range(3))]
    torch.testing.assert_close(esd_loss(student, target, equal_scale_weights(schedule)), sum(per_scale) / 3)


# ---------------------------------------------------------------------------------------------------------------------
# Infinity's bitwise CE and scale weights


def test_bitwise_cross_entropy_hand_computed():
    p1 = torch.tensor([[[0.9, 0.2], [0.5, 0.5]]])
    bits = torch.tensor([[[1, 0], [1, 0]]])
    expected = ((-math.log(0.9) - math.log(0.8)) / 2 + math.log(2)) / 2
    assert bitwise_cross_entropy(bit_logits(p1), bits).item() == pytest.approx(expected, rel=1e-6)


def test_scale_reweight_weights_sum_to_one_and_per_scale_totals():
    schedule = ScaleSchedule.from_infinity(1.0, "1M")
    w = scale_reweight_weights(schedule)
    assert w.shape == (10521,) and w.dtype == torch.float32
    assert w.double().sum().item() == pytest.approx(1.0, abs=1e-6)
    totals = torch.stack([w[schedule.scale_slice(k)].double().sum() for k in range(schedule.num_scales)])
    sqrt_area = torch.tensor([math.sqrt(h * w_) for h, w_ in schedule.grids], dtype=torch.float64)
    torch.testing.assert_close(totals / totals[0], sqrt_area / sqrt_area[0], rtol=1e-5, atol=0)
    # a plain list of (h, w) grids works the same, and matches Infinity's trainer formula
    torch.testing.assert_close(scale_reweight_weights(list(schedule.grids)), w)
    last = math.sqrt(64 * 64)
    infinity_lw = torch.tensor([last / math.sqrt(h * w_) for h, w_ in schedule.grids for _ in range(h * w_)])
    torch.testing.assert_close(w, infinity_lw / infinity_lw.sum())


def test_bitwise_cross_entropy_with_scale_weights():
    schedule = ScaleSchedule.from_patch_nums((1, 2))  # 5 tokens, weights 1/3 then 1/6 each
    logits, bits = random_case(B=1, L=5, d=4, seed=14)
    w = scale_reweight_weights(schedule)
    torch.testing.assert_close(w, torch.tensor([1 / 3] + [1 / 6] * 4))
    per_token = F.cross_entropy(logits.reshape(1, 5, 4, 2).permute(0, 3, 1, 2), bits, reduction="none").mean(-1)
    torch.testing.assert_close(bitwise_cross_entropy(logits, bits, w), (per_token[0] * w).sum())


def test_equal_scale_weights_and_bad_schedule():
    w = equal_scale_weights([(1, 1), (2, 2)])
    torch.testing.assert_close(w, torch.tensor([0.5] + [0.125] * 4))
    with pytest.raises(ValueError, match="at least one scale"):
        scale_reweight_weights([])
    with pytest.raises(ValueError, match="list of"):
        scale_reweight_weights([3, 4])
