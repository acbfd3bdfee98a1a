"""Base-model fingerprints: a short identity of a transformer's config and weights, and its architecture."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from .common import _json_default

# ---------------------------------------------------------------------------------------------------------------------
# Base-model fingerprints
# ---------------------------------------------------------------------------------------------------------------------
NUM_PROBES = 8
PROBE_SAMPLES = 4096
PROBE_TOLERANCE = 0.05
"""A probe matches when it moved by less than this fraction of the sample's norm. Re-casting weights (fp32 <-> bf16 /
fp16) moves it by ~1e-3; another model, even one trained from the same recipe, by ~1."""
# config keys that say how a model was saved or run, not what it computes (transformers adds "architectures" on save)
_VOLATILE_CONFIG_KEYS = {"torch_dtype", "dtype", "transformers_version", "name_or_path", "use_cache", "architectures"}


@dataclass(frozen=True)
class ModelFingerprint:
    """What identifies a transformer: a hash of its config, and probes of a few of its weights.

    ``digest`` (``"<config hash>-<weights hash>"``) is stable across save/load, devices and runs. ``probes`` maps a
    few parameter names to ``(projection, norm)`` of a strided sample of their values: ``projection`` is the sample's
    dot product with a fixed random +-1 vector. They let :meth:`mismatch` tell "the same weights in another dtype"
    (the digest differs, the probes agree) from "another model".
    """

    digest: str
    probes: dict[str, tuple[float, float]]

    @property
    def config_digest(self) -> str:
        return self.digest.split("-")[0]

    def mismatch(self, digest: str, probes: Mapping[str, Any] | None = None) -> str | None:
        """Why a model with ``digest`` (and ``probes``, if known) is not this one, or None if it is."""
        if digest == self.digest:
            return None
        if digest.split("-")[0] != self.config_digest:
            return "its config differs (another architecture or size)"
        if not probes:
            return "its weights differ"
        if set(probes) != set(self.probes):
            return "its parameters have other names"
        for name, (projection, norm) in self.probes.items():
            other_projection, other_norm = (float(v) for v in probes[name])
            scale = max(norm, other_norm)
            moved = max(abs(projection - other_projection), abs(norm - other_norm))
            if scale > 1e-12 and moved > PROBE_TOLERANCE * scale:
                return f"its weights differ (e.g. {name!r})"
        return None


def compute_fingerprint(module: torch.nn.Module) -> ModelFingerprint:
    """Fingerprint ``module`` (a diffusers ``ModelMixin``/``ConfigMixin``, or any module with a ``config``).

    Cheap: one hash of the config, and at most 4096 values from each of 8 parameters. LoRA layers are ignored (a
    loaded adapter does not change the base model's fingerprint), fused adapters are not (they changed the weights).
    """
    module = _unwrap(module)
    config_json = json.dumps(_config_dict(module), sort_keys=True, default=_json_default)
    params = _base_parameters(module)
    chosen = sorted({round(i * (len(params) - 1) / (NUM_PROBES - 1)) for i in range(NUM_PROBES)}) if params else []
    probes = {params[i][0]: _probe(params[i][0], params[i][1]) for i in chosen}
    rounded = {name: [round(p / n, 5) if n else 0.0, float(f"{n:.6g}")] for name, (p, n) in probes.items()}
    weights_json = json.dumps({"count": sum(p.numel() for _, p in params), "probes": rounded}, sort_keys=True)
    digest = f"{_sha(config_json)[:12]}-{_sha(weights_json)[:12]}"
    return ModelFingerprint(digest, probes)


def model_fingerprint(module: torch.nn.Module) -> str:
    """A short, stable identity string for ``module``'s config and weights (see :func:`compute_fingerprint`)."""
    return compute_fingerprint(module).digest


ARCHITECTURE_KEYS = ("num_layers", "depth", "hidden_size", "dim", "embed_dim", "num_attention_heads", "num_heads",
                     "mlp_ratio", "intermediate_size", "codebook_dim", "text_dim", "in_channels", "out_channels")
"""Config entries that fix the shapes of a transformer's weights (what an adapter's tensors must fit)."""


def model_architecture(module: torch.nn.Module) -> dict[str, Any]:
    """The class and shape settings of ``module``'s config, e.g. ``{"class": "VARTransformer2DModel",
    "num_layers": 32, "hidden_size": 2048, ...}``: what an adapter trained on it needs of another model."""
    module = _unwrap(module)
    config = _config_dict(module)
    return {"class": type(module).__name__, **{k: config[k] for k in ARCHITECTURE_KEYS if k in config}}


def architecture_mismatch(recorded: Mapping[str, Any] | None, module: torch.nn.Module) -> str | None:
    """How ``module`` differs from the ``recorded`` architecture (``"num_layers 8 != 6, ..."``), or None if it does
    not (settings recorded on one side only are not compared: older or newer metadata)."""
    if not recorded:
        return None
    current = model_architecture(module)
    diffs = [f"{key} {recorded[key]!r} != {current[key]!r}" for key in recorded
             if key in current and recorded[key] != current[key]]
    return ", ".join(diffs) or None


def pipeline_fingerprint(pipe) -> str:
    """The identity of what a pipeline samples with: the fingerprints of its transformer, VAE and text encoder, e.g.
    the key of cached anchors, which stays valid wherever the same weights are installed (a path would not)."""
    parts = [f"{name}:{model_fingerprint(getattr(pipe, name))}" for name in ("transformer", "vae", "text_encoder")
             if getattr(pipe, name, None) is not None]
    return "|".join(parts)


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    module = getattr(module, "_orig_mod", module)  # torch.compile
    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
        module = module.module
    return module


def _config_dict(module: torch.nn.Module) -> dict[str, Any]:
    config = getattr(module, "config", None)
    if config is None:
        raise TypeError(
            f"{type(module).__name__} has no `config`: fingerprints need a diffusers ModelMixin/ConfigMixin (such as "
            "VARTransformer2DModel) or a transformers PreTrainedModel. Pass `pipe.transformer`."
        )
    items = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in items.items() if not k.startswith("_") and k not in _VOLATILE_CONFIG_KEYS}


def _base_parameters(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Non-LoRA parameters, named as without PEFT (``to_k.base_layer.weight`` -> ``to_k.weight``), sorted by name."""
    params = {}
    for name, param in module.named_parameters():
        if "lora_" in name or param.numel() == 0:
            continue
        params[name.replace(".base_layer.", ".")] = param
    return sorted(params.items())


def _probe(name: str, param: torch.Tensor) -> tuple[float, float]:
    if param.device.type == "meta":
        raise ValueError(f"parameter {name!r} is on the meta device: load the model's weights before fingerprinting")
    flat = param.detach().reshape(-1)
    sample = flat[:: max(1, flat.numel() // PROBE_SAMPLES)][:PROBE_SAMPLES].to("cpu", torch.float64)
    signs = _signs()[: sample.numel()]
    return float((sample * signs).sum()), float(sample.norm())


@lru_cache(maxsize=1)
def _signs() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0x5EED)
    return torch.randint(0, 2, (PROBE_SAMPLES,), generator=generator).to(torch.float64) * 2 - 1


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
