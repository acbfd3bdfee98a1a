"""docs/training.md's flag table is examples/train_svare.py's argparse definitions, flag for flag.

After changing a flag, regenerate the table: ``PYTHONPATH=src python tests/test_training_docs.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "training.md"
START, END = "<!-- flags: generated from examples/train_svare.py by tests/test_training_docs.py -->", "<!-- /flags -->"


class _Parser(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def train_svare_parser() -> argparse.ArgumentParser:
    """The parser ``examples/train_svare.py`` builds (caught as it starts parsing, so no argument is needed)."""
    spec = importlib.util.spec_from_file_location("train_svare_for_docs", ROOT / "examples" / "train_svare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def catch(self, *args, **kwargs):
        raise _Parser(self)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = catch
    try:
        module.parse_args([])
    except _Parser as caught:
        return caught.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError("examples/train_svare.py's parse_args did not call ArgumentParser.parse_args")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off" if action.default is False else "on"
    if action.default is None or action.default == []:
        return "-"
    from var_erase import DEFAULT_MODEL

    if action.default == DEFAULT_MODEL:  # an absolute path that depends on where the package is installed
        return "`var_erase.DEFAULT_MODEL`"
    return f"`{_cell(action.default)}`"


def flags_table(parser: argparse.ArgumentParser) -> str:
    """A markdown table: flag, default, meaning (the help text; the choices when there are any)."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flag = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.dest}`"
        meaning = _cell(action.help or "")
        if action.choices is not None:
            meaning = f"{meaning} (one of {', '.join(f'`{c}`' for c in action.choices)})".strip()
        if isinstance(action, argparse._AppendAction):
            meaning = f"{meaning} (repeatable)" if "repeat" not in meaning else meaning
        rows.append(f"| {flag} | {_default(action)} | {meaning or '-'} |")
    return "\n".join(rows)


def _documented_table(text: str) -> str:
    assert START in text and END in text, f"{DOC} lost its markers {START!r} / {END!r}"
    return text.split(START, 1)[1].split(END, 1)[0].strip()


def test_training_md_lists_every_flag_of_train_svare():
    expected = flags_table(train_svare_parser())
    assert _documented_table(DOC.read_text()) == expected, (
        "docs/training.md's flag table is out of date: run `PYTHONPATH=src python tests/test_training_docs.py`"
    )


def test_every_flag_appears_once():
    parser = train_svare_parser()
    table = _documented_table(DOC.read_text())
    for action in parser._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert table.count(f"`{flag}`") == 1, flag


if __name__ == "__main__":  # regenerate the table in place
    sys.path.insert(0, str(ROOT / "src"))
    text = DOC.read_text()
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    from var_erase.utils import atomic_write_bytes

    atomic_write_bytes(DOC, f"{before}{START}\n{flags_table(train_svare_parser())}\n{END}{after}".encode())
    print(f"wrote {DOC}")
