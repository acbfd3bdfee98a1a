"""Pushing an adapter folder to the Hub: the files that go, the checks before they do."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import yaml
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects

from .common import (
    ADAPTER_METADATA_KEY,
    DEFAULT_IGNORE_PATTERNS,
    FULL_FINETUNE_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    MODEL_CARD_NAME,
)
from .metadata import _read_header

logger = logging.getLogger(__name__)


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
