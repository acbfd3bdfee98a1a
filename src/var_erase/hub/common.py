"""What the hub modules share: file names, the card's vocabulary, the mismatch warning and small formatting helpers."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

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




def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=_json_default)
    return str(value)


def looks_like_repo_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)) and not os.path.exists(name) and ".." not in name


def is_toy_base_model(base_model: str) -> bool:
    return base_model == TOY_BASE_MODEL or "toy" in Path(base_model).name.lower()


def _load_expression(base_model: str) -> str:
    if base_model == TOY_BASE_MODEL:
        return "var_erase.DEFAULT_MODEL"
    return json.dumps(base_model if looks_like_repo_id(base_model) else Path(base_model).name)
