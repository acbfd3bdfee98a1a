"""The pipeline-level LoRA API: train with PEFT, save, load, combine, fuse, unload."""

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from var_erase.pipelines.pipeline_var import VARPipeline

from ._tiny import LORA_TARGETS, tiny_pipeline


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    tiny_pipeline().save_pretrained(path)
    return path


def _fresh(base_path) -> VARPipeline:
    pipe = VARPipeline.from_pretrained(base_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _probe(pipe, seed=0):
    """Teacher-forced logits on fixed random inputs: a cheap, exact fingerprint of the transformer's function."""
    g = torch.Generator().manual_seed(seed)
    schedule = pipe.prepare_schedule(64, 64)
    inputs = torch.randn(1, schedule.total_tokens - 1, 8, generator=g)
    states, mask = pipe.encode_prompt("a red circle")
    with torch.no_grad():
        return pipe.transformer(inputs, states, mask, schedule=schedule).sample


def _train_adapter(pipe, name, seed, steps=3, rank=4, alpha=8):
    tf = pipe.transformer
    tf.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=LORA_TARGETS),
                   adapter_name=name)
    tf.set_adapter(name)
    params = [p for n, p in tf.named_parameters() if "lora" in n and f".{name}." in n]
    for p in params:
        p.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in tf.named_parameters() if "lora" in n and f".{name}." in n}
    opt = torch.optim.AdamW(params, lr=1e-2)
    schedule = pipe.prepare_schedule(64, 64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        states, mask = pipe.encode_prompt("a red circle")
    for _ in range(steps):
        inputs = torch.randn(1, schedule.total_tokens - 1, 8, generator=g)
        target = torch.randint(0, 2, (1, schedule.total_tokens, 8), generator=g)
        logits = tf(inputs, states, mask, schedule=schedule).sample
        loss = torch.nn.functional.cross_entropy(logits.unflatten(-1, (-1, 2)).flatten(0, 2), target.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    tf.eval()
    return before


def _save(pipe, path, name):
    tf = pipe.transformer
    VARPipeline.save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(tf, adapter_name=name),
                                  transformer_lora_adapter_metadata=tf.peft_config[name].to_dict())


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """Two adapters trained on the tiny base model, saved; plus the trainer pipeline's outputs."""
    root = tmp_path_factory.mktemp("adapters")
    pipe = _fresh(base)
    before = _train_adapter(pipe, "erase", seed=1)
    after = {n: p.detach() for n, p in pipe.transformer.named_parameters() if "lora" in n and ".erase." in n}
    _save(pipe, root / "erase", "erase")
    erase_out = _probe(pipe)
    pipe.transformer.delete_adapters("erase")
    _train_adapter(pipe, "style", seed=2)
    _save(pipe, root / "style", "style")
    return dict(root=root, before=before, after=after, erase_out=erase_out, style_out=_probe(pipe))


def test_every_lora_tensor_trains(adapters):
    assert len(adapters["before"]) == 2 * 2 * len(LORA_TARGETS)  # A and B, 2 layers, every target
    unchanged = [n for n, p in adapters["before"].items() if torch.equal(p, adapters["after"][n])]
    assert not unchanged, f"LoRA tensors that did not train: {unchanged}"


def test_save_then_load_into_fresh_pipeline_is_identical(base, adapters):
    pipe = _fresh(base)
    base_out = _probe(pipe)
    pipe.load_lora_weights(adapters["root"] / "erase", adapter_name="erase")
    out = _probe(pipe)
    assert not torch.allclose(out, base_out)
    assert torch.allclose(out, adapters["erase_out"], atol=1e-5)
    # a file path and an in-memory dict load the same weights (a dict has no alpha metadata: equal only if alpha = r)
    other = _fresh(base)
    other.load_lora_weights(adapters["root"] / "erase" / "pytorch_lora_weights.safetensors", adapter_name="e")
    assert torch.allclose(_probe(other), adapters["erase_out"], atol=1e-5)


def test_set_adapters_combines_and_weights(base, adapters):
    pipe = _fresh(base)
    base_out = _probe(pipe)
    pipe.load_lora_weights(adapters["root"] / "erase", adapter_name="erase")
    pipe.load_lora_weights(adapters["root"] / "style", adapter_name="style")
    assert pipe.get_active_adapters() == ["style"]
    pipe.set_adapters("erase")
    assert torch.allclose(_probe(pipe), adapters["erase_out"], atol=1e-5)
    pipe.set_adapters(["erase", "style"], adapter_weights=[1.0, 0.0])
    assert torch.allclose(_probe(pipe), adapters["erase_out"], atol=1e-5)
    pipe.set_adapters(["erase", "style"], adapter_weights=[0.5, 0.7])
    mixed = _probe(pipe)
    assert not torch.allclose(mixed, adapters["erase_out"]) and not torch.allclose(mixed, adapters["style_out"])
    pipe.set_adapters("erase", 0.0)
    assert torch.allclose(_probe(pipe), base_out, atol=1e-5)
    pipe.disable_lora()
    assert torch.allclose(_probe(pipe), base_out, atol=1e-6)
    pipe.enable_lora()
    pipe.delete_adapters("style")
    assert pipe.get_list_adapters() == {"transformer": ["erase"]}
    pipe.unload_lora_weights()
    assert torch.allclose(_probe(pipe), base_out, atol=1e-6)


def test_fuse_and_unfuse_restore_base(base, adapters):
    pipe = _fresh(base)
    base_out = _probe(pipe)
    pipe.load_lora_weights(adapters["root"] / "erase", adapter_name="erase")
    pipe.fuse_lora(adapter_names=["erase"])
    assert pipe.num_fused_loras == 1
    assert torch.allclose(_probe(pipe), adapters["erase_out"], atol=1e-5)
    pipe.unfuse_lora()
    pipe.disable_lora()
    assert torch.allclose(_probe(pipe), base_out, atol=1e-5)


def test_alpha_metadata_is_kept(adapters):
    _, metadata = VARPipeline.lora_state_dict(adapters["root"] / "erase", return_lora_metadata=True)
    assert metadata["transformer.lora_alpha"] == 8 and metadata["transformer.r"] == 4


def test_corrupt_or_wrong_adapter_files_give_clear_errors(base, tmp_path):
    pipe = _fresh(base)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "pytorch_lora_weights.safetensors").write_bytes(b"\x00garbage not safetensors")
    with pytest.raises(OSError, match="not a valid safetensors"):
        pipe.load_lora_weights(bad)
    with pytest.raises(ValueError, match="not a LoRA checkpoint"):
        pipe.load_lora_weights({"transformer.proj_out.weight": torch.zeros(2, 2)})
    with pytest.raises(OSError):
        pipe.load_lora_weights(tmp_path / "does-not-exist")
    with pytest.raises(ValueError, match="safetensors"):
        pipe.load_lora_weights(bad, weight_name="pytorch_lora_weights.bin")
