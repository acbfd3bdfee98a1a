"""Named erasure recipes: the method's settings together with how the prompt pairs, retain set and validation are made.

- ``"verified"`` (the default of :func:`var_erase.erase` and ``examples/train_svare.py``): S-VARE's losses with the
  extensions the toy-world studies found to make erasure surgical (docs/results.md): LoRA rank 8 at 1e-3 on every
  scale; one replacement per erased concept, the kept value the judge least confuses with it on the base model's
  own images (a clean substitute instead of a blend of several), judged on as many images as a validation (every
  prompt of the validation phrasings, twice); 64 pairs per concept worded evenly over every
  template and synonym, the templates including pair-only ones that name the attributes after the noun, in brackets,
  lists and longer sentences (``pair_wording="varied"``); the guided preservation student; a retain set of 48 captions
  of every kept value of the erased concepts' kinds (guided, weight 0.25); and the closed loop: validation every 100
  iterations on the tuning-side phrasings (``"tuning"`` and ``"fresh"``, two images per target prompt), a concept
  counting as erased only when its leak rate is below the target at 95% confidence (not merely observed below it),
  stopping once the worst erased concept is met on two validations in a row, at most 2,500 iterations; what is
  validated, kept and saved is the exponential moving average of the LoRA weights (``ema_decay=0.99``: the loop's
  verdict then holds on held-out wording, where the raw weights' step-to-step swings made it claim success too
  early; ``ema_decay=0`` / ``--ema_decay 0`` turns it off).
- ``"svare"``: S-VARE as the reference code runs it (``ndhg1213/S-VARE``), as a rank-4 LoRA: 500 iterations, a random
  other value per pair, no retain set, no validation loop.
- ``"svare-paper"``: ``"svare"`` with the paper's reading where it differs from the code
  (:meth:`~var_erase.erasure.config.ErasureConfig.paper`).

A recipe's settings are defaults: every argument given to ``erase`` (or flag given to the script) wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import ErasureConfig


@dataclass(frozen=True)
class Recipe:
    """Args:
        name / description: what it is called and what it does.
        config: :class:`ErasureConfig` fields that differ from its defaults.
        num_pairs: generated pairs per concept (toy world). pair_wording: ``"random"``, ``"balanced"`` or ``"varied"``
            (:func:`~var_erase.toy.pairs.toy_prompt_pairs`).
        replacement: ``"random"`` (each pair a random kept value of the kind) or ``"judge"`` (one value per concept,
            the one the judge least reads as the concept on the base model's images).
        retain_prompts_per_concept: captions of every kept value of the erased kinds to preserve (toy world; 0: off).
        validation_steps: iterations between validations of the closed loop (None: no loop).
        confirmations: met validations in a row before the loop stops early.
        validation_target_images: images judged per target prompt at each validation (toy world).
        validation_phrasings: the toy phrasing sets validated on (:mod:`var_erase.toy.phrasings`; tuning-side sets
            only, never a frozen held-out set, :data:`var_erase.toy.phrasings.FROZEN_SETS`).
        replacement_prompts_per_value: with ``replacement="judge"``, base-model prompts per kept value the choice is
            judged on (tuning phrasings, one image each); None: every prompt of ``validation_phrasings``, drawn
            ``validation_target_images`` times (a few percent of confusion is invisible in 16 images).
        distinct_replacements: with ``replacement="judge"``, give several erased concepts of one kind different kept
            values (:func:`~var_erase.erasure.erase.judge_replacements` ``distinct``).
        validation_confidence: judge each erased concept by the upper bound of its leak rate at this confidence
            (:func:`~var_erase.erasure.validation.leak_upper_bound`); None: the observed share.
    """

    name: str
    description: str
    config: dict[str, Any] = field(default_factory=dict)
    num_pairs: int = 50
    pair_wording: str = "random"
    replacement: str = "random"
    retain_prompts_per_concept: int = 0
    validation_steps: int | None = None
    confirmations: int = 1
    validation_target_images: int = 1
    validation_phrasings: tuple[str, ...] = ("tuning",)
    validation_confidence: float | None = None
    replacement_prompts_per_value: int | None = 16
    distinct_replacements: bool = False

    def erasure_config(self, **overrides: Any) -> ErasureConfig:
        """The recipe's :class:`ErasureConfig`, with ``overrides`` (None values are ignored) on top."""
        settings = {**self.config, **{k: v for k, v in overrides.items() if v is not None}}
        if self.name == "svare-paper":
            return ErasureConfig.paper(**settings).validate()
        return ErasureConfig(**settings).validate()


RECIPES: dict[str, Recipe] = {
    "verified": Recipe(
        "verified", "S-VARE with one judge-chosen replacement, a retain set and the closed validation loop",
        config={"lora_rank": 8, "lora_alpha": 8.0, "learning_rate": 1e-3, "max_train_steps": 2500,
                "preservation_student": "guided", "retain_teacher": "guided", "retain_student": "guided",
                "retain_weight": 0.25, "retain_batch_size": 4, "ema_decay": 0.99},
        num_pairs=64, pair_wording="varied", replacement="judge", retain_prompts_per_concept=48, validation_steps=100,
        confirmations=2, validation_target_images=2, validation_phrasings=("tuning", "fresh"),
        validation_confidence=0.95, replacement_prompts_per_value=None),
    "svare": Recipe("svare", "S-VARE as the reference code runs it, as a rank-4 LoRA"),
    "svare-paper": Recipe("svare-paper", "S-VARE with the paper's reading where it differs from the code"),
}
DEFAULT_RECIPE = "verified"


def get_recipe(name: str | Recipe) -> Recipe:
    if isinstance(name, Recipe):
        return name
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {list(RECIPES)}")
    return RECIPES[name]


__all__ = ["DEFAULT_RECIPE", "RECIPES", "Recipe", "get_recipe"]
