"""Judges: the toy oracle on renders with known content, callables, and how ``resolve_judge`` chooses."""

import numpy as np
import pytest
import torch

from var_erase.erasure.judges import CallableJudge, OracleJudge, is_toy_pipeline, resolve_judge
from var_erase.toy.render import render_batch, sample_scene

from ._tiny import tiny_pipeline


def test_oracle_judge_sees_what_a_render_shows_and_not_what_it_lacks():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, n_objects=1, shape="star", colour="blue", style="striped") for _ in range(4)]
    images = torch.from_numpy(render_batch(scenes))
    judge = OracleJudge()
    assert judge(images, ["star", "blue", "striped", "circle"]) == [True, True, True, False]
    assert judge.settings["judge"] == "toy-oracle"


def test_callable_judge_must_answer_once_per_image():
    judge = resolve_judge(lambda images, concepts: [True], tiny_pipeline(), ["x"])
    assert isinstance(judge, CallableJudge) and judge.settings == {"judge": "<lambda>"}
    assert judge(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), ["x"]) == [True]
    with pytest.raises(ValueError, match="one bool per image"):
        judge(torch.zeros(2, 8, 8, 3, dtype=torch.uint8), ["x", "y"])


def test_auto_judge_needs_a_judgeable_concept():
    pipe = tiny_pipeline()
    assert not is_toy_pipeline(pipe)
    assert resolve_judge(None, pipe, ["red"]) is None
    with pytest.raises(ValueError, match="no judge runs offline for \\['red'\\]"):
        resolve_judge("auto", pipe, ["red"])  # a toy concept on a model that does not draw the toy world
    with pytest.raises(ValueError, match="unknown judge 'oracel'"):
        resolve_judge("oracel", pipe, ["red"])
    assert resolve_judge("oracle", pipe, ["red"]).name == "toy-oracle"


def test_auto_judge_on_the_default_model_is_the_oracle():
    from var_erase import DEFAULT_MODEL
    from var_erase.pipelines.pipeline_var import VARPipeline

    pipe = VARPipeline.from_pretrained(DEFAULT_MODEL)
    assert is_toy_pipeline(pipe)
    assert resolve_judge("auto", pipe, ["blue", "star"]).name == "toy-oracle"
