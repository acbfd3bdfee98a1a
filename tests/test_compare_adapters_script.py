"""scripts/compare_adapters.py: tensor-by-tensor comparison of two adapters (the multi-GPU equality check)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ._scripts import load_script

pytestmark = pytest.mark.slow  # a script / app / benchmark / real-evaluator test: `make test-slow`


@pytest.fixture(scope="module")
def script():
    return load_script("scripts/compare_adapters.py")


def _save(folder: Path, tensors: dict) -> str:
    folder.mkdir()
    save_file(tensors, str(folder / "pytorch_lora_weights.safetensors"))
    return str(folder)


def test_close_adapters_match_and_different_ones_do_not(script, tmp_path):
    a = {"x.lora_A.weight": torch.randn(4, 8), "x.lora_B.weight": torch.randn(8, 4)}
    near = {k: v * (1 + 1e-3) for k, v in a.items()}
    far = {k: v + torch.randn_like(v) for k, v in a.items()}
    first = _save(tmp_path / "a", a)
    report = script.main([first, _save(tmp_path / "near", near), "--output_json", str(tmp_path / "r.json")])
    assert report["match"] and report["worst_relative_diff"] == pytest.approx(1e-3, rel=1e-2)
    assert report["cosine_similarity"] == pytest.approx(1.0) and (tmp_path / "r.json").is_file()
    report = script.main([first, _save(tmp_path / "far", far)])
    assert not report["match"] and report["worst_relative_diff"] > 0.1


def test_different_keys_are_reported(script, tmp_path):
    first = _save(tmp_path / "a", {"x": torch.ones(2)})
    report = script.main([first, _save(tmp_path / "b", {"y": torch.ones(2)})])
    assert not report["match"] and "different keys" in report["error"]
    with pytest.raises(SystemExit, match="safetensors"):
        script.main([first, str(tmp_path / "missing")])
