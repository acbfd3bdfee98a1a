"""Attention of a next-scale (VAR) transformer, as Infinity runs it: 2D RoPE, cosine self-attention over the scales,
cross-attention to the text, and the key/value cache of scale-by-scale sampling.

Reference: ``infinity/models/basic.py`` of FoundationVision/Infinity (``precompute_rope2d_freqs_grid``,
``apply_rotary_emb``, ``SelfAttention``, ``CrossAttention``), in the configuration every released script uses
(``cos_attn=True``, ``rope2d_normalized_by_hw=2``, no flash kernels).

Every projection is an ``nn.Linear`` called as a module (never ``F.linear`` on its ``.weight``), so PEFT LoRA layers
wrapped around ``to_q`` / ``to_k`` / ``to_v`` / ``to_out`` are really used. The reference computes its q/k/v with
``F.linear(x, self.mat_qkv.weight, ...)``, which silently bypasses such adapters.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------------------------------
# 2D rotary position embedding


def rope_2d_frequencies(
    positions_L2: torch.Tensor, head_dim: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines and sines of Infinity's 2D RoPE for tokens at ``(row, col)`` positions.

    The head is split in half: the first ``head_dim / 2`` channels rotate with the row index, the second half with the
    column index. Each half holds ``head_dim / 4`` adjacent channel pairs; pair ``i`` of a half turns by
    ``position * inv_freq[i]`` with ``inv_freq[i] = theta ** (-2i / (head_dim / 2))`` (``precompute_rope2d_freqs_grid``
    in the reference, computed the same way in float32).

    Args:
        positions_L2: (L, 2) integer ``(row, col)`` per token, e.g. :meth:`ScaleSchedule.rope_positions`.
        head_dim: channels per attention head; must be divisible by 4.
        theta: RoPE base.

    Returns:
        ``(cos_LP, sin_LP)``, each (L, head_dim / 2) float32: one angle per channel pair, row pairs first.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head_dim divisible by 4 (two axes of channel pairs), got {head_dim}")
    half = head_dim // 2
    exponent = torch.arange(0, half, 2, dtype=torch.int64, device=positions_L2.device).float() / half
    inv_freq = 1.0 / (theta**exponent)  # (head_dim / 4,)
    pos = positions_L2.float()
    angles_LP = torch.cat([torch.outer(pos[:, 0], inv_freq), torch.outer(pos[:, 1], inv_freq)], dim=-1)
    return angles_LP.cos(), angles_LP.sin()


def apply_rope_2d(x_BHLc: torch.Tensor, cos_LP: torch.Tensor, sin_LP: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs ``(x[2j], x[2j+1])`` of every head by the angles of their token (float32).

    Computed as one complex multiplication per pair, ``(x[2j] + i x[2j+1]) * (cos + i sin)``, which is the rotation
    ``(cos x0 - sin x1, sin x0 + cos x1)`` in one kernel (and one in the backward) instead of six.

    Args:
        x_BHLc: (B, H, L, head_dim) queries or keys, or any layout whose last dimension is the head channels and
            against which ``cos_LP`` / ``sin_LP`` broadcast, e.g. token-major (B, L, H, head_dim) with (L, 1, P) tables.
        cos_LP, sin_LP: (L, head_dim / 2) from :func:`rope_2d_frequencies` (``[:, None]`` for token-major inputs).

    Returns:
        float32, the shape of ``x_BHLc``.
    """
    if torch.compiler.is_compiling():  # the compiler has no complex kernels; it fuses the real form itself
        x0, x1 = x_BHLc.float().unflatten(-1, (-1, 2)).unbind(-1)
        return torch.stack((cos_LP * x0 - sin_LP * x1, sin_LP * x0 + cos_LP * x1), dim=-1).flatten(-2)
    pairs_BHLP = torch.view_as_complex(x_BHLc.float().contiguous().unflatten(-1, (-1, 2)))
    rotation_LP = torch.complex(cos_LP.float(), sin_LP.float())
    return torch.view_as_real(pairs_BHLP * rotation_LP).flatten(-2)


# ---------------------------------------------------------------------------------------------------------------------
# key/value cache


class KVCache:
    """Keys and values of every scale generated so far, per transformer layer, for scale-by-scale sampling.

    Self-attention: scale ``k`` attends to the cached keys/values of scales ``0..k-1`` plus its own, which is exactly
    the block-causal mask of teacher forcing, so no mask is needed. The cached keys are stored after normalisation and
    RoPE (with the scale's own positions), as in the reference.

    Cross-attention: the text keys/values do not change from scale to scale; they are computed at the first scale and
    reused (the reference recomputes them at every scale).

    A cache belongs to one generation: one prepared condition (the whole CFG batch), one schedule, scales in order.
    Make a new one (or :meth:`reset`) for the next generation.

    Keys and values are stored token-major, (B, S, H, c), and handed out as (B, H, S, c) views: a scale's tokens are
    one contiguous block of the buffer, and queries, keys and values all share the layout of the projections'
    outputs, so attention writes its output in that layout too and merging the heads is free.

    Args:
        num_layers: transformer layers.
        max_tokens: if given, keys/values are written into buffers preallocated for that many tokens
            (``schedule.total_tokens``) instead of being concatenated at every scale.
    """

    def __init__(self, num_layers: int, max_tokens: int | None = None) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        self.num_layers = num_layers
        self.max_tokens = max_tokens
        self.reset()

    def reset(self) -> None:
        """Forget everything (keeps nothing allocated)."""
        self._keys: list[torch.Tensor | None] = [None] * self.num_layers
        self._values: list[torch.Tensor | None] = [None] * self.num_layers
        self._lengths = [0] * self.num_layers
        self._cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * self.num_layers

    @property
    def seq_len(self) -> int:
        """Tokens cached by every layer (the token offset of the next scale)."""
        return min(self._lengths)

    @property
    def is_consistent(self) -> bool:
        """False after a scale was interrupted half-way through the layers."""
        return len(set(self._lengths)) == 1

    def update(self, layer_idx: int, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append one scale's keys/values for a layer; return the keys/values of all cached tokens (B, H, L, c)."""
        old_k = self._keys[layer_idx]
        if old_k is not None and (old_k.shape[0], old_k.shape[2], old_k.shape[3]) != (
            k_BHlc.shape[0], k_BHlc.shape[1], k_BHlc.shape[3]
        ):
            raise ValueError(
                f"KV cache of layer {layer_idx} holds batch {old_k.shape[0]}, but this scale has batch "
                f"{k_BHlc.shape[0]}; use one cache per generation with the same (CFG) batch at every scale"
            )
        start, end = self._lengths[layer_idx], self._lengths[layer_idx] + k_BHlc.shape[2]
        k_BlHc, v_BlHc = k_BHlc.transpose(1, 2), v_BHlc.transpose(1, 2)
        if self.max_tokens is None:
            self._keys[layer_idx] = k_BlHc if old_k is None else torch.cat((old_k, k_BlHc), dim=1)
            self._values[layer_idx] = v_BlHc if old_k is None else torch.cat((self._values[layer_idx], v_BlHc), dim=1)
            self._lengths[layer_idx] = end
            return self._keys[layer_idx].transpose(1, 2), self._values[layer_idx].transpose(1, 2)
        if end > self.max_tokens:
            raise ValueError(f"KV cache holds at most {self.max_tokens} tokens, this scale would need {end}")
        if old_k is None:
            shape = (k_BHlc.shape[0], self.max_tokens, *k_BlHc.shape[2:])  # (B, S, H, c)
            self._keys[layer_idx] = k_BHlc.new_empty(shape)
            self._values[layer_idx] = v_BHlc.new_empty(shape)
        self._keys[layer_idx][:, start:end] = k_BlHc
        self._values[layer_idx][:, start:end] = v_BlHc
        self._lengths[layer_idx] = end
        return self._keys[layer_idx][:, :end].transpose(1, 2), self._values[layer_idx][:, :end].transpose(1, 2)

    def reserve(self, max_tokens: int) -> None:
        """Preallocate for ``max_tokens`` tokens from the next allocation on (no effect once buffers exist, except an
        error if they are too small)."""
        if self.max_tokens is None and all(k is None for k in self._keys):
            self.max_tokens = max_tokens
        elif self.max_tokens is not None and self.max_tokens < max_tokens:
            raise ValueError(f"this KV cache holds at most {self.max_tokens} tokens, the schedule has {max_tokens}; "
                             "use a new cache per generation")

    def truncate(self, num_tokens: int) -> None:
        """Keep only the first ``num_tokens`` tokens of every layer (e.g. 0 to start a new generation), keeping the
        preallocated buffers and the text keys/values (:meth:`clear_text` drops those). CUDA-graph replay uses this
        to rewind a cache whose buffers must stay at the same addresses."""
        if not 0 <= num_tokens <= (self.max_tokens if self.max_tokens is not None else min(self._lengths)):
            raise ValueError(f"cannot truncate a KV cache of {self.seq_len} tokens (max {self.max_tokens}) to "
                             f"{num_tokens}")
        self._lengths = [num_tokens] * self.num_layers

    def clear_text(self) -> None:
        """Forget the cached text keys/values (they are recomputed at the next scale)."""
        self._cross = [None] * self.num_layers

    def cross_kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached text keys/values of a layer, or None before the first scale."""
        return self._cross[layer_idx]

    def set_cross_kv(self, layer_idx: int, k_BHTc: torch.Tensor, v_BHTc: torch.Tensor) -> None:
        self._cross[layer_idx] = (k_BHTc, v_BHTc)

    def __repr__(self) -> str:
        return f"KVCache(num_layers={self.num_layers}, seq_len={self.seq_len}, max_tokens={self.max_tokens})"


# ---------------------------------------------------------------------------------------------------------------------
# attention modules


def block_causal_attention(
    q_BHLc: torch.Tensor, k_BHLc: torch.Tensor, v_BHLc: torch.Tensor, scale_offsets: tuple[int, ...],
    scale: float | None = None,
) -> torch.Tensor:
    """Attention under the block-causal mask over scales (a token sees its own and all coarser scales), computed
    scale by scale: the queries of scale k attend, unmasked, to the keys ``[0, offsets[k + 1])``.

    Equal to ``scaled_dot_product_attention(q, k, v, attn_mask=schedule.block_causal_mask())`` but without the
    (L, L) mask, so the fused (flash) kernels apply and the invisible 38% of the score matrix is never computed
    (at 1024x1024 on an H200: 2.2 vs 9.1 ms forward, 11.7 vs 28.3 ms forward + backward per layer, batch 2).

    The queries are split (their gradients are concatenated once) and the key/value prefixes come from
    :func:`prefix_views` (their gradients are added in place into one buffer), so the backward does not build a
    full-size zero gradient per scale and view as plain slicing would.
    """
    sizes = [end - start for start, end in zip(scale_offsets[:-1], scale_offsets[1:])]
    ends = tuple(scale_offsets[1:])
    queries = q_BHLc.split(sizes, dim=2)
    keys, values = prefix_views(k_BHLc, ends), prefix_views(v_BHLc, ends)
    outs = [F.scaled_dot_product_attention(q, k, v, scale=scale) for q, k, v in zip(queries, keys, values)]
    return torch.cat([out.transpose(1, 2) for out in outs], dim=1).transpose(1, 2)  # token-major, like q


class _PrefixViews(torch.autograd.Function):
    """``x[:, :, :end]`` for every ``end``; the backward adds each prefix's gradient into one buffer in place."""

    @staticmethod
    def forward(ctx, x_BHLc: torch.Tensor, ends: tuple[int, ...]):  # noqa: D102 - see prefix_views
        ctx.ends, ctx.length = ends, x_BHLc.shape[2]
        return tuple(x_BHLc[:, :, :end] for end in ends)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        grad_BHLc = None
        for grad, end in sorted(zip(grads, ctx.ends), key=lambda pair: -pair[1]):  # longest prefix first
            if grad is None:
                continue
            if grad_BHLc is None:
                grad_BHLc = grad.new_zeros((*grad.shape[:2], ctx.length, grad.shape[3]))
                if end == ctx.length:
                    grad_BHLc.copy_(grad)
                    continue
            grad_BHLc[:, :, :end] += grad
        return grad_BHLc, None


def prefix_views(x_BHLc: torch.Tensor, ends: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """The prefixes ``x[:, :, :end]`` (views) of a (B, H, L, c) tensor, for each ``end``.

    Autograd's own slicing backward gives every prefix a full-size zero gradient and then sums them (13 full-size
    temporaries per tensor and layer at 1024x1024); here the prefix gradients are added in place into one buffer.
    Under ``torch.compile`` plain slicing is used (the compiler fuses those adds itself).
    """
    if not x_BHLc.requires_grad or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return tuple(x_BHLc[:, :, :end] for end in ends)
    return _PrefixViews.apply(x_BHLc, ends)


class _TextAttention(torch.autograd.Function):
    """Attention from many image tokens to a short text: the fused SDPA kernel forward, a written-out backward.

    With 10,521 queries and 23-27 keys per head (Infinity-2B at 1024x1024), the flash-style backward kernels spend about
    1 ms per layer: they split the work by key blocks, and a short text is a single key block. The backward below is
    five small matrix products over the (B, H, L, T) probabilities, recomputed in float32 from the saved q and k: the
    scores, ``dP = dO V^T`` and the softmax backward in float32, the products with ``dS`` and ``P`` in the inputs'
    dtype, as the flash backward does. The text is padded to a multiple of 8 keys (masked out) so the products use
    aligned kernels. The result equals autograd through SDPA to float32 rounding (``tests/test_attention.py``).
    """

    @staticmethod
    def forward(ctx, q_BHLc, k_BHTc, v_BHTc, mask_B11T, scale: float):  # noqa: D102 - see the class
        out_BHLc = F.scaled_dot_product_attention(q_BHLc, k_BHTc, v_BHTc, attn_mask=mask_B11T, scale=scale)
        ctx.save_for_backward(q_BHLc, k_BHTc, v_BHTc, out_BHLc, mask_B11T)
        ctx.scale = scale
        return out_BHLc

    @staticmethod
    def backward(ctx, grad_BHLc):  # noqa: D102 - see the class
        q_BHLc, k_BHTc, v_BHTc, out_BHLc, mask_B11T = ctx.saved_tensors
        num_text, pad = k_BHTc.shape[2], (-k_BHTc.shape[2]) % 8
        k_BHTc, v_BHTc = F.pad(k_BHTc, (0, 0, 0, pad)), F.pad(v_BHTc, (0, 0, 0, pad))
        mask_B11T = F.pad(mask_B11T, (0, pad), value=False)
        acc = torch.promote_types(q_BHLc.dtype, torch.float32)  # float32, or float64 for float64 inputs
        scores_BHLT = torch.matmul(q_BHLc.to(acc), k_BHTc.to(acc).transpose(-1, -2)) * ctx.scale
        probs_BHLT = torch.softmax(scores_BHLT.masked_fill(~mask_B11T, float("-inf")), dim=-1)
        grad_f_BHLc = grad_BHLc.to(acc)
        dprobs_BHLT = torch.matmul(grad_f_BHLc, v_BHTc.to(acc).transpose(-1, -2))
        delta_BHL1 = (grad_f_BHLc * out_BHLc.to(acc)).sum(-1, keepdim=True)
        dscores_BHLT = (probs_BHLT * (dprobs_BHLT - delta_BHL1) * ctx.scale).to(q_BHLc.dtype)
        dq = torch.matmul(dscores_BHLT, k_BHTc) if ctx.needs_input_grad[0] else None
        dk = torch.matmul(dscores_BHLT.transpose(-1, -2), q_BHLc)[:, :, :num_text] if ctx.needs_input_grad[1] else None
        dv = (torch.matmul(probs_BHLT.to(v_BHTc.dtype).transpose(-1, -2), grad_BHLc.to(v_BHTc.dtype))[:, :, :num_text]
              if ctx.needs_input_grad[2] else None)
        return dq, dk, dv, None, None


def text_attention(q_BHLc: torch.Tensor, k_BHTc: torch.Tensor, v_BHTc: torch.Tensor,
                   mask_B11T: torch.Tensor) -> torch.Tensor:
    """Softmax attention to the text, ``scaled_dot_product_attention(q, k, v, attn_mask=mask)``; with gradients, its
    backward is :class:`_TextAttention`'s. ``mask_B11T``: (B, 1, 1, T) bool, True for real text tokens (each row has
    at least one)."""
    scale = q_BHLc.shape[-1] ** -0.5
    if torch.is_grad_enabled() and (q_BHLc.requires_grad or k_BHTc.requires_grad or v_BHTc.requires_grad):
        return _TextAttention.apply(q_BHLc, k_BHTc, v_BHTc, mask_B11T, scale)
    return F.scaled_dot_product_attention(q_BHLc, k_BHTc, v_BHTc, attn_mask=mask_B11T, scale=scale)


def cross_attention_probabilities(q_BHLc: torch.Tensor, k_BHTc: torch.Tensor,
                                  mask_B11T: torch.Tensor) -> torch.Tensor:
    """(B, H, L, T) float32 softmax attention probabilities of :func:`text_attention` (the same scores, scale and
    mask; masked text tokens get probability 0), written out so they can be read and differentiated."""
    scores_BHLT = torch.matmul(q_BHLc.float(), k_BHTc.float().transpose(-1, -2)) * q_BHLc.shape[-1] ** -0.5
    return torch.softmax(scores_BHLT.masked_fill(~mask_B11T, float("-inf")), dim=-1)


def _l2_norm(x: torch.Tensor) -> torch.Tensor:
    """float32 L2 norm over the head channels (the last dimension), kept as a dimension of size 1."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)


def _split_heads(x_BLC: torch.Tensor, num_heads: int) -> torch.Tensor:
    return x_BLC.unflatten(-1, (num_heads, -1)).transpose(1, 2)  # (B, H, L, c)


def _merge_heads(x_BHLc: torch.Tensor) -> torch.Tensor:
    return x_BHLc.transpose(1, 2).flatten(2)  # (B, L, C)


class CosineSelfAttention(nn.Module):
    """Infinity's self-attention over the scales (``attn1``): cosine attention with a learned per-head temperature.

    ``q`` and ``k`` are L2-normalised per head, ``q`` is multiplied by ``exp(min(log_scale, ln max_attn_scale))``
    (``scale_mul_1H11`` in the reference, initialised to ln 4), 2D RoPE is applied after the normalisation, and the
    softmax scale is 1. ``q`` and ``v`` have biases, ``k`` has none (the reference's ``zero_k_bias``). Normalisation,
    temperature and RoPE are computed in float32; the attention itself in the dtype of ``v``.

    Args:
        dim: model width C.
        num_heads: attention heads H (``dim / H`` must be divisible by 4 for 2D RoPE).
        max_attn_scale: upper bound of the learned temperature (100 in Infinity).
    """

    def __init__(self, dim: int, num_heads: int, max_attn_scale: float = 100.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.max_log_scale = math.log(max_attn_scale)
        self.to_q = nn.Linear(dim, dim, bias=True)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=True)
        self.to_out = nn.Linear(dim, dim, bias=True)
        self.log_scale = nn.Parameter(torch.full((1, num_heads, 1, 1), math.log(4.0)))  # per head, (1, H, 1, 1)

    def forward(
        self,
        x_BLC: torch.Tensor,
        rope_cos_LP: torch.Tensor,
        rope_sin_LP: torch.Tensor,
        scale_offsets: tuple[int, ...] | None = None,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        """Args:
            x_BLC: (B, L, C) normalised and modulated tokens (the current scale only when ``kv_cache`` is given).
            rope_cos_LP, rope_sin_LP: RoPE tables of exactly these L tokens (already offset to their positions).
            scale_offsets: token offsets of the scales (``schedule.offsets``): teacher forcing under the
                block-causal mask (:func:`block_causal_attention`).
            kv_cache: sampling: this scale's keys/values are appended to the cache of the earlier scales and the
                queries attend to all of them.
            layer_idx: index of this layer in the cache.

        With neither ``scale_offsets`` nor ``kv_cache`` every token attends to every token.
        """
        # normalisation and RoPE run token-major, (B, L, H, c), the layout of the projections' outputs: q and k keep
        # it (the (B, H, L, c) tensors below are views), and so do the attention output and the KV cache
        q_BLHc = self.to_q(x_BLC).unflatten(-1, (self.num_heads, -1))
        k_BLHc = self.to_k(x_BLC).unflatten(-1, (self.num_heads, -1))
        v_BHLc = _split_heads(self.to_v(x_BLC), self.num_heads)
        cos_L1P, sin_L1P = rope_cos_LP[:, None], rope_sin_LP[:, None]
        with torch.autocast(device_type=x_BLC.device.type, enabled=False):
            temperature_11H1 = self.log_scale.float().clamp(max=self.max_log_scale).exp().transpose(1, 2)
            # L2 normalisation and temperature as one per-token factor (F.normalize's max(||x||, eps) divisor)
            q_scale_BLH1 = temperature_11H1 / _l2_norm(q_BLHc).clamp_min(1e-12)
            k_scale_BLH1 = _l2_norm(k_BLHc).clamp_min(1e-12).reciprocal()
            q_BHLc = (apply_rope_2d(q_BLHc, cos_L1P, sin_L1P) * q_scale_BLH1).to(v_BHLc.dtype).transpose(1, 2)
            k_BHLc = (apply_rope_2d(k_BLHc, cos_L1P, sin_L1P) * k_scale_BLH1).to(v_BHLc.dtype).transpose(1, 2)
        if kv_cache is not None:
            out_BHLc = _attend_through_cache(kv_cache, layer_idx, q_BHLc, k_BHLc, v_BHLc)
        elif scale_offsets is not None:
            out_BHLc = block_causal_attention(q_BHLc, k_BHLc, v_BHLc, scale_offsets, scale=1.0)
        else:
            out_BHLc = F.scaled_dot_product_attention(q_BHLc, k_BHLc, v_BHLc, scale=1.0)
        return self.to_out(_merge_heads(out_BHLc))


class CrossAttention(nn.Module):
    """Cross-attention from the image tokens to the projected text (``attn2``), softmax scale ``1/sqrt(head_dim)``.

    Padding tokens of the text are masked out, which equals the reference's unpadded variable-length attention.
    ``q`` and ``v`` have biases, ``k`` has none (the reference's ``mat_kv`` + ``v_bias``).

    ``attention_probe``: None (default), or a callable that every forward hands the (B, H, L, T) float32 attention
    probabilities (:func:`cross_attention_probabilities`, with gradients; computed only when a probe is set, the
    attention itself stays the fused kernel). Forget-Me-Not reads them (:mod:`var_erase.erasure.fmn`).

    Args:
        dim: model width C (queries and output).
        context_dim: width of the text memory.
        num_heads: attention heads.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=True)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=True)
        self.to_out = nn.Linear(dim, dim, bias=True)
        self.attention_probe: Callable[[torch.Tensor], None] | None = None

    def forward(
        self,
        x_BLC: torch.Tensor,
        context_BTC: torch.Tensor,
        context_mask_B11T: torch.Tensor,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        """Args:
            x_BLC: (B, L, C) normalised tokens.
            context_BTC: (B, T, context_dim) projected text.
            context_mask_B11T: (B, 1, 1, T) bool, True for real text tokens.
            kv_cache: if given, the text keys/values are computed once and reused at later scales.
        """
        q_BHLc = _split_heads(self.to_q(x_BLC), self.num_heads)
        if kv_cache is not None:
            k_BHTc, v_BHTc = _cached_text_kv(self, context_BTC, kv_cache, layer_idx)
        else:
            k_BHTc, v_BHTc = self.text_kv(context_BTC)
        if self.attention_probe is not None:
            self.attention_probe(cross_attention_probabilities(q_BHLc, k_BHTc, context_mask_B11T))
        out_BHLc = text_attention(q_BHLc, k_BHTc.to(q_BHLc.dtype), v_BHTc.to(q_BHLc.dtype), context_mask_B11T)
        return self.to_out(_merge_heads(out_BHLc))

    def text_kv(self, context_BTC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, T, c) keys and values of the text."""
        heads = self.num_heads
        return _split_heads(self.to_k(context_BTC), heads), _split_heads(self.to_v(context_BTC), heads)


# The two KV-cache steps of sampling stay out of torch.compile (``compile_repeated_blocks``): the cache is Python state
# (per-layer buffers and token counts) that would make the compiler specialise the block on every layer and scale.
# Excluded, they are graph breaks, and the compiled pieces around them serve every layer and scale.


@torch.compiler.disable
def _attend_through_cache(kv_cache: KVCache, layer_idx: int, q_BHlc: torch.Tensor, k_BHlc: torch.Tensor,
                          v_BHlc: torch.Tensor) -> torch.Tensor:
    """Append this scale's keys/values to the layer's cache, then attend from this scale's queries to all of them."""
    k_BHSc, v_BHSc = kv_cache.update(layer_idx, k_BHlc, v_BHlc)
    return F.scaled_dot_product_attention(q_BHlc, k_BHSc, v_BHSc, scale=1.0)


@torch.compiler.disable
def _cached_text_kv(attn: CrossAttention, context_BTC: torch.Tensor, kv_cache: KVCache,
                    layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The text keys/values of ``attn``, computed at the first scale and reused from ``kv_cache`` afterwards."""
    cached = kv_cache.cross_kv(layer_idx)
    if cached is None:
        cached = attn.text_kv(context_BTC)
        kv_cache.set_cross_kv(layer_idx, *cached)
    return cached


class TextAttentivePool(nn.Module):
    """Attentive pooling of the text into one vector (Infinity's ``TextAttentivePool``): a learned query per head
    attends to the text (keys without bias, values with bias, softmax scale ``1/sqrt(head_dim)``), then ``to_out``.

    Args:
        text_dim: width of the text features.
        dim: output width D (= model width in Infinity); ``head_dim = dim / num_heads``.
        num_heads: pooling heads (Infinity: ``text_dim // 128``, or ``// 64`` when ``dim > 4096``).
    """

    def __init__(self, text_dim: int, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"pooling width {dim} is not divisible by pool_num_heads={num_heads}")
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, num_heads, dim // num_heads))  # (1, H, c)
        self.to_k = nn.Linear(text_dim, dim, bias=False)
        self.to_v = nn.Linear(text_dim, dim, bias=True)
        self.to_out = nn.Linear(dim, dim, bias=True)

    def forward(self, text_BTC: torch.Tensor, mask_B11T: torch.Tensor) -> torch.Tensor:
        """(B, T, text_dim) normalised text and its (B, 1, 1, T) bool mask -> pooled (B, D)."""
        k_BHTc = _split_heads(self.to_k(text_BTC), self.num_heads)
        v_BHTc = _split_heads(self.to_v(text_BTC), self.num_heads)
        q_BH1c = self.query.to(v_BHTc.dtype).unsqueeze(2).expand(text_BTC.shape[0], -1, -1, -1)
        pooled_BH1c = F.scaled_dot_product_attention(q_BH1c, k_BHTc, v_BHTc, attn_mask=mask_B11T)
        return self.to_out(_merge_heads(pooled_BH1c)[:, 0])
