"""``VARTransformer2DModel``: Infinity's text-to-image next-scale transformer (Infinity-2B architecture).

Reference: ``infinity/models/infinity.py`` (``Infinity``) and ``infinity/models/basic.py`` (``CrossAttnBlock``,
``AdaLNBeforeHead``) of FoundationVision/Infinity, in the configuration every released script uses: shared AdaLN,
cosine self-attention, LayerNorm (eps 1e-6), bitwise head, scale embedding added once before block 0, 2D RoPE laid on
the 1M reference grid, no absolute position embedding. Parameter names are diffusers/PEFT-friendly; the converter in
:mod:`var_erase.conversion.infinity` maps the official checkpoints onto them.

Data flow (B batch, L tokens of all scales, C width, D = C condition width, T text tokens, d bits per token)::

    text (B, T, text_dim) --text_norm--> --text_pooler--> cond_BD --adaln_single--> AdaLN (B, 1, 6, C)
                                     \\--context_embedder--> cross-attention memory (B, T, C)
    tokens: [cond_BD + sos_embed, token_embed(next-scale inputs)] + scale_embed(scale of each token)
    -> N x block -> norm_out (AdaLN on cond_BD) -> proj_out -> logits (B, L, 2d); reshaped (B, L, d, 2),
       class 1 is bit 1.

Precision policy (as the reference runs it): the residual stream, every LayerNorm, the AdaLN modulation, RoPE and the
attention temperatures are float32; the text modules, AdaLN projections, embeddings and the head are kept in float32
(``_keep_in_fp32_modules``: ``from_pretrained(..., dtype=torch.bfloat16)`` casts only the blocks); inside a block
the projections run in the block's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import PixArtAlphaTextProjection
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.normalization import FP32LayerNorm
from torch import nn

from ..schedules import ScaleSchedule
from ..utils import to_device_async
from .attention import CosineSelfAttention, CrossAttention, KVCache, TextAttentivePool, rope_2d_frequencies

# ---------------------------------------------------------------------------------------------------------------------
# prepared text condition


@dataclass
class TextCondition:
    """Everything the transformer needs from a prompt, computed once per generation by
    :meth:`VARTransformer2DModel.prepare_condition` and reused at every scale.

    Attributes:
        cond_BD: (B, D) float32 pooled text: the SOS content and the AdaLN condition (Infinity's ``cond_BD``).
        context_BTC: (B, T, C) float32 cross-attention memory (``text_proj_for_ca`` of the normalised text).
        context_mask_BT: (B, T) bool, True for real text tokens.
        adaln_B16C: (B, 1, 6, C) float32 shared AdaLN output (``shared_ada_lin(cond_BD)``), chunk order
            (gamma1, gamma2, scale1, scale2, shift1, shift2).

    Index it like a batch (``condition[1:]``, ``condition[[0, 2]]``) and join conditions with
    :meth:`TextCondition.cat` (the pipeline's ``[cond; uncond]`` CFG batch).
    """

    cond_BD: torch.Tensor
    context_BTC: torch.Tensor
    context_mask_BT: torch.Tensor
    adaln_B16C: torch.Tensor

    def __post_init__(self) -> None:
        sizes = {f.name: getattr(self, f.name).shape[0] for f in fields(self)}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"TextCondition fields disagree on the batch size: {sizes}")
        if self.context_mask_BT.shape != self.context_BTC.shape[:2]:
            raise ValueError(f"context_mask_BT {tuple(self.context_mask_BT.shape)} does not match context_BTC "
                             f"{tuple(self.context_BTC.shape)}")

    @property
    def batch_size(self) -> int:
        return self.cond_BD.shape[0]

    def __len__(self) -> int:
        return self.batch_size

    def __getitem__(self, index: int | slice | list[int] | torch.Tensor) -> TextCondition:
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return TextCondition(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def cat(cls, conditions: list[TextCondition] | tuple[TextCondition, ...]) -> TextCondition:
        """Concatenate along the batch; text memories of different lengths are right-padded (masked out)."""
        if not conditions:
            raise ValueError("TextCondition.cat needs at least one condition")
        length = max(c.context_BTC.shape[1] for c in conditions)
        padded = [c.padded(length) for c in conditions]
        return cls(**{f.name: torch.cat([getattr(c, f.name) for c in padded]) for f in fields(cls)})

    def repeat_interleave(self, repeats: int) -> TextCondition:
        """Each sample ``repeats`` times in a row (``num_images_per_prompt``)."""
        return TextCondition(**{f.name: getattr(self, f.name).repeat_interleave(repeats, dim=0) for f in fields(self)})

    def to(self, device: torch.device | str | None = None) -> TextCondition:
        return TextCondition(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def padded(self, length: int) -> TextCondition:
        """The text memory right-padded to ``length`` tokens (masked out: the same attention output)."""
        pad = length - self.context_BTC.shape[1]
        if pad == 0:
            return self
        return TextCondition(self.cond_BD, F.pad(self.context_BTC, (0, 0, 0, pad)),
                             F.pad(self.context_mask_BT, (0, pad), value=False), self.adaln_B16C)


# ---------------------------------------------------------------------------------------------------------------------
# AdaLN modules


class SharedAdaLN(nn.Module):
    """Infinity's shared AdaLN (``shared_ada_lin``): SiLU -> Linear(D, 6C), computed once per forward for all blocks.

    Output (B, 1, 6, C) in Infinity's chunk order (gamma1, gamma2, scale1, scale2, shift1, shift2); each block adds its
    own ``scale_shift_table`` (1, 1, 6, C) in the same order. (diffusers' PixArt blocks use another order, (shift_msa,
    scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp); we keep Infinity's so checkpoints map without permutation.)
    """

    def __init__(self, cond_dim: int, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.linear = nn.Linear(cond_dim, 6 * dim)

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.linear(F.silu(cond_BD)).view(-1, 1, 6, self.dim)


class HeadAdaLN(nn.Module):
    """AdaLN before the head (Infinity's ``AdaLNBeforeHead``): ``LN(x) * (1 + scale) + shift`` with
    ``scale, shift = Linear(SiLU(cond_BD))`` in that order; LayerNorm without affine, float32."""

    def __init__(self, dim: int, cond_dim: int, eps: float) -> None:
        super().__init__()
        self.dim = dim
        self.norm = FP32LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.linear = nn.Linear(cond_dim, 2 * dim)

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale_B1C, shift_B1C = self.linear(F.silu(cond_BD)).view(-1, 1, 2, self.dim).float().unbind(2)
        return self.norm(x_BLC) * (1 + scale_B1C) + shift_B1C


# ---------------------------------------------------------------------------------------------------------------------
# transformer block


class VARTransformerBlock(nn.Module):
    """One Infinity ``CrossAttnBlock``::

        gamma1, gamma2, scale1, scale2, shift1, shift2 = scale_shift_table + adaln_B16C
        x = x + gamma1 * attn1(LN(x) * (1 + scale1) + shift1)      # cosine self-attention with 2D RoPE
        x = x + attn2(norm2(x), text)                               # norm2: affine LayerNorm, no gate
        x = x + gamma2 * ff(LN(x) * (1 + scale2) + shift2)         # Linear -> GELU(tanh) -> Linear

    The residual stream and the LayerNorms are float32; the projections run in the block's dtype.
    """

    def __init__(self, dim: int, num_heads: int, ff_inner_dim: int, norm_eps: float, max_attn_scale: float) -> None:
        super().__init__()
        self.norm1 = FP32LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.attn1 = CosineSelfAttention(dim, num_heads, max_attn_scale)
        self.norm2 = FP32LayerNorm(dim, eps=norm_eps, elementwise_affine=True)
        self.attn2 = CrossAttention(dim, dim, num_heads)
        self.norm3 = FP32LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ff = FeedForward(dim, inner_dim=ff_inner_dim, activation_fn="gelu-approximate", bias=True)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 1, 6, dim) / dim**0.5)

    def forward(
        self,
        x_BLC: torch.Tensor,
        adaln_B16C: torch.Tensor,
        context_BTC: torch.Tensor,
        context_mask_B11T: torch.Tensor,
        rope_cos_LP: torch.Tensor,
        rope_sin_LP: torch.Tensor,
        scale_offsets: tuple[int, ...] | None = None,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        dtype = self.scale_shift_table.dtype
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.scale_shift_table.float() + adaln_B16C).unbind(2)
        # fused forms of x * (1 + scale) + shift and x + gamma * h.float() (one kernel each; the bf16 branch outputs
        # are promoted to float32 inside the kernel)
        h_BLC = torch.addcmul(shift1, self.norm1(x_BLC), 1 + scale1).to(dtype)
        h_BLC = self.attn1(h_BLC, rope_cos_LP, rope_sin_LP, scale_offsets, kv_cache, layer_idx)
        x_BLC = torch.addcmul(x_BLC, gamma1, h_BLC)
        h_BLC = self.attn2(self.norm2(x_BLC).to(dtype), context_BTC, context_mask_B11T, kv_cache, layer_idx)
        x_BLC = x_BLC + h_BLC
        h_BLC = torch.addcmul(shift2, self.norm3(x_BLC), 1 + scale2).to(dtype)
        return torch.addcmul(x_BLC, gamma2, self.ff(h_BLC))


# ---------------------------------------------------------------------------------------------------------------------
# entry points other than forward, under offloading hooks

_ROUTED_METHODS = frozenset({"_unconditional_states", "_prepare_condition", "_forward_scale"})


def _has_forward_hook(module: nn.Module) -> bool:
    """Whether a hook wraps ``module.forward``: accelerate's ``_hf_hook`` (``enable_model_cpu_offload``,
    ``enable_sequential_cpu_offload``) or diffusers' hook registry (``enable_group_offload``)."""
    return hasattr(module, "_hf_hook") or hasattr(module, "_diffusers_hook")


# ---------------------------------------------------------------------------------------------------------------------
# the model


class VARTransformer2DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Infinity's next-scale text-to-image transformer with a bitwise head.

    Args:
        num_layers: transformer blocks (Infinity-2B: 32).
        hidden_size: width C (2048); also the condition width D.
        num_attention_heads: heads of self- and cross-attention (16); ``hidden_size / heads`` must be divisible by 4.
        mlp_ratio: FFN width ratio; hidden = ``round(C * mlp_ratio / 256) * 256`` as in Infinity.
        codebook_dim: bits per token d (32); the head predicts 2 logits per bit.
        text_dim: width of the text-encoder features (Flan-T5-XL: 2048).
        max_text_len: rows of ``uncond_text_embeds`` (512), the longest prompt usable with the learned
            unconditional embedding.
        pool_num_heads: heads of the attentive text pooling; None = Infinity's rule, ``text_dim // 128``
            (``// 64`` when ``hidden_size > 4096``), at least 1.
        num_scale_embeddings: rows of the scale embedding (15), the most scales a schedule may have.
        norm_eps: LayerNorm / RMSNorm epsilon.
        max_attn_scale: bound of the learned cosine-attention temperature (100).
        rope_theta: 2D RoPE base.
        cond_drop_rate: probability of replacing a sample's text by the unconditional embedding in training (0.1).
        sample_size: default image size in pixels (used by the pipeline).
        pos_embed_grid: None (Infinity: position only from 2D RoPE, relative) or n: a learned absolute 2D position
            embedding on an ``(n, n)`` grid, resized to each scale's grid and added with the scale embedding (the
            role of VAR's ``pos_1LC``, but for any schedule). Zero-initialised, so adding it to a trained model
            changes nothing until it is trained. Not part of Infinity; the toy model uses it because its fill
            patterns are anchored to the image grid, which relative positions alone cannot place.
    """

    _supports_gradient_checkpointing = True
    _repeated_blocks = ["VARTransformerBlock"]  # diffusers' compile_repeated_blocks() compiles these (regional)
    _no_split_modules = ["VARTransformerBlock"]
    _keep_in_fp32_modules = [
        "text_norm", "text_pooler", "context_embedder", "uncond_text_embeds", "sos_embed", "scale_embed",
        "pos_embed", "token_embed", "adaln_single", "norm_out", "proj_out",
    ]
    _skip_layerwise_casting_patterns = ["norm", "embed", "text_pooler", "adaln_single", "proj_out"]

    @register_to_config
    def __init__(
        self,
        num_layers: int = 32,
        hidden_size: int = 2048,
        num_attention_heads: int = 16,
        mlp_ratio: float = 4.0,
        codebook_dim: int = 32,
        text_dim: int = 2048,
        max_text_len: int = 512,
        pool_num_heads: int | None = None,
        num_scale_embeddings: int = 15,
        norm_eps: float = 1e-6,
        max_attn_scale: float = 100.0,
        rope_theta: float = 10000.0,
        cond_drop_rate: float = 0.1,
        sample_size: int = 1024,
        pos_embed_grid: int | None = None,
    ) -> None:
        super().__init__()
        _check_config(num_layers, hidden_size, num_attention_heads, mlp_ratio, codebook_dim, text_dim, max_text_len,
                      num_scale_embeddings, cond_drop_rate)
        dim = hidden_size
        self.head_dim = dim // num_attention_heads
        pool_heads = pool_num_heads or default_pool_num_heads(text_dim, hidden_size)

        # 1. text conditioning: RMSNorm, attentive pooling (SOS + AdaLN condition), cross-attention memory
        self.text_norm = nn.RMSNorm(text_dim, eps=norm_eps)
        self.text_pooler = TextAttentivePool(text_dim, dim, pool_heads)
        self.context_embedder = PixArtAlphaTextProjection(text_dim, dim, act_fn="gelu_tanh")
        self.uncond_text_embeds = nn.Parameter(torch.empty(max_text_len, text_dim))

        # 2. input embeddings: SOS offset, scale embedding (added once, before block 0), next-scale token projection
        self.sos_embed = nn.Parameter(torch.zeros(1, 1, dim))
        self.scale_embed = nn.Embedding(num_scale_embeddings, dim)
        self.token_embed = nn.Linear(codebook_dim, dim)
        if pos_embed_grid is not None and pos_embed_grid < 1:
            raise ValueError(f"pos_embed_grid must be None (RoPE only, as Infinity) or a grid size >= 1, "
                             f"got {pos_embed_grid}")
        # (1, C, n, n) learned absolute positions, or None (Infinity)
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, pos_embed_grid, pos_embed_grid)) if pos_embed_grid else None

        # 3. shared AdaLN: one SiLU -> Linear(D, 6C) for all blocks
        self.adaln_single = SharedAdaLN(dim, dim)

        # 4. blocks
        ff_inner_dim = round(dim * mlp_ratio / 256) * 256
        self.transformer_blocks = nn.ModuleList(
            VARTransformerBlock(dim, num_attention_heads, ff_inner_dim, norm_eps, max_attn_scale)
            for _ in range(num_layers)
        )

        # 5. bitwise head: AdaLN, then 2 logits per bit
        self.norm_out = HeadAdaLN(dim, dim, norm_eps)
        self.proj_out = nn.Linear(dim, 2 * codebook_dim)

        self.gradient_checkpointing = False
        self._schedule_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # RoPE tables per schedule
        self._init_weights()

    # -----------------------------------------------------------------------------------------------------------------
    # FP8 for the frozen blocks

    def enable_fp8(self, use_fast_accum: bool = False) -> dict[str, list[str]]:
        """Run the blocks' linear layers (self- and cross-attention q/k/v/out, FFN) as e4m3 matmuls with per-row
        weight scales and per-token activation scales (:mod:`var_erase.models.fp8`); the embeddings, norms, text
        modules, AdaLN and head are unchanged. The weights stay as they are (the FP8 copies are added next to them),
        so :meth:`disable_fp8` restores the default path bitwise. Frozen weights only: LoRA on top trains as usual.
        Call it again after changing the base weights. Needs a GPU of compute capability 8.9+ (or the CPU).

        Returns:
            ``{"converted": [...], "skipped": [...]}``, the layer names (skipped: dimensions not multiples of 16).
        """
        from .fp8 import enable_fp8

        return enable_fp8(self.transformer_blocks, use_fast_accum=use_fast_accum)

    def disable_fp8(self) -> list[str]:
        """Undo :meth:`enable_fp8` (drops the FP8 copies); returns the names of the restored layers."""
        from .fp8 import disable_fp8

        return disable_fp8(self.transformer_blocks)

    @property
    def fp8_enabled(self) -> bool:
        """Whether :meth:`enable_fp8` is in effect."""
        from .fp8 import fp8_enabled

        return fp8_enabled(self.transformer_blocks)

    # -----------------------------------------------------------------------------------------------------------------
    # initialisation

    @torch.no_grad()
    def _init_weights(self, aln_init: float = 1e-3, aln_gamma_init: float = 5e-6, head_init: float = 0.02) -> None:
        """Infinity's training init (``init_weights`` + ``special_init`` with ``scripts/train.sh`` values): trunc-normal
        std ``sqrt(1 / 3C)``, zero biases, head weight x 0.02, output projections x ``1 / sqrt(2 * num_layers)``,
        AdaLN gammas x 5e-6 and scales/shifts x 1e-3, temperature ln 4; the unconditional embedding gets the
        reference's seeded init (:func:`reference_uncond_init`)."""
        dim, num_layers = self.config.hidden_size, self.config.num_layers
        std = math.sqrt(1 / dim / 3)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.weight is not None:
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.sos_embed, std=std)
        self.uncond_text_embeds.copy_(reference_uncond_init(*self.uncond_text_embeds.shape))
        nn.init.trunc_normal_(self.text_pooler.query, std=std)
        self.proj_out.weight.mul_(head_init)
        self.norm_out.linear.weight.mul_(aln_init)
        for block in self.transformer_blocks:
            for out_proj in (block.attn1.to_out, block.attn2.to_out, block.ff.net[2]):
                out_proj.weight.mul_(1 / math.sqrt(2 * num_layers))
            block.scale_shift_table.copy_(torch.randn_like(block.scale_shift_table) / dim**0.5)
            block.scale_shift_table[:, :, :2].mul_(aln_gamma_init)
            block.scale_shift_table[:, :, 2:].mul_(aln_init)
            block.attn1.log_scale.fill_(math.log(4.0))

    # -----------------------------------------------------------------------------------------------------------------
    # text condition

    def unconditional_states(self, batch_size: int, seq_len: int) -> torch.Tensor:
        """The learned unconditional text ``uncond_text_embeds[:seq_len]`` for a batch, (B, T, text_dim).

        Infinity's CFG branch uses as many unconditional tokens as the positive prompt has; pass the positive
        prompt's mask with these states.
        """
        return self._run_entry_point("_unconditional_states", batch_size, seq_len)

    def _unconditional_states(self, batch_size: int, seq_len: int) -> torch.Tensor:
        if not 1 <= seq_len <= self.config.max_text_len:
            raise ValueError(
                f"seq_len={seq_len} unconditional tokens requested, but the model has max_text_len="
                f"{self.config.max_text_len}; truncate the prompt to at most {self.config.max_text_len} tokens "
                f"(e.g. tokenizer max_length={self.config.max_text_len})"
            )
        return self.uncond_text_embeds[:seq_len].unsqueeze(0).expand(batch_size, -1, -1)

    def prepare_condition(
        self,
        encoder_hidden_states_BTC: torch.Tensor,
        encoder_attention_mask_BT: torch.Tensor | None = None,
        drop_B: torch.Tensor | None = None,
    ) -> TextCondition:
        """Text features -> the :class:`TextCondition` used at every scale (float32, autocast disabled).

        Args:
            encoder_hidden_states_BTC: (B, T, text_dim) text-encoder output (padding allowed).
            encoder_attention_mask_BT: (B, T) 1/True for real tokens; None = all real. Right padding (as T5
                tokenizers pad) keeps the unconditional branch identical to Infinity's ``cfg_uncond[:len]``.
            drop_B: (B,) bool; where True the sample's text is replaced by the unconditional embedding (training-time
                condition dropout; :meth:`forward` draws it from ``cond_drop_prob``).
        """
        return self._run_entry_point("_prepare_condition", encoder_hidden_states_BTC, encoder_attention_mask_BT, drop_B)

    def _prepare_condition(self, states_BTC: torch.Tensor, mask_BT: torch.Tensor | None,
                           drop_B: torch.Tensor | None) -> TextCondition:
        states_BTC, mask_BT = self._check_text(states_BTC, mask_BT)
        dtype = self.text_norm.weight.dtype
        if drop_B is not None:
            uncond_BTC = self._unconditional_states(states_BTC.shape[0], states_BTC.shape[1])
            states_BTC = torch.where(drop_B.view(-1, 1, 1), uncond_BTC.to(states_BTC), states_BTC)
        mask_B11T = mask_BT[:, None, None, :]
        with torch.autocast(device_type=states_BTC.device.type, enabled=False):
            text_BTC = self.text_norm(states_BTC.to(dtype))
            cond_BD = self.text_pooler(text_BTC, mask_B11T).float()
            context_BTC = self.context_embedder(text_BTC).float()
            adaln_B16C = self.adaln_single(cond_BD.to(dtype)).float()
        return TextCondition(cond_BD, context_BTC, mask_BT, adaln_B16C)

    def _check_text(self, states_BTC: torch.Tensor, mask_BT: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if states_BTC.ndim != 3 or states_BTC.shape[-1] != self.config.text_dim:
            raise ValueError(
                f"encoder_hidden_states must be (batch, tokens, {self.config.text_dim}), got "
                f"{tuple(states_BTC.shape)}; "
                f"use the text encoder this transformer was trained with (text_dim={self.config.text_dim})"
            )
        if mask_BT is None:
            return states_BTC, torch.ones(states_BTC.shape[:2], dtype=torch.bool, device=states_BTC.device)
        if mask_BT.shape != states_BTC.shape[:2]:
            raise ValueError(f"encoder_attention_mask must be (batch, tokens) = {tuple(states_BTC.shape[:2])}, "
                             f"got {tuple(mask_BT.shape)}")
        # a data-dependent check: free on a CPU mask (checked before the copy, which then does not wait for the GPU);
        # on a device mask a host sync, skipped inside torch.compile, where it would break the graph
        on_host = mask_BT.device.type == "cpu"
        if on_host:
            self._check_text_mask(mask_BT)
        mask_BT = to_device_async(mask_BT.to(torch.bool), states_BTC.device)
        if not on_host and not torch.compiler.is_compiling():
            self._check_text_mask(mask_BT)
        return states_BTC, mask_BT

    @staticmethod
    def _check_text_mask(mask_BT: torch.Tensor) -> None:
        if not bool(mask_BT.any(dim=1).all()):
            raise ValueError("every prompt needs at least one unmasked text token (T5 always keeps its </s> token); "
                             "check encoder_attention_mask")

    def _resolve_condition(self, states_BTC, mask_BT, condition, cond_drop_prob, cond_drop_mask=None
                           ) -> TextCondition:
        if (states_BTC is None) == (condition is None):
            raise ValueError("pass exactly one of encoder_hidden_states (with encoder_attention_mask) or a prepared "
                             "condition (transformer.prepare_condition(...))")
        if condition is not None:
            if cond_drop_prob or cond_drop_mask is not None:
                raise ValueError("condition dropout acts on the raw text: pass encoder_hidden_states instead of a "
                                 "prepared condition when cond_drop_prob > 0 or cond_drop_mask is given")
            return condition
        if cond_drop_mask is not None:
            if cond_drop_mask.dtype != torch.bool or tuple(cond_drop_mask.shape) != (states_BTC.shape[0],):
                raise ValueError(f"cond_drop_mask must be a bool tensor of shape ({states_BTC.shape[0]},) (one flag "
                                 f"per sample), got {cond_drop_mask.dtype} {tuple(cond_drop_mask.shape)}")
            return self._prepare_condition(states_BTC, mask_BT, cond_drop_mask.to(states_BTC.device))
        if cond_drop_prob is None:
            cond_drop_prob = self.config.cond_drop_rate if self.training else 0.0
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        drop_B = None
        if cond_drop_prob > 0:
            drop_B = torch.rand(states_BTC.shape[0], device=states_BTC.device) < cond_drop_prob
        return self._prepare_condition(states_BTC, mask_BT, drop_B)

    # -----------------------------------------------------------------------------------------------------------------
    # teacher forcing over all scales

    def forward(
        self,
        token_inputs_BLd: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        schedule: ScaleSchedule | None = None,
        condition: TextCondition | None = None,
        cond_drop_prob: float | None = None,
        return_dict: bool = True,
        cond_drop_mask: torch.Tensor | None = None,
        _entry_point: tuple[str, tuple, dict] | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """Logits of every scale in one pass (teacher forcing), with the block-causal mask over scales
        (``schedule.block_causal_mask()``, applied as per-scale attention over the visible prefix).

        Args:
            token_inputs_BLd: (B, L - 1, d) float next-scale inputs of scales 1..K-1 (the SOS takes position 0).
            encoder_hidden_states: (B, T, text_dim) text features; or pass ``condition`` instead.
            encoder_attention_mask: (B, T) mask of the text features.
            schedule: the scale schedule of the inputs (required).
            condition: a prepared :class:`TextCondition` instead of raw text.
            cond_drop_prob: probability of replacing each sample's text by the unconditional embedding; None =
                ``config.cond_drop_rate`` in training mode and 0 in eval mode.
            return_dict: return a ``Transformer2DModelOutput`` (else a tuple).
            cond_drop_mask: (B,) bool, the samples whose text is replaced by the unconditional embedding, chosen by
                the caller (e.g. reproducibly per sample); overrides ``cond_drop_prob``.
            _entry_point: internal: ``(method, args, kwargs)`` of :meth:`prepare_condition`,
                :meth:`unconditional_states` or :meth:`forward_scale` routed through ``forward`` under an offloading
                hook (see :meth:`_run_entry_point`); that method's result is returned.

        Returns:
            ``sample``: (B, L, 2d) float32 logits; ``sample.view(B, L, d, 2)[..., 1]`` is the logit of bit 1.
        """
        if _entry_point is not None:
            name, args, kwargs = _entry_point
            if name not in _ROUTED_METHODS:
                raise ValueError(f"_entry_point must name one of {sorted(_ROUTED_METHODS)}, got {name!r}")
            return getattr(self, name)(*args, **kwargs)
        schedule = self._check_schedule(schedule)
        condition = self._resolve_condition(encoder_hidden_states, encoder_attention_mask, condition, cond_drop_prob,
                                            cond_drop_mask)
        self._check_token_inputs(token_inputs_BLd, condition.batch_size, schedule.total_tokens - 1, "all scales 1..K-1")

        # 1. input sequence: SOS, then the projected next-scale inputs, plus the scale embedding
        sos_B1C = condition.cond_BD[:, None] + self.sos_embed.float()
        x_BLC = torch.cat([sos_B1C, self._embed_tokens(token_inputs_BLd)], dim=1)
        x_BLC = x_BLC + self.scale_embed(self._scale_ids(schedule, x_BLC.device)).float()
        if self.pos_embed is not None:
            x_BLC = x_BLC + torch.cat([self._abs_positions(grid) for grid in schedule.grids])

        # 2. blocks under the block-causal mask over scales (computed scale by scale, see block_causal_attention)
        rope_cos_LP, rope_sin_LP = self._rope_tables(schedule, x_BLC.device)
        context_BTC, context_mask_B11T = self._context(condition)
        for block in self.transformer_blocks:
            args = (x_BLC, condition.adaln_B16C, context_BTC, context_mask_B11T, rope_cos_LP, rope_sin_LP,
                    schedule.offsets)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x_BLC = self._gradient_checkpointing_func(block, *args)
            else:
                x_BLC = block(*args)

        # 3. bitwise head
        logits_BL2d = self._head(x_BLC, condition.cond_BD)
        return Transformer2DModelOutput(sample=logits_BL2d) if return_dict else (logits_BL2d,)

    # -----------------------------------------------------------------------------------------------------------------
    # scale-by-scale sampling

    def new_kv_cache(self, schedule: ScaleSchedule | None = None) -> KVCache:
        """An empty :class:`KVCache` for one generation (``forward_scale`` sizes its buffers for the schedule)."""
        return KVCache(self.config.num_layers, max_tokens=schedule.total_tokens if schedule is not None else None)

    def forward_scale(
        self,
        token_inputs_Bld: torch.Tensor | None,
        scale_index: int,
        schedule: ScaleSchedule,
        condition: TextCondition,
        kv_cache: KVCache,
    ) -> torch.Tensor:
        """Logits of one scale, attending to the earlier scales through ``kv_cache`` (Infinity's
        ``autoregressive_infer_cfg`` with ``inference_mode=True``). Call it for k = 0, 1, ..., K-1 in order.

        RoPE uses the positions of this scale's tokens, i.e. the table rows starting at the scale's token offset
        ``schedule.offsets[k]`` (the reference's non-fused path uses offset 0 at every scale, a bug we do not copy).

        Args:
            token_inputs_Bld: (B, h_k * w_k, d) next-scale inputs of scale k; None for k = 0 (the SOS).
            scale_index: k.
            schedule: the schedule being generated.
            condition: the prepared condition of the whole batch (e.g. ``[cond; uncond]`` for CFG).
            kv_cache: the generation's cache, holding exactly the scales before k.

        Returns:
            (B, h_k * w_k, 2d) float32 logits.
        """
        return self._run_entry_point("_forward_scale", token_inputs_Bld, scale_index, schedule, condition, kv_cache)

    def _forward_scale(self, token_inputs_Bld: torch.Tensor | None, scale_index: int, schedule: ScaleSchedule,
                       condition: TextCondition, kv_cache: KVCache) -> torch.Tensor:
        self._check_schedule(schedule)
        self._check_scale_step(scale_index, schedule, condition, kv_cache)
        kv_cache.reserve(schedule.total_tokens)  # preallocate instead of concatenating at every scale
        if scale_index == 0:
            if token_inputs_Bld is not None:
                raise ValueError("scale 0 is the SOS token, computed from the condition: pass token_inputs_Bld=None")
            x_BlC = condition.cond_BD[:, None] + self.sos_embed.float()
        else:
            if token_inputs_Bld is None:
                raise ValueError(f"scale {scale_index} needs its next-scale inputs (B, h*w, d); None is only for k=0")
            h, w = schedule.grids[scale_index]
            self._check_token_inputs(token_inputs_Bld, condition.batch_size, h * w, f"scale {scale_index} ({h}x{w})")
            x_BlC = self._embed_tokens(token_inputs_Bld)
        start = schedule.offsets[scale_index]  # the embedding module is called (not its weight read): offloading
        x_BlC = x_BlC + self.scale_embed(self._scale_ids(schedule, x_BlC.device)[start:start + 1]).float()
        if self.pos_embed is not None:
            x_BlC = x_BlC + self._abs_positions(schedule.grids[scale_index])

        rows = schedule.scale_slice(scale_index)  # this scale's RoPE positions start at its token offset
        rope_cos_LP, rope_sin_LP = self._rope_tables(schedule, x_BlC.device)
        context_BTC, context_mask_B11T = self._context(condition)
        for layer_idx, block in enumerate(self.transformer_blocks):
            x_BlC = block(x_BlC, condition.adaln_B16C, context_BTC, context_mask_B11T, rope_cos_LP[rows],
                          rope_sin_LP[rows], kv_cache=kv_cache, layer_idx=layer_idx)
        return self._head(x_BlC, condition.cond_BD)

    def _run_entry_point(self, impl: str, *args, **kwargs):
        """Run the private method ``impl`` of a public entry point other than ``forward``.

        Offloading hooks act when ``forward`` is called: they place what the call reads on the execution device (the
        whole model under ``enable_model_cpu_offload``; this module's own tensors, ``sos_embed``,
        ``uncond_text_embeds``, ``pos_embed``, and the modules outside the blocks under sequential and group
        offloading) and offload it afterwards. The pipeline calls :meth:`prepare_condition`,
        :meth:`unconditional_states` and :meth:`forward_scale` instead, so under a hook the call is routed through
        ``self(...)``, which runs ``impl`` inside ``forward``. Without a hook ``impl`` runs directly.
        """
        if not _has_forward_hook(self):
            return getattr(self, impl)(*args, **kwargs)
        return self(None, _entry_point=(impl, args, kwargs))

    # -----------------------------------------------------------------------------------------------------------------
    # pieces shared by both paths

    def _abs_positions(self, grid: tuple[int, ...]) -> torch.Tensor:
        """(h*w, C) float32 absolute positions of one scale: the learned grid resized to ``(h, w)`` (area when
        shrinking, so a coarse token gets the mean of the positions it covers; bilinear when growing)."""
        h, w = grid[-2:]
        table_1Cnn = self.pos_embed.float()
        n = table_1Cnn.shape[-1]
        mode = "area" if h <= n and w <= n else "bilinear"
        pos_1Chw = F.interpolate(table_1Cnn, size=(h, w), mode=mode, **({} if mode == "area" else
                                                                           {"align_corners": False}))
        return pos_1Chw.flatten(2)[0].T

    def _embed_tokens(self, token_inputs_BLd: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=token_inputs_BLd.device.type, enabled=False):
            return self.token_embed(token_inputs_BLd.to(self.token_embed.weight.dtype)).float()

    def _context(self, condition: TextCondition) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.transformer_blocks[0].scale_shift_table.dtype
        return condition.context_BTC.to(dtype), condition.context_mask_BT[:, None, None, :]

    def _head(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """AdaLN + Linear(C, 2d), float32 with autocast disabled (Infinity's ``get_logits``)."""
        with torch.autocast(device_type=x_BLC.device.type, enabled=False):
            h_BLC = self.norm_out(x_BLC.float(), cond_BD.to(self.norm_out.linear.weight.dtype))
            return self.proj_out(h_BLC.to(self.proj_out.weight.dtype)).float()

    def _rope_tables(self, schedule: ScaleSchedule, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("rope", schedule, str(device))
        if key not in self._schedule_tables:
            self._cache_table(key, lambda: rope_2d_frequencies(schedule.rope_positions(device), self.head_dim,
                                                               self.config.rope_theta))
        return self._schedule_tables[key]

    def _scale_ids(self, schedule: ScaleSchedule, device: torch.device) -> torch.Tensor:
        """(L,) scale index per token, kept per schedule and device (building it costs a host-device sync)."""
        key = ("scale_ids", schedule, str(device))
        if key not in self._schedule_tables:
            self._cache_table(key, lambda: schedule.scale_ids(device))
        return self._schedule_tables[key]

    def _cache_table(self, key: tuple, make) -> None:
        """Keep a schedule's table; built outside inference mode so a table made while sampling under
        ``torch.inference_mode()`` can later serve a training forward."""
        if len(self._schedule_tables) >= 8:  # a few schedules (aspect ratios) at a time
            self._schedule_tables.pop(next(iter(self._schedule_tables)))
        with torch.inference_mode(False), torch.no_grad():
            self._schedule_tables[key] = make()

    # -----------------------------------------------------------------------------------------------------------------
    # input validation

    def _check_schedule(self, schedule: ScaleSchedule | None) -> ScaleSchedule:
        if not isinstance(schedule, ScaleSchedule):
            raise ValueError(f"schedule must be a ScaleSchedule (e.g. ScaleSchedule.from_infinity(1.0, '1M')), "
                             f"got {type(schedule).__name__}")
        if schedule.num_scales > self.config.num_scale_embeddings:
            raise ValueError(f"the schedule has {schedule.num_scales} scales but the model embeds at most "
                             f"num_scale_embeddings={self.config.num_scale_embeddings}; use a smaller pixel budget")
        return schedule

    def _check_token_inputs(self, inputs: torch.Tensor, batch_size: int, length: int, what: str) -> None:
        d = self.config.codebook_dim
        if not torch.is_tensor(inputs) or not inputs.is_floating_point() or inputs.ndim != 3:
            raise ValueError(f"token inputs must be a float tensor (batch, tokens, {d}) for {what}, got "
                             f"{type(inputs).__name__} {tuple(getattr(inputs, 'shape', ()))}")
        if inputs.shape[-1] != d:
            raise ValueError(f"token inputs have {inputs.shape[-1]} channels but the model has codebook_dim={d}; "
                             "use the VAE this transformer was trained with")
        if inputs.shape[1] != length:
            raise ValueError(f"token inputs have {inputs.shape[1]} tokens but {what} of the schedule need {length}")
        if inputs.shape[0] != batch_size:
            raise ValueError(f"token inputs have batch {inputs.shape[0]} but the condition has batch {batch_size}; "
                             "for CFG repeat the inputs for the unconditional half")

    def _check_scale_step(self, scale_index: int, schedule: ScaleSchedule, condition, kv_cache: KVCache) -> None:
        if not isinstance(condition, TextCondition):
            raise ValueError(f"condition must be a TextCondition from transformer.prepare_condition(...), got "
                             f"{type(condition).__name__}")
        if not 0 <= scale_index < schedule.num_scales:
            raise ValueError(f"scale_index must be in [0, {schedule.num_scales - 1}], got {scale_index}")
        if not isinstance(kv_cache, KVCache) or kv_cache.num_layers != self.config.num_layers:
            raise ValueError(f"kv_cache must be transformer.new_kv_cache() (a KVCache of {self.config.num_layers} "
                             f"layers), got {kv_cache!r}")
        expected = schedule.offsets[scale_index]
        if not kv_cache.is_consistent or kv_cache.seq_len != expected:
            raise ValueError(f"scale {scale_index} needs a cache holding the {expected} tokens of scales "
                             f"0..{scale_index - 1}, but it holds {kv_cache.seq_len}; call forward_scale for k = 0, 1, "
                             "... in order with one fresh cache per generation")


def default_pool_num_heads(text_dim: int, hidden_size: int) -> int:
    """Infinity's ``TextAttentivePool`` heads: ``text_dim // 128`` (``// 64`` when ``hidden_size > 4096``), >= 1."""
    return max(1, text_dim // (64 if hidden_size > 4096 else 128))


def reference_uncond_init(max_text_len: int, text_dim: int) -> torch.Tensor:
    """Infinity's deterministic init of ``cfg_uncond``: trunc-normal (std 1.2, generator seeded 0) / sqrt(text_dim).

    The converter uses its rows to pad a shorter checkpoint embedding, exactly as ``Infinity.load_state_dict`` does.
    """
    values = torch.empty(max_text_len, text_dim, device="cpu")
    nn.init.trunc_normal_(values, std=1.2, generator=torch.Generator(device="cpu").manual_seed(0))
    return values / text_dim**0.5


def _check_config(num_layers, hidden_size, num_heads, mlp_ratio, codebook_dim, text_dim, max_text_len,
                  num_scale_embeddings, cond_drop_rate) -> None:
    positive = dict(num_layers=num_layers, hidden_size=hidden_size, num_attention_heads=num_heads,
                    codebook_dim=codebook_dim, text_dim=text_dim, max_text_len=max_text_len,
                    num_scale_embeddings=num_scale_embeddings)
    bad = {k: v for k, v in positive.items() if not (isinstance(v, int) and v > 0)}
    if bad:
        raise ValueError(f"these config values must be positive integers: {bad}")
    if hidden_size % num_heads or (hidden_size // num_heads) % 4:
        raise ValueError(f"hidden_size / num_attention_heads must be an integer divisible by 4 (2D RoPE), got "
                         f"{hidden_size} / {num_heads}")
    if round(hidden_size * mlp_ratio / 256) < 1:
        raise ValueError(f"the FFN width round(hidden_size * mlp_ratio / 256) * 256 is 0 for hidden_size="
                         f"{hidden_size}, mlp_ratio={mlp_ratio}; use hidden_size * mlp_ratio >= 128")
    if not 0.0 <= cond_drop_rate <= 1.0:
        raise ValueError(f"cond_drop_rate must be in [0, 1], got {cond_drop_rate}")
