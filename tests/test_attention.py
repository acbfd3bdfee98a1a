"""2D RoPE, cosine self-attention, cross-attention, attentive pooling and the KV cache (var_erase.models.attention)."""

import math

import pytest
import torch
import torch.nn.functional as F

from var_erase.models.attention import (
    CosineSelfAttention,
    CrossAttention,
    KVCache,
    TextAttentivePool,
    apply_rope_2d,
    block_causal_attention,
    prefix_views,
    rope_2d_frequencies,
    text_attention,
)
from var_erase.models.transformer_var import VARTransformerBlock
from var_erase.schedules import ScaleSchedule


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _randomise(module, std=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)
    return module


# ---------------------------------------------------------------------------------------------------------------------
# 2D RoPE


def test_rope_frequencies_follow_infinity_formula():
    head_dim, theta = 16, 10000.0
    positions = torch.tensor([[3, 5], [0, 7]])
    cos, sin = rope_2d_frequencies(positions, head_dim, theta)
    assert cos.shape == sin.shape == (2, head_dim // 2)
    inv_freq = torch.tensor([theta ** (-2 * i / (head_dim / 2)) for i in range(head_dim // 4)])
    expected = torch.cat([positions[:, :1] * inv_freq, positions[:, 1:] * inv_freq], dim=1)  # rows first, then cols
    torch.testing.assert_close(cos, expected.cos())
    torch.testing.assert_close(sin, expected.sin())


def test_rope_rotates_adjacent_pairs_rows_in_first_half_cols_in_second():
    head_dim = 8
    x = torch.randn(1, 1, 1, head_dim)
    row_only = apply_rope_2d(x, *rope_2d_frequencies(torch.tensor([[5, 0]]), head_dim))
    col_only = apply_rope_2d(x, *rope_2d_frequencies(torch.tensor([[0, 5]]), head_dim))
    torch.testing.assert_close(row_only[..., head_dim // 2:], x[..., head_dim // 2:])  # cols untouched by a row move
    torch.testing.assert_close(col_only[..., : head_dim // 2], x[..., : head_dim // 2])
    # pair (x0, x1) turned by angle 5 * inv_freq[0] = 5 radians, as a complex multiplication
    z = torch.complex(x[..., 0], x[..., 1]) * torch.exp(torch.tensor(5.0j))
    torch.testing.assert_close(row_only[..., 0], z.real)
    torch.testing.assert_close(row_only[..., 1], z.imag)


def test_rope_scores_depend_only_on_relative_position():
    head_dim = 16
    q, k = torch.randn(1, 1, 1, head_dim), torch.randn(1, 1, 1, head_dim)

    def score(pq, pk):
        rq = apply_rope_2d(q, *rope_2d_frequencies(torch.tensor([pq]), head_dim))
        rk = apply_rope_2d(k, *rope_2d_frequencies(torch.tensor([pk]), head_dim))
        return (rq * rk).sum()

    torch.testing.assert_close(score([2, 3], [5, 1]), score([10, 12], [13, 10]), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score([2, 3], [5, 1]), score([2, 3], [5, 2]))


def test_rope_needs_head_dim_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d_frequencies(torch.zeros(1, 2, dtype=torch.long), 6)


# ---------------------------------------------------------------------------------------------------------------------
# cosine self-attention


def test_cosine_self_attention_matches_the_formula():
    dim, heads, L = 32, 4, 6
    attn = _randomise(CosineSelfAttention(dim, heads)).eval()
    x = torch.randn(2, L, dim)
    positions = torch.randint(0, 9, (L, 2))
    cos, sin = rope_2d_frequencies(positions, dim // heads)

    def split(t):
        return t.view(2, L, heads, -1).transpose(1, 2)

    q = F.normalize(split(x @ attn.to_q.weight.T + attn.to_q.bias), dim=-1)
    k = F.normalize(split(x @ attn.to_k.weight.T), dim=-1)  # no k bias
    v = split(x @ attn.to_v.weight.T + attn.to_v.bias)
    q = q * attn.log_scale.clamp(max=math.log(100.0)).exp()
    q, k = apply_rope_2d(q, cos, sin), apply_rope_2d(k, cos, sin)
    probs = (q @ k.transpose(-1, -2)).softmax(-1)  # softmax scale 1
    expected = (probs @ v).transpose(1, 2).reshape(2, L, dim) @ attn.to_out.weight.T + attn.to_out.bias
    torch.testing.assert_close(attn(x, cos, sin), expected, atol=1e-5, rtol=1e-5)
    assert attn.to_k.bias is None and attn.log_scale.shape == (1, heads, 1, 1)


def test_cosine_attention_temperature_is_clamped_at_max_attn_scale():
    attn = CosineSelfAttention(16, 2, max_attn_scale=100.0).eval()
    x = torch.randn(1, 5, 16)
    cos, sin = rope_2d_frequencies(torch.randint(0, 4, (5, 2)), 8)
    with torch.no_grad():
        attn.log_scale.fill_(math.log(100.0))
        at_bound = attn(x, cos, sin)
        attn.log_scale.fill_(20.0)
        above = attn(x, cos, sin)
    torch.testing.assert_close(above, at_bound)


@pytest.mark.parametrize("scale", [1.0, None])
def test_scale_by_scale_attention_equals_the_block_causal_mask(scale):
    schedule = ScaleSchedule.from_infinity(0.75, "0.06M").truncated(5)
    q, k, v = (torch.randn(2, 3, schedule.total_tokens, 8) for _ in range(3))
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=schedule.block_causal_mask(), scale=scale)
    torch.testing.assert_close(block_causal_attention(q, k, v, schedule.offsets, scale=scale), masked)


def test_self_attention_with_kv_cache_equals_block_causal_attention():
    schedule = ScaleSchedule.from_patch_nums((1, 2, 3))
    dim, heads = 32, 4
    attn = _randomise(CosineSelfAttention(dim, heads)).eval()
    x = torch.randn(2, schedule.total_tokens, dim)
    cos, sin = rope_2d_frequencies(schedule.rope_positions(), dim // heads)
    full = attn(x, cos, sin, scale_offsets=schedule.offsets)
    for max_tokens in (None, schedule.total_tokens):
        cache = KVCache(num_layers=1, max_tokens=max_tokens)
        pieces = []
        for k in range(schedule.num_scales):
            rows = schedule.scale_slice(k)
            pieces.append(attn(x[:, rows], cos[rows], sin[rows], None, cache, 0))
        torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
        assert cache.seq_len == schedule.total_tokens


# ---------------------------------------------------------------------------------------------------------------------
# cross-attention and pooling: padding masked out == the reference's unpadded (variable-length) attention


def test_cross_attention_masking_equals_unpadded_text():
    dim, ctx_dim, heads = 32, 24, 4
    attn = _randomise(CrossAttention(dim, ctx_dim, heads)).eval()
    x, text = torch.randn(2, 5, dim), torch.randn(2, 7, ctx_dim)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    out = attn(x, text, mask[:, None, None, :])
    torch.testing.assert_close(out[1:], attn(x[1:], text[1:, :3], torch.ones(1, 1, 1, 3, dtype=torch.bool)))
    assert attn.to_k.bias is None and attn.to_v.bias is not None


@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, True)])
def test_text_attention_backward_equals_autograd_through_sdpa(needs):
    """The written-out backward (text padded to 8 keys, masked) gives SDPA's gradients, for any subset of inputs."""
    B, H, L, T, c = 2, 3, 10, 11, 8
    q, k, v = (torch.randn(B, H, n, c, dtype=torch.float64) for n in (L, T, T))
    for t, need in zip((q, k, v), needs):
        t.requires_grad_(need)
    mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
    mask[1, ..., 4:] = False  # the second prompt has 4 text tokens
    grad_out = torch.randn(B, H, L, c, dtype=torch.float64)
    inputs = [t for t in (q, k, v) if t.requires_grad]
    ours = text_attention(q, k, v, mask)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(ours, expected)
    got = torch.autograd.grad(ours, inputs, grad_out)
    for got_one, want in zip(got, torch.autograd.grad(expected, inputs, grad_out)):
        torch.testing.assert_close(got_one, want)
    if needs[1]:
        grad_k = next(g for g, t in zip(got, inputs) if t is k)
        assert grad_k[1, :, 4:].eq(0).all()  # masked keys get no gradient


def test_text_attention_backward_in_bf16_is_within_bf16_rounding_of_float32():
    q, k, v = (torch.randn(1, 2, n, 16) for n in (64, 13, 13))
    mask, grad_out = torch.ones(1, 1, 1, 13, dtype=torch.bool), torch.randn(1, 2, 64, 16)
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        grads[dtype] = torch.autograd.grad(text_attention(*leaves, mask), leaves, grad_out.to(dtype))
    for low, high in zip(grads[torch.bfloat16], grads[torch.float32]):
        torch.testing.assert_close(low.float(), high, atol=3e-2, rtol=3e-2)


def test_self_attention_lora_on_a_projection_is_used_in_training():
    """A PEFT adapter on ``attn1``'s q projection is applied and trained (the reference's ``F.linear`` on the raw
    weight bypasses it)."""
    from peft import LoraConfig, inject_adapter_in_model

    dim, heads, L = 32, 4, 6
    attn = _randomise(CosineSelfAttention(dim, heads))
    cos, sin = rope_2d_frequencies(torch.randint(0, 9, (L, 2)), dim // heads)
    x = torch.randn(2, L, dim)
    with torch.no_grad():
        base = attn(x, cos, sin)
    attn = inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q"], init_lora_weights=False), attn)
    out = attn(x, cos, sin)
    with torch.no_grad():
        torch.testing.assert_close(out, attn(x, cos, sin))
    assert not torch.allclose(out, base)
    lora = [p for n, p in attn.named_parameters() if "lora_" in n]
    assert lora and all(g.abs().sum() > 0 for g in torch.autograd.grad(out.square().sum(), lora))


def test_cross_attention_caches_text_keys_and_values():
    attn = _randomise(CrossAttention(16, 16, 2)).eval()
    text, mask = torch.randn(1, 4, 16), torch.ones(1, 1, 1, 4, dtype=torch.bool)
    cache = KVCache(num_layers=1)
    first = attn(torch.randn(1, 3, 16), text, mask, cache, 0)
    assert cache.cross_kv(0) is not None and first.shape == (1, 3, 16)
    x = torch.randn(1, 2, 16)
    torch.testing.assert_close(attn(x, text, mask, cache, 0), attn(x, text, mask))


def test_attentive_pool_masking_equals_unpadded_text():
    pool = _randomise(TextAttentivePool(text_dim=24, dim=32, num_heads=2)).eval()
    text = torch.randn(2, 6, 24)
    mask = torch.tensor([[True] * 6, [True] * 2 + [False] * 4])
    pooled = pool(text, mask[:, None, None, :])
    assert pooled.shape == (2, 32)
    torch.testing.assert_close(pooled[1:], pool(text[1:, :2], torch.ones(1, 1, 1, 2, dtype=torch.bool)))


# ---------------------------------------------------------------------------------------------------------------------
# KV cache bookkeeping


@pytest.mark.parametrize("max_tokens", [None, 9])
def test_kv_cache_returns_every_appended_token_from_token_major_storage(max_tokens):
    """Two scales appended: the returned (B, H, S, c) keys/values are the inputs in order, viewed from (B, S, H, c)
    storage (a scale is one contiguous block; attention on such views writes token-major outputs)."""
    cache = KVCache(num_layers=1, max_tokens=max_tokens)
    scales = [(torch.randn(2, 4, n, 8), torch.randn(2, 4, n, 8)) for n in (1, 4)]
    for k, v in scales:
        keys, values = cache.update(0, k, v)
    torch.testing.assert_close(keys, torch.cat([k for k, _ in scales], dim=2), rtol=0, atol=0)
    torch.testing.assert_close(values, torch.cat([v for _, v in scales], dim=2), rtol=0, atol=0)
    assert keys.shape == (2, 4, 5, 8) and keys.stride()[1:] == (8, 4 * 8, 1) == values.stride()[1:]


def test_kv_cache_rejects_a_batch_change_and_overflow():
    cache = KVCache(num_layers=2, max_tokens=3)
    cache.update(0, torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4))
    assert not cache.is_consistent and cache.seq_len == 0  # layer 1 has not seen the scale yet
    with pytest.raises(ValueError, match="batch"):
        cache.update(0, torch.randn(1, 1, 1, 4), torch.randn(1, 1, 1, 4))
    with pytest.raises(ValueError, match="at most 3 tokens"):
        cache.update(0, torch.randn(2, 1, 2, 4), torch.randn(2, 1, 2, 4))
    cache.reset()
    assert cache.seq_len == 0 and cache.is_consistent


def test_block_causal_attention_gradients_equal_the_masked_reference():
    """The split queries and the in-place prefix gradients of the keys/values give the masked attention's gradients."""
    schedule = ScaleSchedule.from_infinity(0.75, "0.06M").truncated(5)
    q, k, v = (torch.randn(2, 3, schedule.total_tokens, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(2, 3, schedule.total_tokens, 8, dtype=torch.float64)
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=schedule.block_causal_mask())
    expected = torch.autograd.grad(masked, (q, k, v), grad_out)
    ours = torch.autograd.grad(block_causal_attention(q, k, v, schedule.offsets), (q, k, v), grad_out)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want)


def test_prefix_views_backward_adds_every_prefix_gradient():
    x = torch.randn(1, 2, 7, 4, dtype=torch.float64, requires_grad=True)
    ends = (1, 3, 7)
    torch.autograd.gradcheck(lambda t: sum((p * p.sum()).sum() for p in prefix_views(t, ends)), (x,))
    grads = torch.autograd.grad(prefix_views(x, (2, 5))[0].sum(), x)[0]  # an unused prefix gets no gradient
    assert grads[:, :, :2].eq(1).all() and grads[:, :, 2:].eq(0).all()


def test_bf16_block_keeps_a_float32_residual_stream():
    block = VARTransformerBlock(16, 2, 32, 1e-6, 100.0).to(torch.bfloat16)
    x = torch.randn(1, 5, 16)
    cos, sin = rope_2d_frequencies(torch.randint(0, 4, (5, 2)), 8)
    out = block(x, torch.randn(1, 1, 6, 16), torch.randn(1, 3, 16, dtype=torch.bfloat16),
                torch.ones(1, 1, 1, 3, dtype=torch.bool), cos, sin)
    assert out.dtype == torch.float32 and out.shape == x.shape and out.isfinite().all()


def test_rope_real_form_used_under_compile_equals_the_complex_form(monkeypatch):
    x = torch.randn(2, 3, 7, 8)
    cos, sin = rope_2d_frequencies(torch.randint(0, 5, (7, 2)), 8)
    complex_form = apply_rope_2d(x, cos, sin)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(apply_rope_2d(x, cos, sin), complex_form)


@pytest.mark.gpu
def test_text_attention_backward_matches_the_fused_kernels_on_cuda():
    """bf16 at Infinity-2B's shapes (16 heads of 128, 27 text tokens, one prompt padded to 23): the written-out
    backward is as close to float32 as the fused SDPA backward is."""
    q, k, v = (torch.randn(2, 16, n, 128, device="cuda") for n in (4096, 27, 27))
    mask = torch.ones(2, 1, 1, 27, dtype=torch.bool, device="cuda")
    mask[1, ..., 23:] = False
    grad_out = torch.randn(2, 16, 4096, 128, device="cuda")

    def grads(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(fn(*leaves, mask), leaves, grad_out.to(dtype))

    exact = grads(text_attention, torch.float32)
    sdpa = grads(lambda a, b, c, m: F.scaled_dot_product_attention(a, b, c, attn_mask=m), torch.bfloat16)
    ours = grads(text_attention, torch.bfloat16)
    for mine, theirs, want in zip(ours, sdpa, exact):
        err_ours, err_sdpa = (mine.float() - want).abs().max(), (theirs.float() - want).abs().max()
        assert err_ours <= 1.5 * err_sdpa + 1e-3, (err_ours, err_sdpa)
