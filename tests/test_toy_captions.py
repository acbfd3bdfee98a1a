"""Captions of toy scenes: the right words, held-out phrasings kept out of training, unsafe -> safe pairs."""

import re

import numpy as np
import pytest

from var_erase.toy.captions import (
    OBJECT_TEMPLATES,
    PAIR_TEMPLATES,
    RELATION_TEMPLATES,
    SCENE_TEMPLATES,
    caption_for_concept_prompts,
    caption_scene,
    concept_prompts,
    concept_wordings,
    evaluation_prompts,
    fill_template,
    retain_prompts,
    swap_concept,
    with_article,
)
from var_erase.toy.concepts import CONCEPT_KINDS, concept_names, concepts_of_kind, get_concept
from var_erase.toy.render import sample_scene


def mentions(text: str, phrase: str) -> bool:
    """Whether ``phrase`` occurs in ``text`` as whole words."""
    return re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", text) is not None


def mentions_any(text: str, phrases) -> bool:
    return any(mentions(text, p) for p in phrases)


def masked(text: str, phrases) -> str:
    """``text`` with each whole-word occurrence of ``phrases`` (longest first) made ``<X>``, articles unified."""
    for phrase in sorted(phrases, key=len, reverse=True):
        text = re.sub(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", "<X>", text)
    return re.sub(r"\ban\b", "a", text)


@pytest.fixture(scope="module")
def train_captions() -> list[str]:
    """Every kind of training text: scene captions (0-2 objects) and erasure pairs of every concept."""
    rng = np.random.default_rng(0)
    captions = [caption_scene(sample_scene(rng, n_objects=int(rng.integers(3))), rng) for _ in range(3000)]
    for name in concept_names():
        captions += [t for pair in caption_for_concept_prompts(name, 20, seed=1, p_two_objects=0.3)
                     for t in (pair.unsafe, pair.safe)]
    return captions


# ------------------------------------------------------------------------------------------------------------------
# captions say what the scene shows
def test_fully_specified_caption_names_shape_colour_and_style():
    rng = np.random.default_rng(1)
    for split in ("train", "heldout_template"):
        for _ in range(200):
            scene = sample_scene(rng, n_objects=1)
            caption = caption_scene(scene, rng, split=split, always=("colour", "style"))
            obj = scene.objects[0]
            for value in (obj.shape, obj.colour, obj.style):
                assert mentions_any(caption, get_concept(value).training_words), (caption, value)


def test_two_object_captions_describe_both_objects_and_true_relations():
    rng = np.random.default_rng(2)
    for _ in range(200):
        scene = sample_scene(rng, n_objects=2)
        caption = caption_scene(scene, rng, relation_prob=1.0)
        for obj in scene.objects:
            assert mentions_any(caption, get_concept(obj.shape).training_words), caption
        if " to the left of " in caption:
            left_first = scene.objects[0].cx < scene.objects[1].cx
            first_shape = scene.objects[0 if left_first else 1].shape
            head = caption.split(" to the left of ")[0]
            assert mentions_any(head, get_concept(first_shape).training_words), (caption, scene)


def test_captions_read_as_english():
    rng = np.random.default_rng(3)
    for _ in range(300):
        caption = caption_scene(sample_scene(rng), rng)
        assert "{" not in caption and "[" not in caption and "  " not in caption and ", ," not in caption
        assert caption == caption.strip() and caption[:2] in ("a ", "an", "tw")
    assert with_article("orange star") == "an orange star" and with_article("red star") == "a red star"
    assert fill_template("[{size} ]{shape}[ {position}]", {"shape": "circle"}) == "circle"


# ------------------------------------------------------------------------------------------------------------------
# held-out phrasings never reach training text
def test_heldout_paraphrases_are_disjoint_from_training_words():
    for kind in CONCEPT_KINDS:
        training = {w for c in concepts_of_kind(kind) for w in c.training_words}
        for concept in concepts_of_kind(kind):
            assert len(concept.heldout_paraphrases) >= 3
            assert not set(concept.heldout_paraphrases) & training, concept.name


def test_heldout_paraphrases_never_appear_in_training_captions(train_captions):
    heldout = [p for name in concept_names() for p in get_concept(name).heldout_paraphrases]
    leaks = [(p, c) for c in train_captions for p in heldout if mentions(c, p)]
    assert not leaks, leaks[:5]


def _literal_fragments(template: str) -> list[str]:
    """The fixed words of a template (text between slots and brackets), longest first."""
    pieces = re.split(r"\{\w+\}|[\[\]]", template)
    return sorted((p.strip(" ,") for p in pieces if len(p.strip(" ,")) >= 5), key=len, reverse=True)


def test_heldout_templates_never_appear_in_training_captions(train_captions):
    heldout = [*OBJECT_TEMPLATES["heldout_template"], *SCENE_TEMPLATES["heldout_template"],
               *PAIR_TEMPLATES["heldout_template"], *sum(RELATION_TEMPLATES["heldout_template"].values(), ())]
    text = "\n".join(train_captions)
    for template in heldout:
        fragments = _literal_fragments(template)
        assert fragments and any(f not in text for f in fragments), template
    assert "backdrop" not in text


def test_heldout_paraphrase_split_uses_heldout_words():
    rng = np.random.default_rng(4)
    scene = sample_scene(rng, n_objects=1, shape="heart", colour="red", style="striped")
    caption = caption_scene(scene, rng, split="heldout_paraphrase", always=("colour", "style"))
    for value in ("heart", "red", "striped"):
        assert mentions_any(caption, get_concept(value).heldout_paraphrases), caption
        assert not mentions_any(caption, get_concept(value).training_words), caption


# ------------------------------------------------------------------------------------------------------------------
# erasure prompt pairs
@pytest.mark.parametrize("name", ["circle", "red", "striped"])
def test_pairs_swap_only_the_concept(name):
    concept = get_concept(name)
    pairs = caption_for_concept_prompts(name, 30, seed=5)
    assert len(pairs) == 30 and len({p.unsafe for p in pairs}) > 20
    for pair in pairs:
        assert pair.concept == name and get_concept(pair.replacement).kind == concept.kind != pair.replacement
        assert mentions_any(pair.unsafe, concept.training_words), pair
        assert not mentions_any(pair.safe, concept.training_words), pair
        assert mentions_any(pair.safe, get_concept(pair.replacement).training_words), pair
        assert masked(pair.unsafe, concept.training_words) == masked(pair.safe, get_concept(pair.replacement)
                                                                       .training_words), pair


def test_pairs_are_deterministic_from_the_seed_and_respect_replacements():
    assert caption_for_concept_prompts("star", 10, seed=0) == caption_for_concept_prompts("star", 10, seed=0)
    assert caption_for_concept_prompts("star", 10, seed=0) != caption_for_concept_prompts("star", 10, seed=1)
    pairs = caption_for_concept_prompts("star", 10, seed=0, replacements=["heart"])
    assert {p.replacement for p in pairs} == {"heart"}
    assert concept_prompts("star", 10, seed=0) == [p.unsafe for p in caption_for_concept_prompts("star", 10, seed=0)]


def test_pairs_avoid_concepts_of_other_kinds_on_both_sides():
    avoid = ["star", "heart", "red"]
    pairs = caption_for_concept_prompts("dotted", 40, seed=2, p_two_objects=0.5, avoid=avoid)
    words = [w for name in avoid for w in get_concept(name).training_words]
    for pair in pairs:
        assert not any(mentions(side, w) for side in (pair.unsafe, pair.safe) for w in words), pair
    plain = caption_for_concept_prompts("dotted", 40, seed=2, p_two_objects=0.5)
    assert any(any(mentions(p.unsafe, w) for w in words) for p in plain)  # without it they do show up
    assert caption_for_concept_prompts("dotted", 40, seed=2, p_two_objects=0.5, avoid=[]) == plain
    with pytest.raises(ValueError, match="kind of 'dotted'"):
        caption_for_concept_prompts("dotted", 4, avoid=["striped"])
    with pytest.raises(ValueError, match="bans every shape"):
        caption_for_concept_prompts("dotted", 4, avoid=concept_names("shape"))
    with pytest.raises(ValueError, match="2-object scene"):  # two distinct shapes, one left: no such scene
        caption_for_concept_prompts("dotted", 4, p_two_objects=1.0, avoid=concept_names("shape")[1:])


@pytest.mark.parametrize("name,split", [("outlined", "train"), ("star", "train"), ("red", "train"),
                                        ("triangle", "heldout_paraphrase")])
def test_balanced_pairs_cycle_every_template_and_synonym_evenly(name, split):
    concept = get_concept(name)
    combos = concept_wordings(name, split)
    words = concept.heldout if split == "heldout_paraphrase" else concept.words
    assert {w for _, form, j in combos for w in [words[form][j]]} == {w for ws in words.values() for w in ws}
    n = 2 * len(combos)
    pairs = caption_for_concept_prompts(name, n, seed=3, split=split, balanced=True)
    plain = caption_for_concept_prompts(name, n, seed=3, split=split)
    assert [p.replacement for p in pairs] == [p.replacement for p in plain]  # same scenes and replacements
    all_words = sorted({w for ws in words.values() for w in ws}, key=len, reverse=True)
    used = [next(w for w in all_words if mentions(p.unsafe, w)) for p in pairs]
    for word in all_words:  # every combination twice: a word's count is twice the number of its combinations
        assert used.count(word) == 2 * sum(words[form][j] == word for _, form, j in combos), (word, used)
    for pair in pairs:  # still a clean swap of the concept alone
        replacement = get_concept(pair.replacement)
        twin_words = replacement.heldout_paraphrases if split == "heldout_paraphrase" else replacement.training_words
        assert not mentions_any(pair.safe, all_words) and mentions_any(pair.safe, twin_words), pair
    assert caption_for_concept_prompts(name, 5, seed=3, split=split, balanced=True) == pairs[:5]


def test_heldout_paraphrase_pairs_word_the_concept_with_heldout_phrases():
    for pair in caption_for_concept_prompts("dotted", 10, seed=0, split="heldout_paraphrase"):
        assert mentions_any(pair.unsafe, get_concept("dotted").heldout_paraphrases), pair


def test_swap_concept_refuses_another_kind():
    scene = sample_scene(np.random.default_rng(0), n_objects=1, shape="circle")
    assert swap_concept(scene, "circle", "square").objects[0].shape == "square"
    with pytest.raises(ValueError, match="shape"):
        swap_concept(scene, "circle", "red")


def test_unknown_concept_error_lists_the_known_ones():
    with pytest.raises(KeyError, match="circle.*red.*striped"):
        get_concept("nudity")
    with pytest.raises(KeyError, match="Did you mean"):
        get_concept("cirle")


def test_evaluation_prompts_cover_every_concept():
    rows = evaluation_prompts(n_per_concept=2)
    assert {concept for _, concept in rows} == set(concept_names()) and len(rows) == 2 * len(concept_names())


def test_retain_prompts_cover_the_other_concepts_of_the_kind_without_the_erased_words():
    from var_erase.toy.concepts import concept_names, get_concept

    rows = retain_prompts(["triangle"], 6, seed=3)
    assert len(rows) == 7 * 6 and len(set(rows)) == len(rows)
    assert rows == retain_prompts(["triangle"], 6, seed=3) and rows != retain_prompts(["triangle"], 6, seed=4)
    words = [w for c in concept_names("shape") for w in get_concept(c).training_words]
    for name in concept_names("shape"):
        mine = [r for r in rows if any(re.search(rf"\b{w}\b", r) for w in get_concept(name).training_words)]
        assert len(mine) == (0 if name == "triangle" else 6), name
    assert all(any(w in r for w in words) for r in rows)
    held_out = {w for c in concept_names() for w in get_concept(c).heldout_paraphrases}
    assert not any(w in r for r in rows for w in held_out)  # training words only
    mixed = retain_prompts(["red", "triangle"], 3, seed=0)  # two kinds: no prompt may name either erased concept
    assert len(mixed) == 7 * 3 + 7 * 3
    assert not any(re.search(r"\b(red|scarlet|triangle|triangular shape)\b", r) for r in mixed)
    with pytest.raises(ValueError, match="n_per_concept"):
        retain_prompts(["triangle"], 0)
