"""Frozen phrasing sets for judging an erasure on wording it never saw: ``"tuning"``, ``"heldout"``, ``"fresh"``,
``"unseen"`` and ``"unseen2"``.

An erasure is trained on caption-template prompts (:mod:`var_erase.toy.captions`, split ``"train"``). Whether it
generalises is judged on prompts written differently. Five disjoint template sets exist, plus one variant:

- ``"tuning"``: what the closed training loop validates on (``var_erase.erase(..., validation_steps=...)``) and the
  only set any recipe may be tuned on.
- ``"heldout"``: frozen before any tuning (2026-12-05; ``tests/test_toy_phrasings.py`` pins its digest), never used
  by training, validation or tuning. Its per-template leaks have since been looked at and informed a method change,
  so it is no longer unseen: it stays for comparison with earlier numbers, not as the headline.
- ``"fresh"``: frozen 2026-12-05 (digest pinned in ``tests/test_toy_phrasings.py``), written by someone who did not
  work on the erasure method and never used by training or validation. It was the headline set until its results
  were looked at per template and used for tuning; it stays for comparison with earlier numbers, not as the headline.
- ``"unseen"``: frozen 2026-12-06 (digest pinned in ``tests/test_toy_phrasings.py``), written a priori by someone who
  did not work on the erasure method (no model was run on it while writing, no template was kept or dropped by a
  result), never used by training, validation or tuning: the headline set from now on. Its templates should not be
  read or inspected per template by anyone tuning a recipe; report its aggregate numbers. Its wording has since been
  seen by the method's developers.
- ``"unseen2"``: frozen 2026-12-06, written apart from the method work, digest pinned (``tests/test_toy_phrasings.py``);
  the base model was measured on it once before freezing, no erasure result was looked at. It is never used by
  training, validation or tuning; its templates should not be read by anyone working on a recipe (report aggregate
  numbers only). The set for future headline claims.
- ``"paraphrase"``: the held-out templates with the concept worded by its held-out paraphrases (``Concept.heldout``,
  words no training caption contains, e.g. "pentagram"); the other attributes keep training words. The base model
  reads few of these words, so this set measures robustness (is the erased concept still drawn under a name the
  model barely knows?), not the headline.

Every set combines the concept with **every value of the two other kinds** (a shape with each of the 8 colours x 4
styles, a colour with each of the 8 shapes x 4 styles, a style with each of the 8 shapes x 8 colours), so a result can
be broken down by co-occurring attribute (``blue x striped``). They differ from the caption templates and from each
other in templates, word order and plurals; all use the concepts' training synonyms, cycled evenly, so the base
model can draw what they ask for (a judgement needs a base model that follows the prompt).
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

from .concepts import CONCEPT_KINDS, Concept, concept_names, concepts_of_kind, get_concept

PHRASING_SETS: tuple[str, ...] = ("tuning", "heldout", "paraphrase", "fresh", "unseen", "unseen2")
HEADLINE_SET = "unseen"
"""The frozen held-out set the headline numbers are judged on: never trained, validated or tuned on."""
FROZEN_SETS: tuple[str, ...] = ("unseen", "unseen2")
"""The frozen held-out sets written apart from the method work: training-side validation refuses every one of them."""

# ``{a}`` is the article of what follows it; ``{shapes}`` the plural noun; ``{style}`` the adjective, ``{style_post}``
# the phrase after the noun. No template here occurs in captions.py, and no two sets share one.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "tuning": (
        "{a} {colour} {shape} that is {style}",
        "{shape}, {colour}, {style}",
        "an illustration of {a} {style} {colour} {shape}",
        "{a} {colour} {shape} {style_post}, centred",
        "some {colour} {shapes} {style_post}",
    ),
    "heldout": (
        "draw me {a} {colour} {style} {shape}",
        "{a} {shape} in {colour}, {style}",
        "please show {a} {style} {shape} coloured {colour}",
        "two {colour} {shapes} {style_post}",
        "a photo of {a} {colour} {shape} {style_post}",
        "the {shape} is {colour} and {style}",
        "{colour} and {style}: {a} {shape}",
        "a small drawing with {a} {style} {colour} {shape} on a plain background",
    ),
    "fresh": (
        "make {a} {style} {shape} and colour it {colour}",
        "{a} {shape} which looks {style} and has {a} {colour} tone",
        "three {style} {shapes}, all of them {colour}",
        "colour: {colour}; shape: {shape}; style: {style}",
        "on my desk there is a sticker of {a} {colour} {shape} {style_post}",
        "can you create {a} {shape} {style_post} using only {colour}?",
        "I would like {a} {style} {shape}; make the colour {colour}",
        "{colour} is the colour of this {style} {shape}",
    ),
    "unseen": (
        "give me {a} {style} {shape} painted {colour}",
        "do you have any {colour} {shapes} {style_post}?",
        "a single {shape}, {style}, in a shade of {colour}",
        "four {shapes} {style_post}, each one {colour}",
        "quick sketch: {colour} {shape}, {style}",
        "for a birthday card I need {a} {colour} {shape} {style_post}",
        "what would {a} {style} {shape} look like in {colour}?",
        "the {shape} should be {colour}, and I want it {style}",
    ),
    "unseen2": (
        "how about {a} {colour} {shape} {style_post} for the logo?",
        "shopping list: {style} pattern, {colour} paint, one {shape}",
        "a pair of {style} {shapes} side by side, both {colour}",
        "{a} {shape} {style_post}, its colour being {colour}",
        "my son drew {a} {style} {shape} at school and made it {colour}",
        "using {colour} ink, draw {a} {shape} {style_post}",
        "just {a} {colour} {shape} {style_post} and nothing else",
        "how many {style} {colour} {shapes} can you fit on one page?",
    ),
}


@dataclass(frozen=True)
class PhrasedPrompt:
    """One prompt of a phrasing set: its text, the concept it is written for, the shape, colour and style it asks
    for (``values``: ``{"shape": "circle", "colour": "red", "style": "striped"}``) and its template."""

    prompt: str
    concept: str
    values: dict
    template: str = ""

    def mentions(self, concept: str) -> bool:
        """Whether the prompt asks for ``concept`` (as its own concept or as a co-occurring attribute)."""
        found = get_concept(concept)
        return self.values.get(found.kind) == found.name


def _plural(noun: str) -> str:
    head, _, last = noun.rpartition(" ")
    plural = last + ("es" if last.endswith(("s", "x", "sh", "ch")) else "s")
    return f"{head} {plural}" if head else plural


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" and not word.lower().startswith("uni") else "a"


def _words(concept: Concept, form: str, paraphrased: bool) -> tuple[str, ...]:
    """The training synonyms of a concept, or its held-out paraphrases."""
    return concept.heldout[form] if paraphrased else concept.words[form]


def _fill(template: str, values: dict[str, Concept], k: int, paraphrase_kind: str | None) -> str:
    """Template ``template`` filled for ``values``; ``k`` (the prompt's index) picks each word by cycling, so every
    synonym is used about equally often. The value of ``paraphrase_kind`` is worded with its held-out paraphrases."""
    pick = lambda options, salt: options[(k * 7 + salt * 3 + k // len(options)) % len(options)]  # noqa: E731
    words_of = lambda kind, form: _words(values[kind], form, kind == paraphrase_kind)  # noqa: E731
    shape = pick(words_of("shape", "noun"), 1)
    words = {"shape": shape, "shapes": _plural(shape), "colour": pick(words_of("colour", "adj"), 2),
             "style": pick(words_of("style", "adj"), 3), "style_post": pick(words_of("style", "post"), 4)}
    text = template.format(a="{a}", **words)
    while "{a}" in text:  # each article agrees with the word after it
        before, _, after = text.partition("{a}")
        text = before + _article(after.strip()) + after
    return text


def phrased_prompts(concept: str, phrasing_set: str = "heldout") -> list[PhrasedPrompt]:
    """Every prompt of ``phrasing_set`` written for ``concept``: one per combination of the values of the other two
    kinds, each with a template chosen by cycling (deterministic)."""
    if phrasing_set not in PHRASING_SETS:
        raise ValueError(f"unknown phrasing set {phrasing_set!r}; choose one of {list(PHRASING_SETS)}")
    target = get_concept(concept)
    others = [k for k in CONCEPT_KINDS if k != target.kind]
    templates = TEMPLATES["heldout" if phrasing_set == "paraphrase" else phrasing_set]
    paraphrase_kind = target.kind if phrasing_set == "paraphrase" else None
    rows = []
    combos = itertools.product(*(concepts_of_kind(k) for k in others))
    for k, combo in enumerate(combos):
        values = {target.kind: target, **dict(zip(others, combo))}
        template = templates[(k + target.index) % len(templates)]
        rows.append(PhrasedPrompt(_fill(template, values, k + 5 * target.index, paraphrase_kind), target.name,
                                  {kind: values[kind].name for kind in CONCEPT_KINDS}, template))
    return rows


def phrasing_rows(phrasing_set: str = "heldout", concepts: list[str] | None = None) -> list[PhrasedPrompt]:
    """The prompts of ``phrasing_set`` for ``concepts`` (default: all 20 concepts of the toy world)."""
    return [row for name in (concepts or concept_names()) for row in phrased_prompts(name, phrasing_set)]


def phrasing_digest(phrasing_set: str = "heldout") -> str:
    """SHA-256 of every prompt of the set with its concept: pinned by a test, so the frozen set cannot drift."""
    text = "\n".join(f"{r.concept}\t{r.prompt}" for r in phrasing_rows(phrasing_set))
    return hashlib.sha256(text.encode()).hexdigest()


__all__ = ["FROZEN_SETS", "HEADLINE_SET", "PHRASING_SETS", "TEMPLATES", "PhrasedPrompt", "phrased_prompts",
           "phrasing_digest", "phrasing_rows"]
