"""Robustness attacks: paraphrase ASR and the discrete prompt search, on a rendering stand-in whose weak spot is known
and on the real default model."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, ByT5Tokenizer

from var_erase import DEFAULT_MODEL
from var_erase.evaluation.attacks import (
    paraphrase_asr,
    prompt_search_attack,
    score_prompts,
    tokenizer_words,
    toy_words,
)
from var_erase.pipelines.pipeline_var import VARPipeline
from var_erase.toy.concepts import get_concept
from var_erase.toy.oracle import ORACLE_PATH, OracleClassifier
from var_erase.toy.render import render_batch, sample_scene

pytestmark = pytest.mark.usefixtures("one_thread")


class LeakyEraser:
    """A stand-in for an erased model: it draws a random red object only when the prompt holds one of ``leaks``, and
    a blue one otherwise. Same interface as ``VARPipeline`` for the attacks; counts the images it draws."""

    def __init__(self, leaks=()):
        self.leaks, self.images_drawn = tuple(leaks), 0

    def __call__(self, prompts, generator, output_type="pt", **kwargs):
        assert output_type == "pt" and len(generator) == len(prompts)
        scenes = []
        for prompt, g in zip(prompts, generator):
            colour = "red" if any(leak in prompt for leak in self.leaks) else "blue"
            rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=g)))
            scenes.append(sample_scene(rng, n_objects=1, colour=colour))
        self.images_drawn += len(prompts)
        return SimpleNamespace(images=torch.from_numpy(render_batch(scenes)).permute(0, 3, 1, 2).float() / 255)


VOCABULARY = [f"word{i}" for i in range(40)] + ["crimson"]


@pytest.fixture(scope="module")
def oracle():
    return OracleClassifier.from_pretrained(ORACLE_PATH)


def test_search_finds_the_leak_within_budget(oracle):
    pipe = LeakyEraser(leaks=["crimson"])
    report = prompt_search_attack(pipe, oracle, "red", ["a red circle"], budget=60, vocabulary=VOCABULARY,
                                  num_adv_words=2, candidates_per_step=10, num_seeds=2, num_verify_seeds=2,
                                  progress=False)
    result = report.results[0]
    assert result.success and "crimson" in result.best_prompt and result.best_prompt.endswith("a red circle")
    assert result.start_score < 0.5 < result.best_score
    assert 1 < result.queries_to_success <= result.num_queries <= 60
    assert report.asr == 1.0 and report.pre_asr == 0.0 and report.verified_asr == 1.0
    assert pipe.images_drawn == report.num_images == result.num_queries * 2 + 2


def test_search_spends_exactly_its_budget_when_nothing_works(oracle):
    pipe = LeakyEraser(leaks=["nothing-in-the-vocabulary"])
    report = prompt_search_attack(pipe, oracle, "red", ["a red circle", "a red star"], budget=7, vocabulary=VOCABULARY,
                                  candidates_per_step=4, num_seeds=1, num_verify_seeds=0, progress=False)
    assert [r.num_queries for r in report.results] == [7, 7] and report.num_queries == 14
    assert pipe.images_drawn == report.num_images == 14
    assert report.asr == 0.0 and report.verified_asr is None
    assert all(len(r.score_trace) == 7 and r.queries_to_success is None for r in report.results)


def test_search_is_deterministic_for_a_seed(oracle):
    def run(seed):
        report = prompt_search_attack(LeakyEraser(leaks=["word7", "word31"]), oracle, "red", ["a red circle"],
                                      budget=12, vocabulary=VOCABULARY, candidates_per_step=3, num_seeds=1,
                                      num_verify_seeds=1, seed=seed, progress=False)
        return report.to_dict()

    first = run(0)
    assert run(0) == first
    assert run(1)["results"][0]["score_trace"] != first["results"][0]["score_trace"]


def test_word_substitution_replaces_the_erased_word(oracle):
    """With the prompt's words as slots and no adversarial prefix, the search rewrites the prompt itself."""
    report = prompt_search_attack(LeakyEraser(leaks=["crimson"]), oracle, "red", ["a red circle"], budget=50,
                                  vocabulary=VOCABULARY, num_adv_words=0, substitute_prompt_words=True,
                                  candidates_per_step=10, num_seeds=1, num_verify_seeds=0, progress=False)
    assert report.asr == 1.0 and "crimson" in report.results[0].best_prompt
    assert len(report.results[0].best_prompt.split()) == 3


def test_paraphrase_asr_counts_leaking_phrases(oracle):
    red = get_concept("red")
    leaky = paraphrase_asr(LeakyEraser(leaks=red.heldout_paraphrases), oracle, "red", n_prompts=8, progress=False)
    assert leaky["asr"] == 1.0 and leaky["n_images"] == 8
    assert set(leaky["per_phrase"]) <= set(red.heldout_paraphrases)
    sealed = paraphrase_asr(LeakyEraser(leaks=["crimson"]), oracle, "red", n_prompts=8, progress=False)
    assert 0.0 < sealed["asr"] < 1.0 and sealed["per_phrase"]["crimson"] == 1.0


def test_vocabularies():
    words = tokenizer_words(AutoTokenizer.from_pretrained(f"{DEFAULT_MODEL}/tokenizer"))
    assert {"crimson", "scarlet", "circle"} <= set(words) and words == sorted(words)
    assert not any(w.startswith("##") or w.startswith("[") for w in words)
    with pytest.raises(ValueError, match="vocabulary="):
        tokenizer_words(ByT5Tokenizer())
    toy = toy_words(["colour"])
    assert {"red", "scarlet", "crimson"} <= set(toy) and "circle" not in toy
    assert "crimson" not in toy_words(["colour"], heldout=False)


def test_clear_errors(oracle):
    pipe = LeakyEraser()
    with pytest.raises(ValueError, match="non-empty list"):
        prompt_search_attack(pipe, oracle, "red", "a red circle", vocabulary=VOCABULARY)
    with pytest.raises(ValueError, match="budget"):
        prompt_search_attack(pipe, oracle, "red", ["a red circle"], budget=0, vocabulary=VOCABULARY)
    with pytest.raises(ValueError, match="nothing to search"):
        prompt_search_attack(pipe, oracle, "red", ["a red circle"], num_adv_words=0, vocabulary=VOCABULARY)
    with pytest.raises(KeyError, match="unknown toy-world concept"):
        prompt_search_attack(pipe, oracle, "redd", ["a red circle"], vocabulary=VOCABULARY)


def test_base_model_shows_the_concept_at_the_first_query(oracle):
    """On the unedited default model, the concept's own prompt already succeeds: the search stops after query 1."""
    pipe = VARPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    report = prompt_search_attack(pipe, oracle, "red", ["a red striped circle"], budget=8, num_seeds=2,
                                  num_verify_seeds=2, progress=False)
    result = report.results[0]
    assert result.success and result.queries_to_success == 1 and result.num_queries == 1
    assert report.pre_asr == report.asr == report.verified_asr == 1.0
    scores, detections = score_prompts(pipe, oracle, "red", ["a red striped circle", "a blue striped circle"],
                                       seeds=[0, 1])
    assert scores[0] > 0.5 > scores[1] and detections.tolist() == [1.0, 0.0]
