"""examples/reproduce_table.py: which rows it runs and which concepts a multi-concept row erases."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

from reproduce_table import concept_group, parse_args, plan, train  # noqa: E402

from var_erase.toy.concepts import concept_names, get_concept  # noqa: E402

pytestmark = pytest.mark.slow  # a script / app / benchmark / real-evaluator test: `make test-slow`


def test_concept_group_fills_the_first_kind_then_the_next_and_keeps_three_of_each():
    five = concept_group("triangle", 5)
    assert five[0] == "triangle" and len(set(five)) == 5
    assert all(get_concept(c).kind == "shape" for c in five)
    ten = concept_group("triangle", 10)
    assert ten[:5] == five and len(set(ten)) == 10
    for kind in {get_concept(c).kind for c in ten}:
        erased = sum(get_concept(c).kind == kind for c in ten)
        assert len(concept_names(kind)) - erased >= 3  # acc_i still has three concepts of this kind


def test_concept_group_says_when_the_world_is_too_small():
    with pytest.raises(ValueError, match="cannot erase 30 concepts"):
        concept_group("red", 30)


def test_plan_has_every_method_per_concept_the_alphas_and_each_multi_row():
    args = parse_args(["--concepts", "triangle,outlined", "--alphas", "0,0.5", "--multi", "5,10"])
    rows = plan(args)
    labels = [r[0] for r in rows]
    for concept in ("triangle", "outlined"):
        assert f"{concept}: original" in labels
        assert {f"{concept}: {m}" for m in ("naive", "vare", "fce", "svare")} <= set(labels)
        assert {f"{concept}: {m}" for m in ("esd-u", "esd-x", "fmn", "uce", "ac-n", "ac-m")} <= set(labels)
    assert "triangle: svare alpha=0" in labels and "triangle: svare alpha=0.5" in labels
    multi = [r for r in rows if r[1].startswith("multi")]
    assert [len(r[2]) for r in multi] == [5, 10]
    assert len({r[1] for r in rows if r[1]}) == len([r for r in rows if r[1]])  # every run has its own folder


def test_every_row_is_a_valid_erasure_config_and_train_calls_the_library(tmp_path):
    from var_erase.erasure.config import ErasureConfig
    from var_erase.hub import read_adapter_metadata

    from ._tiny import tiny_pipeline

    args = parse_args(["--concepts", "triangle", "--alphas", "0.5", "--multi", "", "--max_train_steps", "2",
                       "--num_pairs", "2", "--output_dir", str(tmp_path / "table")])
    for *_, config in plan(args):
        ErasureConfig(**config).validate()  # method / token_threshold are real fields with valid values
    tiny_pipeline().save_pretrained(tmp_path / "base")
    args.pretrained_model_name_or_path = str(tmp_path / "base")
    out = train(args, "triangle-fce", ["triangle"], {"method": "fce"})
    metadata = read_adapter_metadata(out)
    assert metadata.method == "fce" and metadata.hyperparameters["max_train_steps"] == 2
    assert metadata.hyperparameters["recipe"] == "svare"
