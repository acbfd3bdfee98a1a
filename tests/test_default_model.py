"""The embedded default model: loads offline from the package and draws prompted colours."""

import pytest
import torch

from var_erase import DEFAULT_MODEL
from var_erase.evaluation.toy_metrics import fully_specified_prompts, prompt_adherence
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


def test_default_model_draws_the_prompted_colour(pipe):
    """Colour is the attribute the shipped checkpoint has learnt (see docs/toy_model.md for all numbers)."""
    oracle = OracleClassifier.from_pretrained(ORACLE_PATH)
    rows = fully_specified_prompts(16, seed=3)
    result = prompt_adherence(pipe, oracle, rows, batch_size=16, progress=False)
    assert result["n_images"] == 16
    assert result["colour"] >= 0.8
