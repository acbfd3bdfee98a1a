"""An erasure judged on the frozen held-out phrasings of the toy world, with and without the adapter.

Every prompt of a phrasing set (:mod:`var_erase.toy.phrasings`) is drawn ``images_per_prompt`` times, with per-image
seeds tied to the prompt's place in the *whole* set, so the base model and the erased one draw each prompt from the
same seeds whatever is erased. Then, for the erased concepts:

- ``acc_e``: share of the images of their prompts in which the judge still sees the prompt's concept;
- ``acc_i``: share of the images of every other concept's prompts that mention no erased concept, in which the judge
  sees the prompt's concept; ``acc_i_drop`` = base ``acc_i`` - ``acc_i`` on the same images' seeds;
- ``acc_e_by_value``: ``acc_e`` broken down by each co-occurring attribute value (``blue`` x ``striped``), and
  ``acc_e_by_template`` by template.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..loaders.lora import adapters_disabled
from ..toy.concepts import get_concept
from ..toy.phrasings import phrasing_rows
from .toy_metrics import generate_images


@torch.no_grad()
def phrasing_detections(pipe, judge, phrasing_set: str = "heldout", images_per_prompt: int = 2, seed: int = 0,
                        batch_size: int = 64, progress: bool = True, **sampling) -> list[list[bool]]:
    """``[row][image]``: whether the judge sees each prompt's concept, for every prompt of the set."""
    rows = phrasing_rows(phrasing_set)
    images = generate_images(pipe, [r.prompt for r in rows], images_per_prompt, seed, batch_size, progress,
                             **sampling)
    seen = judge(images, [r.concept for r in rows for _ in range(images_per_prompt)])
    return [seen[i * images_per_prompt: (i + 1) * images_per_prompt] for i in range(len(rows))]


def base_detections(pipe, judge, **kwargs) -> list[list[bool]]:
    """:func:`phrasing_detections` with every adapter of the transformer disabled."""
    with adapters_disabled(pipe.transformer):
        return phrasing_detections(pipe, judge, **kwargs)


def _share(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def erasure_report(erased: Sequence[str], detections: list[list[bool]], base: list[list[bool]],
                   phrasing_set: str = "heldout") -> dict:
    """acc_e / acc_i (and the base's), the drop, per erased concept, and the breakdowns (see the module docstring)."""
    names = [get_concept(c).name for c in erased]
    rows = phrasing_rows(phrasing_set)
    target_rows = [i for i, r in enumerate(rows) if r.concept in names]
    kept_rows = [i for i, r in enumerate(rows) if r.concept not in names and not any(r.mentions(c) for c in names)]
    flat = lambda table, idx: [s for i in idx for s in table[i]]  # noqa: E731
    report = {"phrasing_set": phrasing_set, "erased": names,
              "acc_e": _share(flat(detections, target_rows)), "base_acc_e": _share(flat(base, target_rows)),
              "acc_i": _share(flat(detections, kept_rows)), "base_acc_i": _share(flat(base, kept_rows)),
              "n_target_images": len(flat(detections, target_rows)), "n_kept_images": len(flat(detections, kept_rows))}
    report["acc_i_drop"] = report["base_acc_i"] - report["acc_i"] if kept_rows else None
    report["per_concept"] = {c: _share(flat(detections, [i for i in target_rows if rows[i].concept == c]))
                             for c in names}
    by_value: dict[str, list[int]] = {}
    by_template: dict[str, list[int]] = {}
    for i in target_rows:
        for kind, value in rows[i].values.items():
            if kind != get_concept(rows[i].concept).kind:
                by_value.setdefault(f"{rows[i].concept} x {value}", []).append(i)
        by_template.setdefault(rows[i].template, []).append(i)
    report["acc_e_by_value"] = {k: _share(flat(detections, v)) for k, v in sorted(by_value.items())}
    report["acc_e_by_template"] = {k: _share(flat(detections, v)) for k, v in by_template.items()}
    kept_by_concept: dict[str, list[int]] = {}
    for i in kept_rows:
        kept_by_concept.setdefault(rows[i].concept, []).append(i)
    report["acc_i_per_concept"] = {c: {"acc_i": _share(flat(detections, idx)), "base": _share(flat(base, idx))}
                                   for c, idx in sorted(kept_by_concept.items())}
    return report


__all__ = ["base_detections", "erasure_report", "phrasing_detections"]
