"""Small shared helpers."""

from __future__ import annotations

import copy
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

REDACTED = "<redacted>"
_SECRET_WORDS = ("token", "secret", "password", "passwd", "api_key", "apikey")
_HF_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{20,}")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temp file next to ``path``, then rename it over ``path``: never a half-written file.

    The file is made world-readable (``mkstemp`` creates 0600): adapters, cards and prompt files are meant to be shared.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def to_device_async(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device`` without making the host wait for the GPU: a CPU tensor bound for CUDA goes through
    pinned memory with a non-blocking copy (a plain ``.to("cuda")`` from pageable memory synchronises the stream
    first). Anywhere else this is ``tensor.to(device)``."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def is_secret_key(key: Any) -> bool:
    """Whether a mapping key names a secret: it contains ``token``, ``secret``, ``password`` or ``api_key``
    (case-insensitive: ``hub_token``, ``HF_TOKEN``, ``hubToken``, ``client_secret``, ``OPENAI_API_KEY`` ...), not
    counting ``tokenizer`` / ``tokenize`` (``tokenizer_path`` names a file)."""
    return bool(_secret_words(key))


def redact_secrets(mapping: Any) -> Any:
    """A deep copy of ``mapping`` with every secret replaced by ``"<redacted>"``, for anything written to disk or
    uploaded (training logs, adapter metadata, model cards).

    The value of every key that names a secret (:func:`is_secret_key`), in nested dicts and lists too, becomes
    ``"<redacted>"``; None stays None (an unset token is worth knowing). Numbers and booleans under a key whose only
    secret word is ``token`` are kept: they are settings such as ``token_threshold`` or ``max_text_tokens``, never
    credentials (a number under ``secret``/``password``/``api_key`` is still redacted). Any string that holds a
    Hugging Face access token (``hf_`` + 20 or more letters and digits) is redacted as well, e.g. a logged command
    line. Mappings come back as dicts, tuples as tuples, lists as lists.
    """
    if isinstance(mapping, Mapping):
        return {key: _redact_value(key, value) for key, value in mapping.items()}
    if isinstance(mapping, list):
        return [redact_secrets(value) for value in mapping]
    if isinstance(mapping, tuple):
        return tuple(redact_secrets(value) for value in mapping)
    if isinstance(mapping, str):
        return _HF_TOKEN_RE.sub(REDACTED, mapping)
    return copy.deepcopy(mapping)


def _secret_words(key: Any) -> set[str]:
    lowered = str(key).lower().replace("-", "_").replace("tokeniz", "")
    return {word for word in _SECRET_WORDS if word in lowered}


def _redact_value(key: Any, value: Any) -> Any:
    words = _secret_words(key)
    if value is None or not words:
        return redact_secrets(value)
    if words == {"token"} and isinstance(value, (bool, int, float)):
        return value
    return REDACTED
