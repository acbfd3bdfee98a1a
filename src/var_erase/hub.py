"""Erasure adapters as Hub artefacts: their metadata, the base-model check, the model card, and the upload.

An erasure adapter is a folder holding ``pytorch_lora_weights.safetensors`` (the diffusers LoRA format) and a
``README.md`` model card. The adapter's identity travels inside the safetensors header, under one key,
``var_erase_adapter`` (a JSON :class:`AdapterMetadata`), next to diffusers' ``lora_adapter_metadata``:

- ``base_model`` and ``base_model_fingerprint``: which transformer it was trained on (:func:`model_fingerprint`),
  so that :func:`check_adapter_compatibility` can warn before an adapter silently does nothing on another model;
- the erased ``concepts``, the ``method`` and its ``hyperparameters``; the LoRA rank, alpha and target modules;
- ``eval_results`` once evaluated, and the var-erase version that wrote it.

Typical flow (what ``examples/train_svare.py`` does)::

    metadata = AdapterMetadata.from_training(base_model=args.pretrained_model_name_or_path,
                                             transformer=pipe.transformer, concepts=["nudity"], method="svare",
                                             hyperparameters=config.to_dict(), lora_config=lora_config)
    VARPipeline.save_lora_weights(out, ..., extra_metadata=metadata.to_safetensors_metadata())
    save_model_card(render_model_card(metadata, repo_id, images={"Before / after": "grid.png"}), out)
    push_adapter_to_hub(out, repo_id)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.utils import filter_repo_objects
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from .utils import atomic_write_bytes, redact_secrets

__all__ = [
    "ADAPTER_METADATA_KEY",
    "CARD_TAGS",
    "FULL_FINETUNE_WEIGHT_NAME",
    "LORA_WEIGHT_NAME",
    "AdapterMetadata",
    "AdapterMismatchWarning",
    "TOY_BASE_MODEL",
    "ModelFingerprint",
    "check_adapter_compatibility",
    "compute_fingerprint",
    "default_template_path",
    "architecture_mismatch",
    "model_architecture",
    "model_fingerprint",
    "push_adapter_to_hub",
    "read_adapter_metadata",
    "redact_secrets",
    "render_model_card",
    "save_model_card",
    "write_adapter_metadata",
]

logger = logging.getLogger(__name__)

ADAPTER_METADATA_KEY = "var_erase_adapter"
METADATA_FORMAT_VERSION = 1
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
FULL_FINETUNE_WEIGHT_NAME = "finetuned_modules.safetensors"
"""The weights of a ``train_modules`` full fine-tune: the trained modules' parameters, named as in the transformer."""
MODEL_CARD_NAME = "README.md"
TOY_BASE_MODEL = "var_erase.DEFAULT_MODEL"
"""How adapters name the embedded toy model: its folder lives inside the installed package, a machine-specific path."""

CARD_TAGS = ["var-erase", "lora", "concept-erasure", "text-to-image"]
DEFAULT_IGNORE_PATTERNS = ["checkpoint-*", "*/checkpoint-*", "checkpoints", "checkpoints/*", "anchors", "anchors/*",
                           "*.pt", "*.pth", "*.ckpt", "*.tmp", ".*", "*/.*"]
"""Never uploaded: accelerate checkpoints, the anchor cache, pickles, temp files of atomic writes, hidden files."""

METHOD_DESCRIPTIONS = {
    "svare": "S-VARE: filtered cross-entropy towards auxiliary visual tokens plus a preservation KL",
    "fce": "VARE with the filtered cross-entropy, without the preservation loss (an ablation)",
    "vare": "VARE: cross-entropy towards auxiliary visual tokens (paper Eq. 7)",
    "naive": "naive fine-tuning, each branch on its own history (paper Eq. 6; a baseline known to drift)",
    "esd": "ESD-style negative guidance on the logits (a diffusion-era baseline)",
    "esd-u": "ESD-u: negative guidance on the logits, training the non-cross-attention modules (a baseline)",
    "esd-x": "ESD-x: negative guidance on the logits, training the cross-attention modules (a baseline)",
    "fmn": "Forget-Me-Not: cross-attention re-steering away from the concept's tokens (a baseline)",
    "uce": "UCE: closed-form edit of the cross-attention keys and values, as a low-rank adapter (a baseline)",
    "ac-n": "Ablating Concepts, noise-based: cross-entropy towards the anchor's tokens under the concept (a baseline)",
    "ac-m": "Ablating Concepts, model-based: KL to the frozen model's anchor prediction under the concept (a baseline)",
}
METRIC_DESCRIPTIONS = {
    "acc_e": "share of the erased concept's images in which it is still detected (lower is better)",
    "acc_i": "share of other concepts' images in which the prompted concept is detected (higher is better)",
}
SETTING_KEYS = {"seed", "n_images", "num_images_per_prompt", "num_inference_steps", "guidance_scale", "height",
                "width", "threshold"}
SVARE_CITATION = """@inproceedings{zhong2026iclr-closing,
  title     = {{Closing the Safety Gap: Surgical Concept Erasure in Visual Autoregressive Models}},
  author    = {Zhong, Xinhao and Zhou, Yimin and Zhang, Zhiqi and Li, Junhao and Yi, Sun and Chen, Bin and
               Xia, Shu-Tao and Wang, Xuan and Xu, Ke},
  booktitle = {International Conference on Learning Representations},
  year      = {2026},
  url       = {https://mlanthology.org/iclr/2026/zhong2026iclr-closing/}
}"""


class AdapterMismatchWarning(UserWarning):
    """An adapter is being used with a base model other than the one it was trained on."""


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


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return value.item()
        except (ValueError, RuntimeError):
            pass
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return value.to_dict()
    return str(value)


# ---------------------------------------------------------------------------------------------------------------------
# Adapter metadata
# ---------------------------------------------------------------------------------------------------------------------
def _var_erase_version() -> str:
    from . import __version__

    return __version__


@dataclass
class AdapterMetadata:
    """The identity of an erasure adapter, stored in its safetensors header and shown in its model card.

    Attributes:
        base_model: Hub repo id or path of the pipeline it was trained on (``"var_erase.DEFAULT_MODEL"`` for the toy).
        concepts: the erased concepts, e.g. ``["nudity"]``.
        method: the erasure method (``svare``, ``vare``, ``fce``, ``naive``, ``esd``, ...).
        hyperparameters: the settings of the run (learning rate, steps, thresholds, seed, ...), JSON-serialisable.
        lora_rank, lora_alpha, lora_target_modules: the LoRA shape (alpha matters: the effective scale is alpha/rank).
        base_model_fingerprint, base_model_probes: from :func:`compute_fingerprint` of the base transformer.
        base_model_architecture: the base transformer's class and shape settings (:func:`model_architecture`);
            None in adapters written before it was recorded.
        eval_results: the evaluation JSON (``acc_e``, ``acc_i``, ``n_images``, settings), or None.
        var_erase_version: the version that wrote it.
    """

    base_model: str
    concepts: list[str]
    method: str
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_target_modules: list[str] = field(default_factory=list)
    base_model_fingerprint: str | None = None
    base_model_probes: dict[str, list[float]] | None = None
    eval_results: dict[str, Any] | None = None
    var_erase_version: str = field(default_factory=_var_erase_version)
    base_model_architecture: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.concepts, str):
            self.concepts = [self.concepts]
        if not self.base_model or not isinstance(self.base_model, str):
            raise ValueError("base_model must be the repo id or path of the base pipeline, e.g. 'org/var-2b'")
        if not self.concepts or not all(isinstance(c, str) and c.strip() for c in self.concepts):
            raise ValueError(f"concepts must be a non-empty list of concept names, got {self.concepts!r}")
        if not self.method:
            raise ValueError("method must name the erasure method, e.g. 'svare'")
        # a Hub token among the run's arguments must never reach the safetensors header or the card
        self.hyperparameters = redact_secrets(dict(self.hyperparameters or {}))
        if self.eval_results is not None:
            self.eval_results = redact_secrets(dict(self.eval_results))

    @classmethod
    def from_training(
        cls,
        base_model: str | os.PathLike,
        transformer: torch.nn.Module,
        concepts: list[str] | str,
        method: str,
        hyperparameters: Mapping[str, Any] | None = None,
        lora_config: Any = None,
        eval_results: Mapping[str, Any] | None = None,
    ) -> AdapterMetadata:
        """Build the metadata of a run: fingerprints ``transformer`` (the *base*, LoRA layers are ignored) and reads
        rank / alpha / targets from ``lora_config`` (a ``peft.LoraConfig``; None for a full fine-tune)."""
        fingerprint = compute_fingerprint(transformer)
        targets = getattr(lora_config, "target_modules", None) or []
        return cls(
            base_model=_portable_base_model(base_model),
            concepts=[concepts] if isinstance(concepts, str) else list(concepts),
            method=method,
            hyperparameters=dict(hyperparameters or {}),
            lora_rank=getattr(lora_config, "r", None),
            lora_alpha=getattr(lora_config, "lora_alpha", None),
            lora_target_modules=[targets] if isinstance(targets, str) else sorted(targets),
            base_model_fingerprint=fingerprint.digest,
            base_model_probes={name: list(values) for name, values in fingerprint.probes.items()},
            eval_results=dict(eval_results) if eval_results is not None else None,
            base_model_architecture=model_architecture(transformer),
        )

    def to_json(self) -> str:
        """The header entry's JSON; secrets in ``hyperparameters`` / ``eval_results`` are redacted (even ones set
        after construction)."""
        payload = {"format_version": METADATA_FORMAT_VERSION, **dataclasses.asdict(self)}
        payload["hyperparameters"] = redact_secrets(payload["hyperparameters"])
        payload["eval_results"] = redact_secrets(payload["eval_results"])
        return json.dumps(payload, sort_keys=True, default=_json_default)

    def to_safetensors_metadata(self) -> dict[str, str]:
        """The safetensors header entries to add (values must be strings): ``{"var_erase_adapter": <json>}``."""
        return {ADAPTER_METADATA_KEY: self.to_json()}

    @classmethod
    def from_safetensors_metadata(
        cls, metadata: Mapping[str, str] | None, source: str = "the adapter"
    ) -> AdapterMetadata | None:
        """Parse a safetensors header; None if it has no var-erase entry (an adapter from another tool)."""
        if not metadata or ADAPTER_METADATA_KEY not in metadata:
            return None
        try:
            payload = json.loads(metadata[ADAPTER_METADATA_KEY])
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{source}: the {ADAPTER_METADATA_KEY!r} safetensors metadata is not valid JSON ({err}). Rewrite it "
                "with var_erase.hub.write_adapter_metadata."
            ) from err
        version = payload.pop("format_version", 1)
        if version > METADATA_FORMAT_VERSION:
            warnings.warn(f"{source} was written by a newer var-erase (metadata format {version}); fields this "
                          "version does not know are ignored. Upgrade var-erase to read them.", stacklevel=2)
        known = {f.name for f in dataclasses.fields(cls)}
        missing = {"base_model", "concepts", "method"} - set(payload)
        if missing:
            raise ValueError(f"{source}: the {ADAPTER_METADATA_KEY!r} metadata lacks {sorted(missing)}. Rewrite it "
                             "with var_erase.hub.write_adapter_metadata.")
        return cls(**{k: v for k, v in payload.items() if k in known})


def _portable_base_model(base_model: str | os.PathLike) -> str:
    """The embedded toy model's folder is a machine-specific path inside site-packages: name it portably."""
    import var_erase

    base_model, toy = os.fspath(base_model), getattr(var_erase, "DEFAULT_MODEL", None)
    if toy and (base_model == toy or (os.path.exists(base_model) and os.path.exists(toy)
                                      and os.path.samefile(base_model, toy))):
        return TOY_BASE_MODEL
    return base_model


def _adapter_file(source: str | os.PathLike, weight_name: str = LORA_WEIGHT_NAME) -> Path:
    path = Path(source)
    if path.is_dir():
        path = path / weight_name
        if not path.is_file():
            raise FileNotFoundError(f"{source} has no {weight_name}: pass the adapter folder written by "
                                    "save_lora_weights / train_svare.py, or the .safetensors file itself")
    elif not path.is_file():
        raise FileNotFoundError(f"adapter not found: {source} is neither a folder nor a .safetensors file")
    return path


def _read_header(path: Path) -> dict[str, str]:
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); re-save the adapter") from err


def read_adapter_metadata(
    source: str | os.PathLike,
    *,
    weight_name: str = LORA_WEIGHT_NAME,
    revision: str | None = None,
    token: str | None = None,
    local_files_only: bool = False,
) -> AdapterMetadata | None:
    """Read an adapter's :class:`AdapterMetadata` from a folder, a ``.safetensors`` file, or a Hub repo id.

    Only the file's header is read. A repo id goes through the Hub cache (``hf_hub_download``: offline when
    ``HF_HUB_OFFLINE=1`` or ``local_files_only=True``). Returns None for a LoRA file without var-erase metadata.
    """
    if not os.path.exists(source) and _looks_like_repo_id(os.fspath(source)):
        path = Path(hf_hub_download(os.fspath(source), weight_name, revision=revision, token=token,
                                    local_files_only=local_files_only))
    else:
        path = _adapter_file(source, weight_name)
    header = _read_header(path)
    return AdapterMetadata.from_safetensors_metadata(header, source=str(path))


def write_adapter_metadata(
    source: str | os.PathLike, metadata: AdapterMetadata, weight_name: str = LORA_WEIGHT_NAME
) -> Path:
    """Store ``metadata`` in an existing adapter file (a folder or the file), keeping its tensors and other header
    entries (``format``, diffusers' ``lora_adapter_metadata``). Atomic: the file is replaced, never half-written.

    Use it to add ``eval_results`` after evaluating: ``write_adapter_metadata(dir, replace(md, eval_results=r))``.
    """
    path = _adapter_file(source, weight_name)
    try:
        with safe_open(path, framework="pt") as f:
            header = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); re-save the adapter") from err
    header.update(metadata.to_safetensors_metadata())
    atomic_write_bytes(path, safetensors_save(tensors, metadata=header))
    return path


def check_adapter_compatibility(
    metadata: AdapterMetadata | None, transformer: torch.nn.Module, strict: bool = False, adapter: str | None = None
) -> bool:
    """Check that an adapter was trained on ``transformer``; True if so (or if the adapter does not say).

    On a mismatch, warns with :class:`AdapterMismatchWarning`, or raises ``ValueError`` if ``strict``. The same
    weights in another dtype (fp32 vs bf16) are accepted.
    """
    if metadata is None or metadata.base_model_fingerprint is None:
        logger.info("%s carries no base-model fingerprint; skipping the compatibility check", adapter or "the adapter")
        return True
    current = compute_fingerprint(transformer)
    reason = current.mismatch(metadata.base_model_fingerprint, metadata.base_model_probes)
    if reason is None:
        return True
    message = _mismatch_message(metadata, transformer, current, reason, adapter)
    if strict:
        raise ValueError(message)
    warnings.warn(message, AdapterMismatchWarning, stacklevel=2)
    return False


def _mismatch_message(metadata: AdapterMetadata, transformer: torch.nn.Module, current: ModelFingerprint,
                      reason: str, adapter: str | None) -> str:
    config = getattr(_unwrap(transformer), "config", {})
    name = (config.get("_name_or_path") if hasattr(config, "get") else None) or type(transformer).__name__
    label = f"{adapter!r} " if adapter else ""
    return (
        f"The erasure adapter {label}(concepts {metadata.concepts}, method {metadata.method!r}) was trained on base "
        f"model {metadata.base_model!r} (fingerprint {metadata.base_model_fingerprint}), but this transformer "
        f"({name}, fingerprint {current.digest}) is a different model: {reason}. On it the adapter may erase nothing "
        f"or damage other concepts. Load it onto its base model (VARPipeline.from_pretrained("
        f"{_load_expression(metadata.base_model)})), or train an adapter for this model with examples/train_svare.py "
        "--pretrained_model_name_or_path <this model>."
    )


# ---------------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------------
TEMPLATE_NAME = "erasure_adapter.md"


def default_template_path() -> Path:
    """The packaged card template (``var_erase/templates/erasure_adapter.md``; ``model_cards/`` links to it)."""
    return Path(str(resources.files("var_erase") / "templates" / TEMPLATE_NAME))


def render_model_card(
    metadata: AdapterMetadata,
    repo_id: str | None = None,
    images: Mapping[str, str] | None = None,
    template_path: str | os.PathLike | None = None,
    license: str = "apache-2.0",  # noqa: A002 - the Hub's field name
    folder: str | os.PathLike | None = None,
) -> ModelCard:
    """Render the adapter's model card: YAML metadata for the Hub plus a human-readable page.

    Args:
        metadata: the adapter's :class:`AdapterMetadata` (with ``eval_results`` for an evaluation table).
        repo_id: where it is (or will be) on the Hub, e.g. ``"org/var-erased-nudity"``; the how-to loads it. None
            for an adapter that stays local: the how-to then loads ``folder``.
        images: caption -> image path *relative to the adapter folder* (e.g. ``{"Before / after": "grid.png"}``);
            save the images in the folder so that they are uploaded with it.
        template_path: a Jinja template to use instead of the packaged one.
        license: the adapter's licence; use the base model's if it is more restrictive.
        folder: the adapter folder; needed when ``repo_id`` is None (the how-to loads this path).

    Secrets among the hyper-parameters and evaluation settings are shown as ``<redacted>``; a ``learning_rate`` of
    None (the default) is shown as the rate the run used (:attr:`ErasureConfig.effective_learning_rate`).
    """
    location = _adapter_location(repo_id, folder)
    image_list = [{"caption": caption, "path": _relative_image_path(path)} for caption, path in (images or {}).items()]
    metrics, settings = _split_eval_results(redact_secrets(metadata.eval_results or {}))
    hyperparameters = _effective_hyperparameters(redact_secrets(metadata.hyperparameters))
    name = _card_name(repo_id, folder)
    card_data = _card_data(metadata, name, image_list, metrics, license)
    full_finetune = metadata.lora_rank is None and bool(hyperparameters.get("train_modules"))
    return ModelCard.from_template(
        card_data,
        template_str=_template_text(template_path),
        repo_id=location,
        adapter_expression=json.dumps(location),
        on_hub=repo_id is not None,
        title=f"{name}: {', '.join(metadata.concepts)} erased",
        concepts=metadata.concepts,
        method=metadata.method,
        method_description=METHOD_DESCRIPTIONS.get(metadata.method, metadata.method),
        base_model_display=_display_base_model(metadata.base_model),
        load_expression=_load_expression(metadata.base_model),
        example_prompt=json.dumps(str(hyperparameters.get("validation_prompt")
                                      or f"a picture of {metadata.concepts[0]}")),
        base_model_fingerprint=metadata.base_model_fingerprint,
        hyperparameters=sorted((k, _fmt(v)) for k, v in hyperparameters.items()),
        lora_rank=metadata.lora_rank,
        lora_alpha=metadata.lora_alpha,
        lora_target_modules=metadata.lora_target_modules,
        full_finetune=full_finetune,
        weight_name=FULL_FINETUNE_WEIGHT_NAME if full_finetune else LORA_WEIGHT_NAME,
        metrics=[{"name": k, "value": _fmt(v), "description": METRIC_DESCRIPTIONS.get(k, "")} for k, v in metrics],
        eval_settings=json.dumps(settings, indent=2, sort_keys=True, default=_json_default) if settings else None,
        images=image_list,
        is_toy=_is_toy(metadata.base_model),
        var_erase_version=metadata.var_erase_version,
        citation=SVARE_CITATION,
    )


def _adapter_location(repo_id: str | None, folder: str | os.PathLike | None) -> str:
    """What the card's how-to loads: the Hub repo id, else the local folder."""
    if repo_id is not None:
        if not isinstance(repo_id, str) or not repo_id.strip():
            raise ValueError(f"repo_id must be a Hub repo id such as 'org/var-erased-nudity' (or None for a local "
                             f"adapter, with folder=...), got {repo_id!r}")
        return repo_id
    if folder is None:
        raise ValueError("render_model_card needs repo_id (the Hub repo the adapter is pushed to) or, for an adapter "
                         "that stays local, folder=<the adapter folder> (the card's how-to loads it)")
    return os.fspath(folder)


def _card_name(repo_id: str | None, folder: str | os.PathLike | None) -> str:
    if repo_id is not None:
        return repo_id.split("/")[-1]
    return Path(os.path.abspath(os.fspath(folder))).name


def _effective_hyperparameters(hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """``learning_rate: None`` (the run used the mode's default) replaced by the rate the run used."""
    if "learning_rate" not in hyperparameters or hyperparameters["learning_rate"] is not None:
        return hyperparameters
    from .erasure.config import default_learning_rate

    mode = "full" if hyperparameters.get("train_modules") else "lora"
    return {**hyperparameters, "learning_rate": default_learning_rate(mode)}


def _template_text(template_path: str | os.PathLike | None) -> str:
    if template_path is None:  # read through importlib.resources: works from any kind of install
        return (resources.files("var_erase") / "templates" / TEMPLATE_NAME).read_text(encoding="utf-8")
    if not Path(template_path).is_file():
        raise FileNotFoundError(f"model-card template not found: {template_path}")
    return Path(template_path).read_text(encoding="utf-8")


def save_model_card(card: ModelCard, directory: str | os.PathLike) -> Path:
    """Write ``card`` to ``directory/README.md`` atomically; returns the path."""
    path = Path(directory) / MODEL_CARD_NAME
    atomic_write_bytes(path, str(card).encode("utf-8"))
    return path


def _card_data(metadata: AdapterMetadata, name: str, images: list[dict], metrics: list[tuple[str, float]],
               license: str) -> ModelCardData:  # noqa: A002
    hub_base = metadata.base_model if _looks_like_repo_id(metadata.base_model) else None
    extra: dict[str, Any] = {"erased_concepts": list(metadata.concepts), "erasure_method": metadata.method}
    if hub_base:
        extra["base_model_relation"] = "adapter"
    if images:
        extra["widget"] = [{"text": image["caption"], "output": {"url": image["path"]}} for image in images]
    eval_results = None
    if metrics:
        dataset = str((metadata.eval_results or {}).get("prompts_file") or "var-erase evaluation prompts")
        eval_results = [
            EvalResult(task_type="text-to-image", task_name="Concept erasure", dataset_type="var-erase-eval",
                       dataset_name=os.path.basename(dataset), metric_type=name, metric_value=value,
                       metric_name=name)
            for name, value in metrics
        ]
    tags = CARD_TAGS + (["s-vare"] if metadata.method == "svare" else [f"erasure-{metadata.method}"])
    return ModelCardData(
        license=license,
        library_name="diffusers",
        base_model=hub_base,
        tags=tags,
        pipeline_tag="text-to-image",
        model_name=name if eval_results else None,
        eval_results=eval_results,
        **extra,
    )


def _split_eval_results(results: Mapping[str, Any]) -> tuple[list[tuple[str, float]], dict[str, Any]]:
    """Numeric results become metrics (``a.b`` for nested ones); the rest (and known settings) stay settings."""
    metrics, settings = [], {}
    for key, value in results.items():
        if isinstance(value, Mapping) and all(_is_number(v) for v in value.values()) and value:
            metrics.extend((f"{key}.{k}", float(v)) for k, v in value.items())
        elif _is_number(value) and key not in SETTING_KEYS:
            metrics.append((key, float(value)))
        else:
            settings[key] = value
    return metrics, settings


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=_json_default)
    return str(value)


def _relative_image_path(path: str) -> str:
    posix = str(path).replace(os.sep, "/")
    if os.path.isabs(path) or posix.startswith("/") or ".." in posix.split("/") or "://" in posix:
        raise ValueError(
            f"image path {path!r} must be relative to the adapter folder (e.g. 'grid.png'): save the image inside "
            "the folder so that it is uploaded with the card"
        )
    return posix


def _looks_like_repo_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)) and not os.path.exists(name) and ".." not in name


def _is_toy(base_model: str) -> bool:
    return base_model == TOY_BASE_MODEL or "toy" in Path(base_model).name.lower()


def _display_base_model(base_model: str) -> str:
    if base_model == TOY_BASE_MODEL:
        return "the var-erase embedded toy model (`var_erase.DEFAULT_MODEL`)"
    if _looks_like_repo_id(base_model):
        return f"[`{base_model}`](https://huggingface.co/{base_model})"
    return f"`{Path(base_model).name}` (a local model)"


def _load_expression(base_model: str) -> str:
    if base_model == TOY_BASE_MODEL:
        return "var_erase.DEFAULT_MODEL"
    return json.dumps(base_model if _looks_like_repo_id(base_model) else Path(base_model).name)


# ---------------------------------------------------------------------------------------------------------------------
# Upload
# ---------------------------------------------------------------------------------------------------------------------
def push_adapter_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload erasure adapter (var-erase)",
    api: HfApi | None = None,
    ignore_patterns: list[str] | None = None,
    include: list[str] | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload the adapter in ``folder`` to it; returns the commit URL.

    The folder must hold the weights (``pytorch_lora_weights.safetensors``, or ``finetuned_modules.safetensors`` for
    a ``train_modules`` full fine-tune) and a ``README.md`` card whose relative images exist. Only those are
    uploaded: the weights, the card and the images it shows. ``include`` adds more files by glob pattern relative to
    the folder (e.g. ``["training_log.json", "eval*.json"]``); ``ignore_patterns`` removes some. Never uploaded,
    whatever ``include`` says: the ``anchors/`` cache, checkpoints (``checkpoint-*``, ``*.pt``), temporary and hidden
    files. A folder whose files to upload contain ``token`` is refused (a secret must never reach the Hub).
    ``private=None`` keeps the namespace's default; it is ignored if the repo exists.
    """
    folder = Path(folder)
    weight_name, images = _check_adapter_folder(folder)
    allow = [weight_name, MODEL_CARD_NAME, *images, *(include or [])]
    ignore = DEFAULT_IGNORE_PATTERNS + list(ignore_patterns or [])
    files = _files_to_upload(folder, allow, ignore)
    if token:
        _refuse_leaked_token(folder, files, token)
    api = api or HfApi(token=token)
    api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(
        folder_path=folder,
        repo_id=repo_id,
        repo_type="model",
        token=token,
        commit_message=commit_message,
        allow_patterns=allow,
        ignore_patterns=ignore,
    )
    return str(info.commit_url)


def _files_to_upload(folder: Path, allow: list[str], ignore: list[str]) -> list[str]:
    """The folder's files (POSIX paths relative to it) that ``upload_folder`` sends with these patterns."""
    relative = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return list(filter_repo_objects(relative, allow_patterns=allow, ignore_patterns=ignore))


def _refuse_leaked_token(folder: Path, files: list[str], token: str) -> None:
    """ValueError if ``token`` is written in any file to upload (text files, and safetensors headers)."""
    needle = token.encode()
    for name in files:
        path = folder / name
        if name.endswith(".safetensors"):
            data = json.dumps(_read_header(path)).encode()
        elif path.stat().st_size <= 64 * 2**20:
            data = path.read_bytes()
        else:
            continue
        if needle in data:
            raise ValueError(
                f"{path} contains the Hub token this upload uses: it would be published. Remove it (write logs and "
                "metadata through var_erase.hub.redact_secrets) and push again"
            )


def _check_adapter_folder(folder: Path) -> tuple[str, list[str]]:
    """Check the folder's weights and card; returns the weights' file name and the card's local images."""
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {folder}")
    weights = next((folder / name for name in (LORA_WEIGHT_NAME, FULL_FINETUNE_WEIGHT_NAME)
                    if (folder / name).is_file()), None)
    readme = folder / MODEL_CARD_NAME
    if weights is None:
        raise FileNotFoundError(f"{folder} has no {LORA_WEIGHT_NAME}: save the adapter first with "
                                "VARPipeline.save_lora_weights(folder, ...) (train_svare.py does; a full fine-tune "
                                f"writes {FULL_FINETUNE_WEIGHT_NAME} instead)")
    if not readme.is_file():
        raise FileNotFoundError(f"{folder} has no {MODEL_CARD_NAME} model card: write one with "
                                "save_model_card(render_model_card(metadata, repo_id), folder)")
    header = _read_header(weights)
    if ADAPTER_METADATA_KEY not in header:
        logger.warning("%s has no var-erase metadata: users will not see its base model or concepts, and loading "
                       "it onto another model will not warn. Add it with write_adapter_metadata.", weights)
    text = readme.read_text(encoding="utf-8")
    try:
        ModelCard(text)
    except (ValueError, yaml.YAMLError) as err:
        raise ValueError(f"{readme}: the card's YAML metadata is invalid ({err}); re-render it with "
                         "save_model_card(render_model_card(metadata, repo_id), folder)") from err
    images = []
    for image in re.findall(r"!\[[^\]]*\]\(([^)\s]+)", text):
        if "://" in image:
            continue
        if not (folder / image).is_file():
            raise FileNotFoundError(f"{readme} shows {image!r}, which is not in {folder}: save the image there or "
                                    "render the card without it")
        images.append(_glob_literal(image))
    return weights.name, images


def _glob_literal(path: str) -> str:
    """``path`` as an fnmatch pattern that matches only itself."""
    return re.sub(r"([*?\[])", r"[\1]", path)
