"""Erasure adapters as Hub artefacts: their metadata, the base-model check, the model card, and the upload.

An erasure adapter is a folder holding ``pytorch_lora_weights.safetensors`` (the diffusers LoRA format) and a
``README.md`` model card. The adapter's identity travels inside the safetensors header, under one key,
``var_erase_adapter`` (a JSON :class:`AdapterMetadata`), next to diffusers' ``lora_adapter_metadata``:

- ``base_model`` and ``base_model_fingerprint``: which transformer it was trained on (:func:`model_fingerprint`),
  so that :func:`check_adapter_compatibility` can warn before an adapter silently does nothing on another model;
- the erased ``concepts``, the ``method`` and its ``hyperparameters``; the LoRA rank, alpha and target modules;
- ``eval_results`` once evaluated, and the var-erase version that wrote it.

One module per job, every public name re-exported here (``from var_erase.hub import X``):

- :mod:`.fingerprint`: base-model fingerprints and architectures;
- :mod:`.metadata`: :class:`AdapterMetadata`, reading and writing it, the compatibility check;
- :mod:`.card`: rendering and saving the model card;
- :mod:`.upload`: :func:`push_adapter_to_hub`;
- :mod:`.common`: file names, the card's vocabulary, :class:`AdapterMismatchWarning`, formatting helpers.

Typical flow (what :func:`var_erase.erase` does)::

    metadata = AdapterMetadata.from_training(base_model=args.pretrained_model_name_or_path,
                                             transformer=pipe.transformer, concepts=["nudity"], method="svare",
                                             hyperparameters=config.to_dict(), lora_config=lora_config)
    VARPipeline.save_lora_weights(out, ..., extra_metadata=metadata.to_safetensors_metadata())
    save_model_card(render_model_card(metadata, repo_id, images={"Before / after": "grid.png"}), out)
    push_adapter_to_hub(out, repo_id)
"""

from ..utils import redact_secrets
from .card import TEMPLATE_NAME, default_template_path, render_model_card, save_model_card
from .common import (
    ADAPTER_METADATA_KEY,
    CARD_TAGS,
    DEFAULT_IGNORE_PATTERNS,
    FULL_FINETUNE_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    METADATA_FORMAT_VERSION,
    METHOD_DESCRIPTIONS,
    METRIC_DESCRIPTIONS,
    MODEL_CARD_NAME,
    SETTING_KEYS,
    SVARE_CITATION,
    TOY_BASE_MODEL,
    AdapterMismatchWarning,
    format_value,
    is_number,
    is_toy_base_model,
    looks_like_repo_id,
)
from .fingerprint import (
    ARCHITECTURE_KEYS,
    NUM_PROBES,
    PROBE_SAMPLES,
    PROBE_TOLERANCE,
    ModelFingerprint,
    architecture_mismatch,
    compute_fingerprint,
    model_architecture,
    model_fingerprint,
    pipeline_fingerprint,
)
from .metadata import (
    AdapterMetadata,
    check_adapter_compatibility,
    read_adapter_metadata,
    write_adapter_metadata,
)
from .upload import push_adapter_to_hub

__all__ = [
    "ADAPTER_METADATA_KEY",
    "ARCHITECTURE_KEYS",
    "CARD_TAGS",
    "DEFAULT_IGNORE_PATTERNS",
    "FULL_FINETUNE_WEIGHT_NAME",
    "LORA_WEIGHT_NAME",
    "METADATA_FORMAT_VERSION",
    "METHOD_DESCRIPTIONS",
    "METRIC_DESCRIPTIONS",
    "MODEL_CARD_NAME",
    "NUM_PROBES",
    "PROBE_SAMPLES",
    "PROBE_TOLERANCE",
    "SETTING_KEYS",
    "SVARE_CITATION",
    "TEMPLATE_NAME",
    "TOY_BASE_MODEL",
    "AdapterMetadata",
    "AdapterMismatchWarning",
    "ModelFingerprint",
    "architecture_mismatch",
    "check_adapter_compatibility",
    "compute_fingerprint",
    "default_template_path",
    "format_value",
    "is_number",
    "is_toy_base_model",
    "looks_like_repo_id",
    "model_architecture",
    "model_fingerprint",
    "pipeline_fingerprint",
    "push_adapter_to_hub",
    "read_adapter_metadata",
    "redact_secrets",
    "render_model_card",
    "save_model_card",
    "write_adapter_metadata",
]
