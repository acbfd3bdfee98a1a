"""The private diffusers function var-erase wraps (``var_erase.loaders._diffusers_compat``): still there, still taking
what is passed and returning what is read; a changed one is an error naming the diffusers version."""

import inspect
import json
import re

import diffusers
import pytest
import safetensors.torch
import torch
from diffusers.loaders import lora_base

from var_erase.loaders import _diffusers_compat as compat


@pytest.fixture(autouse=True)
def _fresh_check():
    compat._fetch_state_dict.cache_clear()
    yield
    compat._fetch_state_dict.cache_clear()


def _write_lora(folder, name="pytorch_lora_weights.safetensors"):
    tensors = {"transformer.blocks.0.to_k.lora_A.weight": torch.randn(4, 8),
               "transformer.blocks.0.to_k.lora_B.weight": torch.randn(8, 4)}
    lora_metadata = {"transformer.r": 4, "transformer.lora_alpha": 4.0, "transformer.target_modules": ["to_k"]}
    header = {"format": "pt", lora_base.LORA_ADAPTER_METADATA_KEY: json.dumps(lora_metadata), "extra": "kept"}
    safetensors.torch.save_file(tensors, str(folder / name), metadata=header)
    return tensors, lora_metadata


def test_the_installed_diffusers_takes_every_argument_passed():
    fetch = compat._fetch_state_dict()
    assert fetch is lora_base._fetch_state_dict


def test_reads_tensors_lora_metadata_and_the_whole_header(tmp_path):
    tensors, lora_metadata = _write_lora(tmp_path, "adapter.safetensors")
    state_dict, metadata, header = compat.fetch_lora_state_dict(str(tmp_path), "adapter.safetensors",
                                                                local_files_only=True)
    assert state_dict.keys() == tensors.keys() and all(torch.equal(state_dict[k], tensors[k]) for k in tensors)
    assert metadata == lora_metadata
    assert header["extra"] == "kept" and json.loads(header[lora_base.LORA_ADAPTER_METADATA_KEY]) == lora_metadata
    passed = {"w": torch.ones(1)}
    assert compat.fetch_lora_state_dict(passed, None) == (passed, None, None)


def test_a_missing_file_is_diffusers_own_error(tmp_path):
    with pytest.raises(EnvironmentError, match="pytorch_lora_weights.safetensors"):
        compat.fetch_lora_state_dict(str(tmp_path), "pytorch_lora_weights.safetensors", local_files_only=True)


def test_a_changed_signature_fails_naming_the_diffusers_version(monkeypatch):
    def changed(pretrained_model_name_or_path_or_dict, weight_name, use_safetensors):  # an older / newer shape
        return {}, None

    monkeypatch.setattr(lora_base, "_fetch_state_dict", changed)
    message = rf"diffusers {re.escape(diffusers.__version__)}: _fetch_state_dict no longer takes .*local_files_only"
    with pytest.raises(compat.DiffusersCompatibilityError, match=message):
        compat.fetch_lora_state_dict("folder", "pytorch_lora_weights.safetensors")


def test_a_changed_return_value_fails_naming_the_diffusers_version(monkeypatch):
    def two_values(**kwargs):
        return {}, None

    two_values.__signature__ = inspect.signature(lora_base._fetch_state_dict)
    monkeypatch.setattr(lora_base, "_fetch_state_dict", two_values)
    message = rf"diffusers {re.escape(diffusers.__version__)}: .*returned tuple of 2"
    with pytest.raises(compat.DiffusersCompatibilityError, match=message):
        compat.fetch_lora_state_dict("folder", "pytorch_lora_weights.safetensors")


def test_a_removed_function_fails_naming_the_diffusers_version(monkeypatch):
    monkeypatch.delattr(lora_base, "_fetch_state_dict")
    with pytest.raises(compat.DiffusersCompatibilityError, match="_fetch_state_dict no longer exists"):
        compat.fetch_lora_state_dict("folder", "pytorch_lora_weights.safetensors")
