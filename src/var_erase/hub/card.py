"""The model card of an erasure adapter (huggingface_hub's ``ModelCard`` with the packaged template)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..utils import atomic_write_bytes, redact_secrets
from .common import (
    CARD_TAGS,
    FULL_FINETUNE_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    METHOD_DESCRIPTIONS,
    METRIC_DESCRIPTIONS,
    MODEL_CARD_NAME,
    SETTING_KEYS,
    SVARE_CITATION,
    TOY_BASE_MODEL,
    _json_default,
    _load_expression,
    format_value,
    is_number,
    is_toy_base_model,
    looks_like_repo_id,
)
from .metadata import AdapterMetadata

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
        hyperparameters=sorted((k, format_value(v)) for k, v in hyperparameters.items()),
        lora_rank=metadata.lora_rank,
        lora_alpha=metadata.lora_alpha,
        lora_target_modules=metadata.lora_target_modules,
        full_finetune=full_finetune,
        weight_name=FULL_FINETUNE_WEIGHT_NAME if full_finetune else LORA_WEIGHT_NAME,
        metrics=[{"name": k, "value": format_value(v), "description": METRIC_DESCRIPTIONS.get(k, "")}
                 for k, v in metrics],
        eval_settings=json.dumps(settings, indent=2, sort_keys=True, default=_json_default) if settings else None,
        images=image_list,
        is_toy=is_toy_base_model(metadata.base_model),
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
    from ..erasure.config import default_learning_rate

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
    hub_base = metadata.base_model if looks_like_repo_id(metadata.base_model) else None
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
        if isinstance(value, Mapping) and all(is_number(v) for v in value.values()) and value:
            metrics.extend((f"{key}.{k}", float(v)) for k, v in value.items())
        elif is_number(value) and key not in SETTING_KEYS:
            metrics.append((key, float(value)))
        else:
            settings[key] = value
    return metrics, settings






def _relative_image_path(path: str) -> str:
    posix = str(path).replace(os.sep, "/")
    if os.path.isabs(path) or posix.startswith("/") or ".." in posix.split("/") or "://" in posix:
        raise ValueError(
            f"image path {path!r} must be relative to the adapter folder (e.g. 'grid.png'): save the image inside "
            "the folder so that it is uploaded with the card"
        )
    return posix






def _display_base_model(base_model: str) -> str:
    if base_model == TOY_BASE_MODEL:
        return "the var-erase embedded toy model (`var_erase.DEFAULT_MODEL`)"
    if looks_like_repo_id(base_model):
        return f"[`{base_model}`](https://huggingface.co/{base_model})"
    return f"`{Path(base_model).name}` (a local model)"

