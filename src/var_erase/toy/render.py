"""Procedural renderer of the toy world: scenes with exact labels, drawn with numpy masks.

A :class:`Scene` is a background and zero to two non-overlapping :class:`ToyObject` s. Each object is a shape (a signed
distance function in a unit box), a colour, a fill style, a size class, a centre and a small rotation. Rendering is
anti-aliased from the signed distance and works on the object's bounding crop only, so a 64 x 64 image costs well
under a millisecond on one CPU core.

Fill styles are drawn so that a stride-8 autoencoder can reproduce them: the pattern has a period of ``size / 8``
pixels (8 px at 64 x 64, i.e. exactly one period per latent cell) and is anchored to the image grid, not to the
object, so every cell inside a striped (dotted) object holds the same sub-image. Stripes and dots are drawn in full
colour over a translucent body of the same colour, so the silhouette — the shape — stays whole at every size;
outlined objects are a band of ``size / 32`` pixels along the edge.

Coordinates: ``cx`` (``cy``) is the centre as a fraction of the width (height), 0 at the left (top) edge;
``half_extent`` is half the side of the object's box as a fraction of the image side.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .concepts import (
    BACKGROUNDS,
    COLOURS,
    POSITION_COLUMNS,
    POSITION_ROWS,
    SHAPES,
    SIZES,
    STYLES,
    get_concept,
    get_scene_word,
    names,
)

DEFAULT_RESOLUTION = 64
"""Default image side: one 8 x 8 latent at VAE stride 8; shapes, colours and all four styles read clearly."""

MAX_OBJECTS = 2
_TWO_OBJECT_SIZES = ("small", "medium")  # sizes drawn for two-object scenes unless one is forced
_GAP = 0.03  # minimum empty margin between two objects' boxes, fraction of the image side
_EDGE = 0.02  # minimum margin between an object's box and the image edge
PATTERN_BODY = 0.45  # opacity of a striped / dotted object between its stripes or dots


# ---------------------------------------------------------------------------------------------------------------------
# 1. scenes
@dataclass(frozen=True)
class ToyObject:
    """One object of a scene with its exact attributes (see the module docstring for coordinates)."""

    shape: str
    colour: str
    style: str
    size: str
    cx: float
    cy: float
    half_extent: float
    rotation: float = 0.0  # degrees

    @property
    def region(self) -> tuple[str, str]:
        """``(row, column)`` of the centre in a 3 x 3 grid, e.g. ``("top", "left")`` or ``("middle", "center")``."""
        row = POSITION_ROWS[min(int(self.cy * 3), 2)][0]
        column = POSITION_COLUMNS[min(int(self.cx * 3), 2)][0]
        return row, column

    def value(self, kind: str) -> str:
        """The object's value of a concept kind (``"shape"``, ``"colour"`` or ``"style"``)."""
        return {"shape": self.shape, "colour": self.colour, "style": self.style}[kind]


@dataclass(frozen=True)
class Scene:
    """A background and up to :data:`MAX_OBJECTS` non-overlapping objects; the exact labels of one image."""

    objects: tuple[ToyObject, ...]
    background: str

    @property
    def count(self) -> int:
        return len(self.objects)

    def values(self, kind: str) -> frozenset[str]:
        """The set of values of a concept kind present in the scene, e.g. ``values("shape") == {"circle"}``."""
        return frozenset(obj.value(kind) for obj in self.objects)

    def contains(self, concept: str) -> bool:
        """Whether any object shows the named concept."""
        found = get_concept(concept)
        return found.name in self.values(found.kind)


def _check_attribute(kind_table: tuple, value: str | None, what: str) -> None:
    if value is not None and value not in names(kind_table):
        raise ValueError(f"unknown {what} {value!r}; choose one of {list(names(kind_table))}")


def _sample_attributes(rng: np.random.Generator, forced: Mapping[str, str | None], taken_shapes: set[str],
                       size_choices: Sequence[str]) -> dict[str, str]:
    """Draw shape/colour/style/size for one object, keeping forced values."""
    shape_choices = [s for s in names(SHAPES) if s not in taken_shapes] or list(names(SHAPES))
    attrs = {
        "shape": forced.get("shape") or shape_choices[rng.integers(len(shape_choices))],
        "colour": forced.get("colour") or COLOURS[rng.integers(len(COLOURS))].name,
        "style": forced.get("style") or STYLES[rng.integers(len(STYLES))].name,
        "size": forced.get("size") or size_choices[rng.integers(len(size_choices))],
    }
    for table, key in ((SHAPES, "shape"), (COLOURS, "colour"), (STYLES, "style"), (SIZES, "size")):
        _check_attribute(table, attrs[key], key)
    return attrs


def _draw_halves(rng: np.random.Generator, sizes: Sequence[str], tries: int = 50) -> list[float]:
    """Half-extents for the size classes, redrawn (within each class) until the objects can fit side by side."""
    for _ in range(tries):
        halves = [float(rng.uniform(*get_scene_word(SIZES, size).value)) for size in sizes]
        if len(halves) < 2 or 2 * sum(halves) + _GAP + 2 * _EDGE <= 1.0:
            return halves
    raise ValueError(f"objects of sizes {list(sizes)} cannot fit side by side in one image; force smaller sizes "
                     "(e.g. size='small') or fewer objects")


def _place(rng: np.random.Generator, halves: Sequence[float]) -> list[tuple[float, float]]:
    """Centres for up to two boxes of the given half-extents, inside the image and apart by at least the gap.

    Two boxes are separated along a random axis: the first centre is drawn where the second still fits beyond it, the
    second beyond the first; the other coordinate of each is uniform.
    """
    lo = [h + _EDGE for h in halves]
    hi = [1.0 - h - _EDGE for h in halves]
    if len(halves) < 2:
        return [(float(rng.uniform(lo[0], hi[0])), float(rng.uniform(lo[0], hi[0])))] if halves else []
    first, second = (0, 1) if rng.random() < 0.5 else (1, 0)  # which object lies before the other on the axis
    reach = halves[0] + halves[1] + _GAP  # _draw_halves guarantees hi[second] - reach >= lo[first]
    along = [0.0, 0.0]
    along[first] = float(rng.uniform(lo[first], hi[second] - reach))
    along[second] = float(rng.uniform(along[first] + reach, hi[second]))
    across = [float(rng.uniform(lo[i], hi[i])) for i in range(2)]
    horizontal = rng.random() < 0.5
    return [(along[i], across[i]) if horizontal else (across[i], along[i]) for i in range(2)]


def sample_scene(
    rng: np.random.Generator,
    *,
    n_objects: int | None = None,
    p_two_objects: float = 0.35,
    shape: str | None = None,
    colour: str | None = None,
    style: str | None = None,
    size: str | None = None,
    background: str | None = None,
    objects: Sequence[Mapping[str, str | None]] | None = None,
    distinct_shapes: bool = True,
    max_rotation: float = 10.0,
) -> Scene:
    """Draw a random scene; any attribute can be forced.

    Args:
        rng: the only source of randomness (same generator state, same scene).
        n_objects: 0, 1 or 2; ``None`` draws 2 with probability ``p_two_objects``, else 1.
        shape, colour, style, size: force an attribute of the first object.
        background: force the background (one of ``concepts.BACKGROUNDS``).
        objects: force attributes per object, e.g. ``[{"shape": "circle"}, {"colour": "red"}]``; sets ``n_objects``.
        distinct_shapes: give the objects of a scene different shapes unless forced.
        max_rotation: objects are rotated uniformly in ``[-max_rotation, max_rotation]`` degrees.
    """
    first = {"shape": shape, "colour": colour, "style": style, "size": size}
    per_object = [dict(o) for o in objects] if objects is not None else None
    if per_object is not None:
        if n_objects is not None and n_objects != len(per_object):
            raise ValueError(f"n_objects={n_objects} disagrees with {len(per_object)} entries in objects")
        n_objects = len(per_object)
        if per_object:
            per_object[0] = {**{k: v for k, v in first.items() if v is not None}, **per_object[0]}
    if n_objects is None:
        n_objects = 2 if rng.random() < p_two_objects else 1
    if not 0 <= n_objects <= MAX_OBJECTS:
        raise ValueError(f"a toy scene holds 0 to {MAX_OBJECTS} objects, got n_objects={n_objects}")
    if per_object is None:
        per_object = [first] + [{} for _ in range(n_objects - 1)]
    _check_attribute(BACKGROUNDS, background, "background")
    bg = background or BACKGROUNDS[rng.integers(len(BACKGROUNDS))].name

    size_choices = names(SIZES) if n_objects == 1 else _TWO_OBJECT_SIZES
    attrs, taken = [], set()
    for forced in per_object[:n_objects]:
        attrs.append(_sample_attributes(rng, forced, taken if distinct_shapes else set(), size_choices))
        taken.add(attrs[-1]["shape"])
    halves = _draw_halves(rng, [a["size"] for a in attrs])
    centres = _place(rng, halves)
    rotations = rng.uniform(-max_rotation, max_rotation, size=n_objects) if max_rotation > 0 else np.zeros(n_objects)
    objs = tuple(
        ToyObject(**a, cx=cx, cy=cy, half_extent=h, rotation=float(rot))
        for a, (cx, cy), h, rot in zip(attrs, centres, halves, rotations)
    )
    return Scene(objects=objs, background=bg)


# ---------------------------------------------------------------------------------------------------------------------
# 2. shape geometry: signed distance (negative inside) in a unit box, x to the right, y down
SDF = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _polygon_sdf(vertices: Sequence[tuple[float, float]]) -> SDF:
    """Exact signed distance to a closed polygon (any simple polygon), vectorised over its edges."""
    v_N2 = np.asarray(vertices, dtype=np.float32)
    e_N2 = np.roll(v_N2, -1, axis=0) - v_N2
    vx, vy = v_N2[:, 0, None, None], v_N2[:, 1, None, None]
    ex, ey = e_N2[:, 0, None, None], e_N2[:, 1, None, None]
    inv_len2 = 1.0 / (ex * ex + ey * ey)
    wy = vy + ey  # the edge's end point

    def sdf(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        dx_Nhw, dy_Nhw = x - vx, y - vy
        t = np.clip((dx_Nhw * ex + dy_Nhw * ey) * inv_len2, 0.0, 1.0)
        dist2_hw = ((dx_Nhw - ex * t) ** 2 + (dy_Nhw - ey * t) ** 2).min(axis=0)
        # crossing number: an edge flips "inside" when the horizontal ray from the point crosses it
        up, down, left = y >= vy, y < wy, ex * dy_Nhw > ey * dx_Nhw
        crosses = (up & down & left) | (~up & ~down & ~left)
        inside_hw = np.logical_xor.reduce(crosses, axis=0)
        return np.sqrt(dist2_hw) * np.where(inside_hw, -1.0, 1.0).astype(np.float32)

    return sdf


def _regular(n: int, radius: float, phase_deg: float, inner: float | None = None, dy: float = 0.0) -> list:
    """Vertices of a regular polygon (or a star when ``inner`` is set), first vertex at ``phase_deg`` from up."""
    count = 2 * n if inner is not None else n
    out = []
    for k in range(count):
        r = inner if (inner is not None and k % 2) else radius
        a = np.deg2rad(phase_deg + 360.0 * k / count)
        out.append((r * np.sin(a), -r * np.cos(a) + dy))
    return out


def _circle_sdf(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.sqrt(x * x + y * y) - 0.95


def _crescent_sdf(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A moon opening to the upper right: a disc minus a smaller, offset disc (exact inside, where outlines live)."""
    outer = np.sqrt(x * x + y * y) - 0.95
    bite = np.sqrt((x - 0.5) ** 2 + (y + 0.22) ** 2) - 0.7
    return np.maximum(outer, -bite)


_HEART_SCALE, _HEART_MID = 1.65, 0.552  # the classic two-arc heart (tip at 0, lobes up to 1.104) fitted to the box


def _heart_sdf(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact distance to a heart made of two arcs and two lines (the well-known two-circle construction)."""
    px = np.abs(x) / _HEART_SCALE
    py = -y / _HEART_SCALE + _HEART_MID
    lobe = np.sqrt((px - 0.25) ** 2 + (py - 0.75) ** 2) - np.sqrt(2.0) / 4.0
    s = np.maximum(px + py, 0.0) * 0.5
    tip = np.sqrt(np.minimum(px * px + (py - 1.0) ** 2, (px - s) ** 2 + (py - s) ** 2)) * np.sign(px - py)
    return np.where(px + py > 1.0, lobe, tip) * _HEART_SCALE


_CROSS_ARM = 0.32
SHAPE_SDFS: dict[str, SDF] = {
    "circle": _circle_sdf,
    "square": _polygon_sdf([(-0.82, -0.82), (0.82, -0.82), (0.82, 0.82), (-0.82, 0.82)]),
    "triangle": _polygon_sdf([(0.0, -0.82), (0.95, 0.82), (-0.95, 0.82)]),
    "star": _polygon_sdf(_regular(5, 1.0, 0.0, inner=0.45, dy=0.095)),
    "heart": _heart_sdf,
    "cross": _polygon_sdf([
        (-_CROSS_ARM, -0.95), (_CROSS_ARM, -0.95), (_CROSS_ARM, -_CROSS_ARM), (0.95, -_CROSS_ARM),
        (0.95, _CROSS_ARM), (_CROSS_ARM, _CROSS_ARM), (_CROSS_ARM, 0.95), (-_CROSS_ARM, 0.95),
        (-_CROSS_ARM, _CROSS_ARM), (-0.95, _CROSS_ARM), (-0.95, -_CROSS_ARM), (-_CROSS_ARM, -_CROSS_ARM),
    ]),
    "crescent": _crescent_sdf,
    "diamond": _polygon_sdf([(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)]),
}
"""Signed distance function per shape name; every shape in ``concepts.SHAPES`` has one."""


# ---------------------------------------------------------------------------------------------------------------------
# 3. fill styles: the object's colour coverage from its pixel distance and the image-anchored pattern
@lru_cache(maxsize=16)
def _pattern_grids(size: int, period: float) -> dict[str, np.ndarray]:
    """Full-image coverage of the stripe and dot patterns, ``(size, size)`` float32 in [0, 1], and pixel centres."""
    centre_s = np.arange(size, dtype=np.float32) + 0.5
    x_hw, y_hw = np.meshgrid(centre_s, centre_s)
    # diagonal stripes: bands of half the period, measured along x + y and converted to a Euclidean distance
    phase = np.mod((x_hw + y_hw) / period - 0.25 + 0.5, 1.0) - 0.5
    stripe = np.clip(0.5 - (np.abs(phase) * period - period / 4) / np.sqrt(2.0), 0.0, 1.0)
    # dots: one disc per period x period cell, centred in the cell
    fx, fy = np.mod(x_hw, period) - period / 2, np.mod(y_hw, period) - period / 2
    dot = np.clip(0.5 - (np.sqrt(fx * fx + fy * fy) - 0.3 * period), 0.0, 1.0)
    return {"striped": stripe.astype(np.float32), "dotted": dot.astype(np.float32), "coords": centre_s}


def _style_alpha(style: str, sdf_px: np.ndarray, pattern: np.ndarray | None, line_px: float) -> np.ndarray:
    """Colour coverage of an object from its signed pixel distance and (for patterns) the pattern crop.

    solid: the whole silhouette; outlined: a band of ``line_px`` inside the edge; striped / dotted: the pattern in
    full colour over a translucent body (``PATTERN_BODY``), so the silhouette stays whole at any size.
    """
    fill = np.clip(0.5 - sdf_px, 0.0, 1.0)
    if style == "solid":
        return fill
    if style == "outlined":
        return fill - np.clip(0.5 - (sdf_px + line_px), 0.0, 1.0)
    return fill * (PATTERN_BODY + (1.0 - PATTERN_BODY) * pattern)


# ---------------------------------------------------------------------------------------------------------------------
# 4. rendering
def _check_size(size: int) -> None:
    if not isinstance(size, int | np.integer) or size < 16 or size % 8:
        raise ValueError(f"image size must be a multiple of 8 of at least 16 (e.g. 64 or 128), got {size!r}")


@lru_cache(maxsize=16)
def _background(name: str, size: int) -> np.ndarray:
    """The background image, ``(size, size, 3)`` float32 (read-only; copy before drawing)."""
    top, bottom = (np.asarray(c, dtype=np.float32) for c in get_scene_word(BACKGROUNDS, name).value)
    w_h1 = ((np.arange(size, dtype=np.float32) + 0.5) / size)[:, None]
    column_h3 = top * (1.0 - w_h1) + bottom * w_h1
    image = np.broadcast_to(column_h3[:, None, :], (size, size, 3)).copy()
    image.flags.writeable = False
    return image


_RGB = {c.name: np.asarray(c.rgb, dtype=np.float32) for c in COLOURS}


def object_alpha(obj: ToyObject, size: int, pattern_period: float | None = None) -> tuple[slice, slice, np.ndarray]:
    """Where one object puts its colour: ``(rows, cols, alpha_hw)`` with alpha in [0, 1] on that crop of the image."""
    period = pattern_period or size / 8
    grids = _pattern_grids(size, float(period))
    r_px = obj.half_extent * size
    reach = r_px * 1.45 + 2.0  # the box's corners under rotation, plus the anti-aliasing ramp
    cx, cy = obj.cx * size, obj.cy * size
    rows = slice(max(0, int(cy - reach)), min(size, int(np.ceil(cy + reach))))
    cols = slice(max(0, int(cx - reach)), min(size, int(np.ceil(cx + reach))))
    coords = grids["coords"]
    dx_1w = (coords[cols] - cx)[None, :] / r_px
    dy_h1 = (coords[rows] - cy)[:, None] / r_px
    cos, sin = np.cos(np.deg2rad(obj.rotation)), np.sin(np.deg2rad(obj.rotation))
    u_hw, v_hw = cos * dx_1w + sin * dy_h1, cos * dy_h1 - sin * dx_1w
    sdf_px = SHAPE_SDFS[obj.shape](u_hw, v_hw) * r_px
    pattern = grids[obj.style][rows, cols] if obj.style in grids else None
    return rows, cols, _style_alpha(obj.style, sdf_px, pattern, line_px=size / 32)


def render(scene: Scene, size: int = DEFAULT_RESOLUTION, pattern_period: float | None = None) -> np.ndarray:
    """Draw a scene: ``(size, size, 3)`` uint8 RGB. Deterministic (no randomness at render time).

    ``pattern_period`` (pixels) defaults to ``size / 8``: one stripe or dot period per cell of a stride-8 latent at 64
    px, the same picture at every resolution.
    """
    _check_size(size)
    image_hw3 = _background(scene.background, size).copy()
    for obj in scene.objects:
        rows, cols, alpha_hw = object_alpha(obj, size, pattern_period)
        crop = image_hw3[rows, cols]
        crop += alpha_hw[:, :, None] * (_RGB[obj.colour] - crop)
    return (image_hw3 + 0.5).astype(np.uint8)


def render_batch(scenes: Sequence[Scene], size: int = DEFAULT_RESOLUTION) -> np.ndarray:
    """Draw several scenes: ``(B, size, size, 3)`` uint8."""
    out_bhw3 = np.empty((len(scenes), size, size, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        out_bhw3[i] = render(scene, size)
    return out_bhw3


def object_masks(scene: Scene, size: int = DEFAULT_RESOLUTION) -> np.ndarray:
    """Per-object colour coverage, ``(n_objects, size, size)`` float32 in [0, 1] (1 = pixel is the object's colour)."""
    _check_size(size)
    masks_nhw = np.zeros((scene.count, size, size), dtype=np.float32)
    for i, obj in enumerate(scene.objects):
        rows, cols, alpha_hw = object_alpha(obj, size)
        masks_nhw[i, rows, cols] = alpha_hw
    return masks_nhw


def image_grid(images_bhw3: np.ndarray | Sequence[np.ndarray], columns: int = 8, pad: int = 2) -> np.ndarray:
    """Tile uint8 images ``(B, H, W, 3)`` into one ``(rows * (H + pad) + pad, ...)`` grid on a mid-grey canvas."""
    images = np.asarray(images_bhw3)
    b, h, w, _ = images.shape
    columns = max(1, min(columns, b))
    rows = -(-b // columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 96, dtype=np.uint8)
    for i in range(b):
        r, c = divmod(i, columns)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = images[i]
    return grid
