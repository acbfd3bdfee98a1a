"""VARTransformer2DModel: teacher forcing vs cached sampling, CFG batching, condition dropout, LoRA, gradient
checkpointing, save/load, input validation."""

import pytest
import torch
from peft import LoraConfig

from var_erase.models.transformer_var import TextCondition, VARTransformer2DModel
from var_erase.schedules import ScaleSchedule

TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, codebook_dim=8, text_dim=32, max_text_len=16)
ALL_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out",
               "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out", "ff.net.0.proj", "ff.net.2"]
# non-square Infinity schedule (h/w = 0.75, 7 scales, 665 tokens) whose RoPE reference grid (54x72, the 1M grid of
# the template) differs from its own last grid (15x20)
SCHEDULE = ScaleSchedule.from_infinity(0.75, "0.06M", vae_stride=16)
SMALL = SCHEDULE.truncated(5)  # 173 tokens, same RoPE reference grid: for the tests that need many passes


def tiny_model(seed: int = 0, **overrides) -> VARTransformer2DModel:
    torch.manual_seed(seed)
    model = VARTransformer2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # away from the near-zero training init, so every parameter matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def text(batch=2, tokens=7, lengths=(7, 4), seed=1):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, tokens, TINY["text_dim"], generator=g)
    mask = torch.arange(tokens)[None, :] < torch.tensor(lengths)[:, None]  # right padding
    return states, mask


def token_inputs(batch=2, schedule=SMALL, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, schedule.total_tokens - 1, TINY["codebook_dim"], generator=g)


def scale_inputs(inputs_BLd, schedule, k):
    """The next-scale inputs of scale k inside the (B, L - 1, d) teacher-forcing tensor (None for the SOS)."""
    return None if k == 0 else inputs_BLd[:, schedule.offsets[k] - 1: schedule.offsets[k + 1] - 1]


def sample_with_cache(model, inputs_BLd, condition, schedule=SMALL, kv_cache=None):
    kv_cache = kv_cache or model.new_kv_cache()
    logits = [model.forward_scale(scale_inputs(inputs_BLd, schedule, k), k, schedule, condition, kv_cache)
              for k in range(schedule.num_scales)]
    return torch.cat(logits, 1)


# ---------------------------------------------------------------------------------------------------------------------
# teacher forcing == scale-by-scale sampling with the KV cache


@pytest.mark.parametrize("pos_embed_grid", [None, 12])
@torch.no_grad()
def test_cached_scale_by_scale_logits_equal_teacher_forcing(pos_embed_grid):
    model = tiny_model(pos_embed_grid=pos_embed_grid)
    states, mask = text()
    inputs = token_inputs(schedule=SCHEDULE)
    teacher = model(inputs, states, mask, schedule=SCHEDULE).sample
    assert teacher.shape == (2, SCHEDULE.total_tokens, 2 * TINY["codebook_dim"]) and teacher.dtype == torch.float32
    condition = model.prepare_condition(states, mask)
    cache = model.new_kv_cache()
    cached = sample_with_cache(model, inputs, condition, SCHEDULE, kv_cache=cache)
    assert (cached - teacher).abs().max() <= 1e-4
    assert cache.max_tokens == SCHEDULE.total_tokens  # buffers sized once for the schedule, no concatenation


@torch.no_grad()
def test_absolute_positions_start_at_zero_then_tell_positions_apart():
    plain = tiny_model()
    with_pos = VARTransformer2DModel(**TINY, pos_embed_grid=8).eval()
    missing, unexpected = with_pos.load_state_dict(plain.state_dict(), strict=False)
    assert missing == ["pos_embed"] and not unexpected
    states, mask = text()
    inputs = token_inputs()
    base = plain(inputs, states, mask, schedule=SMALL).sample
    assert torch.equal(with_pos(inputs, states, mask, schedule=SMALL).sample, base)  # zero-initialised: no change
    with_pos.pos_embed.normal_()
    inputs_same = inputs[:, :1].expand_as(inputs).contiguous()  # every token alike: only positions differ
    last = SMALL.scale_slice(SMALL.num_scales - 1)
    pos_logits = with_pos(inputs_same, states, mask, schedule=SMALL).sample[:, last]
    plain_logits = plain(inputs_same, states, mask, schedule=SMALL).sample[:, last]
    assert pos_logits.std(1).mean() > plain_logits.std(1).mean() * 1.5


def test_pos_embed_grid_is_validated():
    with pytest.raises(ValueError, match="pos_embed_grid"):
        VARTransformer2DModel(**TINY, pos_embed_grid=0)


@torch.no_grad()
def test_rope_offset_matters_so_the_cache_test_is_sensitive(monkeypatch):
    """Negative control: with the reference's non-fused-path bug (every scale's RoPE rows taken from offset 0) the
    cached logits no longer match teacher forcing."""
    model = tiny_model()
    states, mask = text()
    inputs = token_inputs()
    teacher = model(inputs, states, mask, schedule=SMALL).sample
    monkeypatch.setattr(ScaleSchedule, "scale_slice", lambda self, k: slice(0, self.token_counts[k]))
    buggy = sample_with_cache(model, inputs, model.prepare_condition(states, mask))
    assert (buggy - teacher).abs().max() > 1e-2


@torch.no_grad()
def test_padding_of_the_text_does_not_change_logits():
    model = tiny_model()
    states, mask = text(batch=2, tokens=7, lengths=(7, 4))
    inputs = token_inputs()
    padded = model(inputs, states, mask, schedule=SMALL).sample
    unpadded = model(inputs[1:], states[1:, :4], mask[1:, :4], schedule=SMALL).sample
    torch.testing.assert_close(padded[1:], unpadded, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# classifier-free guidance batch


@torch.no_grad()
def test_cfg_batch_of_cond_and_uncond_equals_separate_calls():
    model = tiny_model()
    states, mask = text()
    inputs = token_inputs()
    cond = model.prepare_condition(states, mask)
    uncond = model.prepare_condition(model.unconditional_states(2, states.shape[1]), mask)  # same mask as the prompt
    both = TextCondition.cat([cond, uncond])
    assert len(both) == 4
    cached = sample_with_cache(model, inputs.repeat(2, 1, 1), both)
    torch.testing.assert_close(cached[:2], sample_with_cache(model, inputs, cond), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached[2:], sample_with_cache(model, inputs, uncond), atol=1e-5, rtol=1e-5)
    teacher = model(inputs.repeat(2, 1, 1), condition=both, schedule=SMALL).sample
    torch.testing.assert_close(teacher[2:], model(inputs, condition=uncond, schedule=SMALL).sample,
                               atol=1e-5, rtol=1e-5)


def test_text_condition_index_cat_pads_and_repeats():
    model = tiny_model()
    short = model.prepare_condition(*text(batch=1, tokens=3, lengths=(3,)))
    long = model.prepare_condition(*text(batch=2, tokens=6, lengths=(6, 2)))
    joined = TextCondition.cat([short, long])
    assert joined.context_BTC.shape[:2] == (3, 6) and joined.context_mask_BT[0].tolist() == [True] * 3 + [False] * 3
    torch.testing.assert_close(joined[1:].cond_BD, long.cond_BD)
    assert len(joined[-1]) == 1 and len(long.repeat_interleave(3)) == 6


def test_unconditional_states_are_the_learned_embedding_prefix():
    model = tiny_model()
    uncond = model.unconditional_states(3, 5)
    assert uncond.shape == (3, 5, TINY["text_dim"])
    torch.testing.assert_close(uncond[2], model.uncond_text_embeds[:5])
    with pytest.raises(ValueError, match="max_text_len=16"):
        model.unconditional_states(1, 17)


# ---------------------------------------------------------------------------------------------------------------------
# condition dropout (training)


def test_condition_dropout_replaces_text_by_the_unconditional_embedding():
    model = tiny_model()
    states, mask = text()
    inputs = token_inputs()
    with torch.no_grad():
        uncond = model(inputs, model.unconditional_states(2, 7), mask, schedule=SMALL).sample
        cond = model(inputs, states, mask, schedule=SMALL).sample
        model.train()
        dropped = model(inputs, states, mask, schedule=SMALL, cond_drop_prob=1.0).sample
        kept = model(inputs, states, mask, schedule=SMALL, cond_drop_prob=0.0).sample
        model.register_to_config(cond_drop_rate=1.0)  # None = the config rate, in training mode only
        default_train = model(inputs, states, mask, schedule=SMALL).sample
        model.eval()
        default_eval = model(inputs, states, mask, schedule=SMALL).sample
    torch.testing.assert_close(dropped, uncond)
    torch.testing.assert_close(kept, cond)
    torch.testing.assert_close(default_train, uncond)
    torch.testing.assert_close(default_eval, cond)
    with pytest.raises(ValueError, match="raw text"):
        model(inputs, condition=model.prepare_condition(states, mask), schedule=SMALL, cond_drop_prob=0.5)


# ---------------------------------------------------------------------------------------------------------------------
# LoRA through PEFT: every adapter is on the computation path (unlike the reference's F.linear bypass)


def _lora_step(model, steps):
    states, mask = text()
    inputs = token_inputs()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    grads = {}
    for _ in range(steps):
        optimizer.zero_grad()
        logits = model(inputs, states, mask, schedule=SMALL).sample
        logits.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        optimizer.step()
    return grads


def test_lora_on_all_targets_trains_every_adapter_tensor():
    model = tiny_model().train()
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=ALL_TARGETS))
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n}
    assert len(lora) == 2 * len(ALL_TARGETS) * TINY["num_layers"]
    # PEFT's "gaussian" init has lora_B = 0, so the first step can only move the B matrices; A follows at step 2
    grads = _lora_step(model, steps=1)
    changed = {n for n, p in model.named_parameters() if n in lora and not torch.equal(p, lora[n])}
    assert changed == {n for n in lora if "lora_B" in n}
    assert all(grads[n].abs().sum() > 0 for n in lora if "lora_B" in n)
    grads = _lora_step(model, steps=1)
    changed = {n for n, p in model.named_parameters() if n in lora and not torch.equal(p, lora[n])}
    assert changed == set(lora), sorted(set(lora) - changed)
    assert all(grads[n].abs().sum() > 0 for n in lora)


def test_lora_targets_cross_attention_and_ffn_only():
    model = tiny_model().train()
    model.requires_grad_(False)
    targets = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out", "ff.net.0.proj", "ff.net.2"]
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))
    names = [n for n, _ in model.named_parameters() if "lora" in n]
    assert names and not any("attn1" in n or "text_pooler" in n for n in names)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "attn1" in n}
    _lora_step(model, steps=2)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "attn1" in n)


def test_every_linear_layer_is_called_as_a_module():
    """Hooks fire only for module calls: an F.linear on a .weight (which PEFT cannot see) would leave a layer silent."""
    model = tiny_model()
    called = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda *_, name=name: called.add(name))
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    states, mask = text()
    with torch.no_grad():
        model(token_inputs(), states, mask, schedule=SMALL)
        assert called == linears
        called.clear()
        sample_with_cache(model, token_inputs(), model.prepare_condition(states, mask))
    assert called == linears


# ---------------------------------------------------------------------------------------------------------------------
# gradient checkpointing, save/load, precision


def test_training_after_sampling_under_inference_mode():
    """The schedule tables cached while sampling under inference_mode must not be inference tensors."""
    model = tiny_model()
    states, mask = text()
    with torch.inference_mode():
        sample_with_cache(model, token_inputs(), model.prepare_condition(states, mask))
        model(token_inputs(), states, mask, schedule=SMALL)
    model.train().enable_gradient_checkpointing()
    model(token_inputs(), states, mask, schedule=SMALL).sample.mean().backward()
    assert model.proj_out.weight.grad is not None


def test_gradient_checkpointing_gives_the_same_gradients():
    states, mask = text()
    inputs = token_inputs()
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(inputs, states, mask, schedule=SMALL, cond_drop_prob=0.0).sample.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model()
    states, mask = text()
    inputs = token_inputs()
    model.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = VARTransformer2DModel.from_pretrained(tmp_path / "transformer")
    assert not loaded.training and loaded.config.max_text_len == TINY["max_text_len"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs, states, mask, schedule=SMALL).sample,
                                   model(inputs, states, mask, schedule=SMALL).sample, atol=0, rtol=0)


def test_bf16_loading_keeps_text_adaln_and_head_in_float32(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    half = VARTransformer2DModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.transformer_blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    for name in ("text_pooler.to_k.weight", "context_embedder.linear_1.weight", "adaln_single.linear.weight",
                 "norm_out.linear.weight", "proj_out.weight", "uncond_text_embeds", "token_embed.weight"):
        assert half.get_parameter(name).dtype == torch.float32, name
    states, mask = text()
    inputs = token_inputs()
    with torch.no_grad():
        reference = model(inputs, states, mask, schedule=SMALL).sample
        logits = half(inputs, states, mask, schedule=SMALL).sample
        cached = sample_with_cache(half, inputs, half.prepare_condition(states, mask))
    assert logits.dtype == torch.float32
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()
    assert (cached - logits).abs().max() < 0.05 * reference.abs().max()


def test_released_configs_have_the_reference_parameter_counts():
    with torch.device("meta"):
        two_b = VARTransformer2DModel()  # the defaults are Infinity-2B
        small = VARTransformer2DModel(num_layers=12, hidden_size=768, num_attention_heads=8)
    assert all(p.is_meta for p in two_b.parameters())  # construction follows the default device (GPU, meta)
    assert sum(p.numel() for p in two_b.parameters()) == 2_204_564_032  # reference Infinity-2B
    assert sum(p.numel() for p in small.parameters()) == 125_185_696  # infinity_layer12 (125M)
    block = two_b.transformer_blocks[0]
    assert block.ff.net[0].proj.out_features == 8192 and block.scale_shift_table.shape == (1, 1, 6, 2048)
    assert two_b.text_pooler.query.shape == (1, 16, 128)


# ---------------------------------------------------------------------------------------------------------------------
# input validation


def test_clear_errors_for_bad_inputs():
    model = tiny_model()
    states, mask = text()
    inputs = token_inputs()
    with pytest.raises(ValueError, match="need 172"):
        model(inputs[:, :-1], states, mask, schedule=SMALL)
    with pytest.raises(ValueError, match="codebook_dim=8"):
        model(torch.randn(2, SMALL.total_tokens - 1, 5), states, mask, schedule=SMALL)
    with pytest.raises(ValueError, match="text_dim=32"):
        model(inputs, torch.randn(2, 7, 16), mask, schedule=SMALL)
    with pytest.raises(ValueError, match="ScaleSchedule"):
        model(inputs, states, mask)
    with pytest.raises(ValueError, match="at least one unmasked"):
        model(inputs, states, torch.zeros_like(mask), schedule=SMALL)
    with pytest.raises(ValueError, match="exactly one"):
        model(inputs, schedule=SMALL)
    with pytest.raises(ValueError, match="num_scale_embeddings"):
        model(inputs, states, mask, schedule=ScaleSchedule.from_patch_nums(range(1, 17)))


def test_forward_scale_errors_name_the_fix():
    model = tiny_model()
    condition = model.prepare_condition(*text())
    inputs = token_inputs()
    cache = model.new_kv_cache()
    with pytest.raises(ValueError, match="SOS"):
        model.forward_scale(inputs[:, :4], 0, SMALL, condition, cache)
    with pytest.raises(ValueError, match="in order"):
        model.forward_scale(scale_inputs(inputs, SMALL, 1), 1, SMALL, condition, cache)
    model.forward_scale(None, 0, SMALL, condition, cache)
    with pytest.raises(ValueError, match="only for k=0"):
        model.forward_scale(None, 1, SMALL, condition, cache)
    with pytest.raises(ValueError, match=r"scale 1 \(2x2\) of the schedule need 4"):
        model.forward_scale(inputs[:, :3], 1, SMALL, condition, cache)
    with pytest.raises(ValueError, match="CFG"):
        model.forward_scale(scale_inputs(inputs, SMALL, 1).repeat(2, 1, 1), 1, SMALL, condition, cache)
    with pytest.raises(ValueError, match="prepare_condition"):
        model.forward_scale(None, 0, SMALL, (condition.cond_BD, condition.context_BTC), model.new_kv_cache())
    with pytest.raises(ValueError, match="new_kv_cache"):
        model.forward_scale(None, 0, SMALL, condition, object())


def test_config_errors():
    with pytest.raises(ValueError, match="divisible by 4"):
        VARTransformer2DModel(**{**TINY, "num_attention_heads": 8, "hidden_size": 48})
    with pytest.raises(ValueError, match="positive integers"):
        VARTransformer2DModel(**{**TINY, "num_layers": 0})
