import math

import pytest
import torch

from var_erase.pipelines.sampling import (
    bit_probabilities,
    check_sampling_args,
    filter_bit_probabilities,
    guide_logits,
    sample_bits,
)


def test_guidance_is_infinity_form():
    cond, uncond = torch.tensor([2.0]), torch.tensor([0.5])
    assert guide_logits(cond, uncond, 1.0).item() == 2.0  # g = 1: no guidance
    assert guide_logits(cond, uncond, 4.0).item() == pytest.approx(4 * 2.0 - 3 * 0.5)


def test_bit_probabilities_softmax_over_pairs():
    logits = torch.tensor([[[0.0, math.log(3.0), 1.0, 1.0]]])  # 2 bits: p1 = 3/4, then 1/2
    p1 = bit_probabilities(logits)
    assert torch.allclose(p1, torch.tensor([[[0.75, 0.5]]]))
    assert torch.allclose(bit_probabilities(logits, temperature=0.5)[0, 0, 0], torch.tensor(0.9))  # 9/(1+9)


def test_top_p_makes_confident_bits_certain_and_top_k_1_is_greedy():
    p1 = torch.tensor([0.02, 0.5, 0.98, 0.3])
    assert torch.allclose(filter_bit_probabilities(p1, top_p=0.97), torch.tensor([0.0, 0.5, 1.0, 0.3]))
    assert filter_bit_probabilities(p1, top_k=1).tolist() == [0.0, 0.0, 1.0, 0.0]
    assert torch.equal(filter_bit_probabilities(p1, top_k=900, top_p=1.0), p1)  # k >= 2 has no effect


def test_sampling_matches_probabilities_and_is_reproducible():
    logits = torch.zeros(1, 20000, 2)
    logits[..., 1] = math.log(0.3 / 0.7)  # p(bit = 1) = 0.3
    bits = sample_bits(logits, generator=torch.Generator().manual_seed(0))
    assert abs(bits.float().mean().item() - 0.3) < 0.02
    again = sample_bits(logits, generator=torch.Generator().manual_seed(0))
    assert torch.equal(bits, again)


def test_generator_list_gives_per_image_streams():
    logits = torch.zeros(2, 64, 16)
    both = sample_bits(logits, generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    single = sample_bits(logits[:1], generator=torch.Generator().manual_seed(2))
    assert torch.equal(both[1:], single)
    with pytest.raises(ValueError, match="one per image"):
        sample_bits(logits, generator=[torch.Generator()])


@pytest.mark.parametrize("kwargs, match", [
    (dict(guidance_scale=-1.0), "guidance_scale"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
])
def test_bad_sampling_args(kwargs, match):
    args = dict(guidance_scale=4.0, temperature=1.0, top_k=900, top_p=0.97) | kwargs
    with pytest.raises(ValueError, match=match):
        check_sampling_args(**args)
