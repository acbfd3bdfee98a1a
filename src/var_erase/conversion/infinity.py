"""Official Infinity checkpoints (FoundationVision/Infinity) -> var_erase's diffusers-style layout.

- :func:`convert_infinity_transformer`: ``infinity_2b_reg.pth``-style state dict -> :class:`VARTransformer2DModel`.
- :func:`convert_infinity_vae`: ``infinity_vae_d32reg.pth``-style checkpoint -> :class:`BSQAutoencoder`.
- :func:`load_pth`: read an official ``.pth`` safely (``weights_only=True``), with a clear error for a bad file.
- :func:`build_infinity_pipeline` / :func:`save_pretrained_atomic`: what ``scripts/convert_infinity_to_diffusers.py``
  runs.

Both converters are strict: every source tensor is consumed or deliberately dropped, every target parameter is
produced with the right shape, or a ``ValueError`` lists what is missing, unexpected or mis-shaped.

Transformer key map (block n is ``blocks.{n}.`` or ``block_chunks.{c}.module.{j}.`` with n = chunk_size * c + j):

=====================================================  ====================================================
Infinity                                               var_erase
=====================================================  ====================================================
``cfg_uncond`` (padded/truncated to max_text_len)       ``uncond_text_embeds``
``pos_start``                                          ``sos_embed``
``text_norm.weight``                                   ``text_norm.weight``
``text_proj_for_sos.ca.mat_q``                         ``text_pooler.query``
``text_proj_for_sos.ca.mat_kv.weight`` (rows k | v)    ``text_pooler.to_k.weight`` | ``text_pooler.to_v.weight``
``text_proj_for_sos.ca.v_bias``                        ``text_pooler.to_v.bias``
``text_proj_for_sos.ca.proj.*``                        ``text_pooler.to_out.*``
``text_proj_for_ca.{0,2}.*``                           ``context_embedder.linear_{1,2}.*``
``lvl_embed.weight`` / ``word_embed.*``                ``scale_embed.weight`` / ``token_embed.*``
``shared_ada_lin.1.*`` / ``head_nm.ada_lin.1.*``       ``adaln_single.linear.*`` / ``norm_out.linear.*``
``head.*``                                             ``proj_out.*``
block ``ada_gss`` (chunk order kept)                   ``transformer_blocks.{n}.scale_shift_table``
block ``sa.mat_qkv.weight`` (rows q | k | v)           ``attn1.to_{q,k,v}.weight``
block ``sa.q_bias`` / ``sa.v_bias``                    ``attn1.to_q.bias`` / ``attn1.to_v.bias``
block ``sa.scale_mul_1H11``                            ``attn1.log_scale`` (1, H, 1, 1)
block ``sa.proj.*``                                    ``attn1.to_out.*``
block ``ca.mat_q.*``                                   ``attn2.to_q.*``
block ``ca.mat_kv.weight`` (rows k | v)                ``attn2.to_k.weight`` | ``attn2.to_v.weight``
block ``ca.v_bias`` / ``ca.proj.*``                    ``attn2.to_v.bias`` / ``attn2.to_out.*``
block ``ca_norm.*``                                    ``norm2.*``
block ``ffn.fc1.*`` / ``ffn.fc2.*``                    ``ff.net.0.proj.*`` / ``ff.net.2.*``
=====================================================  ====================================================

Dropped: every ``zero_k_bias`` buffer (must be zero) and the buffers ``lvl_1L``, ``attn_bias_for_masking``,
``Infinity_visible_kvlen``, ``Infinity_invisible_qlen`` (as ``Infinity.load_state_dict`` drops them).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..models.transformer_var import VARTransformer2DModel, reference_uncond_init

# ---------------------------------------------------------------------------------------------------------------------
# configurations of the released models

INFINITY_TRANSFORMER_CONFIGS: dict[str, dict] = {
    # tools/run_infinity.py `infinity_2b`: depth 32, width 2048, 16 heads, Flan-T5-XL text (2048), d32 VAE
    "infinity-2b": dict(num_layers=32, hidden_size=2048, num_attention_heads=16, mlp_ratio=4.0, codebook_dim=32,
                        text_dim=2048, max_text_len=512, sample_size=1024),
    # `infinity_layer12` (infinity_125M_256x256.pth): depth 12, width 768, 8 heads; the d32 VAE is assumed
    "infinity-125m": dict(num_layers=12, hidden_size=768, num_attention_heads=8, mlp_ratio=4.0, codebook_dim=32,
                          text_dim=2048, max_text_len=512, sample_size=256),
    # `infinity_8b`: depth 40, width 3584, 28 heads; vae_type=14 with 2x2 spatial patchify -> 56-bit tokens
    "infinity-8b": dict(num_layers=40, hidden_size=3584, num_attention_heads=28, mlp_ratio=4.0, codebook_dim=56,
                        text_dim=2048, max_text_len=512, sample_size=1024),
}
"""``VARTransformer2DModel`` keyword arguments per released model (other arguments keep Infinity's defaults)."""

INFINITY_VAE_CONFIGS: dict[str, dict] = {
    # load_visual_tokenizer: base_ch 128, ch_mult [1, 2, 4, 4, 4] (stride 16), 2 res-blocks, GroupNorm 32
    "infinity-2b": dict(block_out_channels=(128, 256, 512, 512, 512), layers_per_block=2, norm_num_groups=32,
                        codebook_dim=32),
    "infinity-125m": dict(block_out_channels=(128, 256, 512, 512, 512), layers_per_block=2, norm_num_groups=32,
                          codebook_dim=32),
    # apply_spatial_patchify: ch_mult [1, 2, 4, 4] (stride 8), codebook_dim 14
    "infinity-8b": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
                        codebook_dim=14),
}
"""``BSQAutoencoder`` keyword arguments per released model."""

DROPPED_BUFFERS = ("lvl_1L", "attn_bias_for_masking", "Infinity_visible_kvlen", "Infinity_invisible_qlen")

_MAX_LISTED = 20

# ---------------------------------------------------------------------------------------------------------------------
# reading official files


def load_pth(path: str | os.PathLike) -> dict:
    """Load an official ``.pth`` checkpoint on the CPU with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable PyTorch checkpoint (truncated download, wrong file), or holds no dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(
            f"{str(path)!r} ({path.stat().st_size:,} bytes) is not a readable PyTorch checkpoint: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. It is probably truncated or "
            "corrupt; download it again and compare its size with the one listed on the Hub."
        ) from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def load_infinity_transformer_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The transformer weights of an official checkpoint: a ``.pth`` state dict, a full training checkpoint
    (``ckpt['trainer']['gpt_fsdp']``, as ``save_slim_model`` reads it), or a sharded folder with a
    ``*.index.json`` (Infinity-8B)."""
    path = Path(path)
    if path.is_dir():
        return _load_sharded(path)
    checkpoint = load_pth(path)
    trainer = checkpoint.get("trainer")
    if isinstance(trainer, Mapping) and isinstance(trainer.get("gpt_fsdp"), Mapping):
        return dict(trainer["gpt_fsdp"])
    return checkpoint


def _load_sharded(folder: Path) -> dict[str, torch.Tensor]:
    indices = sorted(folder.glob("*.index.json"))
    if len(indices) != 1:
        raise ValueError(f"{str(folder)!r} must hold exactly one *.index.json of a sharded checkpoint, found "
                         f"{[p.name for p in indices]}")
    weight_map = json.loads(indices[0].read_text())["weight_map"]
    state_dict: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if shard.endswith(".safetensors"):
            from safetensors.torch import load_file

            state_dict.update(load_file(folder / shard))
        else:
            state_dict.update(load_pth(folder / shard))
    return state_dict


# ---------------------------------------------------------------------------------------------------------------------
# transformer

_TOP_LEVEL = {
    "pos_start": "sos_embed",
    "text_norm.weight": "text_norm.weight",
    "text_proj_for_sos.ca.mat_q": "text_pooler.query",
    "text_proj_for_sos.ca.v_bias": "text_pooler.to_v.bias",
    "text_proj_for_sos.ca.proj.weight": "text_pooler.to_out.weight",
    "text_proj_for_sos.ca.proj.bias": "text_pooler.to_out.bias",
    "text_proj_for_ca.0.weight": "context_embedder.linear_1.weight",
    "text_proj_for_ca.0.bias": "context_embedder.linear_1.bias",
    "text_proj_for_ca.2.weight": "context_embedder.linear_2.weight",
    "text_proj_for_ca.2.bias": "context_embedder.linear_2.bias",
    "lvl_embed.weight": "scale_embed.weight",
    "word_embed.weight": "token_embed.weight",
    "word_embed.bias": "token_embed.bias",
    "shared_ada_lin.1.weight": "adaln_single.linear.weight",
    "shared_ada_lin.1.bias": "adaln_single.linear.bias",
    "head_nm.ada_lin.1.weight": "norm_out.linear.weight",
    "head_nm.ada_lin.1.bias": "norm_out.linear.bias",
    "head.weight": "proj_out.weight",
    "head.bias": "proj_out.bias",
}
_TOP_LEVEL_SPLITS = {"text_proj_for_sos.ca.mat_kv.weight": ("text_pooler.to_k.weight", "text_pooler.to_v.weight")}

_BLOCK = {
    "ada_gss": "scale_shift_table",
    "sa.q_bias": "attn1.to_q.bias",
    "sa.v_bias": "attn1.to_v.bias",
    "sa.proj.weight": "attn1.to_out.weight",
    "sa.proj.bias": "attn1.to_out.bias",
    "ca.mat_q.weight": "attn2.to_q.weight",
    "ca.mat_q.bias": "attn2.to_q.bias",
    "ca.v_bias": "attn2.to_v.bias",
    "ca.proj.weight": "attn2.to_out.weight",
    "ca.proj.bias": "attn2.to_out.bias",
    "ca_norm.weight": "norm2.weight",
    "ca_norm.bias": "norm2.bias",
    "ffn.fc1.weight": "ff.net.0.proj.weight",
    "ffn.fc1.bias": "ff.net.0.proj.bias",
    "ffn.fc2.weight": "ff.net.2.weight",
    "ffn.fc2.bias": "ff.net.2.bias",
}
_BLOCK_SPLITS = {
    "sa.mat_qkv.weight": ("attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight"),
    "ca.mat_kv.weight": ("attn2.to_k.weight", "attn2.to_v.weight"),
}

_CHUNKED_BLOCK = re.compile(r"^block_chunks\.(\d+)\.module\.(\d+)\.(.+)$")
_PLAIN_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def convert_infinity_transformer(
    state_dict: Mapping[str, torch.Tensor], config: Mapping
) -> dict[str, torch.Tensor]:
    """Map an official Infinity transformer state dict onto :class:`VARTransformer2DModel` (strictly).

    Args:
        state_dict: the official weights (``block_chunks.{c}.module.{j}.`` or ``blocks.{n}.`` layout).
        config: the target's ``VARTransformer2DModel`` keyword arguments, e.g.
            ``INFINITY_TRANSFORMER_CONFIGS["infinity-2b"]`` (or ``model.config``).

    Returns:
        A state dict that ``VARTransformer2DModel(**config).load_state_dict(..., strict=True)`` accepts.

    Raises:
        ValueError: listing the missing, unexpected and mis-shaped keys (the first 20 of each).
    """
    expected = _expected_transformer_shapes(config)
    chunk_size = _chunk_size(state_dict)
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in state_dict.items():
        if key in DROPPED_BUFFERS:
            continue
        if key.endswith("zero_k_bias"):
            if torch.count_nonzero(tensor):
                raise ValueError(f"{key} is not zero; this checkpoint is not an Infinity model with a zero k bias")
            continue
        if key == "cfg_uncond":
            out["uncond_text_embeds"] = _fit_uncond(tensor, config)
            continue
        mapped = _map_transformer_key(key, tensor, chunk_size)
        if mapped is None:
            unexpected.append(key)
        else:
            out.update(mapped)
    _check_converted(out, expected, unexpected, "Infinity transformer")
    return out


def _map_transformer_key(key: str, tensor: torch.Tensor, chunk_size: int) -> dict[str, torch.Tensor] | None:
    if key in _TOP_LEVEL:
        return {_TOP_LEVEL[key]: tensor}
    if key in _TOP_LEVEL_SPLITS:
        return _split_rows(tensor, _TOP_LEVEL_SPLITS[key])
    if match := _CHUNKED_BLOCK.match(key):
        block, rest = chunk_size * int(match[1]) + int(match[2]), match[3]
    elif match := _PLAIN_BLOCK.match(key):
        block, rest = int(match[1]), match[2]
    else:
        return None
    prefix = f"transformer_blocks.{block}."
    if rest == "sa.scale_mul_1H11":  # (1, H, 1, 1), or (1, 1, H, 1) in the reference's flash layout
        return {prefix + "attn1.log_scale": tensor.reshape(1, -1, 1, 1)}
    if rest in _BLOCK:
        return {prefix + _BLOCK[rest]: tensor}
    if rest in _BLOCK_SPLITS:
        return _split_rows(tensor, tuple(prefix + name for name in _BLOCK_SPLITS[rest]))
    return None


def _split_rows(tensor: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    if tensor.shape[0] % len(names):
        raise ValueError(f"cannot split a fused weight of {tensor.shape[0]} rows into {len(names)} equal parts "
                         f"({', '.join(names)})")
    return dict(zip(names, (t.clone() for t in tensor.chunk(len(names), dim=0))))


def _chunk_size(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Blocks per chunk in the ``block_chunks`` layout (``depth // block_chunks``): 1 + the largest inner index."""
    inner = [int(m[2]) for key in state_dict if (m := _CHUNKED_BLOCK.match(key))]
    return 1 + max(inner) if inner else 0


def _fit_uncond(cfg_uncond: torch.Tensor, config: Mapping) -> torch.Tensor:
    """Pad or truncate ``cfg_uncond`` to ``max_text_len`` rows like ``Infinity.load_state_dict``: missing rows come
    from the reference's own (seeded) init of the parameter."""
    max_len = config.get("max_text_len", 512)
    text_dim = config.get("text_dim", 2048)
    if cfg_uncond.ndim != 2 or cfg_uncond.shape[1] != text_dim:
        raise ValueError(f"cfg_uncond has shape {tuple(cfg_uncond.shape)}, expected (tokens, text_dim={text_dim})")
    if cfg_uncond.shape[0] >= max_len:
        return cfg_uncond[:max_len].clone()
    fill = reference_uncond_init(max_len, text_dim)[cfg_uncond.shape[0]:].to(cfg_uncond.dtype)
    return torch.cat([cfg_uncond, fill])


def _expected_transformer_shapes(config: Mapping) -> dict[str, torch.Size]:
    kwargs = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = VARTransformer2DModel(**kwargs)
    return {key: tensor.shape for key, tensor in model.state_dict().items()}


def _check_converted(out: dict, expected: dict, unexpected: list[str], what: str) -> None:
    missing = sorted(set(expected) - set(out))
    unexpected = sorted(unexpected) + sorted(set(out) - set(expected))
    shapes = sorted(f"{k}: checkpoint {tuple(out[k].shape)} vs model {tuple(expected[k])}"
                    for k in set(out) & set(expected) if out[k].shape != expected[k])
    if not (missing or unexpected or shapes):
        return
    lines = [f"the checkpoint does not match the {what} config (wrong --model_type, or not an official file?)"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
            lines.append(f"{len(items)} {title} keys{more}:\n    " + "\n    ".join(items[:_MAX_LISTED]))
    raise ValueError("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------------
# VAE

# Infinity wraps nn.Conv2d in `Conv` (.conv) and nn.GroupNorm in `Normalize` (.norm); checkpoints may use either name
_VAE_WRAPPER = re.compile(r"\.(conv_in|conv_out|conv1|conv2|nin_shortcut|norm1|norm2|norm_out|conv)\.(?:conv|norm)\."
                          r"(weight|bias)$")
_RESNET_PART = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_PART = "(" + "|".join(_RESNET_PART) + ")"
_VAE_RULES = [
    (re.compile(r"^(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)$"), lambda m, n: f"{m[1]}.{m[2]}.{m[3]}"),
    (re.compile(r"^(encoder|decoder)\.norm_out\.(weight|bias)$"), lambda m, n: f"{m[1]}.conv_norm_out.{m[2]}"),
    (re.compile(rf"^encoder\.down\.(\d+)\.block\.(\d+)\.{_PART}\.(weight|bias)$"),
     lambda m, n: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}.{_RESNET_PART[m[3]]}.{m[4]}"),
    (re.compile(r"^encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)$"),
     lambda m, n: f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"),
    (re.compile(rf"^(encoder|decoder)\.mid\.block_([12])\.{_PART}\.(weight|bias)$"),
     lambda m, n: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_RESNET_PART[m[3]]}.{m[4]}"),
    (re.compile(rf"^decoder\.up\.(\d+)\.block\.(\d+)\.{_PART}\.(weight|bias)$"),  # levels by resolution -> by order
     lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.resnets.{m[2]}.{_RESNET_PART[m[3]]}.{m[4]}"),
    (re.compile(r"^decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)$"),
     lambda m, n: f"decoder.up_blocks.{n - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"),
]


def convert_infinity_vae(
    checkpoint: Mapping[str, torch.Tensor], config: Mapping | None = None
) -> dict[str, torch.Tensor]:
    """Map an official Infinity BSQ-VAE checkpoint onto :class:`BSQAutoencoder` (its diffusers ``Encoder`` /
    ``Decoder``), as verified in ``research/var_models.md`` section 1.3.

    Args:
        checkpoint: the loaded file: weights under ``checkpoint["vae"]`` if present, else the dict itself; tensor
            names with Infinity's ``.conv.`` / ``.norm.`` wrapper levels or without them.
        config: ``BSQAutoencoder`` keyword arguments; if given, the result is checked key by key and shape by shape
            against that model (strict), otherwise only every source key must be understood.

    The quantizer has no parameters; its integer buffers (``quantizer.*.mask``) are dropped. A state dict saved
    straight from Infinity's ``AutoEncoder`` also holds every quantizer entry under ``quantize.*`` (that class sets
    ``self.quantize = self.quantizer``, infinity/models/bsq_vae/vae.py): those aliases are dropped when they equal
    their ``quantizer.*`` twin, and are an error otherwise.
    """
    weights = checkpoint["vae"] if isinstance(checkpoint.get("vae"), Mapping) else checkpoint
    weights = _drop_quantizer_aliases(weights)
    weights = {_VAE_WRAPPER.sub(r".\1.\2", key): tensor for key, tensor in weights.items()}
    num_up = 1 + max((int(m[1]) for k in weights if (m := re.match(r"^decoder\.up\.(\d+)\.", k))), default=-1)
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for key, tensor in weights.items():
        if key.startswith("quantizer.") and not tensor.is_floating_point():
            continue
        new_key = _map_vae_key(key, num_up)
        if new_key is None:
            unexpected.append(key)
        else:
            out[new_key] = tensor
    if config is not None:
        _check_converted(out, _expected_vae_shapes(config), unexpected, "BSQ VAE")
    elif unexpected:
        _check_converted(out, {k: v.shape for k, v in out.items()}, unexpected, "BSQ VAE")
    return out


def _drop_quantizer_aliases(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` without the ``quantize.*`` copies of ``quantizer.*`` entries (Infinity's alias)."""
    out, conflicts = {}, []
    for key, tensor in weights.items():
        if not key.startswith("quantize."):
            out[key] = tensor
            continue
        twin = weights.get("quantizer." + key[len("quantize."):])
        if twin is None or twin.shape != tensor.shape or not torch.equal(twin, tensor):
            conflicts.append(key)
    if conflicts:
        raise ValueError(
            f"the VAE checkpoint holds {len(conflicts)} 'quantize.*' entries that are not copies of its 'quantizer.*' "
            f"ones (Infinity's AutoEncoder aliases quantize = quantizer, so they should be), e.g. "
            f"{conflicts[:_MAX_LISTED]}. Re-save the VAE from Infinity's AutoEncoder, or remove those entries."
        )
    return out


def _map_vae_key(key: str, num_up: int) -> str | None:
    for pattern, rename in _VAE_RULES:
        if match := pattern.match(key):
            return rename(match, num_up)
    return None


def _expected_vae_shapes(config: Mapping) -> dict[str, torch.Size]:
    from ..models.autoencoder_bsq import BSQAutoencoder

    kwargs = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = BSQAutoencoder(**kwargs)
    return {key: tensor.shape for key, tensor in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------------------------
# building and saving a pipeline

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def load_infinity_transformer(path: str | os.PathLike, config: Mapping, dtype: torch.dtype = torch.float32):
    """Official transformer weights -> :class:`VARTransformer2DModel` (eval mode). Only the blocks are cast to
    ``dtype``; text modules, AdaLN, embeddings and head stay float32, as Infinity runs them."""
    state_dict = convert_infinity_transformer(load_infinity_transformer_state_dict(path), config)
    with torch.device("meta"):
        model = VARTransformer2DModel(**config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.transformer_blocks.to(dtype)
    return model.eval()


def load_infinity_vae(path: str | os.PathLike, config: Mapping, dtype: torch.dtype = torch.float32):
    """Official BSQ-VAE weights -> :class:`BSQAutoencoder` (eval mode)."""
    from ..models.autoencoder_bsq import BSQAutoencoder

    state_dict = convert_infinity_vae(load_pth(path), config)
    with torch.device("meta"):
        model = BSQAutoencoder(**config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(dtype).eval()


def build_infinity_pipeline(
    transformer_path: str | os.PathLike,
    vae_path: str | os.PathLike,
    text_encoder_path: str | os.PathLike,
    model_type: str = "infinity-2b",
    dtype: torch.dtype = torch.bfloat16,
    tokenizer_path: str | os.PathLike | None = None,
    transformer_config: Mapping | None = None,
    vae_config: Mapping | None = None,
):
    """Convert the official files and assemble a ``VARPipeline`` (tokenizer, T5 encoder, transformer, VAE).

    Args:
        transformer_path / vae_path: the official ``.pth`` files (or the 8B shard folder).
        text_encoder_path: local folder or Hub id of the T5 encoder (Infinity: ``google/flan-t5-xl``).
        model_type: a key of :data:`INFINITY_TRANSFORMER_CONFIGS`.
        dtype: dtype of the transformer blocks, the VAE and the text encoder.
        tokenizer_path: where the tokenizer lives if not next to the text encoder.
        transformer_config / vae_config: override the configs of ``model_type`` (e.g. tiny test models).
    """
    from transformers import AutoTokenizer, T5EncoderModel

    from ..pipelines.pipeline_var import VARPipeline

    if model_type not in INFINITY_TRANSFORMER_CONFIGS:
        raise ValueError(f"unknown model_type {model_type!r}; choose one of {sorted(INFINITY_TRANSFORMER_CONFIGS)}")
    transformer_config = dict(transformer_config or INFINITY_TRANSFORMER_CONFIGS[model_type])
    vae_config = dict(vae_config or INFINITY_VAE_CONFIGS[model_type])
    if transformer_config["codebook_dim"] != vae_config["codebook_dim"]:
        raise NotImplementedError(
            f"{model_type}: the transformer predicts {transformer_config['codebook_dim']}-bit tokens from a "
            f"{vae_config['codebook_dim']}-channel VAE through Infinity's 2x2 spatial patchify, which VARPipeline does "
            "not implement; convert the transformer alone with load_infinity_transformer()"
        )
    transformer = load_infinity_transformer(transformer_path, transformer_config, dtype)
    vae = load_infinity_vae(vae_path, vae_config, dtype)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or text_encoder_path, legacy=True)  # as load_tokenizer
    text_encoder = T5EncoderModel.from_pretrained(text_encoder_path, dtype=dtype).eval()
    return VARPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae)


def save_pretrained_atomic(obj, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """``obj.save_pretrained(safe_serialization=True)`` into a temporary folder next to ``output_dir``, then rename it,
    so a failure never leaves a half-written model behind."""
    output_dir = Path(output_dir).resolve()
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{str(output_dir)!r} already exists; choose another --output_dir or pass --overwrite")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        obj.save_pretrained(tmp_dir, safe_serialization=True)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        tmp_dir.rename(output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return output_dir
