import math

import pytest
import torch

from var_erase.models.quantizer import MultiScaleBSQ
from var_erase.schedules import ScaleSchedule

D = 8  # tiny codebook_dim for speed; Infinity's is 32


@pytest.fixture
def quantizer() -> MultiScaleBSQ:
    return MultiScaleBSQ(codebook_dim=D)


@pytest.fixture
def schedule() -> ScaleSchedule:
    # a non-square, non-nested schedule exercises both area downsampling and bilinear resizes
    return ScaleSchedule(((1, 1), (2, 3), (3, 4), (5, 6), (8, 10)), vae_stride=4)


def random_latent(schedule: ScaleSchedule, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, D, *schedule.latent_grid, generator=generator)


# ------------------------------------------------------------------------------------------------------------------
# one scale
def test_codes_are_unit_vectors_of_plus_minus_one_over_sqrt_d(quantizer):
    z_Bdhw = torch.randn(3, D, 4, 5)
    codes_Bdhw, bits_Bld = quantizer.quantize_tokens(z_Bdhw)

    assert codes_Bdhw.shape == (3, D, 4, 5) and codes_Bdhw.dtype == torch.float32
    assert bits_Bld.shape == (3, 20, D) and bits_Bld.dtype == torch.long
    assert torch.equal(codes_Bdhw.abs(), torch.full_like(codes_Bdhw, 1 / math.sqrt(D)))
    torch.testing.assert_close(codes_Bdhw.norm(dim=1), torch.ones(3, 4, 5))
    # bits are the signs, in raster order, and bits_to_codes inverts them exactly
    assert torch.equal(bits_Bld, (z_Bdhw > 0).flatten(2).transpose(1, 2).long())
    assert torch.equal(quantizer.bits_to_codes(bits_Bld, (4, 5)), codes_Bdhw)


def test_exact_zeros_quantize_to_bit_zero_as_the_reference(quantizer):
    z_Bdhw = torch.zeros(1, D, 1, 2)
    z_Bdhw[0, :3, 0, 0] = torch.tensor([0.0, 1.0, -1.0])  # token 0 has zeros, token 1 is all zero
    codes_Bdhw, bits_Bld = quantizer.quantize_tokens(z_Bdhw)

    assert bits_Bld[0, 0].tolist() == [0, 1, 0] + [0] * (D - 3)
    assert bits_Bld[0, 1].tolist() == [0] * D
    assert torch.equal(codes_Bdhw[0, :, 0, 1], torch.full((D,), -1 / math.sqrt(D)))


def test_straight_through_gradient_reaches_the_input(quantizer):
    z_Bdhw = torch.randn(2, D, 3, 3, requires_grad=True)
    codes_Bdhw, _ = quantizer.quantize_tokens(z_Bdhw)
    assert torch.equal(codes_Bdhw.detach().abs(), torch.full_like(codes_Bdhw, 1 / math.sqrt(D)))

    (codes_Bdhw * torch.randn_like(codes_Bdhw)).sum().backward()
    assert z_Bdhw.grad is not None and z_Bdhw.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------------------
# whole latents
def test_quantize_bits_rebuild_f_hat_exactly(quantizer, schedule):
    f_BdHW = random_latent(schedule)
    f_hat_BdHW, bits = quantizer.quantize(f_BdHW, schedule)

    assert f_hat_BdHW.shape == f_BdHW.shape
    assert [b.shape for b in bits] == [(2, h * w, D) for h, w in schedule.grids]
    rebuilt_BdHW = None
    for k, bits_Bld in enumerate(bits):
        codes_Bdhw = quantizer.bits_to_codes(bits_Bld, schedule.grids[k])
        rebuilt_BdHW = quantizer.accumulate(rebuilt_BdHW, codes_Bdhw, k, schedule)
    assert torch.equal(rebuilt_BdHW, f_hat_BdHW)


def test_finer_scales_reduce_the_quantization_error(quantizer, schedule):
    f_BdHW = random_latent(schedule, batch=4)
    f_hat_BdHW, bits = quantizer.quantize(f_BdHW, schedule)
    coarsest_BdHW = quantizer.accumulate(None, quantizer.bits_to_codes(bits[0], schedule.grids[0]), 0, schedule)
    assert (f_hat_BdHW - f_BdHW).norm() < 0.9 * (coarsest_BdHW - f_BdHW).norm()


def test_teacher_forcing_inputs_equal_step_by_step_sampling(quantizer, schedule):
    _, bits = quantizer.quantize(random_latent(schedule), schedule)

    # what a sampler does: bits of scale k -> codes -> cumulative map -> input of scale k + 1
    f_hat_BdHW, step_inputs = None, []
    for k, bits_Bld in enumerate(bits):
        f_hat_BdHW = quantizer.accumulate(f_hat_BdHW, quantizer.bits_to_codes(bits_Bld, schedule.grids[k]), k, schedule)
        if k < schedule.num_scales - 1:
            step_inputs.append(quantizer.next_scale_input(f_hat_BdHW, k, schedule))

    inputs_BLd = quantizer.teacher_forcing_inputs(bits, schedule)
    assert inputs_BLd.shape == (2, schedule.total_tokens - 1, D)  # the 1x1 first scale takes the start token
    assert torch.equal(inputs_BLd, torch.cat(step_inputs, dim=1))
    for k, step_input in enumerate(step_inputs):  # scale k+1's slice of the sequence, minus the start token
        sl = schedule.scale_slice(k + 1)
        assert torch.equal(inputs_BLd[:, sl.start - 1 : sl.stop - 1], step_input)


def test_infinity_schedule_gives_l_minus_one_inputs():
    quantizer = MultiScaleBSQ()  # Infinity: d = 32
    schedule = ScaleSchedule.from_infinity(1.0, "0.06M")  # 7 scales, 521 tokens, 16x16 latent
    f_BdHW = torch.randn(1, 32, 16, 16)
    labels, inputs_BLd, _ = quantizer.self_correct(f_BdHW, schedule, strength=0.3, num_layers=7)
    assert inputs_BLd.shape == (1, 520, 32)
    assert sum(b.shape[1] for b in labels) == 521


def test_quantize_is_differentiable_for_vae_training(quantizer, schedule):
    f_BdHW = random_latent(schedule).requires_grad_()
    f_hat_BdHW, _ = quantizer.quantize(f_BdHW, schedule)
    (f_hat_BdHW * torch.randn_like(f_hat_BdHW)).sum().backward()
    assert torch.isfinite(f_BdHW.grad).all() and f_BdHW.grad.abs().sum() > 0


def test_quantize_runs_in_float32_for_half_inputs(quantizer, schedule):
    f_BdHW = random_latent(schedule)
    f_hat_BdHW, bits = quantizer.quantize(f_BdHW.bfloat16(), schedule)
    assert f_hat_BdHW.dtype == torch.float32
    assert torch.equal(bits[0], quantizer.quantize(f_BdHW.bfloat16().float(), schedule)[1][0])


# ------------------------------------------------------------------------------------------------------------------
# bitwise self-correction
def test_self_correct_without_flips_equals_quantize(quantizer, schedule):
    f_BdHW = random_latent(schedule)
    f_hat_BdHW, bits = quantizer.quantize(f_BdHW, schedule)

    for strength, num_layers in ((0.0, schedule.num_scales), (1.0, 0)):
        generator = torch.Generator().manual_seed(0)
        labels, inputs_BLd, sc_f_hat_BdHW = quantizer.self_correct(f_BdHW, schedule, strength, num_layers, generator)
        assert all(torch.equal(a, b) for a, b in zip(labels, bits, strict=True))
        assert torch.equal(inputs_BLd, quantizer.teacher_forcing_inputs(bits, schedule))
        assert torch.equal(sc_f_hat_BdHW, f_hat_BdHW)


def test_self_correct_is_deterministic_and_flips_bits(quantizer, schedule):
    f_BdHW = random_latent(schedule, batch=4)
    _, clean_bits = quantizer.quantize(f_BdHW, schedule)

    def run(seed):
        return quantizer.self_correct(f_BdHW, schedule, 0.5, schedule.num_scales, torch.Generator().manual_seed(seed))

    labels, inputs_BLd, f_hat_BdHW = run(1)
    labels_again, inputs_again, f_hat_again = run(1)
    assert all(torch.equal(a, b) for a, b in zip(labels, labels_again, strict=True))
    assert torch.equal(inputs_BLd, inputs_again) and torch.equal(f_hat_BdHW, f_hat_again)
    assert not torch.equal(inputs_BLd, run(2)[1])

    # scale 0 quantizes f itself: its labels are the clean bits; later residuals see the flipped map
    assert torch.equal(labels[0], clean_bits[0])
    assert not all(torch.equal(a, b) for a, b in zip(labels, clean_bits))
    # the inputs are built from flipped bits, not from the labels
    assert not torch.equal(inputs_BLd, quantizer.teacher_forcing_inputs(labels, schedule))


def test_self_correct_flip_rate_is_bounded_by_strength(quantizer):
    schedule = ScaleSchedule(((16, 16), (16, 16)), vae_stride=1)  # two full-resolution scales: easy to count flips
    f_BdHW = torch.randn(8, D, 16, 16)
    flip_rates = []
    for seed in range(5):
        labels, inputs_BLd, _ = quantizer.self_correct(f_BdHW, schedule, 0.2, 1, torch.Generator().manual_seed(seed))
        sent_bits_Bld = (inputs_BLd > 0).long()  # at full resolution the next input is scale 0's (flipped) codes
        flip_rates.append((sent_bits_Bld != labels[0]).float().mean().item())
    assert max(flip_rates) <= 0.2 + 0.01
    assert len(set(flip_rates)) > 1 and max(flip_rates) > 0.01  # p is drawn per call, so rates vary


def test_self_correct_uses_the_generator_device_and_global_rng_when_none(quantizer, schedule):
    f_BdHW = random_latent(schedule)
    torch.manual_seed(3)
    first = quantizer.self_correct(f_BdHW, schedule, 0.3, 3)[1]
    torch.manual_seed(3)
    assert torch.equal(first, quantizer.self_correct(f_BdHW, schedule, 0.3, 3)[1])


# ------------------------------------------------------------------------------------------------------------------
# errors
def test_clear_errors_for_bad_inputs(quantizer, schedule):
    f_BdHW = random_latent(schedule)
    with pytest.raises(ValueError, match="squeeze"):
        quantizer.quantize(f_BdHW.unsqueeze(2), schedule)
    with pytest.raises(ValueError, match="codebook_dim channels"):
        quantizer.quantize(torch.randn(2, D + 1, *schedule.latent_grid), schedule)
    with pytest.raises(ValueError, match="last grid"):
        quantizer.quantize(f_BdHW[..., :-1], schedule)
    with pytest.raises(ValueError, match=r"\(B, 6, 8\)"):
        quantizer.bits_to_codes(torch.zeros(2, 5, D, dtype=torch.long), (2, 3))
    with pytest.raises(ValueError, match="bool or integer"):
        quantizer.bits_to_codes(torch.zeros(2, 6, D), (2, 3))
    with pytest.raises(ValueError, match="grid 1"):
        quantizer.accumulate(None, torch.zeros(1, D, 3, 3), 1, schedule)
    with pytest.raises(ValueError, match="no next scale"):
        quantizer.next_scale_input(f_BdHW, schedule.num_scales - 1, schedule)
    with pytest.raises(ValueError, match="5 scales"):
        quantizer.teacher_forcing_inputs([torch.zeros(2, 1, D, dtype=torch.long)], schedule)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        quantizer.self_correct(f_BdHW, schedule, 1.5, 3)
    with pytest.raises(ValueError, match='pass "bilinear"'):
        MultiScaleBSQ(up_mode="trilinear")


def test_has_no_parameters_or_state():
    quantizer = MultiScaleBSQ()
    assert list(quantizer.parameters()) == [] and quantizer.state_dict() == {}
    assert "codebook_dim=32" in repr(quantizer)
