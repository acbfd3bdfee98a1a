"""Evaluate an erasure on the toy world: ACC_e (target still drawn) and ACC_i (everything else still drawn).

    python examples/evaluate.py --lora outputs/demo --target_concept red --output_json outputs/demo/eval.json
    python examples/evaluate.py --prompts_file prompts.csv --target_concept circle --lora org/var-erased-circle

``--prompts_file`` is a CSV with header ``prompt,concept`` (the concept an unedited model should draw for the prompt);
without it, held-out prompts (templates never used in pretraining) are generated for every concept of the target's
kind. The toy oracle reads every image. Writes a JSON with ``acc_e``, ``acc_i``, ``n_images``, per-concept accuracy
and every setting, and ``grid.png`` beside it (first images of each concept).
"""

from __future__ import annotations

import argparse
import csv
import json
import os

import torch
from diffusers.utils import make_image_grid
from PIL import Image

from var_erase import DEFAULT_MODEL, __version__
from var_erase.evaluation.toy_metrics import concept_accuracy, kind_evaluation_prompts
from var_erase.pipelines.pipeline_var import VARPipeline
from var_erase.toy.concepts import get_concept
from var_erase.toy.oracle import ORACLE_PATH, OracleClassifier


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of prompts, images or a batch size)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=DEFAULT_MODEL)
    p.add_argument("--lora", action="append", default=[], help="adapter folder, file or Hub repo id (repeatable)")
    p.add_argument("--target_concept", action="append", required=True, help="erased concept(s)")
    p.add_argument("--prompts_file", default=None, help="CSV with header prompt,concept")
    p.add_argument("--prompts_per_concept", type=positive_int, default=8)
    p.add_argument("--num_images_per_prompt", type=positive_int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--batch_size", type=positive_int, default=32)
    p.add_argument("--oracle_path", default=str(ORACLE_PATH))
    p.add_argument("--output_json", default="outputs/eval.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def read_prompts_file(path: str) -> list[tuple[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"prompt", "concept"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: the CSV needs a header with columns 'prompt,concept', got {reader.fieldnames}")
        rows = [(r["prompt"].strip(), r["concept"].strip()) for r in reader]
    rows = [r for r in rows if r[0]]
    if not rows:
        raise ValueError(f"{path}: no prompts (after the header)")
    for _, concept in rows:
        get_concept(concept)  # unknown concepts raise, listing the known ones
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    for concept in args.target_concept:
        get_concept(concept)
    if args.prompts_file:
        rows = read_prompts_file(args.prompts_file)
    else:
        rows = kind_evaluation_prompts(args.target_concept, args.prompts_per_concept, args.seed)
    pipe = VARPipeline.from_pretrained(args.pretrained_model_name_or_path).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    names = [f"lora_{i}" for i in range(len(args.lora))]
    for name, lora in zip(names, args.lora):
        pipe.load_lora_weights(lora, adapter_name=name)
    if names:
        pipe.set_adapters(names)
    oracle = OracleClassifier.from_pretrained(args.oracle_path).to(args.device)
    result = concept_accuracy(pipe, oracle, rows, args.target_concept, args.num_images_per_prompt, args.seed,
                              args.batch_size, guidance_scale=args.guidance_scale, temperature=args.temperature)
    report = {**result, "target_concepts": args.target_concept,
              "settings": {**vars(args), "n_prompts": len(rows), "var_erase_version": __version__,
                           "torch": torch.__version__}}
    os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
    with open(args.output_json, "w") as f:
        json.dump(report, f, indent=2)
    save_grid(pipe, rows, args, os.path.join(os.path.dirname(os.path.abspath(args.output_json)), "eval_grid.png"))
    print(json.dumps({k: report[k] for k in ("acc_e", "acc_i", "n_images")}, indent=2))
    return report


def save_grid(pipe, rows, args, path: str, per_concept: int = 4) -> None:
    """First ``per_concept`` prompts of each concept, one image each, a row per concept (seeds as in the metric)."""
    from var_erase.evaluation.toy_metrics import generate_images

    concepts = list(dict.fromkeys(c for _, c in rows))
    picked = [[p for p, c in rows if c == concept][:per_concept] for concept in concepts]
    prompts = [p for group in picked for p in group]
    images = generate_images(pipe, prompts, 1, args.seed, args.batch_size, progress=False,
                             guidance_scale=args.guidance_scale, temperature=args.temperature)
    pil = iter(Image.fromarray(im.numpy()).resize((128, 128), Image.NEAREST) for im in images)
    cols = max(len(g) for g in picked)
    blank = Image.new("RGB", (128, 128))
    grid = [next(pil) if i < len(group) else blank for group in picked for i in range(cols)]
    make_image_grid(grid, rows=len(concepts), cols=cols).save(path)


if __name__ == "__main__":
    main()
