"""Erase concepts from a VAR model as a LoRA adapter with a model card: a command line over ``var_erase.erase``.

    python examples/train_svare.py --concept blue --output_dir outputs/erase-blue
    python examples/train_svare.py --prompt_pairs pairs.json --concept nudity --judge nudenet \
        --validation_prompts_file val.csv --pretrained_model_name_or_path path/to/infinity-2b \
        --output_dir outputs/erase-nudity --mixed_precision bf16

The default recipe (``--recipe verified``) checks itself while it trains: a judge (the toy oracle on the embedded
model) reads validation prompts every ``--validation_steps``; the run keeps the best checkpoint, stops once the erased
concepts appear in at most ``--target_acc_e`` of the images and the kept ones lose at most ``--max_acc_i_drop``, and
says whether it got there. ``--recipe svare`` is the reference code's S-VARE. Unset flags take the recipe's values
(``var_erase.erasure.recipes``; table: docs/training.md). Runs under ``accelerate launch`` or plain ``python``.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import replace

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from var_erase import DEFAULT_MODEL
from var_erase.erasure.config import DEFAULT_LORA_TARGET_MODULES, LR_SCHEDULERS, METHODS, UCE_INPUTS
from var_erase.erasure.erase import erase
from var_erase.erasure.recipes import DEFAULT_RECIPE, RECIPES, Recipe, get_recipe
from var_erase.erasure.trainer import check_activation_memory_budget
from var_erase.erasure.validation import ValidationPrompts
from var_erase.pipelines.pipeline_var import VARPipeline
from var_erase.toy.phrasings import FROZEN_SETS, PHRASING_SETS

# flag -> ErasureConfig field, for the flags whose unset value (None) means "the recipe's"
HELPS = {"ema_decay": "moving average of the LoRA weights that the loop validates, keeps and saves (default: the "
                      "recipe's; verified: 0.99; 0 turns it off)"}
CONFIG_FLAGS = {"method": "method", "learning_rate": "learning_rate", "lr_scheduler": "lr_scheduler",
                "lr_warmup_steps": "lr_warmup_steps", "max_train_steps": "max_train_steps",
                "train_batch_size": "train_batch_size", "update": "update", "token_threshold": "token_threshold",
                "preservation_weight": "preservation_weight", "num_train_scales": "num_train_scales",
                "first_erase_scale": "first_erase_scale", "retain_weight": "retain_weight",
                "retain_batch_size": "retain_batch_size", "preservation_teacher": "preservation_teacher",
                "preservation_student": "preservation_student", "retain_teacher": "retain_teacher",
                "retain_student": "retain_student", "uncond_preservation_weight": "uncond_preservation_weight",
                "cond_drop_rate": "cond_drop_rate", "negative_guidance": "negative_guidance",
                "uce_inputs": "uce_inputs", "rank": "lora_rank", "lora_alpha": "lora_alpha", "ema_decay": "ema_decay"}
CHOICES = {"method": METHODS, "lr_scheduler": LR_SCHEDULERS, "update": ["alternating", "joint"],
           "preservation_teacher": ["guided", "conditional"], "preservation_student": ["conditional", "guided"],
           "retain_teacher": ["guided", "conditional"], "retain_student": ["conditional", "guided"],
           "uce_inputs": UCE_INPUTS}
TYPES = {"lr_warmup_steps": int, "max_train_steps": int, "train_batch_size": int, "num_train_scales": int,
         "first_erase_scale": int, "retain_batch_size": int, "rank": int}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=DEFAULT_MODEL)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--concept", action="append", default=[], help="a concept of the model's world (pairs are "
                   "generated) or a label for --prompt_pairs; repeat for several concepts in one adapter")
    p.add_argument("--prompt_pairs", action="append", default=[], help="JSON/CSV of unsafe/safe pairs; repeatable")
    p.add_argument("--recipe", choices=list(RECIPES), default=DEFAULT_RECIPE)
    p.add_argument("--num_pairs", type=int, default=None, help="pairs generated per named concept")
    p.add_argument("--pair_wording", choices=["random", "balanced", "varied"], default=None,
                   help="generated pairs: random, every template/synonym evenly, or also with the attributes after "
                        "the noun (recipe's)")
    p.add_argument("--replacement", action="append", default=[],
                   help="generated pairs: what the safe prompts swap a concept for (VALUE for every erased concept "
                        "of its kind, CONCEPT=VALUE for one); default: the recipe's choice")
    for flag in CONFIG_FLAGS:
        p.add_argument(f"--{flag}", type=TYPES.get(flag, str if flag in CHOICES else float), default=None,
                       choices=CHOICES.get(flag), help=HELPS.get(flag, "default: the recipe's"))
    p.add_argument("--lora_layers", default=None,
                   help=f"comma-separated LoRA target modules (default: {','.join(DEFAULT_LORA_TARGET_MODULES)})")
    p.add_argument("--train_modules", default=None, help="full fine-tune of these modules instead of LoRA")
    p.add_argument("--distinct_replacements", action="store_true",
                   help="with the judge's replacement choice, give erased concepts of one kind different kept values")
    p.add_argument("--retain_prompts_per_concept", type=int, default=None, help="toy retain set size (recipe's)")
    p.add_argument("--retain_prompts", action="append", default=[], help="a text file of prompts to preserve")
    p.add_argument("--judge", default="auto", help="auto, oracle, nudenet, imagenet, clip:<folder>, or none")
    p.add_argument("--validation_prompts_file", default=None, help="CSV prompt,concept,kind (kind target or kept)")
    p.add_argument("--validation_steps", type=int, default=-1, help="iterations between validations (recipe's)")
    p.add_argument("--target_acc_e", type=float, default=0.05)
    p.add_argument("--max_acc_i_drop", type=float, default=0.02)
    p.add_argument("--no_early_stopping", action="store_true", help="train to the end; keep the best validation")
    p.add_argument("--confirmations", type=int, default=None, help="met validations in a row to stop (recipe's)")
    p.add_argument("--validation_confidence", type=float, default=-1, help="judge each concept by its leak rate's "
                   "upper bound at this confidence, e.g. 0.95 (-1: the recipe's; 0: the observed share)")
    p.add_argument("--validation_phrasings", default=None, help="toy world: comma-separated tuning-side phrasing "
                   "sets the loop validates on (default: the recipe's, tuning,fresh)")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--gradient_checkpointing", nargs="?", const="full", default=None, choices=["full", "selective"])
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--fp8", action="store_true", help="the frozen base's block linears as FP8 (e4m3) matmuls "
                   "(pipe.transformer.enable_fp8(); GPUs of compute capability 8.9+, or the CPU); LoRA only")
    p.add_argument("--activation_memory_budget", type=float, default=None)
    p.add_argument("--anchors_per_prompt", type=int, default=1)
    p.add_argument("--anchor_batch_size", type=int, default=8)
    p.add_argument("--anchor_cache_dir", default=None, help="default: <output_dir>/anchors")
    p.add_argument("--no_anchor_cuda_graphs", action="store_true")
    p.add_argument("--no_lora_rank_padding", action="store_true")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpointing_steps", type=int, default=None)
    p.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep at most this many checkpoints")
    p.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder or 'latest'")
    p.add_argument("--validation_prompt", action="append", default=[], help="prompts of the before/after grid")
    p.add_argument("--num_validation_images", type=int, default=4, help="grid images per prompt; 0: no grid")
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id", default=None)
    p.add_argument("--hub_token", default=None)
    p.add_argument("--push_include", action="append", default=[],
                   help="also upload files matching this pattern (e.g. training_log.json); repeatable")
    args = p.parse_args(argv)
    if not args.concept and not args.prompt_pairs:
        p.error("give at least one --concept (a concept of the model's world) or --prompt_pairs FILE")
    for flag in ("anchor_batch_size", "anchors_per_prompt", "gradient_accumulation_steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    try:
        check_activation_memory_budget(args.activation_memory_budget, args.compile, args.gradient_checkpointing)
    except ValueError as err:
        p.error(f"--activation_memory_budget (with --compile, without gradient checkpointing): {err}")
    return args


def config_overrides(args) -> dict:
    """The ErasureConfig fields the flags set (unset flags keep the recipe's values)."""
    out = {field: getattr(args, flag) for flag, field in CONFIG_FLAGS.items() if getattr(args, flag) is not None}
    if args.rank is not None and args.lora_alpha is None:
        out["lora_alpha"] = float(args.rank)  # alpha = rank unless given, as before
    if args.lora_layers:
        out["lora_target_modules"] = [m.strip() for m in args.lora_layers.split(",") if m.strip()]
    if args.train_modules:
        out["train_modules"] = [m.strip() for m in args.train_modules.split(",") if m.strip()]
    return out


def read_retain_prompts(paths: list[str]) -> list[str]:
    prompts: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
        if not lines:
            raise SystemExit(f"--retain_prompts {path}: no prompts in the file (one prompt per line)")
        prompts += lines
    return prompts


def read_validation_prompts(path: str | None, seed: int) -> ValidationPrompts | None:
    """``prompt,concept,kind`` rows (kind ``target``: asks for an erased concept; ``kept``: must still be drawn)."""
    if path is None:
        return None
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"prompt", "concept", "kind"} <= set(rows[0]):
        raise SystemExit(f"--validation_prompts_file {path}: needs a header prompt,concept,kind and rows")
    bad = [r["kind"] for r in rows if r["kind"] not in ("target", "kept")]
    if bad:
        raise SystemExit(f"--validation_prompts_file {path}: kind must be 'target' or 'kept', got {bad[0]!r}")
    pick = lambda kind: [(r["prompt"], r["concept"]) for r in rows if r["kind"] == kind]  # noqa: E731
    return ValidationPrompts(pick("target"), pick("kept"), seed, source=path)


def load_pipeline(pretrained_model_name_or_path: str, accelerator: Accelerator) -> VARPipeline:
    """The pipeline on the accelerator's device, its frozen weights in the mixed-precision dtype (diffusers' training
    scripts' ``weight_dtype``); the trainer keeps what it trains in float32."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    return VARPipeline.from_pretrained(pretrained_model_name_or_path, dtype=weight_dtype).to(accelerator.device)


def recipe(args) -> Recipe:
    """The named recipe, validated on ``--validation_phrasings`` when given."""
    chosen = get_recipe(args.recipe)
    if args.validation_phrasings is None:
        return chosen
    sets = tuple(s.strip() for s in args.validation_phrasings.split(",") if s.strip())
    unknown = [s for s in sets if s not in PHRASING_SETS]
    if not sets or unknown:
        raise SystemExit(f"train_svare.py: --validation_phrasings {args.validation_phrasings!r}: choose from "
                         f"{', '.join(PHRASING_SETS)}")
    frozen = [s for s in sets if s in FROZEN_SETS]
    if frozen:
        raise SystemExit(f"train_svare.py: --validation_phrasings {args.validation_phrasings!r}: {frozen[0]!r} is a "
                         f"frozen held-out set results are judged on; validate on the tuning-side sets "
                         f"({', '.join(s for s in PHRASING_SETS if s not in FROZEN_SETS)})")
    return replace(chosen, validation_phrasings=sets)


def main(argv=None) -> str:
    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.gradient_accumulation_steps)
    set_seed(args.seed)
    pipe = load_pipeline(args.pretrained_model_name_or_path, accelerator)
    pipe.set_progress_bar_config(disable=True)
    if args.fp8:
        pipe.transformer.enable_fp8()  # the frozen block linears as FP8 matmuls (GPUs of sm_89+, or the CPU)
    try:
        result = erase(
            pipe, args.concept, output_dir=args.output_dir, pairs=args.prompt_pairs or None, recipe=recipe(args),
            config=config_overrides(args), seed=args.seed, num_pairs=args.num_pairs, pair_wording=args.pair_wording,
            distinct_replacements=args.distinct_replacements or None,
            replacements=args.replacement, retain_prompts=read_retain_prompts(args.retain_prompts),
            retain_prompts_per_concept=args.retain_prompts_per_concept,
            judge=None if args.judge == "none" else args.judge,
            validation_prompts=read_validation_prompts(args.validation_prompts_file, args.seed),
            validation_steps=args.validation_steps, target_acc_e=args.target_acc_e,
            max_acc_i_drop=args.max_acc_i_drop, early_stopping=not args.no_early_stopping,
            confirmations=args.confirmations, validation_confidence=args.validation_confidence or None,
            base_model=args.pretrained_model_name_or_path, accelerator=accelerator,
            anchor_cache_dir=args.anchor_cache_dir, anchor_batch_size=args.anchor_batch_size,
            anchors_per_prompt=args.anchors_per_prompt,
            anchor_cuda_graphs=False if args.no_anchor_cuda_graphs else None,
            checkpointing_steps=args.checkpointing_steps, checkpoints_total_limit=args.checkpoints_total_limit,
            resume_from_checkpoint=args.resume_from_checkpoint, grid_prompts=args.validation_prompt,
            num_grid_images=args.num_validation_images, push_to_hub=args.push_to_hub, hub_model_id=args.hub_model_id,
            hub_token=args.hub_token, push_include=args.push_include, run_args=vars(args),
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            gradient_checkpointing=args.gradient_checkpointing, compile_blocks=args.compile,
            activation_memory_budget=args.activation_memory_budget,
            pad_lora_rank=False if args.no_lora_rank_padding else None)
    except ValueError as err:
        raise SystemExit(f"train_svare.py: {err}") from err
    if accelerator.is_main_process:
        print(f"wrote the adapter and its card to {result.output_dir}")
    return result.output_dir


if __name__ == "__main__":
    main()
