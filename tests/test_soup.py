"""Adapter soups: the averaged adapter equals the weighted adapters it was made of, and bad mixes are refused."""

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from var_erase.erasure.soup import load_adapter_soup, save_adapter_soup, soup_lora_state_dicts
from var_erase.hub import AdapterMetadata, read_adapter_metadata
from var_erase.pipelines.pipeline_var import VARPipeline

from ._scripts import load_script
from ._tiny import LORA_TARGETS, tiny_pipeline
from .test_lora import _probe


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three saved adapters of the tiny model: seeds 0 and 1 erase 'circle' (ranks 4 and 2, different alphas), the
    third erases 'square'."""
    root = tmp_path_factory.mktemp("soup")
    paths = []
    for seed, rank, alpha, concept in [(0, 4, 8.0, "circle"), (1, 2, 1.0, "circle"), (2, 2, 2.0, "square")]:
        pipe = tiny_pipeline()
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
        pipe.transformer.add_adapter(config)
        torch.manual_seed(seed)
        with torch.no_grad():  # non-zero B, so every adapter changes the model
            for name, p in pipe.transformer.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)
        metadata = AdapterMetadata.from_training("tiny", pipe.transformer, [concept], "svare",
                                                 hyperparameters={"seed": seed, "learning_rate": 1e-3},
                                                 lora_config=config)
        path = root / f"{concept}-s{seed}"
        VARPipeline.save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
                                      transformer_lora_adapter_metadata=config.to_dict(),
                                      extra_metadata=metadata.to_safetensors_metadata())
        paths.append(path)
    return paths


def test_soup_equals_the_weighted_adapters(adapters, tmp_path):
    circle = adapters[:2]
    weighted = tiny_pipeline()
    for i, path in enumerate(circle):
        weighted.load_lora_weights(path, adapter_name=f"a{i}")
    weighted.set_adapters(["a0", "a1"], adapter_weights=[1.5 * 0.5, 1.5 * 0.5])
    save_adapter_soup(circle, tmp_path / "soup", scale=1.5)
    soup = tiny_pipeline()
    soup.load_lora_weights(tmp_path / "soup")
    base = _probe(tiny_pipeline())
    assert not torch.allclose(_probe(soup), base, atol=1e-4)  # the soup changes the model ...
    torch.testing.assert_close(_probe(soup), _probe(weighted), atol=1e-5, rtol=1e-5)  # ... exactly as the mix does

    metadata = read_adapter_metadata(tmp_path / "soup")
    assert metadata.concepts == ["circle"] and (metadata.lora_rank, metadata.lora_alpha) == (6, 6.0)
    soup_info = metadata.hyperparameters["soup"]
    assert soup_info["member_seeds"] == [0, 1] and soup_info["scale"] == 1.5 and soup_info["weights"] == [0.5, 0.5]
    assert "seed" not in metadata.hyperparameters and metadata.hyperparameters["learning_rate"] == 1e-3


def test_stacking_is_the_weighted_sum_of_the_products():
    g = torch.Generator().manual_seed(0)
    sds = [{"x.lora_A.weight": torch.randn(r, 5, generator=g), "x.lora_B.weight": torch.randn(3, r, generator=g)}
           for r in (2, 4)]
    out = soup_lora_state_dicts(sds, scalings=[2.0, 0.5], weights=[0.3, 0.7])
    assert out["x.lora_A.weight"].shape == (6, 5) and out["x.lora_B.weight"].shape == (3, 6)
    expected = sum(w * s * sd["x.lora_B.weight"] @ sd["x.lora_A.weight"] for sd, s, w in zip(sds, [2.0, 0.5],
                                                                                           [0.3, 0.7]))
    torch.testing.assert_close(out["x.lora_B.weight"] @ out["x.lora_A.weight"], expected)


def test_bad_soups_are_refused(adapters):
    with pytest.raises(ValueError, match="averages several adapters"):
        load_adapter_soup(adapters[:1])
    with pytest.raises(ValueError, match="one weight per adapter"):
        load_adapter_soup(adapters[:2], weights=[1.0])
    with pytest.raises(ValueError, match="scale must be a number > 0"):
        load_adapter_soup(adapters[:2], scale=0)
    with pytest.raises(ValueError, match="a soup averages runs of one erasure"):
        load_adapter_soup([adapters[0], adapters[2]])
    with pytest.raises(ValueError, match="the same --lora_layers"):
        soup_lora_state_dicts([{"a.lora_A.weight": torch.ones(1, 1)}, {"b.lora_A.weight": torch.ones(1, 1)}],
                              [1.0, 1.0], [0.5, 0.5])


def test_soup_script_writes_adapter_and_card(adapters, tmp_path):
    argv = ["--lora", str(adapters[0]), "--lora", str(adapters[1]), "--weights", "0.25", "0.75", "--scale", "2",
            "--output_dir", str(tmp_path / "soup")]
    out = load_script("examples/soup_adapters.py").main(argv)
    card = (tmp_path / "soup" / "README.md").read_text()
    assert "circle erased" in card and '"member_seeds": [0, 1]' in card
    assert read_adapter_metadata(out).hyperparameters["soup"]["weights"] == [0.25, 0.75]
