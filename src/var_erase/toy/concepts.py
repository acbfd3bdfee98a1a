"""The toy world's vocabulary: every value an image can show and every word a caption may use for it.

Three *concept kinds* can be prompted for, detected by the oracle and erased: ``shape`` (a noun), ``colour`` and
``style`` (the fill: solid, striped, dotted, outlined). Scene attributes that are captioned but never erased —
background, size class, position — are plain :class:`SceneWord` tables below.

Every value carries its training words by grammatical *form* (``noun`` for shapes; ``adj`` for colours; ``adj`` and
``post`` — a phrase that follows the noun, "with stripes" — for styles) and a *held-out* set of natural-English
paraphrases with the same forms. Held-out phrases are used only to evaluate (prompt adherence on unseen wording,
paraphrase attacks on an erased model); training captions and erasure prompt pairs never contain them.

Everything here is data: adding a colour is adding a row; the renderer, captions and oracle read these tables.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from types import MappingProxyType

CONCEPT_KINDS: tuple[str, ...] = ("shape", "colour", "style")
"""The erasable concept kinds, in the order the oracle's presence heads use."""

# the grammatical form each kind uses in captions; the first form is the one every template can take
KIND_FORMS: dict[str, tuple[str, ...]] = {"shape": ("noun",), "colour": ("adj",), "style": ("adj", "post")}


@dataclass(frozen=True)
class Concept:
    """One value of a concept kind: a shape, a colour or a fill style.

    Args:
        name: canonical name, unique across kinds (``"circle"``, ``"red"``, ``"striped"``).
        kind: one of :data:`CONCEPT_KINDS`.
        index: position within its kind (the oracle's head index).
        words: training wording per form, e.g. ``{"adj": ("striped", ...), "post": ("with stripes", ...)}``; the first
            word of the first form is the canonical caption word.
        heldout: held-out paraphrases per form (evaluation only), same forms as ``words``.
        rgb: the colour value, for colour concepts only.
    """

    name: str
    kind: str
    index: int
    words: MappingProxyType
    heldout: MappingProxyType
    rgb: tuple[int, int, int] | None = None

    @property
    def word(self) -> str:
        """The canonical caption word (``"circle"``, ``"red"``, ``"striped"``)."""
        return self.words[KIND_FORMS[self.kind][0]][0]

    @property
    def training_words(self) -> tuple[str, ...]:
        """Every training phrase of this concept, all forms."""
        return tuple(w for form in KIND_FORMS[self.kind] for w in self.words[form])

    @property
    def heldout_paraphrases(self) -> tuple[str, ...]:
        """Every held-out paraphrase of this concept, all forms (never used in training captions)."""
        return tuple(w for form in KIND_FORMS[self.kind] for w in self.heldout[form])


@dataclass(frozen=True)
class SceneWord:
    """A captioned scene attribute that is not an erasable concept (background, size class)."""

    name: str
    words: tuple[str, ...]
    value: tuple = field(default=())


def _concepts(kind: str, rows: list[tuple]) -> tuple[Concept, ...]:
    """Build the concepts of one kind from ``(name, words, heldout[, rgb])`` rows."""
    forms = KIND_FORMS[kind]
    out = []
    for index, row in enumerate(rows):
        name, words, heldout, *rgb = row
        words = words if isinstance(words, dict) else {forms[0]: words}
        heldout = heldout if isinstance(heldout, dict) else {forms[0]: heldout}
        out.append(
            Concept(
                name=name,
                kind=kind,
                index=index,
                words=MappingProxyType({f: tuple(words[f]) for f in forms}),
                heldout=MappingProxyType({f: tuple(heldout[f]) for f in forms}),
                rgb=tuple(rgb[0]) if rgb else None,
            )
        )
    return tuple(out)


# ---------------------------------------------------------------------------------------------------------------------
# 1. shapes (nouns)
SHAPES: tuple[Concept, ...] = _concepts("shape", [
    ("circle", ("circle", "disc", "round shape"), ("round disk", "circular blob", "orb", "ball-like figure")),
    ("square", ("square", "square shape", "square block"), ("four-sided tile", "boxy figure", "equal-sided box")),
    ("triangle", ("triangle", "triangular shape"), ("three-sided figure", "pyramid shape", "three-cornered wedge")),
    ("star", ("star", "star shape", "five-pointed star"), ("pentagram", "starburst", "twinkle figure")),
    ("heart", ("heart", "heart shape", "love heart"), ("valentine symbol", "love symbol", "sweetheart emblem")),
    ("cross", ("cross", "plus sign", "plus shape"), ("addition symbol", "crossed bars", "cruciform figure")),
    ("crescent", ("crescent", "crescent moon", "moon shape"), ("sickle-shaped figure", "waning moon", "lunar arc")),
    ("diamond", ("diamond", "rhombus", "diamond shape"), ("lozenge", "kite-like figure", "rhomboid")),
])

# ---------------------------------------------------------------------------------------------------------------------
# 2. colours (adjectives) with their RGB value
COLOURS: tuple[Concept, ...] = _concepts("colour", [
    ("red", ("red", "scarlet"), ("crimson", "cherry-red", "tomato-coloured", "ruby"), (220, 30, 35)),
    ("orange", ("orange", "tangerine"), ("amber", "pumpkin-coloured", "apricot-toned"), (245, 135, 20)),
    ("yellow", ("yellow", "lemon-yellow"), ("golden", "canary-coloured", "mustard-toned"), (245, 215, 30)),
    ("green", ("green", "emerald"), ("grass-coloured", "leafy", "jade"), (35, 165, 60)),
    ("cyan", ("cyan", "turquoise"), ("aqua", "teal", "seafoam-coloured"), (30, 200, 215)),
    ("blue", ("blue", "cobalt"), ("sapphire", "ultramarine", "denim-coloured"), (35, 75, 225)),
    ("purple", ("purple", "violet"), ("plum-coloured", "mauve", "amethyst"), (135, 50, 190)),
    ("pink", ("pink", "rose-pink"), ("fuchsia", "bubblegum-coloured", "flamingo-coloured"), (245, 125, 190)),
])

# ---------------------------------------------------------------------------------------------------------------------
# 3. fill styles (adjective before the noun, or a phrase after it)
STYLES: tuple[Concept, ...] = _concepts("style", [
    ("solid",
     {"adj": ("solid", "plain", "filled"), "post": ("with a solid fill", "filled in completely")},
     {"adj": ("unpatterned", "opaque", "block-coloured"), "post": ("with no pattern", "painted edge to edge")}),
    ("striped",
     {"adj": ("striped", "stripy"), "post": ("with stripes", "with diagonal stripes", "covered in stripes")},
     {"adj": ("banded", "pinstripe", "zebra-patterned"), "post": ("with slanted bands", "with diagonal hatching")}),
    ("dotted",
     {"adj": ("dotted", "polka-dot"), "post": ("with dots", "with polka dots", "covered in dots")},
     {"adj": ("spotted", "speckled", "dappled"), "post": ("covered in spots", "sprinkled with spots")}),
    ("outlined",
     {"adj": ("outlined", "hollow"), "post": ("drawn as an outline", "with only its outline")},
     {"adj": ("unfilled", "line-drawn", "contour-only"),
      "post": ("with an empty middle", "traced only along its edge")}),
])

CONCEPTS_BY_KIND: dict[str, tuple[Concept, ...]] = {"shape": SHAPES, "colour": COLOURS, "style": STYLES}

# ---------------------------------------------------------------------------------------------------------------------
# 4. scene attributes that captions mention but that are not erasable concepts
BACKGROUNDS: tuple[SceneWord, ...] = (
    # value: (top RGB, bottom RGB); a plain background has both equal
    SceneWord("white", ("white", "plain white"), ((248, 248, 248), (248, 248, 248))),
    SceneWord("black", ("black", "dark"), ((18, 18, 18), (18, 18, 18))),
    SceneWord("grey", ("grey", "gray"), ((128, 128, 128), (128, 128, 128))),
    SceneWord("gradient", ("grey gradient", "shaded grey"), ((205, 205, 205), (55, 55, 55))),
)

SIZES: tuple[SceneWord, ...] = (
    # value: (min, max) half-extent of the object as a fraction of the image side
    SceneWord("small", ("small", "little"), (0.15, 0.18)),
    SceneWord("medium", ("medium-sized", "mid-sized"), (0.19, 0.225)),
    SceneWord("large", ("large", "big"), (0.24, 0.29)),
)

# position regions: the object's centre in a 3 x 3 grid; words for each row and column ("" = the middle band)
POSITION_ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("top", ("top", "upper")), ("middle", ("",)), ("bottom", ("bottom", "lower")),
)
POSITION_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("left", ("left",)), ("center", ("",)), ("right", ("right",)),
)
CENTRE_WORDS: tuple[str, ...] = ("center", "middle")

# ---------------------------------------------------------------------------------------------------------------------
# registry
_REGISTRY: dict[str, Concept] = {c.name: c for kind in CONCEPT_KINDS for c in CONCEPTS_BY_KIND[kind]}


def concept_names(kind: str | None = None) -> tuple[str, ...]:
    """Canonical concept names, of one kind or of all kinds (in head order)."""
    if kind is None:
        return tuple(_REGISTRY)
    return tuple(c.name for c in concepts_of_kind(kind))


def concepts_of_kind(kind: str) -> tuple[Concept, ...]:
    """The concepts of one kind, in head order."""
    if kind not in CONCEPTS_BY_KIND:
        raise ValueError(f"unknown concept kind {kind!r}; choose one of {list(CONCEPT_KINDS)}")
    return CONCEPTS_BY_KIND[kind]


def get_concept(name: str | Concept) -> Concept:
    """The concept named ``name`` (case-insensitive canonical name, e.g. ``"circle"``, ``"red"``, ``"striped"``)."""
    if isinstance(name, Concept):
        return name
    key = str(name).strip().lower()
    if key in _REGISTRY:
        return _REGISTRY[key]
    close = difflib.get_close_matches(key, list(_REGISTRY), n=3)
    hint = f" Did you mean {close}?" if close else ""
    known = "; ".join(f"{kind}: {', '.join(concept_names(kind))}" for kind in CONCEPT_KINDS)
    raise KeyError(f"unknown toy-world concept {name!r}.{hint} Known concepts — {known}.")


def get_scene_word(table: tuple[SceneWord, ...], name: str) -> SceneWord:
    """Look up a background or size class by name, with an error that lists the valid names."""
    for entry in table:
        if entry.name == name:
            return entry
    raise KeyError(f"unknown value {name!r}; choose one of {[e.name for e in table]}")


def names(table: tuple[Concept, ...] | tuple[SceneWord, ...]) -> tuple[str, ...]:
    """The names of a vocabulary table, in order."""
    return tuple(entry.name for entry in table)
