"""The tuning and held-out phrasing sets: disjoint from the captions and each other, complete, and frozen."""

import pytest

from var_erase.toy.captions import OBJECT_TEMPLATES, PAIR_TEMPLATES, SCENE_TEMPLATES
from var_erase.toy.concepts import concept_names, concepts_of_kind, get_concept
from var_erase.toy.phrasings import TEMPLATES, phrased_prompts, phrasing_digest, phrasing_rows

# pinned on 2026-12-05, before any recipe was tuned or evaluated on them: changing a set changes what the published
# numbers mean, so a change here needs a new digest *and* new measurements
FROZEN = {
    "heldout": "69f551e1a593c25346cecc44d02e653053cec2924d3838f5bdc61c09c1a31e33",
    "tuning": "7e29248dc6971336458cf1452812182f69acd0c2b3fddc1b81c7f2f137b72e96",
}


@pytest.mark.parametrize("name", sorted(FROZEN))
def test_phrasing_sets_are_frozen(name):
    assert phrasing_digest(name) == FROZEN[name]


def test_sets_share_no_template_with_each_other_or_with_the_captions():
    captions = {t for table in (OBJECT_TEMPLATES, SCENE_TEMPLATES, PAIR_TEMPLATES) for ts in table.values() for t in ts}
    assert not set(TEMPLATES["tuning"]) & set(TEMPLATES["heldout"])
    assert not (set(TEMPLATES["tuning"]) | set(TEMPLATES["heldout"])) & captions
    tuning = {r.prompt for r in phrasing_rows("tuning")}
    assert not tuning & {r.prompt for r in phrasing_rows("heldout")}


@pytest.mark.parametrize("concept", ["blue", "star", "striped"])
def test_each_concept_meets_every_value_of_the_other_kinds(concept):
    target = get_concept(concept)
    rows = phrased_prompts(concept, "heldout")
    others = [k for k in ("shape", "colour", "style") if k != target.kind]
    combos = {tuple(r.values[k] for k in others) for r in rows}
    assert len(rows) == len(combos) == len(concepts_of_kind(others[0])) * len(concepts_of_kind(others[1]))
    assert all(r.values[target.kind] == target.name and r.mentions(concept) for r in rows)


def test_prompts_name_what_they_ask_for_and_paraphrases_use_heldout_words():
    for row in phrased_prompts("striped", "heldout")[:10]:
        assert any(w in row.prompt for w in get_concept("striped").training_words), row.prompt
    paraphrased = phrased_prompts("star", "paraphrase")
    assert all(any(w in r.prompt for w in get_concept("star").heldout_paraphrases) for r in paraphrased)
    assert len(phrasing_rows("heldout")) == 8 * 32 + 8 * 32 + 4 * 64 and len(concept_names()) == 20


def test_unknown_set_is_refused():
    with pytest.raises(ValueError, match="choose one of"):
        phrased_prompts("red", "test")
