"""Tiny random components for fast CPU tests: a whole VARPipeline that builds offline in well under a second.

64x64 images: a stride-4 BSQ autoencoder (16x16 latent, 8 bits per token), Infinity's 0.06M schedule for the ratio
(7 scales, 521 tokens at 1:1), a 2-layer transformer, and a byte-level T5 text encoder that needs no vocabulary file.
"""

from __future__ import annotations

import torch
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from var_erase.models.autoencoder_bsq import BSQAutoencoder
from var_erase.models.transformer_var import VARTransformer2DModel
from var_erase.pipelines.pipeline_var import VARPipeline

TINY_SIZE = 64
LORA_TARGETS = [
    "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out",
    "ff.net.0.proj", "ff.net.2",
]


def tiny_transformer(seed: int = 0, **overrides) -> VARTransformer2DModel:
    torch.manual_seed(seed)
    config = dict(num_layers=2, hidden_size=64, num_attention_heads=4, codebook_dim=8, text_dim=32, max_text_len=64,
                  sample_size=TINY_SIZE, cond_drop_rate=0.0)
    config.update(overrides)
    model = VARTransformer2DModel(**config).eval()
    with torch.no_grad():  # random, not the near-zero init, so that outputs depend on every parameter
        for name, p in model.named_parameters():
            if "uncond" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def tiny_vae(seed: int = 0) -> BSQAutoencoder:
    torch.manual_seed(seed)
    return BSQAutoencoder(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                          codebook_dim=8).eval()


def tiny_text_encoder(seed: int = 0) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, dropout_rate=0.0)
    return T5EncoderModel(config).eval()


def tiny_pipeline(seed: int = 0) -> VARPipeline:
    pipe = VARPipeline(tokenizer=ByT5Tokenizer(), text_encoder=tiny_text_encoder(seed),
                       transformer=tiny_transformer(seed), vae=tiny_vae(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe
