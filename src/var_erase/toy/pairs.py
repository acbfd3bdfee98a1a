"""Erasure inputs generated from the toy world: unsafe -> safe prompt pairs, replacements and retain prompts.

For a named concept of the toy world (``"red"``, ``"star"``, ``"dotted"``) nothing has to be written by hand: the pairs
are caption-template prompts that ask for the concept, each with its safe twin (the same prompt with the concept
swapped for another value of its kind, :func:`~var_erase.toy.captions.caption_for_concept_prompts`), and the retain
prompts are training captions of the values the run keeps. Every error is a ``ValueError`` that says what to change.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from ..erasure.prompts import PromptPair
from .captions import caption_for_concept_prompts, retain_prompts
from .concepts import concept_names, get_concept

PAIR_WORDINGS: tuple[str, ...] = ("random", "balanced", "varied")


def is_toy_concept(name: str) -> bool:
    """Whether ``name`` is a concept of the toy world (by canonical name or synonym)."""
    try:
        get_concept(name)
    except (KeyError, ValueError):
        return False
    return True


def check_toy_concepts(concepts: Sequence[str]) -> list[str]:
    """The canonical names of ``concepts``; a ValueError naming the first one that is not a toy concept."""
    names = []
    for name in concepts:
        try:
            names.append(get_concept(name).name)
        except (KeyError, ValueError) as err:
            raise ValueError(f"{name!r} is not a concept of the toy world ({err}). For another concept, pass its "
                             f"unsafe/safe prompt pairs (pairs=... in Python, --prompt_pairs FILE on the command line: "
                             f"JSON/CSV in the EAR / S-VARE format).") from err
    return names


def toy_prompt_pairs(concepts: Sequence[str], num_pairs: int = 50, seed: int = 0, *,
                     replacements: Sequence[str] = (), wording: str = "random") -> list[PromptPair]:
    """``num_pairs`` generated pairs per concept, deduplicated; concept ``k`` of the list draws with
    ``seed * 1000 + k``. ``replacements`` as :func:`replacements_for`; ``wording``: ``"random"`` (training templates,
    words drawn at random), ``"balanced"`` (every training template and synonym of the concept evenly) or ``"varied"``
    (balanced over the training templates and the pair-only templates that name the attributes after the noun, in
    brackets, lists and longer sentences: ``captions.OBJECT_TEMPLATES["varied"]``). A concept's pairs never show
    another concept of the run."""
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    if wording not in PAIR_WORDINGS:
        raise ValueError(f"wording must be one of {list(PAIR_WORDINGS)}, got {wording!r}")
    concepts = check_toy_concepts(concepts)
    pairs: list[PromptPair] = []
    for k, name in enumerate(concepts):
        generated = caption_for_concept_prompts(name, num_pairs, seed=seed * 1000 + k,
                                                split="varied" if wording == "varied" else "train",
                                                balanced=wording != "random",
                                                replacements=replacements_for(name, concepts, replacements),
                                                avoid=others_erased(name, concepts))
        pairs += [PromptPair(g.unsafe, g.safe, g.concept) for g in generated]
    return list(dict.fromkeys(pairs))


def others_erased(name: str, concepts: Sequence[str]) -> list[str]:
    """The concepts of other kinds erased in the same run: ``name``'s pairs must not show them (on either side), or
    its safe prompts would ask for a concept that another pair erases (see ``caption_for_concept_prompts``)."""
    kind = get_concept(name).kind
    return list(dict.fromkeys(get_concept(c).name for c in concepts if get_concept(c).kind != kind))


def replacements_for(name: str, concepts: Sequence[str], asked: Sequence[str]) -> list[str] | None:
    """The values a generated pair may swap ``name`` for.

    ``asked`` holds replacement entries: ``"VALUE"`` applies to every erased concept of VALUE's kind,
    ``"CONCEPT=VALUE"`` to CONCEPT only (the per-concept entries win). Without an entry for ``name``: every value of
    its kind that the run does not erase (so one concept's safe prompts never ask for another erased concept, which
    its own erase step pushes away while the preservation step holds it); ``None`` = every other value. A plain
    value that the run erases is skipped for the concepts it does not fit.
    """
    target = get_concept(name)
    erased = {get_concept(c).name for c in concepts}
    own, shared = parse_replacements(asked, erased)
    if own.get(target.name):
        return own[target.name]
    chosen = [v for v in shared.get(target.kind, []) if v not in erased]
    if chosen:
        return chosen
    if shared.get(target.kind):
        raise ValueError(f"replacement {' '.join(shared[target.kind])}: every value is erased in this run, so "
                         f"{target.name!r} has nothing to become; add a {target.kind} that is not erased")
    kept = [c for c in concept_names(target.kind) if c not in erased]
    return kept or None


def parse_replacements(asked: Sequence[str], erased: set[str]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Replacement entries as ``({concept: [values]}, {kind: [values]})``; a bad entry is a ValueError with the fix."""
    own: dict[str, list[str]] = {}
    shared: dict[str, list[str]] = {}
    for entry in asked:
        concept, sep, value = entry.partition("=")
        try:
            found_value = get_concept(value if sep else concept)
            found_concept = get_concept(concept) if sep else None
        except KeyError as err:
            raise ValueError(f"replacement {entry}: {err.args[0]}") from err
        if found_concept is None:
            shared.setdefault(found_value.kind, []).append(found_value.name)
            continue
        if found_concept.name not in erased:
            raise ValueError(f"replacement {entry}: {found_concept.name!r} is not erased in this run "
                             f"(it erases {', '.join(sorted(erased))})")
        if found_value.kind != found_concept.kind:
            raise ValueError(f"replacement {entry}: {found_value.name!r} is a {found_value.kind}, "
                             f"{found_concept.name!r} a {found_concept.kind}; give one of its own kind")
        if found_value.name in erased:
            raise ValueError(f"replacement {entry}: {found_value.name!r} is erased in this run too, so it cannot "
                             f"be what {found_concept.name!r} becomes; pick a value that is kept")
        own.setdefault(found_concept.name, []).append(found_value.name)
    kinds = {get_concept(c).kind for c in erased}
    for kind, values in shared.items():
        if kind not in kinds:
            raise ValueError(f"replacement {' '.join(values)}: the run erases no {kind} (it erases "
                             f"{', '.join(sorted(erased))}); give values of the erased concepts' kinds")
    return own, shared


def toy_retain_prompts(concepts: Sequence[str], per_concept: int, seed: int = 0) -> list[str]:
    """Training captions of every kept value of the erased concepts' kinds (``per_concept`` each), or none for 0."""
    if per_concept < 0:
        raise ValueError(f"retain prompts per concept must be >= 0, got {per_concept}")
    return retain_prompts(check_toy_concepts(concepts), per_concept, seed=seed + 7) if per_concept else []


def warn_if_styles_miss_fine_scales(concepts: Sequence[str], num_train_scales: int | None) -> None:
    """Warn when toy fill styles are erased on the coarse scales only: the toy model draws them at the fine ones."""
    if num_train_scales is None:
        return
    styles = [name for name in concepts if is_toy_concept(name) and get_concept(name).kind == "style"]
    if styles:
        warnings.warn(f"num_train_scales={num_train_scales} trains the coarse scales only, and the toy model draws "
                      f"fill styles ({', '.join(styles)}) at the fine ones: erasing 'dotted' on 5 of 7 scales left "
                      f"16-22 of 32 dotted images. Leave num_train_scales unset to train every scale.", stacklevel=2)


__all__ = ["PAIR_WORDINGS", "check_toy_concepts", "is_toy_concept", "others_erased", "parse_replacements",
           "replacements_for", "toy_prompt_pairs", "toy_retain_prompts", "warn_if_styles_miss_fine_scales"]
