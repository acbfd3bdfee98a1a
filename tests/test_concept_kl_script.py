"""examples/toy/concept_kl.py: per-concept guided KL between the frozen model and an adapter."""

from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from var_erase.pipelines.pipeline_var import VARPipeline

from ._scripts import load_script
from ._tiny import LORA_TARGETS, tiny_pipeline

pytestmark = pytest.mark.slow  # a script / app / benchmark / real-evaluator test: `make test-slow`


def _script():
    return load_script("examples/toy/concept_kl.py")


def _adapter(path: Path, std: float) -> str:
    pipe = tiny_pipeline()
    config = LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    pipe.transformer.add_adapter(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(std=std) if std else p.zero_()
    VARPipeline.save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                  transformer_lora_adapter_metadata=config.to_dict())
    return str(path)


def test_kl_is_zero_for_a_no_op_adapter_and_positive_for_a_real_one(tmp_path):
    base = tmp_path / "base"
    tiny_pipeline().save_pretrained(base)
    results = _script().main(["--pretrained_model_name_or_path", str(base), "--kind", "style",
                              "--prompts_per_concept", "1", "--lora", _adapter(tmp_path / "zero", 0.0),
                              "--lora", _adapter(tmp_path / "moved", 0.1),
                              "--output_json", str(tmp_path / "kl.json")])
    zero, moved = (r["kl_per_concept"] for r in results)
    assert set(zero) == {"solid", "outlined", "striped", "dotted"}
    assert max(zero.values()) == pytest.approx(0.0, abs=1e-6)
    assert min(moved.values()) > 1e-6
    with pytest.raises(SystemExit, match="--kind must be"):
        _script().main(["--kind", "size", "--lora", "x"])
