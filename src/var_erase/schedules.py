"""Scale schedules: the per-scale token grids a next-scale model predicts, coarse to fine.

A schedule is the list of latent grids ``(h_k, w_k)`` for ``k = 0 .. K-1``. Scale ``k`` holds ``h_k * w_k`` tokens; the
tokens of all scales are concatenated, so scale ``k`` occupies ``[offsets[k], offsets[k + 1])`` of the sequence.

Infinity picks its schedule from an aspect-ratio template and a pixel budget (``infinity/utils/dynamic_resolution.py``
in the reference): 15 templates (8 ratios h/w and their inverses), each a list of 13 grids of which the first 7 / 10 /
12 / 13 are used for 0.06M / 0.25M / 0.60M / 1M pixels (VAE stride 16). 1024x1024 is 13 scales and 10,521 tokens.
VAR-style models use square ``patch_nums`` instead (:meth:`ScaleSchedule.from_patch_nums`).

2D RoPE positions follow Infinity's ``rope2d_normalized_by_hw=2``: the grid of every scale is laid onto a reference
grid (for Infinity templates the last grid of the 1M schedule of the same ratio, even at smaller budgets), position
``(round(r * H_ref / h), round(c * W_ref / w))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

# Infinity's latent grids per aspect ratio h/w (13 scales each); the inverse ratios use the transposed grids.
_INFINITY_RATIO_GRIDS: dict[float, tuple[tuple[int, int], ...]] = {
    1.000: ((1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40),
            (48, 48), (64, 64)),
    1.250: ((1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36),
            (55, 44), (70, 56)),
    1.333: ((1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36),
            (60, 45), (72, 54)),
    1.500: ((1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32),
            (63, 42), (78, 52)),
    1.750: ((1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32),
            (70, 40), (84, 48)),
    2.000: ((1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30),
            (74, 37), (90, 45)),
    2.500: ((1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26),
            (80, 32), (100, 40)),
    3.000: ((1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24),
            (90, 30), (111, 37)),
}


def _all_templates() -> dict[float, tuple[tuple[int, int], ...]]:
    templates = dict(_INFINITY_RATIO_GRIDS)
    for ratio, grids in _INFINITY_RATIO_GRIDS.items():
        if ratio != 1.0:
            # the reference truncates 1/ratio to 3 decimals: int(1 / ratio * 1000) / 1000
            templates[int(1 / ratio * 1000) / 1000] = tuple((w, h) for h, w in grids)
    return templates


INFINITY_TEMPLATES: dict[float, tuple[tuple[int, int], ...]] = _all_templates()
"""The 15 aspect-ratio templates (h/w -> 13 latent grids)."""

PIXEL_BUDGETS: dict[str, int] = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}
"""Infinity's pixel budgets and how many scales of a template each uses."""

# a requested ratio further than this (relative) from every template is refused rather than silently distorted
_RATIO_TOLERANCE = 0.05


def nearest_template(h_div_w: float) -> float:
    """The Infinity template ratio nearest to ``h_div_w`` (as the reference picks it)."""
    if not h_div_w > 0:
        raise ValueError(f"aspect ratio h/w must be positive, got {h_div_w}")
    return min(INFINITY_TEMPLATES, key=lambda r: abs(r - h_div_w))


@dataclass(frozen=True)
class ScaleSchedule:
    """Latent grids of a next-scale model, with token offsets, RoPE positions and the block-causal mask.

    Args:
        grids: ``(h_k, w_k)`` per scale, coarse to fine; the last grid is the VAE latent grid.
        vae_stride: pixels per latent cell, so the image is ``(h_{K-1} * stride, w_{K-1} * stride)``.
        rope_reference: ``(H_ref, W_ref)`` grid the RoPE positions of every scale are laid onto; the last grid
            when ``None``.
    """

    grids: tuple[tuple[int, int], ...]
    vae_stride: int = 16
    rope_reference: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        grids = tuple((int(h), int(w)) for h, w in self.grids)
        if not grids:
            raise ValueError("a scale schedule needs at least one scale")
        if any(h <= 0 or w <= 0 for h, w in grids):
            raise ValueError(f"every scale grid must be positive, got {grids}")
        if self.vae_stride <= 0:
            raise ValueError(f"vae_stride must be positive, got {self.vae_stride}")
        object.__setattr__(self, "grids", grids)
        if self.rope_reference is not None:
            object.__setattr__(self, "rope_reference", tuple(int(v) for v in self.rope_reference))

    # ----------------------------------------------------------------------------------------------------------------
    # construction
    @classmethod
    def from_infinity(cls, h_div_w: float = 1.0, pixels: str = "1M", vae_stride: int = 16) -> ScaleSchedule:
        """Infinity's schedule for the template nearest ``h_div_w`` and a pixel budget (``0.06M`` .. ``1M``)."""
        if pixels not in PIXEL_BUDGETS:
            raise ValueError(f"unknown pixel budget {pixels!r}; choose one of {list(PIXEL_BUDGETS)}")
        template = nearest_template(h_div_w)
        if abs(template - h_div_w) / h_div_w > _RATIO_TOLERANCE:
            raise ValueError(
                f"aspect ratio h/w = {h_div_w:.3f} has no Infinity template (nearest {template}); use a ratio between "
                f"1/3 and 3, e.g. one of {sorted(INFINITY_TEMPLATES)}"
            )
        grids = INFINITY_TEMPLATES[template]
        return cls(grids[: PIXEL_BUDGETS[pixels]], vae_stride=vae_stride, rope_reference=grids[-1])

    @classmethod
    def from_patch_nums(cls, patch_nums: tuple[int, ...] | list[int], vae_stride: int = 16) -> ScaleSchedule:
        """VAR-style square schedule, e.g. ``(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)`` (680 tokens)."""
        return cls(tuple((int(p), int(p)) for p in patch_nums), vae_stride=vae_stride)

    @classmethod
    def for_image_size(
        cls, height: int, width: int, vae_stride: int = 16, max_scales: int | None = None
    ) -> ScaleSchedule:
        """The Infinity schedule whose output size is nearest to ``height x width``.

        The template is the one nearest ``height / width``; the budget the one whose pixel count is nearest (in log
        space) among those with at most ``max_scales`` scales. The result's :attr:`height`/:attr:`width` are the size
        actually drawn; they can differ from the request by the template's rounding.
        """
        if not (isinstance(height, int) and isinstance(width, int)) or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive integers, got height={height!r}, width={width!r}")
        candidates = [
            cls.from_infinity(height / width, pixels, vae_stride)
            for pixels, n in PIXEL_BUDGETS.items()
            if max_scales is None or n <= max_scales
        ]
        if not candidates:
            raise ValueError(f"max_scales={max_scales} admits no Infinity pixel budget (the smallest uses 7 scales)")
        target = torch.tensor(float(height * width)).log()
        return min(candidates, key=lambda s: abs(float(torch.tensor(float(s.height * s.width)).log() - target)))

    def truncated(self, num_scales: int) -> ScaleSchedule:
        """The first ``num_scales`` scales (RoPE reference kept), e.g. for scale-restricted training."""
        if not 1 <= num_scales <= self.num_scales:
            raise ValueError(f"num_scales must be in [1, {self.num_scales}], got {num_scales}")
        return ScaleSchedule(self.grids[:num_scales], self.vae_stride, self.reference_grid)

    def to_dict(self) -> dict:
        return {"grids": [list(g) for g in self.grids], "vae_stride": self.vae_stride,
                "rope_reference": list(self.reference_grid)}

    @classmethod
    def from_dict(cls, data: dict) -> ScaleSchedule:
        ref = data.get("rope_reference")
        return cls(tuple(tuple(g) for g in data["grids"]), int(data.get("vae_stride", 16)),
                   tuple(ref) if ref is not None else None)

    # ----------------------------------------------------------------------------------------------------------------
    # sizes and offsets
    @property
    def num_scales(self) -> int:
        return len(self.grids)

    @property
    def token_counts(self) -> tuple[int, ...]:
        return tuple(h * w for h, w in self.grids)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """``K + 1`` offsets: scale ``k`` is tokens ``[offsets[k], offsets[k+1])``."""
        out = [0]
        for n in self.token_counts:
            out.append(out[-1] + n)
        return tuple(out)

    @property
    def total_tokens(self) -> int:
        return self.offsets[-1]

    @property
    def latent_grid(self) -> tuple[int, int]:
        return self.grids[-1]

    @property
    def height(self) -> int:
        return self.grids[-1][0] * self.vae_stride

    @property
    def width(self) -> int:
        return self.grids[-1][1] * self.vae_stride

    @property
    def reference_grid(self) -> tuple[int, int]:
        return self.rope_reference if self.rope_reference is not None else self.grids[-1]

    def scale_slice(self, k: int) -> slice:
        return slice(self.offsets[k], self.offsets[k + 1])

    # ----------------------------------------------------------------------------------------------------------------
    # per-token tables
    def scale_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(L,) long: the scale index of every token."""
        counts = torch.tensor(self.token_counts, device=device)
        return torch.repeat_interleave(torch.arange(self.num_scales, device=device), counts)

    def rope_positions(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(L, 2) long: (row, col) RoPE position of every token on the reference grid (Infinity mode 2).

        Computed as the reference does, ``round(arange(h) * (H_ref / h))`` in float32 with round-half-to-even, so
        positions match it exactly.
        """
        ref_h, ref_w = self.reference_grid
        rows, cols = [], []
        for h, w in self.grids:
            r = (torch.arange(h, dtype=torch.float32) * (ref_h / h)).round().long()
            c = (torch.arange(w, dtype=torch.float32) * (ref_w / w)).round().long()
            rows.append(r[:, None].expand(h, w).reshape(-1))
            cols.append(c[None, :].expand(h, w).reshape(-1))
        return torch.stack([torch.cat(rows), torch.cat(cols)], dim=-1).to(device)

    def block_causal_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(L, L) bool, True where attention is allowed: a token sees its own and all coarser scales."""
        ids = self.scale_ids(device)
        return ids[:, None] >= ids[None, :]

    def __repr__(self) -> str:
        return (f"ScaleSchedule({self.num_scales} scales, {self.total_tokens} tokens, "
                f"{self.height}x{self.width} px, grids={list(self.grids)})")
