"""Captions of toy scenes, held-out phrasings, and the unsafe -> safe prompt pairs used to erase a concept.

A caption is built in two steps: a :class:`CaptionPlan` is drawn (templates, which optional attributes are mentioned,
one uniform draw per word choice), then realised against a scene. Realising the same plan against a scene in which one
concept was swapped for another value of its kind gives the *safe* twin of an *unsafe* prompt — same template, same
synonym slot, only the concept changed ("a red striped circle" -> "a red striped square").

Splits:

- ``"train"``: training templates and training words — the only split pretraining captions and erasure pairs use.
- ``"heldout_template"``: templates never used in training, training words (prompt adherence on unseen phrasing).
- ``"heldout_paraphrase"``: training templates, but every shape/colour/style word comes from the concepts' held-out
  paraphrase lists (``Concept.heldout``) — evaluation only (adherence, paraphrase attacks on an erased model).

Template syntax: ``{slot}`` is replaced by a word; ``[...]`` is an optional segment, dropped when a slot in it is not
mentioned. Object slots: ``shape``, ``colour``, ``style`` (adjective), ``style_post`` (a phrase after the noun),
``size``, ``position``. Scene slots: ``obj``, ``obj1``, ``obj2``, ``background``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from .concepts import (
    BACKGROUNDS,
    CENTRE_WORDS,
    POSITION_COLUMNS,
    POSITION_ROWS,
    SIZES,
    Concept,
    concept_names,
    concepts_of_kind,
    get_concept,
    get_scene_word,
)
from .render import Scene, ToyObject, sample_scene

CAPTION_SPLITS: tuple[str, ...] = ("train", "heldout_template", "heldout_paraphrase")
# Erasure prompt pairs only (never pretraining captions, never evaluation): the training templates plus templates that
# put the attributes after the noun, in a list, in brackets or in a longer sentence. An erasure trained only on
# attribute-before-noun wording ("a red striped circle") can leave the concept drawn when a prompt names it elsewhere.
PAIR_SPLITS: tuple[str, ...] = ("train", "varied")

# ---------------------------------------------------------------------------------------------------------------------
# 1. templates per split ("train" templates also serve "heldout_paraphrase")
OBJECT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "train": (
        "[{size} ][{colour} ][{style} ]{shape}[ {position}]",
        "[{size} ][{style} ][{colour} ]{shape}[ {position}]",
        "[{size} ][{colour} ]{shape}[ {style_post}][ {position}]",
        "{shape}[, {colour}][, {style_post}][, {position}]",
    ),
    "varied": (
        "[{size} ][{colour} ][{style} ]{shape}[ {position}]",
        "[{size} ][{style} ][{colour} ]{shape}[ {position}]",
        "[{size} ][{colour} ]{shape}[ {style_post}][ {position}]",
        "{shape}[, {colour}][, {style_post}][, {position}]",
        "{shape} ({colour}, {style})",
        "{style} {shape}, {colour} in colour",
        "{shape} {style_post}, and it is {colour}",
        "{shape}; colour: {colour}; fill: {style}",
        "{shape} - {colour}, {style}",
        "{shape} looking {colour} and {style}",
    ),
    "heldout_template": (
        "{shape} that is {colour} and {style}[, placed {position}]",
        "[{size} ][{style} ]{shape} painted in {colour}[ {position}]",
        "{shape} whose colour is {colour}[, {style_post}]",
        "[{size} ]{shape} shown[ in {colour}][ {style_post}][ {position}]",
    ),
}
SCENE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "train": ("{obj}[ {background}]", "a picture of {obj}[ {background}]", "an image of {obj}[, {background}]"),
    "varied": ("{obj}[ {background}]", "a picture of {obj}[ {background}]", "an image of {obj}[, {background}]",
               "a scene featuring {obj}[ {background}]", "in this image we see {obj}[ {background}] and nothing else"),
    "heldout_template": ("there is {obj}[ {background}]", "a simple drawing showing {obj}[ {background}]"),
}
PAIR_TEMPLATES: dict[str, tuple[str, ...]] = {
    "train": (
        "{obj1} and {obj2}[ {background}]",
        "two shapes: {obj1} and {obj2}[, {background}]",
        "a picture of {obj1} next to {obj2}[ {background}]",
    ),
    "heldout_template": ("{obj1} together with {obj2}[ {background}]", "there are two figures, {obj1} plus {obj2}"),
}
# relational pair templates: usable when the scene's first object really lies left of (above) the second
RELATION_TEMPLATES: dict[str, dict[str, tuple[str, ...]]] = {
    "train": {"left": ("{obj1} to the left of {obj2}[ {background}]",), "above": ("{obj1} above {obj2}",)},
    "heldout_template": {
        "left": ("{obj1} sitting on the left side of {obj2}",), "above": ("{obj1} placed over {obj2}",),
    },
}
BACKGROUND_TEMPLATES: dict[str, tuple[str, ...]] = {
    "train": ("on a {bg} background", "against a {bg} background"),
    "heldout_template": ("set against a {bg} backdrop",),
}
EMPTY_TEMPLATES: dict[str, tuple[str, ...]] = {
    "train": ("an empty {bg} background", "a blank {bg} background"),
    "heldout_template": ("nothing but a {bg} backdrop",),
}

for _table in (PAIR_TEMPLATES, RELATION_TEMPLATES, BACKGROUND_TEMPLATES, EMPTY_TEMPLATES):
    _table["varied"] = _table["train"]  # the varied pair split changes object and scene wording only

_SLOT = re.compile(r"\{(\w+)\}")
_OPTIONAL = re.compile(r"\[([^\]]*)\]")


def _template_split(split: str) -> str:
    if split not in CAPTION_SPLITS + PAIR_SPLITS:
        raise ValueError(f"unknown caption split {split!r}; choose one of {list(CAPTION_SPLITS + PAIR_SPLITS[1:])}")
    return split if split in ("heldout_template", "varied") else "train"


def required_slots(template: str) -> frozenset[str]:
    """The slots of a template outside optional segments (a template needs all of them filled)."""
    return frozenset(_SLOT.findall(_OPTIONAL.sub("", template)))


def fill_template(template: str, words: dict[str, str]) -> str:
    """Fill ``{slot}`` s from ``words``; drop each ``[...]`` segment whose slots are not all in ``words``."""

    def optional(match: re.Match) -> str:
        inner = match.group(1)
        return inner.format(**words) if set(_SLOT.findall(inner)) <= words.keys() else ""

    return _OPTIONAL.sub(optional, template).format(**words)


def with_article(phrase: str) -> str:
    """``"a red circle"``, ``"an orange star"``, ``"a uniformly ..."`` (by the first sound, for this vocabulary)."""
    vowel = phrase[:1].lower() in "aeio" or (phrase[:1].lower() == "u" and not phrase.lower().startswith("uni"))
    return ("an " if vowel else "a ") + phrase


# ---------------------------------------------------------------------------------------------------------------------
# 2. plans: every random choice of a caption, so that a plan can be realised against a swapped scene
_OPTIONAL_MENTIONS = ("colour", "style", "size", "position")


@dataclass(frozen=True)
class CaptionPlan:
    """All random choices of one caption.

    Args:
        split: the caption split the templates come from.
        scene_template: the template that arranges object phrases and the background phrase.
        object_templates: one template per mentioned object, in caption order.
        object_order: scene object index for each caption position.
        mentions: per caption position, the optional attributes the caption states (shape is always stated).
        background_template: the background phrase template, ``None`` when the background is not mentioned.
        picks: a uniform draw in [0, 1) per word choice, keyed ``"<position>.<slot>"`` or ``"background"``.
    """

    split: str
    scene_template: str
    object_templates: tuple[str, ...]
    object_order: tuple[int, ...]
    mentions: tuple[frozenset[str], ...]
    background_template: str | None
    picks: dict[str, float]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _relation(scene: Scene) -> dict[str, tuple[int, int]]:
    """Relations that hold between the two objects: ``{"left": (i, j)}`` when object i lies fully left of j, etc."""
    a, b = scene.objects
    out = {}
    if abs(a.cx - b.cx) >= a.half_extent + b.half_extent:
        out["left"] = (0, 1) if a.cx < b.cx else (1, 0)
    if abs(a.cy - b.cy) >= a.half_extent + b.half_extent:
        out["above"] = (0, 1) if a.cy < b.cy else (1, 0)
    return out


def _scene_template(rng: np.random.Generator, scene: Scene, tsplit: str, p_relation: float) -> tuple[str, tuple]:
    """Choose the scene template and the order in which objects appear in the caption."""
    if scene.count == 0:
        return _pick(rng, EMPTY_TEMPLATES[tsplit]), ()
    if scene.count == 1:
        return _pick(rng, SCENE_TEMPLATES[tsplit]), (0,)
    relations = _relation(scene)
    if relations and rng.random() < p_relation:
        kind = _pick(rng, sorted(relations))
        return _pick(rng, RELATION_TEMPLATES[tsplit][kind]), relations[kind]
    order = (0, 1) if rng.random() < 0.5 else (1, 0)
    return _pick(rng, PAIR_TEMPLATES[tsplit]), order


def _needs(template: str) -> frozenset[str]:
    """The optional attributes an object template cannot do without."""
    return frozenset("style" if s == "style_post" else s for s in required_slots(template)) - {"shape"}


def plan_caption(
    scene: Scene,
    rng: np.random.Generator,
    *,
    split: str = "train",
    omit_prob: float = 0.1,
    size_prob: float = 0.2,
    position_prob: float = 0.2,
    background_prob: float = 0.5,
    relation_prob: float = 0.3,
    always: Sequence[str] = (),
) -> CaptionPlan:
    """Draw every choice of a caption for ``scene``.

    ``omit_prob`` is the chance to leave out each of colour and style (the model then learns the unprompted spread);
    ``size_prob`` / ``position_prob`` / ``background_prob`` the chance to state each. ``always`` lists attributes that
    are always stated (e.g. ``("colour", "style")`` for fully specified prompts).
    """
    tsplit = _template_split(split)
    scene_template, order = _scene_template(rng, scene, tsplit, relation_prob)
    chance = {"colour": 1.0 - omit_prob, "style": 1.0 - omit_prob, "size": size_prob, "position": position_prob}
    mentions, object_templates = [], []
    for _ in order:
        stated = frozenset(k for k in _OPTIONAL_MENTIONS if k in always or rng.random() < chance[k])
        fits = [t for t in OBJECT_TEMPLATES[tsplit] if _needs(t) <= stated]
        object_templates.append(_pick(rng, fits or OBJECT_TEMPLATES["train"]))
        mentions.append(stated)
    wants_bg = scene.count == 0 or "background" in always or rng.random() < background_prob
    background_template = _pick(rng, BACKGROUND_TEMPLATES[tsplit]) if wants_bg else None
    keys = [f"{p}.{slot}" for p in range(len(order)) for slot in ("shape", "colour", "style", "size", "position")]
    picks = {key: float(rng.random()) for key in [*keys, "background"]}
    return CaptionPlan(split, scene_template, tuple(object_templates), order, tuple(mentions), background_template,
                       picks)


# ---------------------------------------------------------------------------------------------------------------------
# 3. realisation: plan + scene -> text
def _choose(options: Sequence[str], u: float) -> str:
    """Uniform choice by a draw ``u`` in [0, 1)."""
    return options[min(int(u * len(options)), len(options) - 1)]


def _choose_canonical(options: Sequence[str], u: float) -> str:
    """Choice by ``u`` in [0, 1) that gives the first (canonical) word half the time, the synonyms the rest."""
    if u < 0.5 or len(options) == 1:
        return options[0]
    return _choose(options[1:], 2.0 * u - 1.0)


def _concept_word(concept: Concept, form: str, u: float, paraphrase: bool) -> str:
    return _choose(concept.heldout[form], u) if paraphrase else _choose_canonical(concept.words[form], u)


def _position_words(obj: ToyObject, u: float) -> str:
    row, column = obj.region
    row_words = dict(POSITION_ROWS)[row]
    column_words = dict(POSITION_COLUMNS)[column]
    if row == "middle" and column == "center":
        return f"in the {_choose(CENTRE_WORDS, u)}"
    if row == "middle":
        return f"on the {column_words[0]}"
    if column == "center":
        return f"at the {row_words[0]}"
    return f"in the {_choose(row_words, u)} {_choose(column_words, u)} corner"


def _object_phrase(obj: ToyObject, template: str, stated: frozenset[str], picks: dict[str, float], prefix: str,
                   paraphrase: Callable[[Concept], bool]) -> str:
    shape, colour, style = (get_concept(obj.shape), get_concept(obj.colour), get_concept(obj.style))
    words = {"shape": _concept_word(shape, "noun", picks[f"{prefix}.shape"], paraphrase(shape))}
    if "colour" in stated:
        words["colour"] = _concept_word(colour, "adj", picks[f"{prefix}.colour"], paraphrase(colour))
    if "style" in stated:
        words["style"] = _concept_word(style, "adj", picks[f"{prefix}.style"], paraphrase(style))
        words["style_post"] = _concept_word(style, "post", picks[f"{prefix}.style"], paraphrase(style))
    if "size" in stated:
        words["size"] = _choose(get_scene_word(SIZES, obj.size).words, picks[f"{prefix}.size"])
    if "position" in stated:
        words["position"] = _position_words(obj, picks[f"{prefix}.position"])
    return with_article(fill_template(template, words))


def realise_caption(plan: CaptionPlan, scene: Scene, paraphrase: Callable[[Concept], bool] | None = None) -> str:
    """The caption text of ``plan`` for ``scene``.

    ``paraphrase(concept)`` says whether a concept's word comes from its held-out list; by default that is the case
    for every concept exactly when ``plan.split == "heldout_paraphrase"``.
    """
    if paraphrase is None:
        heldout = plan.split == "heldout_paraphrase"
        paraphrase = lambda concept: heldout  # noqa: E731
    background = _choose(get_scene_word(BACKGROUNDS, scene.background).words, plan.picks["background"])
    words = {}
    if plan.background_template is not None:
        words["background"] = plan.background_template.format(bg=background)
    phrases = [
        _object_phrase(scene.objects[index], template, stated, plan.picks, str(p), paraphrase)
        for p, (index, template, stated) in enumerate(zip(plan.object_order, plan.object_templates, plan.mentions))
    ]
    if scene.count == 0:
        return plan.scene_template.format(bg=background)
    if len(phrases) == 1:
        words["obj"] = phrases[0]
    else:
        words["obj1"], words["obj2"] = phrases
    return fill_template(plan.scene_template, words)


def caption_scene(scene: Scene, rng: np.random.Generator, *, split: str = "train", **plan_kwargs) -> str:
    """A random caption of ``scene`` (see :func:`plan_caption` for the mention probabilities)."""
    return realise_caption(plan_caption(scene, rng, split=split, **plan_kwargs), scene)


# ---------------------------------------------------------------------------------------------------------------------
# 4. concept prompts and unsafe -> safe pairs for erasure
@dataclass(frozen=True)
class ConceptPromptPair:
    """An erasure training pair: ``unsafe`` asks for ``concept``; ``safe`` is the same prompt with ``replacement``.

    Field-compatible with ``var_erase.erasure.prompts.PromptPair`` (``unsafe``, ``safe``, ``concept``).
    """

    unsafe: str
    safe: str
    concept: str
    replacement: str


def swap_concept(scene: Scene, concept: str | Concept, replacement: str | Concept) -> Scene:
    """``scene`` with every object showing ``concept`` changed to ``replacement`` (a value of the same kind)."""
    old, new = get_concept(concept), get_concept(replacement)
    if old.kind != new.kind:
        raise ValueError(f"cannot swap {old.kind} {old.name!r} for {new.kind} {new.name!r}; use a {old.kind}")
    objects = tuple(replace(o, **{old.kind: new.name}) if o.value(old.kind) == old.name else o for o in scene.objects)
    return replace(scene, objects=objects)


def _replacement(rng: np.random.Generator, concept: Concept, scene: Scene, choices: Sequence[str] | None) -> str:
    """A different value of the concept's kind, preferring one the scene does not show already."""
    pool = [get_concept(c) for c in choices] if choices else list(concepts_of_kind(concept.kind))
    wrong = [c.name for c in pool if c.kind != concept.kind]
    if wrong:
        raise ValueError(f"replacements {wrong} are not of kind {concept.kind!r}: {concept.name!r} can only become "
                         f"another {concept.kind} ({', '.join(c.name for c in concepts_of_kind(concept.kind))})")
    pool = [c.name for c in pool if c.name != concept.name]
    if not pool:
        raise ValueError(f"no replacement for {concept.name!r}: pass replacements of kind {concept.kind!r}")
    fresh = [c for c in pool if c not in scene.values(concept.kind)]
    return _pick(rng, fresh or pool)


def caption_for_concept_prompts(
    concept: str | Concept,
    n: int = 64,
    seed: int = 0,
    *,
    split: str = "train",
    replacements: Sequence[str] | None = None,
    p_two_objects: float = 0.0,
    background_prob: float = 0.3,
    balanced: bool = False,
    avoid: Sequence[str] = (),
) -> list[ConceptPromptPair]:
    """``n`` prompts that ask for ``concept``, each with its safe twin; deterministic from ``seed``.

    Each prompt describes a random scene that shows the concept, always stating shape, colour and style ("a red
    striped circle on a black background"); the safe twin swaps the concept for another value of its kind drawn from
    ``replacements`` (default: every other value) and keeps every other word. With ``split="heldout_paraphrase"`` the
    concept (and its replacement) is worded with held-out paraphrases — for evaluation, never for training.

    ``balanced=True`` words the concept evenly: the prompts cycle through every (object template, word of the
    concept) combination of the split (:func:`concept_wordings`), so each synonym and template gets ``n / combos``
    prompts (+- 1) instead of a random share (the canonical word half the time, and e.g. "outlined" in 5 of 50
    prompts, seed 0). Scenes, replacements and every other word are drawn exactly as without it.

    ``avoid`` names concepts of *other* kinds that no scene may show, on either side of a pair: the concepts erased in
    the same run. Erasing "dotted" with "star" needs it: the pair "a dotted star" -> "an outlined star" would teach
    the adapter to keep drawing stars (its erase target is an outlined star, and the preservation step holds the safe
    prompt's star) while the star's own pairs erase it. A scene that shows one is drawn again from the same
    generator, so an empty ``avoid`` gives exactly the pairs it gave before. Values of the concept's own kind are
    ``replacements``' business and are refused here.
    """
    target = get_concept(concept)
    banned = _avoided_values(target, avoid)
    rng = np.random.default_rng(seed)
    paraphrase = lambda c: split == "heldout_paraphrase" and c.kind == target.kind  # noqa: E731
    wordings = concept_wordings(target, split) if balanced else []
    order = np.random.default_rng(seed + 7_919).permutation(len(wordings)) if balanced else []
    pairs = []
    for i in range(n):
        n_objects = 2 if rng.random() < p_two_objects else 1
        scene = _scene_without(rng, n_objects, target, banned)
        plan = plan_caption(scene, rng, split=split, always=("colour", "style"), size_prob=0.1, position_prob=0.1,
                            background_prob=background_prob)
        if balanced:
            plan = _with_wording(plan, scene, target, wordings[order[i % len(wordings)]])
        other = _replacement(rng, target, scene, replacements)
        safe_scene = swap_concept(scene, target, other)
        unsafe, safe = realise_caption(plan, scene, paraphrase), realise_caption(plan, safe_scene, paraphrase)
        pairs.append(ConceptPromptPair(unsafe, safe, target.name, other))
    return pairs


def _scene_without(rng: np.random.Generator, n_objects: int, target: Concept,
                   banned: dict[str, frozenset[str]], max_draws: int = 10_000) -> Scene:
    """A scene showing ``target`` and none of the ``banned`` values (drawn again until it does)."""
    for _ in range(max_draws):
        scene = sample_scene(rng, n_objects=n_objects, **{target.kind: target.name})
        if not any(scene.values(kind) & values for kind, values in banned.items()):
            return scene
    avoided = sorted(set().union(*banned.values()))
    raise ValueError(f"no {n_objects}-object scene showing {target.name!r} without {avoided} in {max_draws} draws; "
                     f"avoid fewer concepts")


def _avoided_values(target: Concept, avoid: Sequence[str]) -> dict[str, frozenset[str]]:
    """``{kind: names}`` of the concepts in ``avoid``; an error if one is of the target's kind or bans a whole kind."""
    banned: dict[str, set[str]] = {}
    for name in avoid:
        found = get_concept(name)
        if found.kind == target.kind:
            raise ValueError(f"avoid={list(avoid)} names the {found.kind} {found.name!r}, the kind of {target.name!r}; "
                             f"pass values of its own kind as replacements instead")
        banned.setdefault(found.kind, set()).add(found.name)
    for kind, names in banned.items():
        if len(names) == len(concepts_of_kind(kind)):
            raise ValueError(f"avoid={list(avoid)} bans every {kind}; no scene could be drawn")
    return {kind: frozenset(names) for kind, names in banned.items()}


def concept_wordings(concept: str | Concept, split: str = "train") -> list[tuple[str, str, int]]:
    """Every way the object templates of ``split`` can word ``concept``: ``(template, form, word index)``, where
    ``form`` is the concept's word form the template uses (``"noun"`` for shapes, ``"adj"`` or ``"post"`` for styles,
    ``"adj"`` for colours) and the index points into ``concept.words[form]`` (``concept.heldout[form]`` for the
    ``"heldout_paraphrase"`` split)."""
    target = get_concept(concept)
    words = target.heldout if split == "heldout_paraphrase" else target.words
    out = []
    for template in OBJECT_TEMPLATES[_template_split(split)]:
        slots = set(_SLOT.findall(template))
        if target.kind == "shape":
            forms = ["noun"]
        elif target.kind == "colour":
            forms = ["adj"] if "colour" in slots else []
        else:
            forms = [f for f, slot in (("adj", "style"), ("post", "style_post")) if slot in slots]
        out += [(template, form, j) for form in forms for j in range(len(words[form]))]
    return out


def _word_pick(index: int, n_words: int, paraphrase: bool) -> float:
    """The draw ``u`` for which :func:`_concept_word` returns word ``index`` of ``n_words``."""
    if paraphrase or n_words == 1:
        return (index + 0.5) / n_words
    return 0.25 if index == 0 else 0.5 + (index - 0.5) / (2 * (n_words - 1))


def _with_wording(plan: CaptionPlan, scene: Scene, target: Concept, wording: tuple[str, str, int]) -> CaptionPlan:
    """``plan`` with every object that shows ``target`` worded by ``wording`` (template and word)."""
    template, form, index = wording
    paraphrase = plan.split == "heldout_paraphrase"
    n_words = len((target.heldout if paraphrase else target.words)[form])
    templates, picks = list(plan.object_templates), dict(plan.picks)
    for p, obj_index in enumerate(plan.object_order):
        if scene.objects[obj_index].value(target.kind) == target.name:
            templates[p] = template
            picks[f"{p}.{target.kind}"] = _word_pick(index, n_words, paraphrase)
    return replace(plan, object_templates=tuple(templates), picks=picks)


def concept_prompts(concept: str | Concept, n: int = 64, seed: int = 0, *, split: str = "train", **kwargs) -> list[str]:
    """``n`` prompts that ask for ``concept`` (the unsafe side of :func:`caption_for_concept_prompts`)."""
    return [pair.unsafe for pair in caption_for_concept_prompts(concept, n, seed, split=split, **kwargs)]


def evaluation_prompts(
    concepts: Sequence[str] | None = None, n_per_concept: int = 8, seed: int = 0, *, split: str = "heldout_template"
) -> list[tuple[str, str]]:
    """Rows ``(prompt, concept)`` — the concept an unedited model should draw — for ``examples/evaluate.py`` CSVs.

    ``concepts`` defaults to every concept of every kind; each gets ``n_per_concept`` single-object prompts.
    """
    rows = []
    for k, name in enumerate(concepts or concept_names()):
        prompts = concept_prompts(name, n_per_concept, seed * 1000 + k, split=split)
        rows += [(prompt, get_concept(name).name) for prompt in prompts]
    return rows


def retain_prompts(
    concepts: Sequence[str | Concept], n_per_concept: int = 16, seed: int = 0, *, kinds: Sequence[str] | None = None
) -> list[str]:
    """Training-split prompts of every *other* concept of the erased concepts' kinds: a retain set to preserve.

    For each concept of ``kinds`` (default: the kinds of ``concepts``) that is not being erased, ``n_per_concept``
    prompts as :func:`concept_prompts` writes them (training templates and words only, so evaluation prompts never
    appear), without any prompt that uses a training word of an erased concept (e.g. a "red circle" while erasing red).
    Deterministic from ``seed``. The paper has no retain set (its preservation loss sees only the pairs' own safe
    prompts); this feeds the trainer's optional ``retain_prompts`` extension.
    """
    erased = [get_concept(c) for c in concepts]
    if not erased:
        raise ValueError("no erased concepts given: the retain set is built from the other concepts of their kinds")
    if n_per_concept < 1:
        raise ValueError(f"n_per_concept must be >= 1, got {n_per_concept}")
    kinds = list(dict.fromkeys(kinds or [c.kind for c in erased]))
    banned = re.compile(r"\b(" + "|".join(re.escape(w) for c in erased for w in c.training_words) + r")\b", re.I)
    erased_names = {c.name for c in erased}
    out = []
    for kind in kinds:
        for concept in concepts_of_kind(kind):
            if concept.name in erased_names:
                continue
            kept: list[str] = []
            round_ = 0
            while len(kept) < n_per_concept:
                if round_ >= 64:
                    raise ValueError(f"cannot write {n_per_concept} prompts of {concept.name!r} that avoid the erased "
                                     f"concepts' words")
                batch = concept_prompts(concept, n_per_concept, seed * 1000 + concept.index * 97 + round_ * 7919)
                kept += [p for p in batch if not banned.search(p) and p not in kept][: n_per_concept - len(kept)]
                round_ += 1
            out += kept
    return out
