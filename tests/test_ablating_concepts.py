"""AC-N / AC-M (var_erase.erasure.ablating_concepts): the two objectives against their formulas, and a short run of
each on the tiny model (the target's logits move, the kept prompts' stay within a bound)."""

import pytest
import torch
import torch.nn.functional as F

from var_erase.erasure import ablating_concepts as ac

from ._method_checks import method_anchors, train


@pytest.fixture(scope="module")
def anchors():
    return method_anchors()


def test_noise_based_loss_is_the_bitwise_cross_entropy_towards_the_anchor_bits():
    torch.manual_seed(0)
    logits, bits = torch.randn(2, 5, 8), torch.randint(0, 2, (2, 5, 4))
    want = F.cross_entropy(logits.reshape(-1, 2), bits.reshape(-1))  # all tokens weigh 1/L: a plain mean
    torch.testing.assert_close(ac.noise_based_loss(logits, bits), want)


def test_model_based_loss_is_the_per_bit_kl_from_the_frozen_anchor_prediction():
    torch.manual_seed(0)
    student, frozen = torch.randn(2, 2, 5, 8).unbind(0)
    p, q = torch.softmax(frozen.reshape(2, 5, 4, 2), -1), torch.softmax(student.reshape(2, 5, 4, 2), -1)
    want = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(ac.model_based_loss(student, frozen), want)
    assert float(ac.model_based_loss(frozen, frozen)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("method", ["ac-n", "ac-m"])
def test_short_run_moves_the_target_and_keeps_others_bounded(anchors, method):
    """Bound: the kept prompts' mean absolute logit change is at most twice the target's, and no kept logit moves by
    more than 1.5 (8 steps at lr 1e-2); the objective falls; only cross-attention keys and values are trained."""
    trainer, change = train(method, anchors)
    assert {".".join(name.split(".")[2:4]) for name in trainer.trainable_state_dict()} == {"attn2.to_k", "attn2.to_v"}
    history = trainer.state.history
    assert history[-1]["loss"] < history[0]["loss"]
    assert change["target"] > 0.005
    assert change["kept"] <= 2 * change["target"] and change["kept_max"] <= 1.5
