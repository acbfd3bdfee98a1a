"""Prompt pairs for erasure: each pair maps an unsafe prompt (it names the concept) to a safe paraphrase of it.

S-VARE learns, under the unsafe prompt, the token trajectory the frozen model draws for the safe one (research/
paper.md §1.2, §1.8). The files it was trained on come from EAR's ECGVF generator (paper.md §1.7); this module reads
them as they are published:

- JSON, a list of objects with ``original_prompt`` / ``modified_prompt`` (EAR ``train_church.json``) or
  ``unsafe_prompt`` / ``safe_prompt`` (EAR ``train_nudity.json``, what S-VARE's tools read), or ``unsafe`` / ``safe``;
  an optional ``concept``; other keys (``replaced``, ``category``, ``idx``) are ignored.
- CSV with a header naming one of those column pairs (EAR ``train_van_gogh.csv`` has ``unsafe_prompt,safe_prompt``),
  for example ``unsafe,safe,concept``.

Prompts are stripped of surrounding whitespace (EAR's safe prompts start with a space). Every problem is reported
with the file, the item or line, and what to change. Named concepts of the toy world get their pairs from
:mod:`var_erase.toy`, not from here.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..utils import atomic_write_bytes

__all__ = ["KEY_PAIRS", "PromptPair", "PromptPairsError", "load_prompt_pairs", "write_prompt_pairs"]

KEY_PAIRS: tuple[tuple[str, str], ...] = (
    ("unsafe_prompt", "safe_prompt"),  # EAR nudity, S-VARE
    ("original_prompt", "modified_prompt"),  # EAR church
    ("unsafe", "safe"),
)
"""Accepted (unsafe, safe) key or column names, in the order they are looked for."""

CONCEPT_KEY = "concept"
_ACCEPTED = ", ".join(f"{u!r}/{s!r}" for u, s in KEY_PAIRS)


@dataclass(frozen=True)
class PromptPair:
    """One training pair: ``unsafe`` names the concept to erase, ``safe`` is the paraphrase to steer it to."""

    unsafe: str
    safe: str
    concept: str | None = None


class PromptPairsError(ValueError):
    """A prompt-pairs file or list that cannot be used; the message names the file, the row and the fix."""


def load_prompt_pairs(
    path: str | os.PathLike, *, default_concept: str | None = None, drop_duplicates: bool = False
) -> list[PromptPair]:
    """Read unsafe -> safe prompt pairs from an EAR / S-VARE JSON file or a CSV file (see the module docstring).

    Args:
        path: a ``.json`` or ``.csv`` file.
        default_concept: the concept of rows that name none (EAR's Van Gogh CSV has no ``concept`` column).
        drop_duplicates: keep the first of repeated (unsafe, safe) pairs instead of raising.

    Raises:
        FileNotFoundError: the file does not exist.
        PromptPairsError (a ``ValueError``): empty file, unknown format, missing keys, empty or non-text prompts,
            identical unsafe and safe prompts, or repeated pairs.
    """
    path = Path(path)
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        rows = _json_rows(path, text)
    elif suffix == ".csv":
        rows = _csv_rows(path, text)
    else:
        raise PromptPairsError(
            f"{path}: unsupported prompt-pairs format {path.suffix or '(no extension)'!r}. "
            "Use a .json file (a list of objects, EAR / S-VARE style) or a .csv file with a header."
        )
    pairs = [_to_pair(path, where, row, default_concept) for where, row in rows]
    return _check_unique(path, pairs, [where for where, _ in rows], drop_duplicates)


def write_prompt_pairs(pairs: Iterable[PromptPair], path: str | os.PathLike) -> Path:
    """Write ``pairs`` as S-VARE JSON (``unsafe_prompt``, ``safe_prompt``, ``concept``), atomically.

    The pairs are checked as :func:`load_prompt_pairs` would check them, so a written file always reads back.
    Returns the path written.
    """
    path = Path(path)
    pairs = list(pairs)
    wheres = [f"pair {i}" for i in range(1, len(pairs) + 1)]
    for where, pair in zip(wheres, pairs):
        if not isinstance(pair, PromptPair):
            raise TypeError(f"{where} is a {type(pair).__name__}, expected PromptPair(unsafe, safe, concept)")
        _to_pair(path, where, {"unsafe": pair.unsafe, "safe": pair.safe, CONCEPT_KEY: pair.concept}, None)
    _check_unique(path, pairs, wheres, drop_duplicates=False)
    if not pairs:
        raise PromptPairsError(f"{path}: no prompt pairs to write")
    records = [
        {"unsafe_prompt": p.unsafe, "safe_prompt": p.safe, **({CONCEPT_KEY: p.concept} if p.concept else {})}
        for p in pairs
    ]
    atomic_write_bytes(path, (json.dumps(records, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return path


# -- reading ---------------------------------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(
            errno.ENOENT, f"prompt-pairs file not found: {path}. Check the path (relative paths start at "
            f"{Path.cwd()}); it should be a .json or .csv file of unsafe/safe prompt pairs", str(path)
        )
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, f"{path} is a folder; pass the .json or .csv file inside it", str(path))
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: tolerate the byte-order mark spreadsheet tools write
    except UnicodeDecodeError as err:
        raise PromptPairsError(f"{path}: not UTF-8 text ({err}). Re-save the file as UTF-8.") from err
    if not text.strip():
        raise PromptPairsError(f"{path}: the file is empty. Add unsafe/safe prompt pairs ({_ACCEPTED}).")
    return text


def _json_rows(path: Path, text: str) -> list[tuple[str, Mapping]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise PromptPairsError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    if not isinstance(data, list):
        found = f"an object with keys {sorted(data)[:8]}" if isinstance(data, dict) else f"a {type(data).__name__}"
        raise PromptPairsError(
            f"{path}: expected a JSON list of objects (one per pair, EAR / S-VARE style), got {found}. "
            "If the pairs sit under one key, save that list on its own."
        )
    if not data:
        raise PromptPairsError(f"{path}: the JSON list is empty. Add objects with keys {_ACCEPTED}.")
    rows = []
    for index, item in enumerate(data, start=1):
        where = f"item {index}"
        if not isinstance(item, dict):
            raise PromptPairsError(f"{path}: {where} is a {type(item).__name__}, expected an object with {_ACCEPTED}")
        rows.append((where, item))
    return rows


def _csv_rows(path: Path, text: str) -> list[tuple[str, Mapping]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [name.strip() for name in reader.fieldnames or []]
    reader.fieldnames = header
    if not any(u in header and s in header for u, s in KEY_PAIRS):
        raise PromptPairsError(
            f"{path}: line 1 must be a header naming the prompt columns, one of {_ACCEPTED} (optionally "
            f"{CONCEPT_KEY!r}); found {header}. Add or rename the header, e.g. 'unsafe,safe,concept'."
        )
    rows = []
    for row in reader:
        where = f"line {reader.line_num}"
        if all(not (value or "").strip() for value in row.values() if isinstance(value, str)) and None not in row:
            continue  # a line of empty cells
        if None in row or None in row.values():  # more, or fewer, cells than header columns
            cells = len(header) + len(row[None]) if None in row else sum(v is not None for v in row.values())
            raise PromptPairsError(
                f"{path}: {where} has {cells} cell{'s' if cells != 1 else ''} but the header has {len(header)}. "
                "Quote prompts that contain commas (\"a cat, a dog\"); give every row the same columns."
            )
        rows.append((where, row))
    if not rows:
        raise PromptPairsError(f"{path}: the header is there but no prompt pairs follow. Add one pair per line.")
    return rows


def _to_pair(path: Path, where: str, row: Mapping, default_concept: str | None) -> PromptPair:
    unsafe_key, safe_key = _pick_keys(path, where, row)
    unsafe = _text(path, where, row, unsafe_key)
    safe = _text(path, where, row, safe_key)
    if unsafe == safe:
        raise PromptPairsError(
            f"{path}: {where}: the unsafe and safe prompts are identical ({unsafe!r}), so there is nothing to erase. "
            "Rewrite the safe prompt without the concept, or delete the pair."
        )
    concept = row.get(CONCEPT_KEY)
    if concept is not None and not isinstance(concept, str):
        raise PromptPairsError(f"{path}: {where}: {CONCEPT_KEY!r} must be text, got {type(concept).__name__}")
    concept = (concept or "").strip() or default_concept
    return PromptPair(unsafe, safe, concept)


def _pick_keys(path: Path, where: str, row: Mapping) -> tuple[str, str]:
    both = [(u, s) for u, s in KEY_PAIRS if u in row and s in row]
    if both:
        first = both[0]
        for other in both[1:]:
            if [_strip(row[k]) for k in other] != [_strip(row[k]) for k in first]:
                raise PromptPairsError(
                    f"{path}: {where} has both {first[0]!r}/{first[1]!r} and {other[0]!r}/{other[1]!r} with "
                    "different prompts. Keep one pair of keys."
                )
        return first
    for u, s in KEY_PAIRS:
        if u in row or s in row:
            have, missing = (u, s) if u in row else (s, u)
            raise PromptPairsError(f"{path}: {where} has {have!r} but no {missing!r}. Add the missing prompt.")
    keys = sorted(k for k in row if k is not None)
    raise PromptPairsError(
        f"{path}: {where} has keys {keys}, none of the accepted prompt keys {_ACCEPTED}. Rename the keys "
        "(EAR files use 'original_prompt'/'modified_prompt' or 'unsafe_prompt'/'safe_prompt')."
    )


def _text(path: Path, where: str, row: Mapping, key: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise PromptPairsError(f"{path}: {where}: {key!r} must be text, got {type(value).__name__} {value!r}")
    if not value.strip():
        raise PromptPairsError(f"{path}: {where}: {key!r} is empty. Write the prompt or delete the pair.")
    return value.strip()


def _strip(value) -> object:
    return value.strip() if isinstance(value, str) else value


def _check_unique(path: Path, pairs: list[PromptPair], wheres: list[str], drop_duplicates: bool) -> list[PromptPair]:
    first_seen: dict[tuple[str, str], str] = {}
    kept = []
    for where, pair in zip(wheres, pairs):
        key = (pair.unsafe, pair.safe)
        if key not in first_seen:
            first_seen[key] = where
            kept.append(pair)
        elif not drop_duplicates:
            raise PromptPairsError(
                f"{path}: {where} repeats the pair of {first_seen[key]} ({pair.unsafe!r} -> {pair.safe!r}). "
                "Delete one of them, or pass drop_duplicates=True to keep the first."
            )
    return kept


# -- writing ---------------------------------------------------------------------------------------------------------

