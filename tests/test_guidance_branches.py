"""adapter_on_branch: a LoRA adapter on the conditional or the unconditional half of a guidance batch only."""

import pytest
import torch
from peft import LoraConfig

from var_erase.evaluation.guidance_branches import adapter_on_branch

from ._tiny import LORA_TARGETS, tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline()
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=LORA_TARGETS),
                                 adapter_name="erased")
    return pipe


def _guidance_batch_logits(pipe):
    """Logits of the batch the pipeline runs with guidance, ``[cond; uncond]``, on fixed random inputs."""
    schedule = pipe.prepare_schedule(64, 64)
    g = torch.Generator().manual_seed(0)
    inputs_BLd = torch.randn(1, schedule.total_tokens - 1, 8, generator=g).repeat(2, 1, 1)
    states, mask = pipe.encode_prompt("a red circle")
    uncond = pipe.transformer.unconditional_states(1, states.shape[1])
    states_2B = torch.cat([states, uncond])
    mask_2B = torch.cat([mask, torch.ones_like(mask)])
    with torch.no_grad():
        return pipe.transformer(inputs_BLd, states_2B, mask_2B, schedule=schedule).sample


def test_each_half_runs_the_weights_its_branch_asks_for(pipe):
    with_adapter = _guidance_batch_logits(pipe)
    pipe.transformer.disable_adapters()
    base = _guidance_batch_logits(pipe)
    pipe.transformer.enable_adapters()
    assert not torch.allclose(with_adapter, base, atol=1e-4)  # the adapter changes both rows
    with adapter_on_branch(pipe.transformer, "erased", "cond"):
        cond_only = _guidance_batch_logits(pipe)
    with adapter_on_branch(pipe.transformer, "erased", "uncond"):
        uncond_only = _guidance_batch_logits(pipe)
    with adapter_on_branch(pipe.transformer, "erased", "both"):
        both = _guidance_batch_logits(pipe)
    torch.testing.assert_close(cond_only[0], with_adapter[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond_only[1], base[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(uncond_only[0], base[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(uncond_only[1], with_adapter[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both, with_adapter)
    torch.testing.assert_close(_guidance_batch_logits(pipe), with_adapter)  # hooks removed on exit


def test_sampling_with_guidance_uses_the_restricted_adapter(pipe):
    kwargs = dict(guidance_scale=4.0, generator=torch.Generator().manual_seed(1), output_type="pt")
    full = pipe("a red circle", **kwargs).images
    kwargs["generator"] = torch.Generator().manual_seed(1)
    with adapter_on_branch(pipe.transformer, "erased", "uncond"):
        restricted = pipe("a red circle", **kwargs).images
    assert restricted.shape == full.shape and not torch.equal(restricted, full)


def test_bad_input_is_refused_with_the_fix(pipe):
    with pytest.raises(ValueError, match="branch must be one of"):
        with adapter_on_branch(pipe.transformer, "erased", "negative"):
            pass
    with pytest.raises(ValueError, match="no LoRA layer .* 'other'"):
        with adapter_on_branch(pipe.transformer, "other", "cond"):
            pass
    with pytest.raises(ValueError, match="guidance_scale != 1"):
        with adapter_on_branch(pipe.transformer, "erased", "cond"):
            pipe("a red circle", guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
