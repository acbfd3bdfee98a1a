"""The oracle: a small CNN that reads every attribute of a toy image, the ground-truth judge of generated images.

Heads (one linear layer over pooled features): multi-label presence of each shape, colour and style (sigmoid), the
background (softmax) and the number of objects, 0 to ``max_objects`` (softmax). Trained on renders with blur, noise,
down/up-sampling and JPEG-like block quantisation (``examples/toy/train_oracle.py``), so it also reads the slightly
blurry images a generative model draws. The vocabulary is part of the config, so weights never meet a world they were
not trained on unnoticed.

    oracle = OracleClassifier.from_pretrained(ORACLE_PATH)
    reading = oracle.predict(images_uint8_BHW3)   # or (B, 3, H, W) in [-1, 1]
    reading.shapes[0]  # frozenset({"circle"})
    reading.detected("circle")  # (B,) bool
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .concepts import BACKGROUNDS, COLOURS, CONCEPT_KINDS, SHAPES, STYLES, get_concept, names
from .render import DEFAULT_RESOLUTION, MAX_OBJECTS

ORACLE_PATH = Path(__file__).parent / "weights" / "oracle"
"""Folder of the shipped oracle weights (``OracleClassifier.from_pretrained(ORACLE_PATH)``)."""


@dataclass
class OracleReading:
    """What the oracle sees in a batch of ``B`` images.

    ``shapes`` / ``colours`` / ``styles``: per image, the set of values whose presence probability is at least the
    threshold; ``backgrounds``: per image, the most likely background; ``counts``: per image, the most likely number of
    objects; ``probs``: ``{"shape": (B, n_shapes), "colour": ..., "style": ..., "background": (B, n_backgrounds),
    "count": (B, max_objects + 1)}`` probabilities.
    """

    shapes: list[frozenset[str]]
    colours: list[frozenset[str]]
    styles: list[frozenset[str]]
    backgrounds: list[str]
    counts: list[int]
    probs: dict[str, torch.Tensor]
    threshold: float = 0.5

    def __len__(self) -> int:
        return len(self.backgrounds)

    def detected(self, concept: str) -> torch.Tensor:
        """``(B,)`` bool: whether each image shows the named concept (any kind)."""
        found = get_concept(concept)
        return self.probs[found.kind][:, found.index] >= self.threshold

    def values(self, kind: str) -> list[frozenset[str]]:
        """The detected sets of one concept kind, per image."""
        if kind not in CONCEPT_KINDS:
            raise ValueError(f"unknown concept kind {kind!r}; choose one of {list(CONCEPT_KINDS)}")
        return {"shape": self.shapes, "colour": self.colours, "style": self.styles}[kind]


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels), nn.SiLU()
    )


class OracleClassifier(ModelMixin, ConfigMixin):
    """Small CNN reading shape / colour / style presence, background and object count of toy images.

    Args:
        shape_names, colour_names, style_names, background_names: the vocabulary, in head order.
        max_objects: the count head predicts 0 .. ``max_objects`` objects.
        image_size: the side images are resized to before reading (the training resolution).
        block_channels: channels of the four stages; each stage halves the resolution and holds two 3x3 convs.
        feature_dim: width of the penultimate features (:meth:`features`, used for a feature-FID).
        threshold: presence probability at which :meth:`predict` reports a value.
    """

    @register_to_config
    def __init__(
        self,
        shape_names: Sequence[str] = names(SHAPES),
        colour_names: Sequence[str] = names(COLOURS),
        style_names: Sequence[str] = names(STYLES),
        background_names: Sequence[str] = names(BACKGROUNDS),
        max_objects: int = MAX_OBJECTS,
        image_size: int = DEFAULT_RESOLUTION,
        block_channels: Sequence[int] = (32, 64, 128, 256),
        feature_dim: int = 256,
        threshold: float = 0.5,
    ) -> None:
        super().__init__()
        # 1. convolutional trunk: four stages, each stride 2 then stride 1
        layers, in_channels = [], 3
        for out_channels in block_channels:
            layers += [_conv_block(in_channels, out_channels, 2), _conv_block(out_channels, out_channels, 1)]
            in_channels = out_channels
        self.trunk = nn.Sequential(*layers)
        # 2. pooled features: average and max pooling (max keeps a small object's evidence), then a projection
        self.project = nn.Sequential(nn.Linear(2 * in_channels, feature_dim), nn.SiLU())
        # 3. one linear head over all groups; `head_sizes` says how its outputs split
        self.head = nn.Linear(feature_dim, sum(self.head_sizes.values()))

    @property
    def head_sizes(self) -> dict[str, int]:
        """Number of logits per group: ``shape``, ``colour``, ``style``, ``background``, ``count``."""
        cfg = self.config
        return {
            "shape": len(cfg.shape_names), "colour": len(cfg.colour_names), "style": len(cfg.style_names),
            "background": len(cfg.background_names), "count": cfg.max_objects + 1,
        }

    def _names(self, group: str) -> list[str]:
        return list(getattr(self.config, f"{group}_names"))

    def _detected_sets(self, kind: str, probs_BV: torch.Tensor, threshold: float) -> list[frozenset[str]]:
        value_names = self._names(kind)
        return [frozenset(n for n, p in zip(value_names, row) if p >= threshold) for row in probs_BV.tolist()]

    # -----------------------------------------------------------------------------------------------------------------
    # tensors in, tensors out
    def features(self, images) -> torch.Tensor:
        """Penultimate features ``(B, feature_dim)`` of images in any format :meth:`prepare` accepts."""
        return self._features(self.prepare(images))

    def _features(self, pixel_values_B3HW: torch.Tensor) -> torch.Tensor:
        maps_BCHW = self.trunk(pixel_values_B3HW)
        pooled_B2C = torch.cat([maps_BCHW.mean(dim=(2, 3)), maps_BCHW.amax(dim=(2, 3))], dim=1)
        return self.project(pooled_B2C)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per group (see :attr:`head_sizes`) for ``pixel_values`` ``(B, 3, H, W)`` in [-1, 1]."""
        logits_BK = self.head(self._features(pixel_values))
        return dict(zip(self.head_sizes, logits_BK.split(list(self.head_sizes.values()), dim=1)))

    def prepare(self, images) -> torch.Tensor:
        """Images -> ``(B, 3, image_size, image_size)`` float in [-1, 1] on the model's device.

        Accepts uint8 arrays/tensors ``(H, W, 3)`` / ``(B, H, W, 3)`` / ``(B, 3, H, W)``, float tensors in [-1, 1]
        ``(3, H, W)`` / ``(B, 3, H, W)``, PIL images, or a list of any of these.
        """
        pixels = _to_pixel_values(images).to(device=self.device, dtype=self.dtype)
        size = self.config.image_size
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return pixels

    # -----------------------------------------------------------------------------------------------------------------
    # readings
    @torch.no_grad()
    def predict(self, images, batch_size: int = 256) -> OracleReading:
        """Read a batch of images (any format :meth:`prepare` accepts); the model is put in eval mode."""
        self.eval()
        pixels = self.prepare(images)
        chunks = [self(pixels[i: i + batch_size]) for i in range(0, len(pixels), batch_size)]
        logits = {k: torch.cat([c[k] for c in chunks]).float() for k in self.head_sizes}
        probs = {k: logits[k].sigmoid() if k in CONCEPT_KINDS else logits[k].softmax(dim=1) for k in logits}
        threshold = self.config.threshold
        sets = {kind: self._detected_sets(kind, probs[kind], threshold) for kind in CONCEPT_KINDS}
        backgrounds = self._names("background")
        return OracleReading(
            shapes=sets["shape"], colours=sets["colour"], styles=sets["style"],
            backgrounds=[backgrounds[i] for i in probs["background"].argmax(dim=1).tolist()],
            counts=probs["count"].argmax(dim=1).tolist(),
            probs={k: v.cpu() for k, v in probs.items()}, threshold=threshold,
        )


def score_reading(reading: OracleReading, scenes: Sequence) -> dict[str, float]:
    """Accuracy of a reading against the true scenes (``render.Scene``), as fractions in [0, 1].

    Per concept kind: ``<kind>/per_attribute`` — share of correct (image, value) presence decisions — and
    ``<kind>/exact_set`` — share of images whose whole detected set is right; plus ``background`` and ``count``.
    """
    if len(reading) != len(scenes):
        raise ValueError(f"{len(reading)} readings for {len(scenes)} scenes")
    scores = {}
    for kind in CONCEPT_KINDS:
        n_values = reading.probs[kind].shape[1]
        detected, truth = reading.values(kind), [scene.values(kind) for scene in scenes]
        wrong = sum(len(d ^ t) for d, t in zip(detected, truth))  # each symmetric-difference member is one error
        scores[f"{kind}/per_attribute"] = 1.0 - wrong / (len(scenes) * n_values)
        scores[f"{kind}/exact_set"] = float(np.mean([d == t for d, t in zip(detected, truth)]))
    scores["background"] = float(np.mean([b == s.background for b, s in zip(reading.backgrounds, scenes)]))
    scores["count"] = float(np.mean([c == s.count for c, s in zip(reading.counts, scenes)]))
    return scores


def _to_pixel_values(images) -> torch.Tensor:
    """Any supported image batch -> ``(B, 3, H, W)`` float in [-1, 1] (CPU or the input's device)."""
    if isinstance(images, list | tuple):
        if not images:
            raise ValueError("no images to read: got an empty list")
        return torch.cat([_to_pixel_values(image) for image in images])
    if hasattr(images, "convert") and not isinstance(images, np.ndarray | torch.Tensor):  # a PIL image
        images = np.asarray(images.convert("RGB"))
    if isinstance(images, np.ndarray):
        array = np.ascontiguousarray(images)
        images = torch.from_numpy(array if array.flags.writeable else array.copy())
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"expected images as numpy arrays, torch tensors or PIL images, got {type(images).__name__}")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or 3 not in (images.shape[1], images.shape[-1]):
        raise ValueError(f"expected (B, 3, H, W) or (B, H, W, 3) images, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        if images.shape[1] != 3:  # channels last
            images = images.permute(0, 3, 1, 2)
        return images.float() / 127.5 - 1.0
    if not images.is_floating_point() or images.shape[1] != 3:
        raise ValueError("float images must be (B, 3, H, W) in [-1, 1]; pass uint8 for (B, H, W, 3) in [0, 255]")
    return images.float()
