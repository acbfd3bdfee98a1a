"""examples/robustness.py end to end on a tiny pipeline with a random adapter: every measurement is there, in range,
for both the erased and the base model, and the adapter's effect shows in the side-effect FID."""

import json
import os
import sys

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from var_erase.pipelines.pipeline_var import VARPipeline

from ._tiny import LORA_TARGETS, tiny_pipeline

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import robustness  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def model_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    pipe = tiny_pipeline()
    pipe.save_pretrained(root / "pipe")
    tf = pipe.transformer
    tf.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS), adapter_name="erase")
    torch.manual_seed(0)
    with torch.no_grad():  # PEFT starts lora_B at zero (a no-op adapter); make it act
        for name, param in tf.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    layers = get_peft_model_state_dict(tf, adapter_name="erase")
    VARPipeline.save_lora_weights(root / "lora", transformer_lora_layers=layers,
                                  transformer_lora_adapter_metadata=tf.peft_config["erase"].to_dict())
    return root


def test_robustness_report(model_and_adapter):
    root = model_and_adapter
    out = root / "robustness.json"
    report = robustness.main([
        "--pretrained_model_name_or_path", str(root / "pipe"), "--lora", str(root / "lora"),
        "--target_concept", "red", "--paraphrase_prompts", "2", "--attack_prompts", "1", "--attack_budget", "2",
        "--fid_prompts_per_concept", "1", "--scale_prompts", "2", "--device", "cpu", "--output_json", str(out),
    ])
    assert json.loads(out.read_text())["target_concept"] == "red"
    for model in ("erased", "base"):
        r = report[model]
        assert 0.0 <= r["paraphrase_asr"] <= 1.0 and 0.0 <= r["attack_asr"] <= 1.0
        assert r["attack_queries"] <= 2  # the budget per starting prompt, one starting prompt
    side = report["side_effects"]
    assert side["fid_images"] == 19  # one prompt for each of the 19 other concepts
    assert side["fid_erased_vs_base"] > 0.0 and side["fid_noise_floor"] > 0.0  # a random adapter changes images
    rates = report["scale_commitment"]["rates"]
    assert len(rates) == len(report["scale_commitment"]["grids"]) + 1 and all(0.0 <= r <= 1.0 for r in rates)
    assert report["settings"]["attack_budget"] == 2


def test_unknown_concept_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        robustness.parse_args(["--lora", "x", "--target_concept", "unicorn"])
    assert "unknown toy-world concept 'unicorn'" in capsys.readouterr().err
