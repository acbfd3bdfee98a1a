"""``var_erase.erase``: the closed loop (validate, keep the best, stop once met, say so) on a tiny pipeline."""

import json

import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from var_erase import erase
from var_erase.erasure.erase import judge_replacements
from var_erase.erasure.prompts import PromptPair
from var_erase.erasure.validation import ValidationPrompts, ValidationResult, better
from var_erase.hub import read_adapter_metadata
from var_erase.utils import redact_secrets

from ._tiny import tiny_pipeline

PAIRS = [PromptPair("a photo of a nude person", "a photo of a dressed person", "nudity"),
         PromptPair("a nude figure on a beach", "a dressed figure on a beach", "nudity")]
VALIDATION = ValidationPrompts(targets=[("a nude person in a garden", "nudity")] * 2,
                               kept=[("a dog on grass", "dog"), ("a red car", "car")], source="test prompts")
SVARE = {"max_train_steps": 8, "learning_rate": 1e-3}


class ScheduledJudge:
    """Reads the erased concept in the target images according to ``schedule`` (one entry per validation, the
    base model's first), sees every kept concept, and records the adapter's weights at each validation."""

    name = "scheduled"
    settings = {"judge": "scheduled"}

    def __init__(self, pipe, schedule):
        self.pipe, self.schedule, self.calls, self.weights = pipe, list(schedule), 0, []

    def __call__(self, images, concepts):
        assert images.dtype == torch.uint8 and images.shape[-1] == 3 and len(images) == len(concepts)
        if concepts[0] != "nudity":
            return [True] * len(concepts)
        seen = self.schedule[min(self.calls, len(self.schedule) - 1)]
        self.calls += 1
        if "default" in getattr(self.pipe.transformer, "peft_config", {}):
            self.weights.append({k: v.clone() for k, v in get_peft_model_state_dict(self.pipe.transformer).items()})
        return [i < seen * len(concepts) for i in range(len(concepts))]


def _erase(tmp_path, pipe, judge, **kwargs):
    return erase(pipe, "nudity", output_dir=tmp_path / "out", pairs=PAIRS, recipe="svare", config=SVARE,
                 judge=judge, validation_prompts=VALIDATION, num_grid_images=0, progress=False, **kwargs)


def test_run_stops_at_the_first_validation_that_meets_the_target(tmp_path):
    pipe = tiny_pipeline()
    judge = ScheduledJudge(pipe, [1.0, 1.0, 0.0])  # base, step 2: still drawn; step 4: gone
    result = _erase(tmp_path, pipe, judge, validation_steps=2)
    assert result.steps == 4 and result.reached is True
    assert result.message.startswith("Target reached: at step 4")
    assert [v["step"] for v in result.validations] == [0, 2, 4]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "model-index" in card and "acc_e" in card and "test prompts" in card
    verified = read_adapter_metadata(tmp_path / "out").eval_results
    assert verified["acc_e"] == 0.0 and verified["base_acc_e"] == 1.0 and verified["target_reached"] is True
    assert verified["judge"] == {"judge": "scheduled"} and verified["acc_i_drop"] == 0.0


def test_unreached_target_keeps_the_best_checkpoint_and_says_so(tmp_path):
    pipe = tiny_pipeline()
    judge = ScheduledJudge(pipe, [1.0, 1.0, 0.5, 1.0, 1.0])  # best at step 4 (half the images), never met
    result = _erase(tmp_path, pipe, judge, validation_steps=2)
    assert result.steps == 8 and result.reached is False
    assert result.message.startswith("Target NOT reached") and "step 4" in result.message
    saved = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    best = judge.weights[2]  # recorded at the step-4 validation
    assert any(not torch.equal(best[k], judge.weights[-1][k]) for k in best)  # training went on after it
    for key, value in best.items():
        match = [k for k in saved if k.endswith(key.removeprefix("transformer."))]
        assert match and torch.equal(saved[match[0]], value), key
    log = json.loads((tmp_path / "out" / "training_log.json").read_text())
    assert log["verified"]["step"] == 4 and log["message"] == result.message


def test_with_a_weight_average_the_average_is_judged_and_saved(tmp_path):
    pipe = tiny_pipeline()
    judge = ScheduledJudge(pipe, [1.0, 1.0, 0.0])  # base, step 2: still drawn; step 4: gone
    result = erase(pipe, "nudity", output_dir=tmp_path / "out", pairs=PAIRS, recipe="svare",
                   config=SVARE | {"ema_decay": 0.9}, judge=judge, validation_prompts=VALIDATION, num_grid_images=0,
                   progress=False, validation_steps=2)
    assert result.steps == 4 and result.reached is True
    saved = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    judged = judge.weights[2]  # what the judge saw at step 4: the average
    for key, value in judged.items():
        match = [k for k in saved if k.endswith(key.removeprefix("transformer."))]
        assert match and torch.equal(saved[match[0]], value), key
    plain = ScheduledJudge(tiny_pipeline(), [1.0, 1.0, 0.0])
    _erase(tmp_path / "plain", plain.pipe, plain, validation_steps=2)
    assert any(not torch.equal(judged[k], plain.weights[2][k]) for k in judged)  # the average is not the weights
    log = json.loads((tmp_path / "out" / "training_log.json").read_text())
    assert log["config"]["ema_decay"] == 0.9


def test_secrets_are_never_written(tmp_path):
    pipe = tiny_pipeline()
    result = _erase(tmp_path, pipe, None, run_args={"hub_token": "hf_SECRET", "nested": {"api_key": "k1"}, "seed": 3},
                    checkpointing_steps=4)
    assert result.reached is None and "not verified" in result.message
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert b"hf_SECRET" not in path.read_bytes() and b"k1\"" not in path.read_bytes(), path
    log = json.loads((tmp_path / "out" / "training_log.json").read_text())
    assert log["args"] == {"hub_token": "<redacted>", "nested": {"api_key": "<redacted>"}, "seed": 3}
    redacted = redact_secrets({"token": None, "x": [{"password": "p"}]})
    assert redacted == {"token": None, "x": [{"password": "<redacted>"}]}


def test_unwritable_output_dir_fails_before_training(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(ValueError, match="cannot write to"):
        erase(tiny_pipeline(), "nudity", output_dir=blocked / "out", pairs=PAIRS, judge=None)


def test_validation_without_prompts_for_a_free_text_concept_names_the_fix(tmp_path):
    with pytest.raises(ValueError, match="validation_prompts"):
        erase(tiny_pipeline(), "nudity", output_dir=tmp_path / "o", pairs=PAIRS, recipe="svare",
              judge=lambda images, concepts: [False] * len(concepts))


def test_better_prefers_met_then_lowest_acc_e_within_the_bound():
    def result(step, acc_e, drop, met=False):
        return ValidationResult(step, acc_e, 0.9, drop, met)

    assert better(result(2, 0.5, 0.0), None, 0.02)
    assert better(result(4, 0.0, 0.0, met=True), result(2, 0.1, 0.0), 0.02)
    assert not better(result(6, 0.0, 0.0, met=True), result(4, 0.0, 0.0, met=True), 0.02)  # the first met stays
    assert better(result(4, 0.2, 0.01), result(2, 0.3, 0.01), 0.02)
    assert better(result(4, 0.9, 0.01), result(2, 0.1, 0.05), 0.02)  # within the acc_i bound beats outside it
    with pytest.raises(ValueError, match="target prompt"):
        ValidationPrompts(targets=[])


def test_replacement_is_the_kept_value_the_judge_least_confuses_with_the_target():
    """Images are generated value by value in the kind's order (circle first, the erased triangle left out); a judge
    that reads the first block (circles) as triangles makes the circle a poor replacement."""
    pipe = tiny_pipeline()
    from var_erase.erasure.config import ErasureConfig

    def judge(images, concepts):
        if concepts[0] == "triangle" and len(set(concepts)) == 1:  # "is this a triangle?" for every image
            return [i < 4 for i in range(len(concepts))]
        return [True] * len(concepts)

    chosen = judge_replacements(pipe, judge, ["triangle"], ErasureConfig(), prompts_per_value=4)
    assert chosen == {"triangle": "square"}


def test_replacement_can_be_judged_on_every_prompt_of_the_validation_sets_and_every_image():
    """Circle (the first kept shape) is read as the target only in second images past its 16th prompt: a 16-image
    sample sees a tie and keeps circle; judging every prompt twice sees the confusion and picks square."""
    from var_erase.erasure.config import ErasureConfig

    pipe, sizes = tiny_pipeline(), []

    def judge(images, concepts):
        sizes.append(len(concepts))
        if len(set(concepts)) > 1:  # "is each image what its prompt asked for?"
            return [True] * len(concepts)
        per_value = len(concepts) // 7  # seven kept shapes, circle's images first
        return [i < per_value and i >= 32 and i % 2 == 1 for i in range(len(concepts))]

    assert judge_replacements(pipe, judge, ["triangle"], ErasureConfig()) == {"triangle": "circle"}
    full = judge_replacements(pipe, judge, ["triangle"], ErasureConfig(), prompts_per_value=None,
                              phrasing_sets=("tuning",), images_per_prompt=2)
    assert full == {"triangle": "square"} and sizes[-1] == 7 * 32 * 2


def test_distinct_replacements_give_concepts_of_one_kind_different_values():
    """Triangle and star both read least in circles (block 0); independently both take circle. ``distinct`` takes
    the assignment whose worst confusion is lowest: star reads as square (block 1) 10% of the time, triangle 50%, so
    triangle keeps circle and star gets square."""
    from var_erase.erasure.config import ErasureConfig
    from var_erase.toy.concepts import concept_names

    pipe = tiny_pipeline()
    kept = [v for v in concept_names("shape") if v not in ("triangle", "star")]
    second = {"triangle": 0.5, "star": 0.1}

    def judge(images, concepts):
        if len(set(concepts)) > 1:  # "is each image what its prompt asked for?"
            return [True] * len(concepts)
        per_value = len(concepts) // len(kept)
        rate = second[concepts[0]]
        return [i >= per_value and (i >= 2 * per_value or (i - per_value) < rate * per_value)
                for i in range(len(concepts))]

    both = judge_replacements(pipe, judge, ["triangle", "star"], ErasureConfig(), prompts_per_value=10)
    assert both == {"triangle": kept[0], "star": kept[0]}
    distinct = judge_replacements(pipe, judge, ["triangle", "star"], ErasureConfig(), prompts_per_value=10,
                                  distinct=True)
    assert distinct == {"triangle": kept[0], "star": kept[1]}


def test_erase_passes_distinct_replacements_to_the_judged_choice(tmp_path):
    """The flag reaches the replacement choice and the generated pairs: triangle and star (both clean only on the
    first kept shape) get the first and second kept shapes, recorded in the training log."""
    from var_erase.toy.concepts import concept_names

    pipe = tiny_pipeline()
    kept = [v for v in concept_names("shape") if v not in ("triangle", "star")]

    def judge(images, concepts):  # blocks past the first read as the concept, except star in the second
        if len(set(concepts)) > 1 or len(concepts) < 2 * len(kept):
            return [True] * len(concepts)
        per_value = len(concepts) // len(kept)
        return [i >= per_value and not (concepts[0] == "star" and i < 2 * per_value) for i in range(len(concepts))]

    result = erase(pipe, ["triangle", "star"], output_dir=tmp_path / "out", recipe="verified", judge=judge,
                   config={"max_train_steps": 1}, num_pairs=2, retain_prompts_per_concept=0, validation_steps=None,
                   validation_prompts=VALIDATION, num_grid_images=0, progress=False, distinct_replacements=True)
    log = json.loads((tmp_path / "out" / "training_log.json").read_text())
    assert log["replacements"] == [f"triangle={kept[0]}", f"star={kept[1]}"], log["replacements"]
    assert result.steps == 1


def test_distinct_assignment_repeats_values_only_when_there_are_too_few():
    from var_erase.erasure.erase import _distinct_assignment

    scores = {"a": {"x": (0.0, -1.0, 0), "y": (0.2, -1.0, 1)}, "b": {"x": (0.0, -1.0, 0), "y": (0.3, -1.0, 1)}}
    assert _distinct_assignment(scores) == {"a": "y", "b": "x"}  # worst confusion 0.2 rather than 0.3
    three = {**scores, "c": {"x": (0.1, -1.0, 0), "y": (0.0, -1.0, 1)}}
    assert _distinct_assignment(three) == {"a": "x", "b": "x", "c": "y"}  # 3 concepts, 2 values: each its best


def test_confirmations_need_met_validations_in_a_row_and_keep_the_last(tmp_path):
    pipe = tiny_pipeline()
    judge = ScheduledJudge(pipe, [1.0, 0.0, 1.0, 0.0, 0.0, 1.0])  # met at 1, lost at 2, met at 3 and 4
    result = _erase(tmp_path, pipe, judge, validation_steps=1, confirmations=2)
    assert result.steps == 4 and result.reached is True
    assert [v["step"] for v in result.validations] == [0, 1, 2, 3, 4]
    assert read_adapter_metadata(tmp_path / "out").eval_results["step"] == 4
    saved = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    for key, value in judge.weights[-1].items():  # the weights read at the step-4 validation
        match = [k for k in saved if k.endswith(key.removeprefix("transformer."))]
        assert match and torch.equal(saved[match[0]], value), key
    with pytest.raises(ValueError, match="confirmations"):
        _erase(tmp_path, tiny_pipeline(), judge, validation_steps=2, confirmations=0)


def test_a_met_validation_that_is_never_confirmed_ends_not_reached_and_is_kept(tmp_path):
    pipe = tiny_pipeline()
    judge = ScheduledJudge(pipe, [1.0, 0.0, 1.0])  # met at step 2 only; every later validation still sees it
    result = _erase(tmp_path, pipe, judge, validation_steps=2, confirmations=2)
    assert result.steps == 8 and result.reached is False
    assert result.message.startswith("Target NOT reached: it was met, but not on enough validations in a row")
    verified = read_adapter_metadata(tmp_path / "out").eval_results
    assert verified["step"] == 2 and verified["confirmed"] is False and verified["target_reached"] is False
    saved = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    for key, value in judge.weights[1].items():  # read at the step-2 validation (0: the base read) and kept
        match = [k for k in saved if k.endswith(key.removeprefix("transformer."))]
        assert match and torch.equal(saved[match[0]], value), key


def test_target_is_met_only_when_the_worst_erased_concept_is(tmp_path):
    """Two erased concepts: one fully gone, the other still in a quarter of its images. The mean (0.125) would pass a
    0.15 target; the worst concept (0.25) does not."""
    from var_erase.erasure.validation import Validator

    prompts = ValidationPrompts(targets=[("a nude person", "nudity")] * 2 + [("a gun", "gun")] * 2,
                                target_images_per_prompt=2, source="test")
    assert prompts.num_images == 8

    def judge(images, concepts):
        assert len(concepts) == 8  # two images of every target prompt
        return [c == "gun" and i == 4 for i, c in enumerate(concepts)]

    validator = Validator(tiny_pipeline(), prompts, judge, target_acc_e=0.15)
    result = validator(1)
    assert result.per_concept == {"nudity": 0.0, "gun": 0.25} and result.acc_e == 0.125
    assert not result.met
    with pytest.raises(ValueError, match="target_images_per_prompt"):
        ValidationPrompts(targets=[("a", "b")], target_images_per_prompt=0)


def test_leak_upper_bound_is_the_exact_one_sided_clopper_pearson_bound():
    from var_erase.erasure.validation import _binomial_cdf, leak_upper_bound

    assert leak_upper_bound(0, 64, 0.95) == pytest.approx(1 - 0.05 ** (1 / 64), abs=1e-9)
    for leaks, n in ((2, 128), (7, 256), (1, 3)):
        bound = leak_upper_bound(leaks, n, 0.95)
        assert leaks / n < bound < 1 and _binomial_cdf(leaks, n, bound) == pytest.approx(0.05, abs=1e-9)
    assert leak_upper_bound(5, 5, 0.9) == 1.0
    for bad in ((-1, 4, 0.95), (5, 4, 0.95), (0, 0, 0.95), (0, 4, 1.0)):
        with pytest.raises(ValueError):
            leak_upper_bound(*bad)


def test_with_a_confidence_a_concept_is_met_only_when_its_bound_is_within_the_target():
    """One leak in 64 images is 1.6% observed, within a 5% target; its 95% upper bound (7.1%) is not. No leak in 64
    images bounds the rate at 4.6%: met."""
    from var_erase.erasure.validation import Validator

    prompts = ValidationPrompts(targets=[("a nude person", "nudity")] * 32, target_images_per_prompt=2, source="t")
    leaks = [1]

    def judge(images, concepts):
        return [i < leaks[0] for i in range(len(concepts))]

    pipe = tiny_pipeline()
    assert Validator(pipe, prompts, judge).__call__(1).met  # the observed share: met
    strict = Validator(pipe, prompts, judge, confidence=0.95)
    result = strict(1)
    assert result.per_concept == {"nudity": 1 / 64} and result.per_concept_upper["nudity"] > 0.07
    assert not result.met and "95% confidence" in strict.report(result)
    leaks[0] = 0
    result = strict(2)
    assert result.met and result.per_concept_upper["nudity"] == pytest.approx(0.0457, abs=1e-4)
    with pytest.raises(ValueError, match="confidence"):
        Validator(pipe, prompts, judge, confidence=95)


def test_validation_prompts_can_draw_on_several_tuning_side_phrasing_sets():
    from var_erase.erasure.recipes import RECIPES
    from var_erase.erasure.validation import toy_validation_prompts
    from var_erase.toy.phrasings import phrased_prompts

    one = toy_validation_prompts(["blue"], "tuning")
    two = toy_validation_prompts(["blue"], ("tuning", "fresh"), target_images_per_prompt=2)
    assert len(two.targets) == 2 * len(one.targets) and two.images_per_target == 2
    assert {p for p, _ in two.targets} == {r.prompt for s in ("tuning", "fresh") for r in phrased_prompts("blue", s)}
    assert len(two.kept) == len(one.kept) and "'fresh'" in two.source
    assert not any("blue" in p for p, _ in two.kept)
    recipe = RECIPES["verified"]
    assert recipe.validation_confidence == 0.95 and "tuning" in recipe.validation_phrasings
    assert not {"heldout", "paraphrase", "unseen", "unseen2"} & set(recipe.validation_phrasings)  # never held out
    with pytest.raises(ValueError, match="at least one"):
        toy_validation_prompts(["blue"], ())


@pytest.mark.parametrize("frozen", ["unseen", "unseen2"])
def test_validation_refuses_every_frozen_heldout_set(frozen):
    from dataclasses import replace

    from var_erase.erasure.erase import _default_validation_prompts
    from var_erase.erasure.recipes import RECIPES
    from var_erase.toy.phrasings import FROZEN_SETS

    assert frozen in FROZEN_SETS
    assert all(not set(FROZEN_SETS) & set(r.validation_phrasings) for r in RECIPES.values())
    recipe = replace(RECIPES["verified"], validation_phrasings=("tuning", frozen))
    with pytest.raises(ValueError, match=f"include '{frozen}', a frozen held-out set"):
        _default_validation_prompts(["blue"], 0, recipe)


def test_the_default_recipe_averages_the_weights_and_a_zero_decay_turns_it_off():
    from var_erase.erasure.recipes import DEFAULT_RECIPE, RECIPES

    from ._scripts import load_script

    assert RECIPES[DEFAULT_RECIPE].erasure_config().ema_decay == 0.99
    assert RECIPES["svare"].erasure_config().ema_decay is None  # the reference saves the trained weights
    assert RECIPES[DEFAULT_RECIPE].erasure_config(ema_decay=0).ema_decay == 0
    train = load_script("examples/train_svare.py")
    args = train.parse_args(["--concept", "red", "--output_dir", "x", "--ema_decay", "0"])
    assert train.config_overrides(args)["ema_decay"] == 0


def test_varied_pairs_name_the_concept_after_the_noun_too():
    from var_erase.toy.captions import OBJECT_TEMPLATES
    from var_erase.toy.pairs import toy_prompt_pairs

    pairs = toy_prompt_pairs(["red"], 64, wording="varied")
    balanced = toy_prompt_pairs(["red"], 64, wording="balanced")
    assert len(pairs) == 64 and all(p.concept == "red" for p in pairs)
    extra = [t for t in OBJECT_TEMPLATES["varied"] if t not in OBJECT_TEMPLATES["train"]]
    markers = ["(", " in colour", "and it is", "; colour:", " - ", " looking "]
    assert len(extra) == len(markers)
    for marker in markers:  # every pair-only template is used
        assert any(marker in p.unsafe for p in pairs), marker
        assert not any(marker in p.unsafe for p in balanced), marker
    for pair in pairs:  # the safe twin changes the colour word only
        assert pair.unsafe != pair.safe and len(pair.unsafe.split()) == len(pair.safe.split())
    with pytest.raises(ValueError, match="wording must be one of"):
        toy_prompt_pairs(["red"], 4, wording="shuffled")


def test_uce_is_a_closed_form_erasure_written_and_verified_like_a_trained_one(tmp_path):
    """``config={"method": "uce"}``: no training loop (0 steps), the pairs' unsafe prompts edited towards their safe
    prompts in the cross-attention keys/values, the adapter loadable, the judge's single reading in its header."""
    pipe = tiny_pipeline()
    judge = ScheduledJudge(pipe, [1.0, 0.0])  # base: drawn; after the edit: gone
    result = erase(pipe, "nudity", output_dir=tmp_path / "out", pairs=PAIRS, recipe="svare", config={"method": "uce"},
                   judge=judge, validation_prompts=VALIDATION, num_grid_images=1, progress=False)
    assert result.steps == 0 and result.reached is True and result.message.startswith("Target reached")
    metadata = read_adapter_metadata(tmp_path / "out")
    assert metadata.method == "uce" and metadata.eval_results["acc_e"] == 0.0
    assert metadata.hyperparameters["replacements"] == [p.safe for p in PAIRS]
    saved = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    assert saved and all("attn2.to_k" in k or "attn2.to_v" in k for k in saved)
    assert (tmp_path / "out" / "grid.png").exists() and "uce" in (tmp_path / "out" / "README.md").read_text()
    fresh = tiny_pipeline()
    fresh.load_lora_weights(str(tmp_path / "out"))  # loads like any erasure adapter
