"""Pipeline-level LoRA API for VAR pipelines, on diffusers' ``LoraBaseMixin``.

``LoraBaseMixin`` already implements ``set_adapters``, ``disable_lora``/``enable_lora``, ``delete_adapters``,
``unload_lora_weights`` and the fuse machinery for every name in ``_lora_loadable_modules``; a pipeline mixin adds the
loading and saving (research/hf_mechanics.md §1). What differs from diffusers' own mixins:

- only safetensors are read or written (no pickle fallback);
- a Hub repo id with no ``weight_name`` resolves to ``pytorch_lora_weights.safetensors`` directly, so loading from the
  offline Hub cache works (diffusers' guess needs the network);
- files are written atomically (temp file, then rename), and extra string metadata (the erasure adapter's identity,
  see :mod:`var_erase.hub`) can be stored next to diffusers' ``lora_adapter_metadata``;
- a corrupt or non-LoRA file is an ``OSError``/``ValueError`` that names the file and the fix; so is a LoRA whose
  keys match no module of the transformer (e.g. a Stable Diffusion UNet LoRA), which diffusers would load as a no-op;
- an erasure adapter's recorded base model is checked (:mod:`var_erase.hub`): another architecture is refused, other
  weights warn (``ignore_mismatched_base=True`` loads anyway).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from contextlib import contextmanager

import safetensors
import safetensors.torch
import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LoraBaseMixin
from huggingface_hub.utils import validate_hf_hub_args
from peft.tuners.tuners_utils import BaseTunerLayer

from ..hub import (
    ARCHITECTURE_KEYS,
    AdapterMetadata,
    AdapterMismatchWarning,
    architecture_mismatch,
    check_adapter_compatibility,
    model_architecture,
)
from ..utils import atomic_write_bytes
from ._diffusers_compat import fetch_lora_state_dict

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_HUB_KWARGS = ("local_files_only", "cache_dir", "force_download", "proxies", "token", "revision", "subfolder")


class VARLoraLoaderMixin(LoraBaseMixin):
    """Load, save, combine and fuse LoRA adapters of a pipeline's ``transformer``."""

    _lora_loadable_modules = ["transformer"]
    transformer_name = "transformer"

    @classmethod
    @validate_hf_hub_args
    def lora_state_dict(
        cls, pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor], **kwargs
    ):
        """Read a LoRA state dict from a folder, a ``.safetensors`` file, a Hub repo id, or a dict.

        Returns the state dict, or ``(state_dict, lora_metadata)`` with ``return_lora_metadata=True``, or
        ``(state_dict, lora_metadata, file_metadata)`` with ``return_file_metadata=True`` as well.
        """
        return_lora_metadata = kwargs.pop("return_lora_metadata", False)
        return_file_metadata = kwargs.pop("return_file_metadata", False)
        source = pretrained_model_name_or_path_or_dict
        weight_name = kwargs.pop("weight_name", None)
        if isinstance(source, os.PathLike):
            source = os.fspath(source)
        if isinstance(source, str) and os.path.isfile(source):
            source, weight_name = os.path.dirname(source) or ".", os.path.basename(source)
        if weight_name is None and not isinstance(source, dict):
            weight_name = LORA_WEIGHT_NAME
        if weight_name is not None and not weight_name.endswith(".safetensors"):
            raise ValueError(f"only safetensors LoRA files are supported, got weight_name={weight_name!r}")
        try:
            state_dict, metadata, file_metadata = fetch_lora_state_dict(source, weight_name, **{
                name: kwargs.pop(name) for name in _HUB_KWARGS if name in kwargs})
        except safetensors.SafetensorError as err:
            raise OSError(
                f"could not read the LoRA file {weight_name!r} in {source!r}: it is not a valid safetensors file "
                f"({err}). Re-download or re-save the adapter with `pipe.save_lora_weights`."
            ) from err
        if kwargs:
            raise TypeError(f"unexpected keyword arguments: {sorted(kwargs)}")
        out = (state_dict,)
        if return_lora_metadata:
            out += (metadata,)
        if return_file_metadata:
            out += (file_metadata,)
        return out if len(out) > 1 else state_dict

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict[str, torch.Tensor],
        adapter_name: str | None = None,
        hotswap: bool = False,
        **kwargs,
    ) -> None:
        """Load a LoRA adapter into ``self.transformer`` (it becomes the active adapter).

        Args:
            pretrained_model_name_or_path_or_dict: a folder holding ``pytorch_lora_weights.safetensors``, the file
                itself, a Hub repo id (read from the local cache when offline), or a state dict.
            adapter_name: name to register it under (default ``default_{n}``), used by ``set_adapters``.
            hotswap: replace the weights of an already loaded adapter of the same name in place.
            ignore_mismatched_base: load an erasure adapter recorded for a transformer of another architecture
                (number of layers, width, ...) instead of raising ``ValueError`` (it warns instead). An adapter
                trained on other weights of the same architecture only warns (:class:`AdapterMismatchWarning`).
            kwargs: ``weight_name``, ``revision``, ``subfolder``, ``cache_dir``, ``local_files_only``, ``token``,
                ``low_cpu_mem_usage``.
        """
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, dict):
            source = pretrained_model_name_or_path_or_dict = dict(pretrained_model_name_or_path_or_dict)
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        ignore_mismatched_base = kwargs.pop("ignore_mismatched_base", False)
        state_dict, metadata, file_metadata = self.lora_state_dict(
            pretrained_model_name_or_path_or_dict, return_lora_metadata=True, return_file_metadata=True, **kwargs
        )
        bad = [k for k in state_dict if "lora" not in k]
        if not state_dict or bad:
            raise ValueError(
                f"not a LoRA checkpoint: {len(bad)} of {len(state_dict)} tensors have no 'lora' in their name "
                f"(e.g. {bad[:3]}). Pass the folder or file written by `save_lora_weights` / train_svare.py."
            )
        name = None if isinstance(source, dict) else os.fspath(source)
        label = "the state dict" if name is None else repr(name)
        _check_keys_match_modules(state_dict, self.transformer, self.transformer_name, label)
        adapter = AdapterMetadata.from_safetensors_metadata(file_metadata, source=name or label)
        _check_base_model(adapter, self.transformer, name, ignore_mismatched_base)
        self.transformer.load_lora_adapter(
            state_dict,
            network_alphas=None,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=self,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
            prefix=self.transformer_name,
        )

    @classmethod
    def save_lora_weights(
        cls,
        save_directory: str | os.PathLike,
        transformer_lora_layers: dict[str, torch.Tensor | torch.nn.Module] | None = None,
        is_main_process: bool = True,
        weight_name: str | None = None,
        save_function=None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata: dict | None = None,
        extra_metadata: dict[str, str] | None = None,
    ) -> str | None:
        """Write ``transformer_lora_layers`` to ``save_directory/pytorch_lora_weights.safetensors`` atomically.

        ``transformer_lora_adapter_metadata`` (the ``LoraConfig`` as a dict, e.g. from
        ``diffusers.training_utils._collate_lora_metadata``) keeps ``lora_alpha`` and the targets, so loading gives
        the same outputs; ``extra_metadata`` adds string entries to the safetensors header. Returns the file path.
        """
        if not transformer_lora_layers:
            raise ValueError("transformer_lora_layers is empty: pass get_peft_model_state_dict(pipe.transformer)")
        if not safe_serialization or save_function is not None:
            raise ValueError("var-erase writes safetensors only; leave safe_serialization=True and save_function=None")
        if not is_main_process:
            return None
        state_dict = cls.pack_weights(transformer_lora_layers, cls.transformer_name)
        header = {"format": "pt", **(extra_metadata or {})}
        if transformer_lora_adapter_metadata:
            packed = {f"{cls.transformer_name}.{k}": sorted(v) if isinstance(v, set) else v
                      for k, v in transformer_lora_adapter_metadata.items()}
            header[LORA_ADAPTER_METADATA_KEY] = json.dumps(packed, indent=2, sort_keys=True)
        path = os.path.join(save_directory, weight_name or LORA_WEIGHT_NAME)
        state_dict = {k: v.detach().contiguous() for k, v in state_dict.items()}
        atomic_write_bytes(path, safetensors.torch.save(state_dict, metadata=header))
        return path

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs,
    ) -> None:
        """Merge the active (or named) adapters into the transformer weights; undo with ``unfuse_lora``."""
        super().fuse_lora(components=components or ["transformer"], lora_scale=lora_scale,
                          safe_fusing=safe_fusing, adapter_names=adapter_names, **kwargs)

    def unfuse_lora(self, components: list[str] | None = None, **kwargs) -> None:
        """Restore the weights from before ``fuse_lora``."""
        super().unfuse_lora(components=components or ["transformer"], **kwargs)


_LORA_SUFFIX = re.compile(r"\.lora_(?:A|B|down|up|magnitude_vector|embedding_A|embedding_B)(?:\.[^.]+)?"
                          r"(?:\.weight|\.bias)?$")
_FOREIGN_FORMATS = (
    (("lora_unet_", "unet.", "down_blocks", "up_blocks", "mid_block", "input_blocks", "output_blocks"),
     "a diffusion UNet LoRA (Stable Diffusion / SDXL, diffusers or kohya format)"),
    (("text_encoder", "lora_te", "te1_", "te2_"), "a text-encoder LoRA of a Stable Diffusion pipeline"),
    (("single_transformer_blocks", "double_blocks", "single_blocks", "transformer_blocks", "joint_blocks"),
     "a LoRA of a diffusion transformer (Flux, SD3, PixArt, ...)"),
    (("model.layers.", "self_attn", "q_proj", "mlp.gate_proj"), "a language-model LoRA (transformers / PEFT)"),
)


def _lora_module_name(key: str, prefix: str) -> str:
    """``transformer.blocks.0.attn2.to_q.lora_A.weight`` -> ``blocks.0.attn2.to_q`` (the module it adapts)."""
    key = key[len(prefix) + 1:] if key.startswith(f"{prefix}.") else key
    return _LORA_SUFFIX.sub("", key)


def _check_keys_match_modules(state_dict: dict, transformer: torch.nn.Module, prefix: str, label: str) -> None:
    """ValueError if no key of ``state_dict`` names a module of ``transformer`` (diffusers would load nothing)."""
    modules = {name for name, _ in transformer.named_modules()}
    if any(_lora_module_name(key, prefix) in modules for key in state_dict if key.startswith(f"{prefix}.")):
        return
    keys = sorted(state_dict)
    text = " ".join(keys).lower()
    kind = next((what for markers, what in _FOREIGN_FORMATS if any(m in text for m in markers)),
                "a LoRA of another model")
    linear = next((name for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
                   and ".attn2." in f".{name}."), None) or next(
        (name for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)), "blocks.0.attn2.to_q")
    linear = linear.replace(".base_layer", "")
    raise ValueError(
        f"{label} matches no module of this pipeline's {type(transformer).__name__}: it looks like {kind} (keys such "
        f"as {keys[:3]}). var-erase loads LoRA adapters of its VAR transformer, with keys such as "
        f"'{prefix}.{linear}.lora_A.weight' (written by `save_lora_weights` / examples/train_svare.py); an adapter "
        "made for another model cannot be used with this one."
    )


def _check_base_model(adapter: AdapterMetadata | None, transformer: torch.nn.Module, name: str | None,
                      ignore_mismatched_base: bool) -> None:
    """Refuse an adapter recorded for another architecture (unless ``ignore_mismatched_base``); warn when it was
    trained on other weights. ``name``: the adapter's path or repo id (None for a state dict)."""
    if adapter is None:
        return
    label = repr(name) if name else "(a state dict)"
    diff = architecture_mismatch(adapter.base_model_architecture, transformer)
    if diff is not None:
        message = (
            f"the erasure adapter {label} was trained on a transformer of another architecture ({diff}; the "
            f"adapter's base: {adapter.base_model!r}, {_describe(adapter.base_model_architecture)}; this pipeline's "
            f"transformer: {_describe(None, transformer)}). Its weights do not fit this model. Load it onto its base "
            "model, or pass ignore_mismatched_base=True to load_lora_weights to load the tensors that fit anyway."
        )
        if not ignore_mismatched_base:
            raise ValueError(message)
        warnings.warn(message, AdapterMismatchWarning, stacklevel=3)
        return
    check_adapter_compatibility(adapter, transformer, adapter=name)  # other weights: AdapterMismatchWarning


def _describe(architecture: dict | None, transformer: torch.nn.Module | None = None) -> str:
    architecture = architecture if architecture is not None else model_architecture(transformer)
    order = {key: i for i, key in enumerate(("class", *ARCHITECTURE_KEYS))}
    return ", ".join(f"{k}={architecture[k]}" for k in sorted(architecture, key=lambda k: order.get(k, len(order))))


def adapter_layers(model: torch.nn.Module) -> list[BaseTunerLayer]:
    """The PEFT adapter layers (LoRA-wrapped modules) of ``model``."""
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextmanager
def adapters_disabled(transformer):
    """Context manager: run a PEFT-adapted model as its base model.

    Switches off every enabled adapter layer, and back on afterwards; layers that were off stay off, and the
    ``requires_grad`` flags PEFT's toggle changes are restored. A no-op for a model without adapters.
    """
    enabled = [layer for layer in adapter_layers(transformer) if not layer.disable_adapters]
    requires_grad = {param: param.requires_grad for param in transformer.parameters()}
    for layer in enabled:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in enabled:
            layer.enable_adapters(True)
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)
