"""Evaluation prompt sets (I2P, Ring-A-Bell, COCO captions, ...) from a local file or a Hub dataset repo.

Formats read as the field publishes them (research/erasure_anchors.md §3.2):

- **CSV** with a header. The prompt column is ``prompt_column`` if given, else the first of ``prompt``,
  ``sensitive prompt`` (RECE's ``nudity-ring-a-bell.csv``), ``adv_prompt``, ``caption``, ``text``. Seeds come from
  ``evaluation_seed`` (ESD / MACE I2P and COCO-30k files) or ``sd_seed`` (``AIML-TUDA/i2p``, SPM), guidance from
  ``evaluation_guidance`` or ``sd_guidance_scale``; every other column is kept in ``PromptRecord.extra``. I2P's
  ``categories`` column (comma-separated, e.g. ``"sexual, violence"``) can filter the set (``categories=["sexual"]``).
- **JSON**: a list of strings, a list of objects (columns as for CSV), an object holding such a list under
  ``prompts`` / ``data`` / ``rows``, or a COCO captions file (``{"annotations": [{"caption": ...}, ...]}``).
- **TXT**: one prompt per line; blank lines are skipped.

``source`` is a local path, or a Hub dataset repo id together with ``filename`` (``hf_hub_download`` of that file; it
works offline from the Hugging Face cache once downloaded, and ``token`` reaches gated sets such as
``Chia15/RingABell-Nudity``). :data:`HUB_PROMPT_SETS` names the public files whose paths are known. Every problem is
reported with the file and what to change.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PROMPT_COLUMNS = ("prompt", "sensitive prompt", "adv_prompt", "caption", "text")
SEED_COLUMNS = ("evaluation_seed", "sd_seed", "seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale", "guidance_scale", "guidance")
HUB_PROMPT_SETS = {"i2p": ("AIML-TUDA/i2p", "i2p_benchmark.csv")}  # name -> (dataset repo id, file in the repo)


class PromptSetError(ValueError):
    """A prompt file that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class PromptRecord:
    """One evaluation prompt, with the seed and guidance the file prescribes (None when it has none)."""

    prompt: str
    seed: int | None = None
    guidance_scale: float | None = None
    extra: dict = field(default_factory=dict, compare=False)


def load_prompt_set(
    source: str | os.PathLike,
    *,
    filename: str | None = None,
    prompt_column: str | None = None,
    categories: str | Sequence[str] | None = None,
    limit: int | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> list[PromptRecord]:
    """Prompts of a local CSV / JSON / TXT file, a Hub dataset file, or a named set of :data:`HUB_PROMPT_SETS`.

    Args:
        source: a file path; a dataset repo id (with ``filename``); or a name in :data:`HUB_PROMPT_SETS`.
        filename: the file inside the dataset repo.
        prompt_column: the column holding prompts (default: the first of :data:`PROMPT_COLUMNS` present).
        categories: keep rows whose comma-separated ``categories`` column names one of these (I2P).
        limit: keep the first ``limit`` prompts (after filtering).
        revision, token: passed to ``hf_hub_download``.
    """
    path = resolve_prompt_file(source, filename, revision, token)
    records = _parse(path, prompt_column)
    if categories is not None:
        records = filter_categories(records, categories, path)
    if limit is not None:
        if limit < 1:
            raise PromptSetError(f"limit must be >= 1, got {limit}")
        records = records[:limit]
    if not records:
        raise PromptSetError(f"{path}: no prompts left (after the header and any category filter)")
    return records


def resolve_prompt_file(source: str | os.PathLike, filename: str | None = None, revision: str | None = None,
                        token: str | bool | None = None) -> Path:
    """A local path to the prompt file: ``source`` itself, or its Hub copy (downloaded once, then from the cache)."""
    if str(source) in HUB_PROMPT_SETS and filename is None:
        source, filename = HUB_PROMPT_SETS[str(source)]
    path = Path(source)
    if path.is_file() and filename is None:
        return path
    if path.is_dir():
        raise PromptSetError(f"{path} is a folder; pass the prompt file inside it")
    if filename is None:
        raise PromptSetError(f"{source} is not a file. For a Hub dataset pass its repo id and filename=..., or one of "
                             f"the named sets {sorted(HUB_PROMPT_SETS)}")
    return _download(str(source), filename, revision, token)


def filter_categories(records: Sequence[PromptRecord], categories: str | Sequence[str], path: Path | str = "prompts"
                      ) -> list[PromptRecord]:
    """Rows whose ``categories`` cell (``"sexual, violence"``) names one of ``categories`` (case-insensitive)."""
    wanted = {c.strip().lower() for c in ([categories] if isinstance(categories, str) else categories)}
    if any("categories" not in r.extra for r in records):
        raise PromptSetError(f"{path}: categories={sorted(wanted)} needs a 'categories' column (as in I2P's CSV)")
    return [r for r in records if wanted & {c.strip().lower() for c in str(r.extra["categories"]).split(",")}]


# ---------------------------------------------------------------------------------------------------------------------
# parsing
def _parse(path: Path, prompt_column: str | None) -> list[PromptRecord]:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise PromptSetError(f"{path}: not UTF-8 text ({err}); save it as UTF-8") from err
    if suffix == ".csv":
        return _rows_to_records(list(csv.DictReader(io.StringIO(text))), path, prompt_column, _csv_header(text))
    if suffix == ".json":
        return _json_to_records(text, path, prompt_column)
    if suffix == ".txt":
        return [PromptRecord(line.strip()) for line in text.splitlines() if line.strip()]
    raise PromptSetError(f"{path}: unknown prompt file type {suffix!r}; use .csv, .json or .txt")


def _csv_header(text: str) -> list[str]:
    return next(csv.reader(io.StringIO(text)), [])


def _json_to_records(text: str, path: Path, prompt_column: str | None) -> list[PromptRecord]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise PromptSetError(f"{path}: invalid JSON ({err})") from err
    if isinstance(data, Mapping):
        if "annotations" in data:  # COCO captions
            return _rows_to_records(data["annotations"], path, prompt_column or "caption")
        key = next((k for k in ("prompts", "data", "rows") if isinstance(data.get(k), list)), None)
        if key is None:
            raise PromptSetError(f"{path}: a JSON object needs a list under 'prompts', 'data', 'rows' or "
                                 f"'annotations'; found keys {sorted(data)[:10]}")
        data = data[key]
    if not isinstance(data, list):
        raise PromptSetError(f"{path}: expected a JSON list of prompts or of objects, got {type(data).__name__}")
    if all(isinstance(item, str) for item in data):
        return [PromptRecord(item.strip()) for item in data if item.strip()]
    return _rows_to_records(data, path, prompt_column)


def _rows_to_records(rows: list, path: Path, prompt_column: str | None,
                     header: Iterable[str] | None = None) -> list[PromptRecord]:
    if not all(isinstance(row, Mapping) for row in rows):
        raise PromptSetError(f"{path}: every item must be an object with a prompt field (or every item a string)")
    columns = list(header) if header is not None else list(dict.fromkeys(k for row in rows for k in row))
    column = _prompt_column(columns, path, prompt_column)
    seed_column = next((c for c in SEED_COLUMNS if c in columns), None)
    guidance_column = next((c for c in GUIDANCE_COLUMNS if c in columns), None)
    records = []
    for index, row in enumerate(rows, start=1):
        prompt = str(row.get(column) or "").strip()
        if prompt:
            records.append(PromptRecord(
                prompt, _number(row, seed_column, int, path, index), _number(row, guidance_column, float, path, index),
                {k: v for k, v in row.items() if k not in (column, seed_column, guidance_column) and k}))
    return records


def _prompt_column(columns: list[str], path: Path, prompt_column: str | None) -> str:
    if prompt_column is not None:
        if prompt_column not in columns:
            raise PromptSetError(f"{path}: no column {prompt_column!r}; the columns are {columns}")
        return prompt_column
    found = next((c for c in PROMPT_COLUMNS if c in columns), None)
    if found is None:
        raise PromptSetError(f"{path}: no prompt column; expected one of {list(PROMPT_COLUMNS)} in the header, got "
                             f"{columns}. Pass prompt_column=... to name it")
    return found


def _number(row: Mapping, column: str | None, kind: type, path: Path, index: int):
    if column is None or row.get(column) in (None, ""):
        return None
    try:
        return kind(float(row[column])) if kind is int else kind(row[column])
    except (TypeError, ValueError) as err:
        raise PromptSetError(f"{path}, data row {index}: {column}={row[column]!r} is not a number") from err


def _download(repo_id: str, filename: str, revision: str | None, token: str | bool | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset", revision=revision, token=token))
    except HFValidationError as err:
        raise PromptSetError(f"{repo_id!r} is neither a file nor a Hub dataset repo id ({err})") from err
    except GatedRepoError as err:
        raise PromptSetError(f"dataset {repo_id} is gated: accept its terms on the Hub and pass token=...") from err
    except RepositoryNotFoundError as err:
        raise PromptSetError(f"no dataset repo {repo_id} on the Hub (or it is private: pass token=...)") from err
    except LocalEntryNotFoundError as err:  # before EntryNotFoundError, its parent
        raise PromptSetError(f"{filename} of dataset {repo_id} is not in the Hugging Face cache and the Hub cannot be "
                             f"reached; download it once online, or pass a local copy of the file") from err
    except EntryNotFoundError as err:
        raise PromptSetError(f"dataset {repo_id} has no file {filename!r}") from err
