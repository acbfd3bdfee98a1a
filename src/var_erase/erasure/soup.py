"""Adapter soup: several LoRA adapters of one erasure averaged into one adapter (an extension beyond the paper).

Runs of one erasure recipe that differ only in their seed (other generated prompt pairs, LoRA initialisation and
batch order) agree on what erases the concept and disagree on their side effects. Averaging their weight changes, as
model soups average models fine-tuned from one start (Wortsman et al., ICML 2022), keeps what the runs share and
shrinks what each does alone. For LoRA the average is exact and is itself a LoRA. With ``dW_i = s_i B_i A_i`` and
``s_i = alpha_i / r_i``::

    scale * sum_i w_i dW_i = [scale w_1 s_1 B_1, ..., scale w_K s_K B_K] @ [A_1; ...; A_K]

a LoRA of rank ``sum_i r_i`` with scaling 1 (``lora_alpha`` = rank). The weights ``w_i`` default to ``1 / K``.
Averaging also shortens the shared direction wherever the runs point a little apart, so the average alone erases
less than its members; ``scale`` > 1 lengthens it again. Choose ``scale`` on validation prompts, never on the prompts
you report.

Loading the soup gives the same outputs as loading the K adapters and calling
``pipe.set_adapters(names, adapter_weights=[scale * w_i ...])``, as one adapter of rank ``sum_i r_i``.

    from var_erase.erasure.soup import save_adapter_soup
    save_adapter_soup(["runs/s0", "runs/s1", "runs/s2", "runs/s3"], "outputs/erased-soup", scale=1.5)
    pipe.load_lora_weights("outputs/erased-soup")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

import torch

from ..hub import AdapterMetadata
from ..loaders.lora import VARLoraLoaderMixin

PREFIX = "transformer."


def soup_lora_state_dicts(
    state_dicts: Sequence[dict[str, torch.Tensor]], scalings: Sequence[float], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Stack K LoRA state dicts into one of rank ``sum r_i`` and scaling 1 (see the module docstring).

    Every state dict must name the same ``...lora_A.weight`` ``(r_i, in)`` / ``...lora_B.weight`` ``(out, r_i)``
    tensors; ``scalings[i]`` is adapter i's ``alpha_i / r_i``; ``weights[i]`` its weight in the sum (scale included).
    """
    if not state_dicts:
        raise ValueError("an adapter soup needs at least one adapter")
    if not len(state_dicts) == len(scalings) == len(weights):
        raise ValueError(f"{len(state_dicts)} state dicts, {len(scalings)} scalings and {len(weights)} weights: "
                         "give one scaling and one weight per adapter")
    keys = sorted(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], start=1):
        if sorted(sd) != keys:
            extra, missing = sorted(set(sd) - set(keys)), sorted(set(keys) - set(sd))
            raise ValueError(f"adapter {i} adapts other layers than adapter 0 (extra {extra[:3]}, missing "
                             f"{missing[:3]}): a soup needs adapters trained with the same --lora_layers")
    bad = [k for k in keys if not (k.endswith("lora_A.weight") or k.endswith("lora_B.weight"))]
    if bad:
        raise ValueError(f"only plain LoRA A/B matrices can be averaged, not {bad[:3]} (DoRA, biases, ...)")
    out = {}
    for key in keys:
        if key.endswith("lora_A.weight"):  # (r_i, in) -> (sum r_i, in)
            out[key] = torch.cat([sd[key].float() for sd in state_dicts], dim=0)
        else:  # (out, r_i) -> (out, sum r_i), each scaled by w_i * s_i
            out[key] = torch.cat([sd[key].float() * (w * s) for sd, s, w in zip(state_dicts, scalings, weights)],
                                 dim=1)
    return out


def load_adapter_soup(
    sources: Sequence[str | os.PathLike], weights: Sequence[float] | None = None, scale: float = 1.0
) -> tuple[dict[str, torch.Tensor], dict, AdapterMetadata | None]:
    """Read K adapters (folders, files or Hub repo ids) and return the soup's state dict (``transformer.``-prefixed
    keys, as saved), its LoRA config and its var-erase metadata (None when the members carry none)."""
    sources = [os.fspath(s) for s in sources]
    if len(sources) < 2:
        raise ValueError(f"an adapter soup averages several adapters; got {len(sources)}")
    weights = [1.0 / len(sources)] * len(sources) if weights is None else [float(w) for w in weights]
    if len(weights) != len(sources):
        raise ValueError(f"{len(weights)} weights for {len(sources)} adapters: give one weight per adapter")
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale must be a number > 0, got {scale!r}")
    state_dicts, configs, members = [], [], []
    for source in sources:
        sd, config, header = VARLoraLoaderMixin.lora_state_dict(source, return_lora_metadata=True,
                                                                 return_file_metadata=True)
        members.append(AdapterMetadata.from_safetensors_metadata(header, source=source))
        if not config:
            raise ValueError(f"{source} has no LoRA config (lora_adapter_metadata) in its header, so its alpha is "
                             "unknown; save it with save_lora_weights(..., transformer_lora_adapter_metadata=...)")
        config = {k.removeprefix(PREFIX): v for k, v in config.items()}
        for key in ("rank_pattern", "alpha_pattern"):
            if config.get(key):
                raise ValueError(f"{source} uses a per-layer {key}; only one rank and alpha per adapter is supported")
        if config.get("use_dora"):
            raise ValueError(f"{source} is a DoRA adapter; DoRA magnitudes cannot be averaged as a LoRA")
        state_dicts.append(sd)
        configs.append(config)
    scalings = [float(c["lora_alpha"]) / int(c["r"]) for c in configs]
    state_dict = soup_lora_state_dicts(state_dicts, scalings, [scale * w for w in weights])
    rank = sum(int(c["r"]) for c in configs)
    config = dict(configs[0]) | {"r": rank, "lora_alpha": float(rank)}
    return state_dict, config, _soup_metadata(sources, members, weights, scale, rank)


def _soup_metadata(sources: list[str], members: list[AdapterMetadata | None], weights: list[float], scale: float,
                   rank: int) -> AdapterMetadata | None:
    if all(m is None for m in members):
        return None
    if any(m is None for m in members):
        raise ValueError("some adapters carry var-erase metadata and others do not: "
                         f"{[s for s, m in zip(sources, members) if m is None]} have none")
    first = members[0]
    for source, m in zip(sources[1:], members[1:]):
        if m.base_model_fingerprint != first.base_model_fingerprint:
            raise ValueError(f"{source} was trained on another base model than {sources[0]} (fingerprints "
                             f"{m.base_model_fingerprint} and {first.base_model_fingerprint}): average adapters "
                             "of one base model only")
        if sorted(m.concepts) != sorted(first.concepts) or m.method != first.method:
            raise ValueError(f"{source} erases {m.concepts} with {m.method!r}, {sources[0]} erases "
                             f"{first.concepts} with {first.method!r}: a soup averages runs of one erasure")
    soup = {"members": sources, "weights": weights, "scale": scale,
            "member_seeds": [m.hyperparameters.get("seed") for m in members]}
    hyperparameters = {k: v for k, v in first.hyperparameters.items() if k != "seed"} | {"soup": soup}
    return replace(first, hyperparameters=hyperparameters, lora_rank=rank, lora_alpha=float(rank),
                   eval_results=None)


def save_adapter_soup(
    sources: Sequence[str | os.PathLike], output_dir: str | os.PathLike, weights: Sequence[float] | None = None,
    scale: float = 1.0,
) -> str:
    """Average ``sources`` (see :func:`load_adapter_soup`) and write ``output_dir/pytorch_lora_weights.safetensors``
    (atomically, with the LoRA config and the var-erase metadata). Returns the file's path."""
    state_dict, config, metadata = load_adapter_soup(sources, weights, scale)
    os.makedirs(output_dir, exist_ok=True)
    layers = {k.removeprefix(PREFIX): v for k, v in state_dict.items()}
    extra = metadata.to_safetensors_metadata() if metadata is not None else None
    return VARLoraLoaderMixin.save_lora_weights(output_dir, transformer_lora_layers=layers,
                                                transformer_lora_adapter_metadata=config, extra_metadata=extra)
