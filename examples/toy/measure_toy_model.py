"""Measure the toy model: prompt adherence read by the oracle on held-out phrasings, and diversity across seeds.

    python examples/toy/measure_toy_model.py --n_prompts 200 --output_dir outputs/measure

Prompts come from caption templates and synonym combinations never used in pretraining captions
(``heldout_template``); each states shape, colour and style of one object. Writes ``metrics.json`` and ``grid.png``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from diffusers.utils import make_image_grid
from PIL import Image

from var_erase import DEFAULT_MODEL
from var_erase.evaluation.toy_metrics import (
    adherence_by_value,
    adherence_from_reading,
    fully_specified_prompts,
    generate_images,
    seed_diversity,
)
from var_erase.pipelines.pipeline_var import VARPipeline
from var_erase.toy.oracle import ORACLE_PATH, OracleClassifier


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=DEFAULT_MODEL)
    p.add_argument("--oracle_path", default=str(ORACLE_PATH))
    p.add_argument("--n_prompts", type=int, default=200)
    p.add_argument("--split", default="heldout_template")
    p.add_argument("--diversity_prompts", type=int, default=8)
    p.add_argument("--diversity_seeds", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--output_dir", default="outputs/measure")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    pipe = VARPipeline.from_pretrained(args.pretrained_model_name_or_path).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    oracle = OracleClassifier.from_pretrained(args.oracle_path).to(args.device)
    sampling = dict(guidance_scale=args.guidance_scale, temperature=args.temperature)

    rows = fully_specified_prompts(args.n_prompts, args.seed, args.split)
    images = generate_images(pipe, [p for p, _ in rows], 1, args.seed, args.batch_size, **sampling)
    reading = oracle.predict(images)
    adherence = adherence_from_reading(reading, [t for _, t in rows])
    per_value = adherence_by_value(reading, [t for _, t in rows])

    diversity = []
    for prompt, _ in rows[: args.diversity_prompts]:
        same_prompt = generate_images(pipe, [prompt], args.diversity_seeds, args.seed + 1, args.batch_size,
                                      progress=False, **sampling)
        diversity.append(seed_diversity(same_prompt))
    metrics = {
        "adherence": adherence,
        "adherence_by_value": per_value,
        "diversity": {k: sum(d[k] for d in diversity) / len(diversity) for k in diversity[0]},
        "n_images": len(images),
        "settings": vars(args),
    }
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    grid = [Image.fromarray(im.numpy()) for im in images[:64]]
    make_image_grid(grid, rows=len(grid) // 8, cols=8).resize((8 * 128, len(grid) // 8 * 128), Image.NEAREST).save(
        os.path.join(args.output_dir, "grid.png"))
    with open(os.path.join(args.output_dir, "grid_prompts.txt"), "w") as f:
        f.write("\n".join(p for p, _ in rows[:64]))
    print(json.dumps({k: v for k, v in metrics.items() if k != "settings"}, indent=2))
    return metrics


if __name__ == "__main__":
    main()
