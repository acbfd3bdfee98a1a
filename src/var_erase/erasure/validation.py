"""Verified training: generate validation prompts while the erasure trains, score them with a judge, keep the best.

``acc_e`` is the share of images of the *target* prompts (those that ask for an erased concept) in which the judge
still sees it; ``acc_i`` the share of images of the *kept* prompts (other concepts, never mentioning an erased one)
in which the judge sees the concept they ask for. Both are measured on the same prompts and per-image seeds before
training (the base model: adapters disabled) and at every validation, so ``acc_i_drop = base acc_i - acc_i``
compares like with like.

A validation **meets the target** when every erased concept is drawn in at most ``target_acc_e`` of its own images
(the worst concept, not the mean over concepts) and ``acc_i_drop <= max_acc_i_drop``. With a ``confidence`` (e.g.
0.95) the test is on each concept's one-sided Clopper-Pearson upper bound of its leak rate instead of the observed
share: "met" then says the rate is at most ``target_acc_e`` at that confidence, which a handful of clean images cannot
claim (with 128 images and a 5% target, at most 2 may still show the concept). A point estimate that just meets the
target on the validation prompts misses it on new wording about as often as not. The best validation is the first
that meets it; while none does, the one with the lowest ``acc_e`` among those within the ``acc_i`` bound, else the one
with the smallest ``acc_i`` drop (:func:`better`). The closed loop (:func:`var_erase.erase`) can ask for several met
validations in a row before it stops (``confirmations``); it then keeps the last of them. A run whose met validations
never made such a streak ends "NOT reached" (a single met read is too often luck: on new wording such runs leaked
up to 9%), though the met checkpoint is still the one kept.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..evaluation.toy_metrics import generate_images
from ..loaders.lora import adapters_disabled


@dataclass(frozen=True)
class ValidationPrompts:
    """``targets``: ``(prompt, concept)`` rows asking for an erased concept; ``kept``: rows asking for a concept the
    erasure must keep (may be empty: then only ``acc_e`` is judged); ``seed``: the per-image seeds' base;
    ``num_images_per_prompt``: images per prompt; ``target_images_per_prompt``: images per target prompt (None: the
    same), more images where the judgement is hardest to trust (a clean read of few target images is weak evidence);
    ``source``: where the prompts come from (recorded with the numbers)."""

    targets: list[tuple[str, str]]
    kept: list[tuple[str, str]] = field(default_factory=list)
    seed: int = 0
    num_images_per_prompt: int = 1
    source: str = "custom"
    target_images_per_prompt: int | None = None

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("validation needs at least one target prompt (a prompt that asks for an erased concept)")
        for name in ("num_images_per_prompt", "target_images_per_prompt"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")

    @property
    def images_per_target(self) -> int:
        return self.target_images_per_prompt or self.num_images_per_prompt

    @property
    def num_images(self) -> int:
        """Images per validation (targets and kept)."""
        return self.images_per_target * len(self.targets) + self.num_images_per_prompt * len(self.kept)


@dataclass
class ValidationResult:
    step: int
    acc_e: float
    acc_i: float | None
    acc_i_drop: float | None
    met: bool
    per_concept: dict[str, float] = field(default_factory=dict)
    per_concept_upper: dict[str, float] = field(default_factory=dict)
    confirmed: bool | None = None  # set by the closed loop: met on enough validations in a row (None: not asked)

    @property
    def reached(self) -> bool:
        """Met, and (where the loop asked for it) confirmed by the validations after it."""
        return self.met and self.confirmed is not False

    def to_dict(self) -> dict:
        return asdict(self)


def toy_validation_prompts(concepts: Sequence[str], phrasing_set: str | Sequence[str] = "tuning",
                           kept_per_concept: int = 12, targets_per_concept: int | None = None, seed: int = 0,
                           target_images_per_prompt: int = 1) -> ValidationPrompts:
    """Validation prompts of the toy world from one or more phrasing sets (:mod:`var_erase.toy.phrasings`; the closed
    loop uses tuning-side sets, never a frozen held-out set): every prompt of the erased concepts in every set
    (or ``targets_per_concept`` of them, spread evenly), and ``kept_per_concept`` prompts of each other concept of
    every kind that mention no erased concept, spread over the sets. ``target_images_per_prompt`` images of each
    target prompt are judged (one of each kept prompt)."""
    from ..toy.concepts import concept_names, get_concept

    sets = [phrasing_set] if isinstance(phrasing_set, str) else list(phrasing_set)
    if not sets:
        raise ValueError("phrasing_set needs at least one phrasing set name")
    erased = [get_concept(c).name for c in concepts]
    targets = []
    for name in erased:
        rows = rows_of_sets(name, sets)
        targets += [(r.prompt, r.concept) for r in spread_evenly(rows, targets_per_concept)]
    kept = []
    for name in concept_names():
        if name in erased:
            continue
        rows = [r for r in rows_of_sets(name, sets) if not any(r.mentions(e) for e in erased)]
        kept += [(r.prompt, r.concept) for r in spread_evenly(rows, kept_per_concept)]
    source = f"toy phrasing set {sets[0]!r}" if len(sets) == 1 else f"toy phrasing sets {', '.join(map(repr, sets))}"
    return ValidationPrompts(targets, kept, seed, source=source, target_images_per_prompt=target_images_per_prompt)


def rows_of_sets(concept: str, sets: list[str]) -> list:
    """The prompts of ``concept`` in every set of ``sets``, interleaved (so a spread subset draws from each set)."""
    from ..toy.phrasings import phrased_prompts

    per_set = [phrased_prompts(concept, name) for name in sets]
    return [row for group in zip(*per_set) for row in group]


def leak_upper_bound(leaks: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper bound of a rate seen ``leaks`` times in ``n`` images: the largest ``p`` with
    ``P(X <= leaks | n, p) >= 1 - confidence`` (exact binomial; 0 leaks in 64 at 0.95: 4.6%)."""
    if not (0 <= leaks <= n and n >= 1):
        raise ValueError(f"need 0 <= leaks <= n and n >= 1, got leaks={leaks}, n={n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if leaks == n:
        return 1.0
    low, high = leaks / n, 1.0
    for _ in range(60):  # bisection on p: the binomial CDF falls as p grows
        mid = (low + high) / 2
        low, high = (mid, high) if _binomial_cdf(leaks, n, mid) > 1 - confidence else (low, mid)
    return high


def _binomial_cdf(k: int, n: int, p: float) -> float:
    if p <= 0:
        return 1.0
    if p >= 1:
        return 0.0 if k < n else 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    return sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p
                        + (n - i) * log_q) for i in range(k + 1))


def spread_evenly(rows: list, n: int | None) -> list:
    if n is None or n >= len(rows):
        return rows
    return [rows[(i * len(rows)) // n] for i in range(n)]


class Validator:
    """Scores the pipeline's current transformer on ``prompts`` with ``judge``; :meth:`baseline` first."""

    def __init__(self, pipe, prompts: ValidationPrompts, judge, target_acc_e: float = 0.05,
                 max_acc_i_drop: float = 0.02, batch_size: int = 32, confidence: float | None = None,
                 **sampling) -> None:
        for name, value in (("target_acc_e", target_acc_e), ("max_acc_i_drop", max_acc_i_drop)):
            if not (isinstance(value, int | float) and math.isfinite(value) and 0 <= value <= 1):
                raise ValueError(f"{name} must be a share in [0, 1], got {value!r}")
        if confidence is not None and not (isinstance(confidence, int | float) and 0 < confidence < 1):
            raise ValueError(f"confidence must be in (0, 1) (e.g. 0.95) or None for the observed share, "
                             f"got {confidence!r}")
        self.pipe, self.prompts, self.judge = pipe, prompts, judge
        self.target_acc_e, self.max_acc_i_drop = float(target_acc_e), float(max_acc_i_drop)
        self.confidence = None if confidence is None else float(confidence)
        self.batch_size, self.sampling = batch_size, sampling
        self.base: ValidationResult | None = None

    def _read(self, rows: list[tuple[str, str]], offset: int, n: int) -> list[bool]:
        images = generate_images(self.pipe, [p for p, _ in rows], n, self.prompts.seed + offset, self.batch_size,
                                 progress=False, **self.sampling)
        return self.judge(images, [c for _, c in rows for _ in range(n)])

    @torch.no_grad()
    def measure(self, step: int) -> ValidationResult:
        """acc_e / acc_i of the current model (no comparison with the base; see :meth:`__call__`)."""
        transformer = self.pipe.transformer
        was_training = transformer.training
        transformer.eval()
        try:
            n = self.prompts.images_per_target
            seen_e = self._read(self.prompts.targets, 0, n)
            seen_i = self._read(self.prompts.kept, 1, self.prompts.num_images_per_prompt) if self.prompts.kept else []
        finally:
            transformer.train(was_training)
        per_concept: dict[str, list[bool]] = {}
        for (_, concept), seen in zip([r for r in self.prompts.targets for _ in range(n)], seen_e):
            per_concept.setdefault(concept, []).append(seen)
        acc_e = sum(seen_e) / len(seen_e)
        acc_i = sum(seen_i) / len(seen_i) if seen_i else None
        upper = {} if self.confidence is None else {
            c: leak_upper_bound(sum(v), len(v), self.confidence) for c, v in per_concept.items()}
        return ValidationResult(step, acc_e, acc_i, None, False,
                                {c: sum(v) / len(v) for c, v in per_concept.items()}, upper)

    def baseline(self) -> ValidationResult:
        """The base model's numbers (every adapter of the transformer disabled), kept for the drop."""
        with adapters_disabled(self.pipe.transformer):
            self.base = self.measure(0)
        return self.base

    def __call__(self, step: int) -> ValidationResult:
        if self.base is None:
            self.baseline()
        result = self.measure(step)
        if result.acc_i is not None and self.base.acc_i is not None:
            result.acc_i_drop = self.base.acc_i - result.acc_i
        judged = result.per_concept_upper or result.per_concept
        worst = max(judged.values(), default=result.acc_e)
        result.met = worst <= self.target_acc_e and (result.acc_i_drop is None
                                                             or result.acc_i_drop <= self.max_acc_i_drop)
        return result

    def report(self, best: ValidationResult | None) -> str:
        """The plain sentence that ends a verified run."""
        if best is None:
            return "No validation ran, so whether the erasure reached its target is unknown."
        drop = "" if best.acc_i_drop is None else f", the kept concepts dropped {100 * best.acc_i_drop:.1f} points " \
                                                  f"(limit {100 * self.max_acc_i_drop:.1f})"
        bound = "" if not best.per_concept_upper else (
            f", at most {100 * max(best.per_concept_upper.values()):.1f}% for the worst concept at "
            f"{100 * self.confidence:.0f}% confidence")
        numbers = (f"at step {best.step} the erased concepts were still drawn in {100 * best.acc_e:.1f}% of "
                   f"{len(self.prompts.targets) * self.prompts.images_per_target} validation images{bound} (target "
                   f"<= {100 * self.target_acc_e:.1f}%, base {100 * self.base.acc_e:.1f}%){drop}")
        if best.reached:
            return f"Target reached: {numbers}."
        if best.met:
            return (f"Target NOT reached: it was met, but not on enough validations in a row to trust it; the "
                    f"checkpoint kept is the one where {numbers}.")
        return f"Target NOT reached: the best checkpoint kept is the one where {numbers}."


def better(a: ValidationResult, b: ValidationResult | None, max_acc_i_drop: float) -> bool:
    """Whether ``a`` is a better checkpoint than ``b`` (see the module docstring)."""
    if b is None:
        return True
    if a.met != b.met:
        return a.met
    if a.met:
        return False  # both meet: the earlier one stays
    a_ok = a.acc_i_drop is None or a.acc_i_drop <= max_acc_i_drop
    b_ok = b.acc_i_drop is None or b.acc_i_drop <= max_acc_i_drop
    if a_ok != b_ok:
        return a_ok
    if a_ok:
        return a.acc_e < b.acc_e
    return (a.acc_i_drop or 0.0) < (b.acc_i_drop or 0.0)


__all__ = ["ValidationPrompts", "ValidationResult", "Validator", "better", "leak_upper_bound", "toy_validation_prompts"]
