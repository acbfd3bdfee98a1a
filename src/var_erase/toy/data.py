"""Streaming toy-world data: rendered images, captions and exact labels, with nothing stored on disk.

Each example is ``{"pixel_values": (3, H, W) float in [-1, 1], "caption": str, "labels": {...}}`` where ``labels``
holds multi-hot presence vectors per concept kind (``"shape"``: ``(n_shapes,)``, ``"colour"``, ``"style"``), the
background index and the object count. A stream is fixed by ``(seed, epoch, rank, worker id, number of workers)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .captions import caption_scene
from .concepts import BACKGROUNDS, CONCEPT_KINDS, concepts_of_kind, get_concept, names
from .render import DEFAULT_RESOLUTION, Scene, render, sample_scene

LABEL_KEYS: tuple[str, ...] = (*CONCEPT_KINDS, "background", "count")
_BACKGROUND_INDEX = {name: i for i, name in enumerate(names(BACKGROUNDS))}


def encode_labels(scene: Scene) -> dict[str, torch.Tensor]:
    """Exact labels of a scene as tensors: multi-hot ``(n_values,)`` float per concept kind, long scalars otherwise."""
    labels = {}
    for kind in CONCEPT_KINDS:
        multi_hot = torch.zeros(len(concepts_of_kind(kind)))
        for value in scene.values(kind):
            multi_hot[get_concept(value).index] = 1.0
        labels[kind] = multi_hot
    labels["background"] = torch.tensor(_BACKGROUND_INDEX[scene.background])
    labels["count"] = torch.tensor(scene.count)
    return labels


def to_pixel_values(image_hw3: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` (or ``(B, H, W, 3)``) -> float ``(3, H, W)`` (``(B, 3, H, W)``) in [-1, 1]."""
    pixels = torch.from_numpy(np.ascontiguousarray(image_hw3)).float().div_(127.5).sub_(1.0)
    return pixels.movedim(-1, -3)


def sample_scenes(rng: np.random.Generator, n: int, *, p_empty: float = 0.0, **scene_kwargs) -> list[Scene]:
    """``n`` random scenes; a share ``p_empty`` of them hold no object (useful to teach a judge to say "nothing")."""
    scenes = []
    for _ in range(n):
        if p_empty and rng.random() < p_empty:
            scenes.append(sample_scene(rng, n_objects=0, background=scene_kwargs.get("background")))
        else:
            scenes.append(sample_scene(rng, **scene_kwargs))
    return scenes


class ToyDataset(IterableDataset):
    """Endless (or ``num_samples``-long) stream of toy images with captions and labels, rendered on the fly.

    Args:
        resolution: image side in pixels (64 by default).
        seed: base seed; every worker (and every process ``rank``) draws its own stream from it.
        split: caption split (``"train"``, ``"heldout_template"``, ``"heldout_paraphrase"``).
        num_samples: examples per epoch over all workers and ranks; ``None`` streams forever.
        p_empty: share of images with no object.
        rank, world_size: the process's place in distributed training (each process gets its own stream and share).
        scene_kwargs: forwarded to :func:`~var_erase.toy.render.sample_scene` (e.g. ``p_two_objects``, ``shape``).
        caption_kwargs: forwarded to :func:`~var_erase.toy.captions.plan_caption` (mention probabilities).
    """

    def __init__(
        self,
        resolution: int = DEFAULT_RESOLUTION,
        seed: int = 0,
        split: str = "train",
        num_samples: int | None = None,
        p_empty: float = 0.0,
        rank: int = 0,
        world_size: int = 1,
        scene_kwargs: dict | None = None,
        caption_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.resolution, self.seed, self.split = resolution, seed, split
        self.num_samples, self.p_empty = num_samples, p_empty
        self.rank, self.world_size = rank, world_size
        self.scene_kwargs, self.caption_kwargs = dict(scene_kwargs or {}), dict(caption_kwargs or {})
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use a new stream for the next iteration (as ``DistributedSampler.set_epoch`` does)."""
        self.epoch = epoch

    def _stream_position(self) -> tuple[int, int]:
        """``(stream id, number of streams)`` of this worker in this process."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def __iter__(self) -> Iterator[dict]:
        stream, streams = self._stream_position()
        rng = np.random.default_rng([self.seed, self.epoch, stream, streams])
        if self.num_samples is None:
            count = None
        else:  # split num_samples over the streams, the first ones taking the remainder
            count = self.num_samples // streams + (stream < self.num_samples % streams)
        produced = 0
        while count is None or produced < count:
            yield self.example(rng)
            produced += 1

    def example(self, rng: np.random.Generator) -> dict:
        """One example drawn from ``rng``."""
        scene = sample_scenes(rng, 1, p_empty=self.p_empty, **self.scene_kwargs)[0]
        return {
            "pixel_values": to_pixel_values(render(scene, self.resolution)),
            "caption": caption_scene(scene, rng, split=self.split, **self.caption_kwargs),
            "labels": encode_labels(scene),
        }


def labels_batch(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Stacked :func:`encode_labels` of several scenes: ``(B, n_values)`` per kind, ``(B,)`` for the rest."""
    encoded = [encode_labels(s) for s in scenes]
    return {key: torch.stack([e[key] for e in encoded]) for key in LABEL_KEYS}


__all__ = ["LABEL_KEYS", "ToyDataset", "encode_labels", "labels_batch", "sample_scenes",
           "to_pixel_values"]
