"""Per-scale analysis: forced prefixes reproduce the source images exactly, both ends of the curve are the two models'
own samples, and the adapter is left as it was found."""

import pytest
import torch
from peft import LoraConfig

from var_erase.evaluation.scale_analysis import scale_commitment
from var_erase.evaluation.toy_metrics import image_seed
from var_erase.toy.oracle import ORACLE_PATH, OracleClassifier

from ._tiny import LORA_TARGETS, tiny_pipeline

PROMPTS = ["a red circle", "a red striped star"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def oracle():
    return OracleClassifier.from_pretrained(ORACLE_PATH)


def _with_random_adapter(pipe):
    """A LoRA whose up-projections are random too (PEFT initialises them to zero, a no-op adapter)."""
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS), adapter_name="erase")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return pipe


def _own_samples(pipe, prompts):
    generators = [torch.Generator().manual_seed(image_seed(0, i)) for i in range(len(prompts))]
    images = pipe(prompts, generator=generators, output_type="pt").images
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def test_without_adapter_every_rate_is_the_base_rate(oracle):
    pipe = tiny_pipeline()
    with pytest.warns(UserWarning, match="no active adapter"):
        result = scale_commitment(pipe, oracle, "red", PROMPTS, num_images_per_prompt=2, return_images=True,
                                  progress=False)
    num_scales = len(result.grids)
    assert len(result.rates) == num_scales + 1 == result.detections_KN.shape[0]
    assert all(0.0 <= r <= 1.0 for r in result.rates) and result.n_images == 4
    assert result.rates == [result.base_rate] * (num_scales + 1) and result.erased_rate == result.base_rate
    assert (result.detections_KN == result.detections_KN[0]).all()
    assert (result.images_KNHW3 == result.images_KNHW3[0]).all()  # image by image, pixel by pixel
    assert result.kl_per_scale == [0.0] * num_scales and result.midpoint_scale is None
    assert result.settings["adapter_active"] is False


def test_with_adapter_the_ends_are_each_models_own_samples(oracle):
    pipe = _with_random_adapter(tiny_pipeline())
    erased_images = _own_samples(pipe, PROMPTS)
    requires_grad = [p.requires_grad for p in pipe.transformer.parameters()]
    result = scale_commitment(pipe, oracle, "red", PROMPTS, return_images=True, progress=False)
    images = result.images_KNHW3
    assert torch.equal(images[0], erased_images)  # k = 0: the erased model alone
    pipe.transformer.disable_adapters()
    base_images = _own_samples(pipe, PROMPTS)
    pipe.transformer.enable_adapters()
    assert torch.equal(images[-1], base_images)  # k = K: every scale forced from the base model
    assert not torch.equal(base_images, erased_images)
    mixed = [k for k in range(1, len(images) - 1) if not torch.equal(images[k], images[0])
             and not torch.equal(images[k], images[-1])]
    assert mixed  # some prefixes give images that neither model draws alone
    assert all(kl > 0 for kl in result.kl_per_scale)
    # the adapter is on again, and nothing was left trainable that was not
    assert torch.equal(_own_samples(pipe, PROMPTS), erased_images)
    assert [p.requires_grad for p in pipe.transformer.parameters()] == requires_grad


def test_directions_mirror_and_base_pipe_matches_disabled_adapter(oracle):
    pipe = _with_random_adapter(tiny_pipeline())
    forward = scale_commitment(pipe, oracle, "red", PROMPTS, return_images=True, progress=False)
    reverse = scale_commitment(pipe, oracle, "red", PROMPTS, prefix_model="erased", return_images=True,
                               progress=False)
    assert torch.equal(forward.images_KNHW3[0], reverse.images_KNHW3[-1])
    assert torch.equal(forward.images_KNHW3[-1], reverse.images_KNHW3[0])
    assert (forward.base_rate, forward.erased_rate) == (reverse.base_rate, reverse.erased_rate)
    separate = scale_commitment(pipe, oracle, "red", PROMPTS, base_pipe=tiny_pipeline(), return_images=True,
                                progress=False)
    assert torch.equal(separate.images_KNHW3, forward.images_KNHW3)
    assert separate.to_dict()["rates"] == forward.rates and "images_KNHW3" not in separate.to_dict()


def test_clear_errors(oracle):
    pipe = _with_random_adapter(tiny_pipeline())
    with pytest.raises(ValueError, match="set by the analysis"):
        scale_commitment(pipe, oracle, "red", PROMPTS, output_type="pil")
    with pytest.raises(ValueError, match="prefix_model"):
        scale_commitment(pipe, oracle, "red", PROMPTS, prefix_model="lora")
    with pytest.raises(ValueError, match="non-empty list"):
        scale_commitment(pipe, oracle, "red", "a red circle")
    pipe.fuse_lora()
    with pytest.raises(ValueError, match="unfuse_lora"):
        scale_commitment(pipe, oracle, "red", PROMPTS, progress=False)
