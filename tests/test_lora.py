"""The pipeline-level LoRA API: train with PEFT, save, load, combine, fuse, unload."""

import warnings
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import ByT5Tokenizer

from var_erase.hub import AdapterMetadata, AdapterMismatchWarning
from var_erase.pipelines.pipeline_var import VARPipeline

from ._tiny import LORA_TARGETS, tiny_pipeline, tiny_text_encoder, tiny_transformer, tiny_vae


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


# -- foreign adapters: another model's LoRA, another architecture, other weights --------------------------------------
def _pipeline(num_layers: int = 2, seed: int = 0) -> VARPipeline:
    pipe = VARPipeline(tokenizer=ByT5Tokenizer(), text_encoder=tiny_text_encoder(seed),
                       transformer=tiny_transformer(seed, num_layers=num_layers), vae=tiny_vae(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _erasure_adapter(path, num_layers: int, seed: int = 0, architecture: bool = True):
    """An erasure adapter as train_svare.py saves it (var-erase metadata in the header) for a tiny base model."""
    pipe = _pipeline(num_layers, seed)
    metadata = AdapterMetadata.from_training(f"org/tiny-{num_layers}-{seed}", pipe.transformer, ["circle"], "svare")
    if not architecture:  # as written before the architecture was recorded
        metadata = replace(metadata, base_model_architecture=None)
    _train_adapter(pipe, "erase", seed=1, steps=1)
    tf = pipe.transformer
    VARPipeline.save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(tf, adapter_name="erase"),
                                  transformer_lora_adapter_metadata=tf.peft_config["erase"].to_dict(),
                                  extra_metadata=metadata.to_safetensors_metadata())
    return path


@pytest.mark.parametrize("keys, kind", [
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"], "a diffusion UNet LoRA"),
    (["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
      "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"], "a diffusion UNet LoRA"),
    (["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"], "a text-encoder LoRA"),
    (["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight",
      "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight"], "a LoRA of a diffusion transformer"),
    (["transformer.nothing_like_this.lora_A.weight"], "a LoRA of another model"),
])
def test_a_lora_whose_keys_match_no_module_is_an_error_naming_what_it_is(base, tmp_path, keys, kind):
    pipe = _fresh(base)
    state_dict = {key: torch.zeros(4, 4) for key in keys}
    folder = tmp_path / "foreign"
    folder.mkdir()
    save_file(state_dict, folder / "pytorch_lora_weights.safetensors")
    for source in (state_dict, folder):
        with pytest.raises(ValueError, match=f"matches no module of this pipeline's VARTransformer2DModel: it "
                                             f"looks like {kind}") as error:
            pipe.load_lora_weights(source)
        assert "var-erase loads LoRA adapters of its VAR transformer, with keys such as " \
               "'transformer.transformer_blocks.0.attn2.to_q.lora_A.weight'" in str(error.value)
    assert not hasattr(pipe.transformer, "peft_config") or not pipe.transformer.peft_config


def test_an_adapter_for_another_architecture_is_refused_unless_overridden(tmp_path):
    deep = _erasure_adapter(tmp_path / "deep", num_layers=3)
    pipe = _pipeline(num_layers=2)
    with pytest.raises(ValueError, match=r"another architecture \(num_layers 3 != 2; the adapter's base: "
                                         r"'org/tiny-3-0', class=VARTransformer2DModel, num_layers=3.*this pipeline's "
                                         r"transformer: .*num_layers=2.*ignore_mismatched_base=True"):
        pipe.load_lora_weights(deep, adapter_name="erase")
    assert not getattr(pipe.transformer, "peft_config", None)
    with pytest.warns(AdapterMismatchWarning, match="num_layers 3 != 2"):
        pipe.load_lora_weights(deep, adapter_name="erase", ignore_mismatched_base=True)
    assert "erase" in pipe.transformer.peft_config
    shallow = _erasure_adapter(tmp_path / "shallow", num_layers=2)
    with pytest.raises(ValueError, match="num_layers 2 != 3"):  # every key fits the deeper model: still refused
        _pipeline(num_layers=3).load_lora_weights(shallow)


def test_an_adapter_for_other_weights_warns_and_loads(tmp_path):
    adapter = _erasure_adapter(tmp_path / "seed0", num_layers=2, seed=0)
    same = _pipeline(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterMismatchWarning)
        same.load_lora_weights(adapter, adapter_name="erase")  # its own base: silent
    other = _pipeline(seed=1)
    with pytest.warns(AdapterMismatchWarning, match=r"trained on base model 'org/tiny-2-0'.*its weights differ"):
        other.load_lora_weights(adapter, adapter_name="erase")
    assert "erase" in other.transformer.peft_config
    legacy = _erasure_adapter(tmp_path / "legacy", num_layers=2, seed=0, architecture=False)
    with pytest.warns(AdapterMismatchWarning, match="its weights differ"):  # no architecture recorded: warn only
        _pipeline(seed=1).load_lora_weights(legacy)
