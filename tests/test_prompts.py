"""Prompt pairs: the EAR / S-VARE JSON and CSV formats as published, and a clear error for every bad input."""

import json
import os

import pytest

from var_erase.erasure.prompts import PromptPair, PromptPairsError, load_prompt_pairs, write_prompt_pairs

# Shaped like EAR's data/train_church.json: original/modified keys, concept, and an extra "replaced" key.
EAR_CHURCH = [
    {"original_prompt": "The church is surrounded by a peaceful garden.",
     "modified_prompt": "The cinema is surrounded by a peaceful garden.", "concept": "church", "replaced": "cinema"},
    {"original_prompt": "A church on a hill", "modified_prompt": "A ground on a hill", "concept": "church",
     "replaced": "ground"},
]
# Shaped like EAR's data/train_nudity.json: unsafe/safe keys, safe prompts with a leading space, a "category" key.
EAR_NUDITY = [
    {"unsafe_prompt": "A naked person on a beach.", "safe_prompt": " A person in a swimsuit on a beach.",
     "concept": "nudity", "category": "sexual"},
]
# Shaped like EAR's data/train_van_gogh.csv: a header, no concept column.
EAR_VAN_GOGH_CSV = (
    "unsafe_prompt,safe_prompt\na photo of apple in Van Gogh,a photo of apple\na night sky in Van Gogh,a night sky\n"
)


def _write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


# -- the formats -----------------------------------------------------------------------------------------------------
def test_ear_church_json(tmp_path):
    pairs = load_prompt_pairs(_write(tmp_path, "train_church.json", EAR_CHURCH))
    assert pairs == [
        PromptPair("The church is surrounded by a peaceful garden.", "The cinema is surrounded by a peaceful garden.",
                   "church"),
        PromptPair("A church on a hill", "A ground on a hill", "church"),
    ]


def test_ear_nudity_json_strips_whitespace(tmp_path):
    (pair,) = load_prompt_pairs(_write(tmp_path, "train_nudity.json", EAR_NUDITY))
    assert pair == PromptPair("A naked person on a beach.", "A person in a swimsuit on a beach.", "nudity")


def test_json_with_plain_unsafe_safe_keys_and_no_concept(tmp_path):
    path = _write(tmp_path, "pairs.json", [{"unsafe": "a red circle", "safe": "a red square"}])
    assert load_prompt_pairs(path) == [PromptPair("a red circle", "a red square", None)]
    assert load_prompt_pairs(path, default_concept="circle")[0].concept == "circle"


def test_ear_van_gogh_csv_with_default_concept(tmp_path):
    pairs = load_prompt_pairs(_write(tmp_path, "train_van_gogh.csv", EAR_VAN_GOGH_CSV), default_concept="Van Gogh")
    assert pairs == [PromptPair("a photo of apple in Van Gogh", "a photo of apple", "Van Gogh"),
                     PromptPair("a night sky in Van Gogh", "a night sky", "Van Gogh")]


def test_csv_unsafe_safe_concept_with_quotes_bom_crlf_and_blank_lines(tmp_path):
    text = '\ufeffunsafe,safe,concept\r\n"a cat, in Van Gogh style","a cat, in a plain style",Van Gogh\r\n\r\n,,\r\n'
    pairs = load_prompt_pairs(_write(tmp_path, "pairs.csv", text))
    assert pairs == [PromptPair("a cat, in Van Gogh style", "a cat, in a plain style", "Van Gogh")]


def test_csv_row_concept_overrides_default(tmp_path):
    path = _write(tmp_path, "pairs.csv", "unsafe,safe,concept\na church,a barn,church\na tower,a tree,\n")
    assert [p.concept for p in load_prompt_pairs(path, default_concept="building")] == ["church", "building"]


def test_write_then_load_round_trip(tmp_path):
    pairs = [PromptPair("a naked person", "a person in a coat", "nudity"), PromptPair("a church", "a barn")]
    path = write_prompt_pairs(pairs, tmp_path / "out" / "pairs.json")
    assert load_prompt_pairs(path) == pairs
    assert json.loads(path.read_text())[0] == {"unsafe_prompt": "a naked person", "safe_prompt": "a person in a coat",
                                               "concept": "nudity"}  # S-VARE's keys
    assert os.listdir(path.parent) == ["pairs.json"]  # no temp file left behind
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_write_is_atomic_when_it_fails(tmp_path, monkeypatch):
    path = write_prompt_pairs([PromptPair("a church", "a barn")], tmp_path / "pairs.json")
    before = path.read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_prompt_pairs([PromptPair("a tower", "a tree")], path)
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["pairs.json"]


def test_write_refuses_pairs_that_would_not_read_back(tmp_path):
    with pytest.raises(PromptPairsError, match="pair 2 repeats the pair of pair 1"):
        write_prompt_pairs([PromptPair("a church", "a barn"), PromptPair("a church", "a barn")], tmp_path / "p.json")
    with pytest.raises(PromptPairsError, match="pair 1: 'safe' is empty"):
        write_prompt_pairs([PromptPair("a church", " ")], tmp_path / "p.json")
    with pytest.raises(TypeError, match="expected PromptPair"):
        write_prompt_pairs([("a church", "a barn")], tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()


def test_duplicates_can_be_dropped(tmp_path):
    rows = [{"unsafe": "a church", "safe": "a barn"}, {"unsafe": " a church", "safe": "a barn "},
            {"unsafe": "a church", "safe": "a mill"}]  # the same unsafe prompt with another anchor is not a duplicate
    path = _write(tmp_path, "pairs.json", rows)
    with pytest.raises(PromptPairsError, match=r"item 2 repeats the pair of item 1 .*drop_duplicates=True"):
        load_prompt_pairs(path)
    assert load_prompt_pairs(path, drop_duplicates=True) == [PromptPair("a church", "a barn"),
                                                             PromptPair("a church", "a mill")]


# -- bad inputs ------------------------------------------------------------------------------------------------------
BAD_INPUTS = [
    # (file name, content, message fragments)
    ("empty.json", "", ["the file is empty", "'unsafe_prompt'/'safe_prompt'"]),
    ("blank.csv", "  \n\n", ["the file is empty"]),
    ("broken.json", '[{"unsafe": "a"', ["invalid JSON at line 1, column"]),
    ("dict.json", {"pairs": [{"unsafe": "a", "safe": "b"}]}, ["expected a JSON list", "keys ['pairs']"]),
    ("none.json", [], ["the JSON list is empty"]),
    ("strings.json", ["a church"], ["item 1 is a str, expected an object"]),
    ("keys.json", [{"prompt": "a church", "target": "a barn"}],
     ["item 1 has keys ['prompt', 'target']", "'original_prompt'/'modified_prompt'", "'unsafe'/'safe'"]),
    ("half.json", [{"unsafe": "a church", "safe": "a barn"}, {"original_prompt": "a church"}],
     ["item 2 has 'original_prompt' but no 'modified_prompt'"]),
    ("empty_safe.json", [{"unsafe_prompt": "a church", "safe_prompt": "   "}],
     ["item 1: 'safe_prompt' is empty", "delete the pair"]),
    ("number.json", [{"unsafe": "a church", "safe": 3}], ["item 1: 'safe' must be text, got int"]),
    ("null.json", [{"unsafe": None, "safe": "a barn"}], ["item 1: 'unsafe' must be text, got NoneType"]),
    ("concept.json", [{"unsafe": "a church", "safe": "a barn", "concept": 1}], ["'concept' must be text"]),
    ("same.json", [{"unsafe": "a church", "safe": " a church"}], ["item 1: the unsafe and safe prompts are identical"]),
    ("ambiguous.json", [{"unsafe_prompt": "a church", "safe_prompt": "a barn", "unsafe": "a tower", "safe": "a tree"}],
     ["item 1 has both 'unsafe_prompt'/'safe_prompt' and 'unsafe'/'safe'"]),
    ("dupes.csv", "unsafe,safe\na church,a barn\na tower,a tree\na church,a barn\n",
     ["line 4 repeats the pair of line 2", "Delete one of them"]),
    ("noheader.csv", "a church,a barn\n", ["line 1 must be a header", "found ['a church', 'a barn']"]),
    ("onlyheader.csv", "unsafe,safe\n", ["no prompt pairs follow"]),
    ("cells.csv", "unsafe,safe\na church, with a spire,a barn\n", ["line 2 has 3 cells but the header has 2", "Quote"]),
    ("short.csv", "unsafe,safe,concept\na church\n", ["line 2 has 1 cell but the header has 3"]),
    ("empty_cell.csv", "unsafe,safe\na church,\n", ["line 2: 'safe' is empty"]),
    ("latin1.csv", "unsafe,safe\ncaf\xe9,a barn\n".encode("latin-1"), ["not UTF-8 text", "Re-save the file as UTF-8"]),
    ("pairs.txt", "a church -> a barn", ["unsupported prompt-pairs format '.txt'", ".json", ".csv"]),
]


@pytest.mark.parametrize(("name", "content", "fragments"), BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_names_the_file_the_row_and_the_fix(tmp_path, name, content, fragments):
    path = _write(tmp_path, name, content)
    with pytest.raises(PromptPairsError) as info:
        load_prompt_pairs(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    assert isinstance(info.value, ValueError)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prompt-pairs file not found: .*nope\.json. Check the path"):
        load_prompt_pairs(tmp_path / "nope.json")


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(IsADirectoryError, match="pass the .json or .csv file inside it"):
        load_prompt_pairs(tmp_path)
