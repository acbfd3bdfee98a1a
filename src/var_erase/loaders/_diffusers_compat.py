"""The one private diffusers function var-erase calls, wrapped here and nowhere else.

diffusers has no public function that resolves a LoRA file (a local folder, a file, or a Hub repo id through its
cache, with diffusers' own error messages) and returns its tensors with the header's LoRA metadata:
``LoraBaseMixin.lora_state_dict`` is per-pipeline, and every diffusers mixin calls the private
``diffusers.loaders.lora_base._fetch_state_dict``. :func:`fetch_lora_state_dict` calls it after checking that it
still takes the arguments passed and returns what is expected; when a diffusers release changes it, the call (and
``tests/test_diffusers_compat.py``) raises :class:`DiffusersCompatibilityError` naming the installed version.
"""

from __future__ import annotations

import inspect
import os
from functools import lru_cache
from typing import Any

import diffusers
import torch
from diffusers.loaders import lora_base

FETCH_STATE_DICT_PARAMETERS: tuple[str, ...] = (
    "pretrained_model_name_or_path_or_dict", "weight_name", "use_safetensors", "local_files_only", "cache_dir",
    "force_download", "proxies", "token", "revision", "subfolder", "user_agent", "allow_pickle", "return_file_metadata",
)
"""The keyword arguments :func:`fetch_lora_state_dict` passes to ``_fetch_state_dict``."""


class DiffusersCompatibilityError(RuntimeError):
    """A diffusers internal that var-erase wraps is gone or changed in the installed diffusers."""


def _incompatible(what: str) -> DiffusersCompatibilityError:
    return DiffusersCompatibilityError(
        f"diffusers {diffusers.__version__}: {what}. var-erase reads LoRA files through "
        "diffusers.loaders.lora_base._fetch_state_dict (see var_erase/loaders/_diffusers_compat.py); install the "
        "diffusers version var-erase pins in pyproject.toml, or update the wrapper for this release")


@lru_cache(maxsize=1)
def _fetch_state_dict():
    fetch = getattr(lora_base, "_fetch_state_dict", None)
    if not callable(fetch):
        raise _incompatible("diffusers.loaders.lora_base._fetch_state_dict no longer exists")
    parameters = inspect.signature(fetch).parameters
    missing = [name for name in FETCH_STATE_DICT_PARAMETERS if name not in parameters]
    if missing:
        raise _incompatible(f"_fetch_state_dict no longer takes {missing}")
    return fetch


def fetch_lora_state_dict(source: str | dict[str, torch.Tensor], weight_name: str | None,
                          **hub_kwargs: Any) -> tuple[dict[str, torch.Tensor], dict | None, dict[str, str] | None]:
    """``(state_dict, lora_metadata, file_metadata)`` of a safetensors LoRA file, never unpickling.

    Args:
        source: a folder, a Hub repo id, or a state dict (returned as is, with no metadata).
        weight_name: the file's name in ``source`` (a ``.safetensors``).
        hub_kwargs: ``local_files_only``, ``cache_dir``, ``force_download``, ``proxies``, ``token``, ``revision``,
            ``subfolder`` as ``hf_hub_download`` takes them.

    ``lora_metadata`` is diffusers' ``lora_adapter_metadata`` (the ``LoraConfig`` as a dict, or None) and
    ``file_metadata`` the whole safetensors header (None for a state dict).
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    out = _fetch_state_dict()(
        pretrained_model_name_or_path_or_dict=source, weight_name=weight_name, use_safetensors=True,
        local_files_only=hub_kwargs.get("local_files_only"), cache_dir=hub_kwargs.get("cache_dir"),
        force_download=hub_kwargs.get("force_download", False), proxies=hub_kwargs.get("proxies"),
        token=hub_kwargs.get("token"), revision=hub_kwargs.get("revision"), subfolder=hub_kwargs.get("subfolder"),
        user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"}, allow_pickle=False,
        return_file_metadata=True)
    if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[0], dict)):
        raise _incompatible(f"_fetch_state_dict(return_file_metadata=True) returned {type(out).__name__} "
                            f"{'of ' + str(len(out)) if isinstance(out, tuple) else ''}, not (state_dict, "
                            "lora_metadata, file_metadata)")
    return out


__all__ = ["FETCH_STATE_DICT_PARAMETERS", "DiffusersCompatibilityError", "fetch_lora_state_dict"]
