"""ESD-u / ESD-x (var_erase.erasure.esd): the negative-guidance target on bit logits, the modules each variant trains,
and a short run on the tiny model (the target's logits move, the kept prompts' stay within a bound)."""

import pytest
import torch

from var_erase.erasure import esd, losses
from var_erase.erasure.config import DEFAULT_LORA_TARGET_MODULES

from ._method_checks import method_anchors, train


@pytest.fixture(scope="module")
def anchors():
    return method_anchors()


def test_negative_guidance_loss_is_the_mse_to_the_guided_target():
    torch.manual_seed(0)
    student, cond, uncond = torch.randn(3, 2, 5, 8).unbind(0)
    eta = 1.5
    target = uncond - eta * (cond - uncond)
    torch.testing.assert_close(esd.negative_guidance_loss(student, cond, uncond, eta),
                               ((student - target) ** 2).mean())
    assert float(esd.negative_guidance_loss(target, cond, uncond, eta)) == pytest.approx(0.0, abs=1e-12)
    weights = losses.equal_scale_weights([(1, 1), (2, 2)])
    assert esd.negative_guidance_loss(student, cond, uncond, eta, weights).shape == ()
    with pytest.raises(ValueError, match="negative_guidance must be a finite number"):
        esd.negative_guidance_loss(student, cond, uncond, float("nan"))


def test_variants_name_the_paper_module_sets():
    assert all(".attn2." not in f".{m}" for m in esd.ESD_U_TARGET_MODULES)
    assert {m.split(".")[0] for m in esd.ESD_U_TARGET_MODULES} == {"attn1", "ff"}
    assert {m.split(".")[0] for m in esd.ESD_X_TARGET_MODULES} == {"attn2"}
    assert esd.ESD_U_FULL_FINETUNE_MODULES == ("attn1", "ff") and esd.ESD_X_FULL_FINETUNE_MODULES == ("attn2",)


@pytest.mark.parametrize(("method", "trained"), [("esd-u", {"attn1", "ff"}), ("esd-x", {"attn2"}),
                                                 ("esd", {m.split(".")[0] for m in DEFAULT_LORA_TARGET_MODULES})])
def test_short_run_moves_the_target_and_keeps_others_bounded(anchors, method, trained):
    """Bound: the kept prompts' mean absolute logit change is at most twice the target's, and no kept logit moves by
    more than 1.5 (5 steps at lr 1e-2, the logits' spread is about 1); the ESD loss falls by more than half."""
    trainer, change = train(method, anchors, steps=5)
    assert {name.split(".")[2] for name in trainer.trainable_state_dict()} == trained
    history = trainer.state.history
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert change["target"] > 0.02
    assert change["kept"] <= 2 * change["target"] and change["kept_max"] <= 1.5


def test_negative_guidance_is_passed_through(anchors):
    """eta = 0 makes the target the unconditional logits; the loss at step 0 is then smaller than with eta = 1 (the
    target moves away from the concept's logits, which the student starts at)."""
    plain, _ = train("esd-x", anchors, steps=1, negative_guidance=0.0)
    strong, _ = train("esd-x", anchors, steps=1, negative_guidance=1.0)
    assert plain.state.history[0]["loss"] < strong.state.history[0]["loss"]
