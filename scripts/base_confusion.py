"""How often the judge reads one value of a kind in the base model's images of another: the floor a replacement sets.

    python scripts/base_confusion.py --kind shape --sets tuning,fresh --output_json outputs/shape_confusion.json

For each value V of ``--kind``, every prompt of V in the phrasing sets (tuning-side sets only: never the headline
held-out set) is drawn ``--images_per_prompt`` times by the base model and read by the toy oracle; row V, column W is
the share of V's images in which the oracle sees W. An erasure that maps T to R draws R's images where T was asked,
so row R, column T is roughly the lowest acc_e it can reach.
"""

from __future__ import annotations

import argparse
import json

import torch

from var_erase import DEFAULT_MODEL, VARPipeline
from var_erase.erasure.config import ErasureConfig
from var_erase.erasure.erase import sampling_settings
from var_erase.evaluation.toy_metrics import generate_images
from var_erase.toy.concepts import CONCEPT_KINDS, concept_names
from var_erase.toy.oracle import ORACLE_PATH, OracleClassifier
from var_erase.toy.phrasings import PHRASING_SETS, phrased_prompts


@torch.no_grad()
def confusion(pipe, oracle, kind: str, sets: list[str], images_per_prompt: int, seed: int) -> dict:
    values = concept_names(kind)
    table = {}
    for value in values:
        prompts = [r.prompt for name in sets for r in phrased_prompts(value, name)]
        images = generate_images(pipe, prompts, images_per_prompt, seed, 32, progress=False,
                                 **sampling_settings(ErasureConfig()))
        seen = oracle.predict(images).values(kind)
        table[value] = {other: sum(other in s for s in seen) / len(seen) for other in values}
    return table


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=DEFAULT_MODEL)
    p.add_argument("--kind", choices=CONCEPT_KINDS, default="shape")
    p.add_argument("--sets", default="tuning,fresh", help="comma-separated tuning-side phrasing sets")
    p.add_argument("--images_per_prompt", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_json", default=None)
    args = p.parse_args(argv)
    sets = args.sets.split(",")
    unknown = [s for s in sets if s not in PHRASING_SETS]
    if unknown:
        p.error(f"unknown phrasing set(s) {unknown}; choose from {list(PHRASING_SETS)}")
    pipe = VARPipeline.from_pretrained(args.pretrained_model_name_or_path)
    table = confusion(pipe, OracleClassifier.from_pretrained(ORACLE_PATH), args.kind, sets, args.images_per_prompt,
                      args.seed)
    for value, row in table.items():
        print(value, {k: round(v, 3) for k, v in row.items() if v > 0})
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"kind": args.kind, "sets": sets, "images_per_prompt": args.images_per_prompt,
                       "seed": args.seed, "confusion": table}, f, indent=1)
    return table


if __name__ == "__main__":
    main()
