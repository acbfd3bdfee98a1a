"""The embedded default model: loads offline from the package and draws prompted colours and shapes."""

import pytest
import torch

from var_erase import DEFAULT_MODEL
from var_erase.evaluation.toy_metrics import (
    adherence_by_value,
    adherence_from_reading,
    fully_specified_prompts,
    generate_images,
)
from var_erase.pipelines.pipeline_var import VARPipeline
from var_erase.toy.oracle import ORACLE_PATH, OracleClassifier


@pytest.fixture(scope="module")
def pipe():
    pipe = VARPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_default_model_loads_offline_in_fp32(pipe):
    assert pipe.text_encoder.dtype == torch.float32  # stored fp16, loaded fp32
    assert pipe.transformer.config.sample_size == 64


def test_default_model_generates_deterministically(pipe):
    a = pipe("a red striped circle", generator=torch.Generator().manual_seed(0), output_type="np").images
    b = pipe("a red striped circle", generator=torch.Generator().manual_seed(0), output_type="np").images
    assert a.shape == (1, 64, 64, 3) and (a == b).all()


def test_default_model_draws_the_prompted_colour_and_shape(pipe):
    """Colour and shape are what the shipped checkpoint has learnt (docs/toy_model.md has every number)."""
    oracle = OracleClassifier.from_pretrained(ORACLE_PATH)
    rows = fully_specified_prompts(24, seed=3)
    targets = [t for _, t in rows]
    reading = oracle.predict(generate_images(pipe, [p for p, _ in rows], 1, 0, 24, progress=False))
    result = adherence_from_reading(reading, targets)
    assert result["colour"] >= 0.8 and result["shape"] >= 0.7
    by_value = adherence_by_value(reading, targets)
    for kind in ("shape", "colour", "style"):  # the per-value table adds up to the aggregate
        n = sum(v["n"] for v in by_value[kind].values())
        assert n == 24
        assert abs(sum(v["share"] * v["n"] for v in by_value[kind].values()) / n - result[kind]) < 1e-9
