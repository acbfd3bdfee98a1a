"""Measurements on the toy world, where the truth is known: prompt adherence read by the oracle, and diversity.

Generation is batched with one generator per image (image ``i`` of a run always gets seed ``seed * 1_000_003 + i``),
so a number can be reproduced image by image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..toy.captions import evaluation_prompts, plan_caption, realise_caption
from ..toy.concepts import CONCEPT_KINDS, concept_names, get_concept
from ..toy.render import sample_scene


def fully_specified_prompts(n: int, seed: int = 0, split: str = "heldout_template") -> list[tuple[str, dict]]:
    """``n`` one-object prompts that state shape, colour and style, with those targets.

    ``split="heldout_template"`` uses caption templates and synonym combinations never used in pretraining captions.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        scene = sample_scene(rng, n_objects=1)
        plan = plan_caption(scene, rng, split=split, always=("colour", "style"), size_prob=0.0, position_prob=0.0,
                            background_prob=0.0)
        obj = scene.objects[0]
        rows.append((realise_caption(plan, scene), {kind: obj.value(kind) for kind in CONCEPT_KINDS}))
    return rows


def image_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


@torch.no_grad()
def generate_images(
    pipe,
    prompts: Sequence[str],
    num_images_per_prompt: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
    desc: str = "generating",
    **call_kwargs,
) -> torch.Tensor:
    """All images of ``prompts`` (prompt-major order) as uint8 ``(N, H, W, 3)`` on the CPU; ``desc`` labels the
    progress bar."""
    expanded = [p for p in prompts for _ in range(num_images_per_prompt)]
    chunks = []
    bar = tqdm(total=len(expanded), desc=desc, disable=not progress)
    for start in range(0, len(expanded), batch_size):
        batch = expanded[start: start + batch_size]
        generators = [torch.Generator().manual_seed(image_seed(seed, start + i)) for i in range(len(batch))]
        images = pipe(batch, generator=generators, output_type="pt", **call_kwargs).images  # (b, 3, H, W) in [0, 1]
        chunks.append((images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu())
        bar.update(len(batch))
    bar.close()
    return torch.cat(chunks)


def adherence_from_reading(reading, targets: Sequence[dict]) -> dict[str, float]:
    """Share of images where each prompted attribute is seen, and where all of them are."""
    hits = {kind: [t[kind] in seen for t, seen in zip(targets, reading.values(kind))] for kind in targets[0]}
    all_hits = [all(hits[kind][i] for kind in hits) for i in range(len(targets))]
    return {**{kind: float(np.mean(v)) for kind, v in hits.items()}, "all": float(np.mean(all_hits))}


def kind_evaluation_prompts(targets: Sequence[str], n_per_concept: int, seed: int) -> list[tuple[str, str]]:
    """Held-out ``(prompt, concept)`` rows for every concept of the targets' kinds: the targets' rows give acc_e, the
    others' acc_i."""
    kinds = dict.fromkeys(get_concept(t).kind for t in targets)
    return evaluation_prompts([name for kind in kinds for name in concept_names(kind)], n_per_concept, seed)


def adherence_by_value(reading, targets: Sequence[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Per concept kind and prompted value: ``{"share": seen / prompted, "n": prompted}``, e.g.
    ``{"style": {"dotted": {"share": 0.12, "n": 50}, ...}, ...}``: which values a model draws and which it misses."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for kind in targets[0]:
        seen_by_value: dict[str, list[bool]] = {}
        for target, seen in zip(targets, reading.values(kind)):
            seen_by_value.setdefault(target[kind], []).append(target[kind] in seen)
        table[kind] = {value: {"share": float(np.mean(hits)), "n": len(hits)}
                       for value, hits in sorted(seen_by_value.items())}
    return table


def prompt_adherence(pipe, oracle, rows: Sequence[tuple[str, dict]], num_images_per_prompt: int = 1, seed: int = 0,
                     batch_size: int = 32, **call_kwargs) -> dict:
    """Generate for ``(prompt, targets)`` rows and read the images with the oracle.

    Returns the per-attribute shares, ``all`` (every prompted attribute seen) and ``n_images``.
    """
    prompts = [p for p, _ in rows]
    targets = [t for _, t in rows for _ in range(num_images_per_prompt)]
    images = generate_images(pipe, prompts, num_images_per_prompt, seed, batch_size, **call_kwargs)
    reading = oracle.predict(images)
    return {**adherence_from_reading(reading, targets), "n_images": len(targets)}


def foreground_boxes(images_NHW3: torch.Tensor, tolerance: int = 40) -> torch.Tensor:
    """(N, 4) float ``(cy, cx, height, width)`` in [0, 1] of the pixels that differ from the border colour.

    The background of a toy render is uniform, so its colour is the median of the border pixels.
    """
    images = images_NHW3.int()
    border = torch.cat([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], dim=1)  # (N, 4S, 3)
    background = border.median(dim=1).values[:, None, None]  # (N, 1, 1, 3)
    mask = (images - background).abs().amax(-1) > tolerance  # (N, H, W)
    size = torch.tensor(images.shape[1:3], dtype=torch.float32)
    boxes = []
    for m in mask:
        ys, xs = torch.nonzero(m, as_tuple=True)
        if len(ys) == 0:
            boxes.append(torch.full((4,), float("nan")))
            continue
        lo = torch.stack([ys.min(), xs.min()]).float()
        hi = torch.stack([ys.max(), xs.max()]).float() + 1
        boxes.append(torch.cat([(lo + hi) / 2 / size, (hi - lo) / size]))
    return torch.stack(boxes)


def seed_diversity(images_NHW3: torch.Tensor) -> dict[str, float]:
    """How much object placement varies across images of one prompt: std of box centre and size, and the share of
    distinct placements (centres rounded to 1/8 of the image)."""
    boxes = foreground_boxes(images_NHW3)
    boxes = boxes[~boxes.isnan().any(dim=1)]
    if len(boxes) < 2:
        return {"centre_std": 0.0, "size_std": 0.0, "distinct_placements": float(len(boxes)), "n_images": len(boxes)}
    centres = boxes[:, :2]
    cells = {tuple(c) for c in (centres * 8).floor().int().tolist()}
    return {
        "centre_std": float(centres.std(dim=0).mean()),
        "size_std": float(boxes[:, 2:].prod(dim=1).sqrt().std()),
        "distinct_placements": len(cells) / len(boxes),
        "n_images": len(boxes),
    }


def concept_accuracy(pipe, oracle, rows: Sequence[tuple[str, str]], target_concepts: Sequence[str],
                     num_images_per_prompt: int = 1, seed: int = 0, batch_size: int = 32, progress: bool = True,
                     **call_kwargs) -> dict:
    """ACC_e / ACC_i on ``(prompt, concept)`` rows, where ``concept`` is what an unedited model should draw.

    ``acc_e``: share of images of target-concept rows where the oracle still sees that concept (lower is better).
    ``acc_i``: share of images of the other rows whose concept is seen (higher is better: nothing else changed).
    Also per concept, and ``n_images``. Rows are generated in order with per-image seeds (see module docstring).
    """
    targets = set(target_concepts)
    images = generate_images(pipe, [p for p, _ in rows], num_images_per_prompt, seed, batch_size, progress,
                             **call_kwargs)
    reading = oracle.predict(images)
    concepts = [c for _, c in rows for _ in range(num_images_per_prompt)]
    seen = [bool(reading.detected(c)[i]) for i, c in enumerate(concepts)]
    per_concept: dict[str, list[bool]] = {}
    for c, s in zip(concepts, seen):
        per_concept.setdefault(c, []).append(s)
    erased = [s for c, s in zip(concepts, seen) if c in targets]
    other = [s for c, s in zip(concepts, seen) if c not in targets]
    return {
        "acc_e": float(np.mean(erased)) if erased else None,
        "acc_i": float(np.mean(other)) if other else None,
        "per_concept": {c: float(np.mean(v)) for c, v in sorted(per_concept.items())},
        "n_images": len(concepts),
    }
