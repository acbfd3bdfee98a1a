"""Shared set-up of the baseline-method tests (test_esd, test_fmn, test_ablating_concepts, test_uce): a tiny
pipeline, two prompt pairs that erase "circle", two kept prompts, their anchors, and the logit changes a method makes.

The tiny model is random, so its text features do not separate concepts the way a trained model's do: every prompt
moves when one is trained on. The tests therefore check that the target's logits move and that the kept prompts'
logits stay within a stated bound (no blow-up); selectivity itself is measured on the embedded model by the
evaluation protocol, not here.
"""

from __future__ import annotations

import torch

from var_erase.erasure.anchors import AnchorSet, sample_anchors
from var_erase.erasure.config import ErasureConfig
from var_erase.erasure.prompts import PromptPair
from var_erase.erasure.trainer import ErasureTrainer

from ._tiny import tiny_pipeline

PAIRS = [PromptPair("a red circle", "a red square", "circle"), PromptPair("a big blue circle", "a big blue square",
                                                                          "circle")]
KEPT = ["two green triangles", "a yellow star on white"]


def method_anchors() -> AnchorSet:
    """One trajectory of the frozen tiny model per safe prompt and per kept prompt."""
    return sample_anchors(tiny_pipeline(), [p.safe for p in PAIRS] + KEPT, anchors_per_prompt=1, progress=False)


@torch.no_grad()
def teacher_forced_logits(pipe, anchors: AnchorSet, prompts: list[str], anchor_prompts: list[str]) -> torch.Tensor:
    """(B, L, 2d) logits of ``prompts`` along the anchors of ``anchor_prompts``, eval mode, no condition dropout."""
    rows = [anchors.rows_for(p)[0] for p in anchor_prompts]
    states, mask = pipe.encode_prompt(prompts)
    was_training = pipe.transformer.training
    pipe.transformer.eval()
    out = pipe.transformer(anchors.inputs[rows], states, mask, schedule=anchors.schedule, cond_drop_prob=0.0).sample
    pipe.transformer.train(was_training)
    return out


def logits_of_targets_and_kept(pipe, anchors: AnchorSet) -> tuple[torch.Tensor, torch.Tensor]:
    """The unsafe prompts along their pairs' safe anchors, and the kept prompts along their own anchors."""
    targets = teacher_forced_logits(pipe, anchors, [p.unsafe for p in PAIRS], [p.safe for p in PAIRS])
    return targets, teacher_forced_logits(pipe, anchors, KEPT, KEPT)


def train(method: str, anchors: AnchorSet, steps: int = 8, **config) -> tuple[ErasureTrainer, dict[str, float]]:
    """Train ``method`` for ``steps`` iterations on a fresh tiny pipeline; returns the trainer and the mean absolute
    change of the targets' and of the kept prompts' logits (``{"target": ..., "kept": ..., "kept_max": ...}``)."""
    pipe = tiny_pipeline()
    target_before, kept_before = logits_of_targets_and_kept(pipe, anchors)
    cfg = ErasureConfig(**({"method": method, "learning_rate": 1e-2, "max_train_steps": steps, "cond_drop_rate": 0.0}
                           | config))
    trainer = ErasureTrainer(pipe, cfg, PAIRS, anchors, seed=0)
    trainer.train(progress=False)
    target_after, kept_after = logits_of_targets_and_kept(pipe, anchors)
    return trainer, {"target": float((target_after - target_before).abs().mean()),
                     "kept": float((kept_after - kept_before).abs().mean()),
                     "kept_max": float((kept_after - kept_before).abs().max())}
