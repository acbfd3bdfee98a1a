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
    assert filter_bit_probabilities(p1, top_k=1).tolist() == [0.0, 0.5, 1.0, 0.0]  # a tie stays, as Infinity's
    assert torch.equal(filter_bit_probabilities(p1, top_k=900, top_p=1.0), p1)  # k >= 2 has no effect


def _infinity_filtered_p1(l0: float, l1: float, top_k: int, top_p: float) -> float:
    """P(bit = 1) after Infinity's top-k / top-p over one bit's two logits, restated class by class: top-k drops a
    logit below the k-th largest; top-p sorts the probabilities ascending (a tie keeps class order), drops each class
    whose cumulative probability is at most 1 - top_p, never the last; the rest is renormalised."""
    logits = {0: l0, 1: l1}
    if top_k > 0:
        kth = sorted(logits.values(), reverse=True)[min(top_k, 2) - 1]
        logits = {c: v for c, v in logits.items() if v >= kth}
    if top_p < 1.0 and len(logits) == 2:
        probs = {c: math.exp(v) / sum(math.exp(w) for w in logits.values()) for c, v in logits.items()}
        first = sorted(probs, key=lambda c: probs[c])[0]  # stable: a tie puts class 0 first
        if probs[first] <= 1 - top_p:
            del logits[first]
    total = sum(math.exp(v) for v in logits.values())
    return math.exp(logits[1]) / total if 1 in logits else 0.0


def test_top_k_and_top_p_keep_exactly_what_infinitys_per_bit_filter_keeps():
    diffs = [-4.0, -1.0, -0.2, -1e-3, 0.0, 1e-3, 0.2, 1.0, 4.0]  # logit(1) - logit(0)
    for top_k in (0, 1, 2):
        for top_p in (1.0, 0.97, 0.8, 0.6, 0.5, 0.3, 0.05):
            p1 = bit_probabilities(torch.tensor([[[v for d in diffs for v in (0.0, d)]]]))
            got = filter_bit_probabilities(p1, top_k=top_k, top_p=top_p)[0, 0].tolist()
            want = [_infinity_filtered_p1(0.0, d, top_k, top_p) for d in diffs]
            assert got == pytest.approx(want, abs=1e-6), (top_k, top_p)


def test_top_p_at_most_half_keeps_the_more_likely_value_and_top_k_1_keeps_ties():
    p1 = torch.tensor([0.6, 0.4, 0.2, 0.8, 0.5])
    assert filter_bit_probabilities(p1, top_p=0.3).tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert filter_bit_probabilities(p1, top_k=1).tolist() == [1.0, 0.0, 0.0, 1.0, 0.5]  # a tie stays 50/50
    tied = sample_bits(torch.zeros(1, 4000, 2), top_k=1, generator=torch.Generator().manual_seed(0))
    assert 0.45 < tied.float().mean().item() < 0.55


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
