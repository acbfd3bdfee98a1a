"""Adapter metadata: the ``var_erase_adapter`` JSON inside the safetensors header, and the base-model check."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from ..utils import atomic_write_bytes, redact_secrets
from .common import (
    ADAPTER_METADATA_KEY,
    LORA_WEIGHT_NAME,
    METADATA_FORMAT_VERSION,
    TOY_BASE_MODEL,
    AdapterMismatchWarning,
    _json_default,
    _load_expression,
    looks_like_repo_id,
)
from .fingerprint import ModelFingerprint, _unwrap, compute_fingerprint, model_architecture

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Adapter metadata
# ---------------------------------------------------------------------------------------------------------------------
def _var_erase_version() -> str:
    from .. import __version__

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
    if not os.path.exists(source) and looks_like_repo_id(os.fspath(source)):
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
