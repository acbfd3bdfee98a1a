"""Erase concepts from a VAR model with S-VARE (or a baseline), as a LoRA adapter with a model card.

    python examples/train_svare.py --concept circle --output_dir outputs/erase-circle
    python examples/train_svare.py --prompt_pairs pairs.json --concept nudity \
        --pretrained_model_name_or_path path/to/infinity-2b --output_dir outputs/erase-nudity --mixed_precision bf16

Steps: unsafe -> safe prompt pairs (``--prompt_pairs`` file in the EAR / S-VARE format, or generated for each named
``--concept`` of the model's world); the frozen model's auxiliary visual tokens for every safe prompt (cached under
``--anchor_cache_dir``); the erasure loop (:class:`var_erase.erasure.trainer.ErasureTrainer`); then
``pytorch_lora_weights.safetensors`` (with alpha and the adapter's identity in its header), ``README.md`` (the model
card), ``grid.png`` (before / after for the validation prompts) and ``training_log.json`` in ``--output_dir``.
Runs under ``accelerate launch`` as well as plain ``python``.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.utils import make_image_grid
from peft import LoraConfig

from var_erase import DEFAULT_MODEL
from var_erase.erasure.anchors import load_or_sample_anchors
from var_erase.erasure.config import DEFAULT_LORA_TARGET_MODULES, LR_SCHEDULERS, METHODS, ErasureConfig
from var_erase.erasure.prompts import PromptPair, load_prompt_pairs
from var_erase.erasure.trainer import ErasureTrainer, check_activation_memory_budget, latest_checkpoint
from var_erase.hub import (
    AdapterMetadata,
    pipeline_fingerprint,
    push_adapter_to_hub,
    render_model_card,
    save_model_card,
)
from var_erase.loaders.lora import adapters_disabled
from var_erase.pipelines.pipeline_var import VARPipeline


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=DEFAULT_MODEL)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--concept", action="append", default=[],
                   help="a concept of the model's world (pairs are generated) or a label for --prompt_pairs; repeat "
                        "for several concepts in one adapter")
    p.add_argument("--prompt_pairs", action="append", default=[],
                   help="JSON/CSV of unsafe/safe pairs (keys original_prompt/modified_prompt or unsafe_prompt/"
                        "safe_prompt); repeatable")
    p.add_argument("--num_pairs", type=int, default=50, help="pairs generated per named concept (the paper: 50)")
    p.add_argument("--replacement", action="append", default=[],
                   help="generated pairs (toy world): the values the safe prompts may swap a concept for "
                        "(repeatable). VALUE applies to every erased concept of its kind, CONCEPT=VALUE to one "
                        "concept; default: every value of the kind that the run does not erase")
    p.add_argument("--pair_wording", choices=["random", "balanced"], default="random",
                   help="generated pairs (toy world): word the concept with random synonyms / templates, or cycle "
                        "every (template, synonym) combination evenly")
    p.add_argument("--method", choices=METHODS, default="svare")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lora_alpha", type=float, default=None, help="default: --rank")
    p.add_argument("--lora_layers", default=",".join(DEFAULT_LORA_TARGET_MODULES),
                   help="comma-separated LoRA target modules (default: cross-attention + FFN)")
    p.add_argument("--train_modules", default=None,
                   help="full fine-tune of these modules instead of LoRA, e.g. 'attn2,ff' (the reference's CA + FFN)")
    p.add_argument("--learning_rate", type=float, default=None, help="default: 1e-4 for LoRA, 2.34e-5 full")
    p.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant",
                   help="learning-rate schedule over --max_train_steps (diffusers' names; the reference: constant)")
    p.add_argument("--lr_warmup_steps", type=int, default=0, help="iterations of linear warm-up of the schedule")
    p.add_argument("--max_train_steps", type=int, default=500)
    p.add_argument("--train_batch_size", type=int, default=2)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--gradient_checkpointing", nargs="?", const="full", default=None, choices=["full", "selective"],
                   help="recompute block activations in the backward: 'full' (the flag alone; the reference's) or "
                        "'selective' (keep the attention outputs: faster, more memory)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (regional; faster steps on a GPU after a compile of "
                        "about a minute)")
    p.add_argument("--activation_memory_budget", type=float, default=None,
                   help="with --compile and no --gradient_checkpointing: share (0-1] of the activations kept for the "
                        "backward, the compiler recomputing the rest (at Infinity-2B, batch 2, bf16, on an H200: "
                        "0.05 1.55 s per iteration at 18 GiB, 0.4 1.46 s at 37 GiB, 0.7 1.40 s at 54 GiB)")
    p.add_argument("--update", choices=["alternating", "joint"], default="alternating")
    p.add_argument("--token_threshold", type=float, default=0.25, help="alpha of the filtered CE")
    p.add_argument("--preservation_weight", type=float, default=0.5)
    p.add_argument("--num_train_scales", type=int, default=None, help="train only the first K scales")
    p.add_argument("--first_erase_scale", type=int, default=1,
                   help="extension beyond the paper (default 1: off): the erase loss counts only scales >= this "
                        "(1-based); the preservation loss keeps every trained scale")
    p.add_argument("--retain_prompts_per_concept", type=int, default=0,
                   help="extension beyond the paper (default 0: off, the paper's L_Pre on the pairs' safe prompts "
                        "only): also preserve this many training captions of every other concept of the erased "
                        "concepts' kinds (toy world) in each preservation step")
    p.add_argument("--retain_prompts", action="append", default=[],
                   help="extension beyond the paper: a text file of prompts to preserve (one per line); repeatable")
    p.add_argument("--retain_weight", type=float, default=None,
                   help="weight of the retain KL (default: --preservation_weight)")
    p.add_argument("--retain_batch_size", type=int, default=None,
                   help="retain prompts per preservation step (default: --train_batch_size)")
    p.add_argument("--preservation_teacher", choices=["guided", "conditional"], default="guided",
                   help="teacher of the preservation KL: the frozen model's guided logits (the reference) or, beyond "
                        "the paper, its conditional logits")
    p.add_argument("--preservation_student", choices=["conditional", "guided"], default="conditional",
                   help="student side of the preservation KL: the conditional logits (the reference) or, beyond the "
                        "paper, the student's own guided logits (cond and uncond rows, the anchors' guidance)")
    p.add_argument("--retain_teacher", choices=["guided", "conditional"], default="conditional",
                   help="teacher of the retain KL (extension; default: conditional)")
    p.add_argument("--retain_student", choices=["conditional", "guided"], default="conditional",
                   help="student side of the retain KL (extension beyond the paper; default: conditional): the "
                        "conditional logits or the student's own guided logits, as --preservation_student")
    p.add_argument("--uncond_preservation_weight", type=float, default=0.0,
                   help="extension beyond the paper (default 0: off): also keep the frozen model's unconditional "
                        "branch (KL along the anchors), which guidance multiplies by 1 - g")
    p.add_argument("--cond_drop_rate", type=float, default=0.1,
                   help="share of training samples whose text is replaced by the unconditional embedding (the "
                        "reference: 0.1, in both steps)")
    p.add_argument("--anchors_per_prompt", type=int, default=1)
    p.add_argument("--anchor_batch_size", type=int, default=8,
                   help="prompts sampled at once for the auxiliary visual tokens (guided: twice the rows). The KV "
                        "cache grows with it: at Infinity-2B, 1024x1024, bf16, batch 2 peaks at 18 GiB with the text "
                        "encoder, batch 8 at about 50 GiB")
    p.add_argument("--anchor_cache_dir", default=None, help="default: <output_dir>/anchors")
    p.add_argument("--no_anchor_cuda_graphs", action="store_true",
                   help="sample the auxiliary visual tokens eagerly; by default, on a GPU, each scale is replayed as "
                        "a CUDA graph (the same tokens, captured once, dropped before training)")
    p.add_argument("--no_lora_rank_padding", action="store_true",
                   help="compute the LoRA products at the adapter's rank; by default, on a GPU, they are zero-padded "
                        "to a multiple of 8 (the same adapter and results, on faster aligned kernels)")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                   help="autocast dtype (default: accelerate's config); the frozen weights are loaded in it too "
                        "(Infinity-2B in bf16: 4.4 GB of transformer instead of 8.8), the trained ones stay float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpointing_steps", type=int, default=None)
    p.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder or 'latest'")
    p.add_argument("--validation_prompt", action="append", default=[])
    p.add_argument("--num_validation_images", type=int, default=4,
                   help="images per validation prompt in the before/after grid.png; 0 skips the grid")
    p.add_argument("--push_to_hub", action="store_true")
    p.add_argument("--hub_model_id", default=None)
    p.add_argument("--hub_token", default=None)
    args = p.parse_args(argv)
    if not args.concept and not args.prompt_pairs:
        p.error("give at least one --concept (a concept of the model's world) or --prompt_pairs FILE")
    if args.anchor_batch_size < 1:
        p.error(f"--anchor_batch_size must be >= 1, got {args.anchor_batch_size}")
    try:
        check_activation_memory_budget(args.activation_memory_budget, args.compile, args.gradient_checkpointing)
    except ValueError as err:
        p.error(f"--activation_memory_budget (with --compile, without gradient checkpointing): {err}")
    return args


def resolve_pairs(args) -> tuple[list[PromptPair], list[str]]:
    """Prompt pairs from files, or generated for the named concepts of the toy world. Returns (pairs, concepts)."""
    pairs: list[PromptPair] = []
    for path in args.prompt_pairs:
        pairs += load_prompt_pairs(path, default_concept=args.concept[0] if len(args.concept) == 1 else None)
    if args.prompt_pairs:
        concepts = args.concept or sorted({p.concept for p in pairs if p.concept}) or ["custom"]
        return pairs, concepts
    from var_erase.toy.captions import caption_for_concept_prompts
    from var_erase.toy.concepts import get_concept

    for name in args.concept:  # all of them first: each one's pairs depend on the others
        try:
            get_concept(name)
        except (KeyError, ValueError) as err:
            raise SystemExit(f"--concept {name!r} is not a concept of the toy world ({err}). For another concept, "
                             f"pass --prompt_pairs FILE with its unsafe/safe pairs.") from err
    for k, name in enumerate(args.concept):
        generated = caption_for_concept_prompts(name, args.num_pairs, seed=args.seed * 1000 + k, split="train",
                                                balanced=args.pair_wording == "balanced",
                                                replacements=replacements_for(name, args.concept, args.replacement),
                                                avoid=others_erased(name, args.concept))
        pairs += [PromptPair(g.unsafe, g.safe, g.concept) for g in generated]
    return list(dict.fromkeys(pairs)), args.concept


def warn_if_styles_miss_fine_scales(concepts: list[str], num_train_scales: int | None) -> None:
    """Warn when toy fill styles are erased on the coarse scales only: the toy model draws them at the fine ones."""
    from var_erase.toy.concepts import get_concept

    if num_train_scales is None:
        return
    styles = []
    for name in concepts:
        try:
            if get_concept(name).kind == "style":
                styles.append(name)
        except (KeyError, ValueError):  # not a toy concept (pairs from a file)
            continue
    if styles:
        warnings.warn(f"--num_train_scales {num_train_scales} trains the coarse scales only, and the toy model draws "
                      f"fill styles ({', '.join(styles)}) at the fine ones: erasing 'dotted' on 5 of 7 scales left "
                      f"16-22 of 32 dotted images, on every scale 0-2 (docs/results.md, seventh round). Leave "
                      f"--num_train_scales unset to train every scale.", stacklevel=2)


def others_erased(name: str, concepts: list[str]) -> list[str]:
    """The concepts of other kinds erased in the same run: ``name``'s pairs must not show them (on either side), or
    its safe prompts would ask for a concept that another pair erases (see ``caption_for_concept_prompts``)."""
    from var_erase.toy.concepts import get_concept

    kind = get_concept(name).kind
    return list(dict.fromkeys(get_concept(c).name for c in concepts if get_concept(c).kind != kind))


def replacements_for(name: str, concepts: list[str], asked: list[str]) -> list[str] | None:
    """The values a generated pair may swap ``name`` for.

    ``asked`` holds the ``--replacement`` entries: ``"VALUE"`` applies to every erased concept of VALUE's kind,
    ``"CONCEPT=VALUE"`` to CONCEPT only (the per-concept entries win). Without an entry for ``name``: every value of
    its kind that the run does not erase (so one concept's safe prompts never ask for another erased concept, which
    its own erase step pushes away while the preservation step holds it); ``None`` = every other value. A plain
    value that the run erases is skipped for the concepts it does not fit; a bad entry exits with what to change.
    """
    from var_erase.toy.concepts import concept_names, get_concept

    target = get_concept(name)
    erased = {get_concept(c).name for c in concepts}
    own, shared = _parse_replacements(asked, erased)
    if own.get(target.name):
        return own[target.name]
    chosen = [v for v in shared.get(target.kind, []) if v not in erased]
    if chosen:
        return chosen
    if shared.get(target.kind):
        raise SystemExit(f"--replacement {' '.join(shared[target.kind])}: every value is erased in this run, so "
                         f"{target.name!r} has nothing to become; add a {target.kind} that is not erased")
    kept = [c for c in concept_names(target.kind) if c not in erased]
    return kept or None


def _parse_replacements(asked: list[str], erased: set[str]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``--replacement`` entries as ``({concept: [values]}, {kind: [values]})``; bad names exit with the fix."""
    from var_erase.toy.concepts import get_concept

    own: dict[str, list[str]] = {}
    shared: dict[str, list[str]] = {}
    for entry in asked:
        concept, sep, value = entry.partition("=")
        try:
            found_value = get_concept(value if sep else concept)
            found_concept = get_concept(concept) if sep else None
        except KeyError as err:
            raise SystemExit(f"--replacement {entry}: {err.args[0]}") from err
        if found_concept is None:
            shared.setdefault(found_value.kind, []).append(found_value.name)
            continue
        if found_concept.name not in erased:
            raise SystemExit(f"--replacement {entry}: {found_concept.name!r} is not erased in this run "
                             f"(--concept {' --concept '.join(sorted(erased))})")
        if found_value.kind != found_concept.kind:
            raise SystemExit(f"--replacement {entry}: {found_value.name!r} is a {found_value.kind}, "
                             f"{found_concept.name!r} a {found_concept.kind}; give one of its own kind")
        if found_value.name in erased:
            raise SystemExit(f"--replacement {entry}: {found_value.name!r} is erased in this run too, so it cannot "
                             f"be what {found_concept.name!r} becomes; pick a value that is kept")
        own.setdefault(found_concept.name, []).append(found_value.name)
    kinds = {get_concept(c).kind for c in erased}
    for kind, values in shared.items():
        if kind not in kinds:
            raise SystemExit(f"--replacement {' '.join(values)}: the run erases no {kind} (it erases "
                             f"{', '.join(sorted(erased))}); give values of the erased concepts' kinds")
    return own, shared


def resolve_retain_prompts(args, concepts: list[str]) -> list[str]:
    """Prompts to preserve besides the pairs' safe prompts (empty unless asked for: not part of the paper)."""
    prompts: list[str] = []
    for path in args.retain_prompts:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
        if not lines:
            raise SystemExit(f"--retain_prompts {path}: no prompts in the file (one prompt per line)")
        prompts += lines
    if args.retain_prompts_per_concept > 0:
        if args.prompt_pairs:
            raise SystemExit("--retain_prompts_per_concept writes toy-world captions for named --concept s; with "
                             "--prompt_pairs give --retain_prompts FILE instead")
        from var_erase.toy.captions import retain_prompts

        prompts += retain_prompts(concepts, args.retain_prompts_per_concept, seed=args.seed + 7)
    return list(dict.fromkeys(prompts))


def erasure_config(args) -> ErasureConfig:
    modules = args.train_modules.split(",") if args.train_modules else None
    return ErasureConfig(
        method=args.method, learning_rate=args.learning_rate, lr_scheduler=args.lr_scheduler,
        lr_warmup_steps=args.lr_warmup_steps, max_train_steps=args.max_train_steps,
        train_batch_size=args.train_batch_size, update=args.update, token_threshold=args.token_threshold,
        preservation_weight=args.preservation_weight, num_train_scales=args.num_train_scales,
        first_erase_scale=args.first_erase_scale,
        retain_weight=args.retain_weight, retain_batch_size=args.retain_batch_size,
        preservation_teacher=args.preservation_teacher, preservation_student=args.preservation_student,
        retain_teacher=args.retain_teacher, retain_student=args.retain_student,
        cond_drop_rate=args.cond_drop_rate, uncond_preservation_weight=args.uncond_preservation_weight,
        lora_rank=args.rank, lora_alpha=args.lora_alpha or float(args.rank),
        lora_target_modules=[m.strip() for m in args.lora_layers.split(",") if m.strip()], train_modules=modules,
    )


@torch.no_grad()
def validation_grid(pipe, prompts: list[str], n: int, seed: int, config: ErasureConfig):
    """Rows: prompts; columns: n images before (adapters off), then n after, same seeds."""
    kwargs = dict(guidance_scale=config.inference_guidance_scale, temperature=config.inference_temperature,
                  top_k=config.inference_top_k, top_p=config.inference_top_p, num_images_per_prompt=n)
    was_training = pipe.transformer.training
    pipe.transformer.eval()
    rows = []
    for i, prompt in enumerate(prompts):
        gens = lambda i=i: [torch.Generator().manual_seed(seed * 1000 + i * n + j) for j in range(n)]  # noqa: E731
        with adapters_disabled(pipe.transformer):
            before = pipe(prompt, generator=gens(), **kwargs).images
        rows += before + pipe(prompt, generator=gens(), **kwargs).images
    pipe.transformer.train(was_training)
    grid = make_image_grid(rows, rows=len(prompts), cols=2 * n)
    scale = max(1, 128 // rows[0].width)  # small images (the toy world's 64 px) are shown enlarged
    return grid.resize((grid.width * scale, grid.height * scale), resample=0) if scale > 1 else grid


def default_validation_prompts(pairs: list[PromptPair]) -> list[str]:
    """Two unsafe prompts and one safe prompt per concept."""
    out = []
    for concept in dict.fromkeys(p.concept for p in pairs):
        mine = [p for p in pairs if p.concept == concept]
        out += [p.unsafe for p in mine[:2]] + [mine[0].safe]
    return out


def load_pipeline(pretrained_model_name_or_path: str, accelerator: Accelerator) -> VARPipeline:
    """The pipeline on the accelerator's device, its frozen weights in the mixed-precision dtype (diffusers' training
    scripts' ``weight_dtype``): the transformer keeps its ``_keep_in_fp32_modules`` in float32, and the trainer keeps
    what it trains in float32."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    pipe = VARPipeline.from_pretrained(pretrained_model_name_or_path, dtype=weight_dtype)
    return pipe.to(accelerator.device)


def main(argv=None) -> str:
    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision=args.mixed_precision,
                              gradient_accumulation_steps=args.gradient_accumulation_steps)
    set_seed(args.seed)
    pairs, concepts = resolve_pairs(args)
    warn_if_styles_miss_fine_scales(concepts, args.num_train_scales)
    retain = resolve_retain_prompts(args, concepts)
    config = erasure_config(args)
    pipe = load_pipeline(args.pretrained_model_name_or_path, accelerator)
    pipe.set_progress_bar_config(disable=True)
    os.makedirs(args.output_dir, exist_ok=True)

    # 1. auxiliary visual tokens of the safe prompts (frozen model, cached)
    anchor_prompts = list(dict.fromkeys([p.safe for p in pairs] + retain))  # + retain prompts (extension)
    anchors = load_or_sample_anchors(
        pipe, anchor_prompts, args.anchor_cache_dir or os.path.join(args.output_dir, "anchors"),
        model_id=pipeline_fingerprint(pipe), anchors_per_prompt=args.anchors_per_prompt,
        batch_size=args.anchor_batch_size,
        guidance_scale=config.anchor_guidance_scale, temperature=config.anchor_temperature, top_k=config.anchor_top_k,
        top_p=config.anchor_top_p, seed=config.anchor_seed, progress=accelerator.is_main_process,
        cuda_graphs=False if args.no_anchor_cuda_graphs else None)

    # 2. erase
    metadata = AdapterMetadata.from_training(args.pretrained_model_name_or_path, pipe.transformer, concepts,
                                             args.method, hyperparameters=config.to_dict() | {
                                                 "seed": args.seed, "num_pairs": len(pairs),
                                                 "num_retain_prompts": len(retain),
                                                 "anchors_per_prompt": args.anchors_per_prompt})
    trainer = ErasureTrainer(pipe, config, pairs, anchors, accelerator, seed=args.seed,
                             gradient_accumulation_steps=args.gradient_accumulation_steps,
                             gradient_checkpointing=args.gradient_checkpointing, retain_prompts=retain,
                             compile_blocks=args.compile, activation_memory_budget=args.activation_memory_budget,
                             pad_lora_rank=False if args.no_lora_rank_padding else None)
    resume = latest_checkpoint(args.output_dir) if args.resume_from_checkpoint == "latest" else \
        args.resume_from_checkpoint
    if resume:
        trainer.load_checkpoint(resume)
        accelerator.print(f"resumed from {resume} at step {trainer.state.step}")
    trainer.train(checkpointing_steps=args.checkpointing_steps, output_dir=args.output_dir)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return args.output_dir

    # 3. adapter, grid, card, log
    if config.finetune_mode == "lora":
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                          target_modules=list(config.lora_target_modules))
        metadata.lora_rank, metadata.lora_alpha = lora.r, lora.lora_alpha
        metadata.lora_target_modules = sorted(lora.target_modules)
        VARPipeline.save_lora_weights(args.output_dir, transformer_lora_layers=trainer.trainable_state_dict(),
                                      transformer_lora_adapter_metadata=pipe.transformer.peft_config[
                                          "default"].to_dict(),
                                      extra_metadata=metadata.to_safetensors_metadata())
    else:
        from safetensors.torch import save_file

        save_file(trainer.trainable_state_dict(), os.path.join(args.output_dir, "finetuned_modules.safetensors"),
                  metadata=metadata.to_safetensors_metadata())
    prompts = args.validation_prompt or default_validation_prompts(pairs)
    images = {}
    if args.num_validation_images > 0:  # 0: no before/after grid (e.g. runs that only compare adapters)
        grid = validation_grid(pipe, prompts, args.num_validation_images, args.seed, config)
        grid.save(os.path.join(args.output_dir, "grid.png"))
        images = {"Before (left) / after (right)": "grid.png"}
    with open(os.path.join(args.output_dir, "training_log.json"), "w") as f:
        json.dump({"args": vars(args), "config": config.to_dict(), "concepts": concepts, "num_pairs": len(pairs),
                   "retain_prompts": retain, "validation_prompts": prompts, "history": trainer.state.history}, f,
                  indent=2)
    repo_id = args.hub_model_id or f"var-erased-{'-'.join(concepts)}"
    save_model_card(render_model_card(metadata, repo_id, images), args.output_dir)
    if args.push_to_hub:
        url = push_adapter_to_hub(args.output_dir, repo_id, token=args.hub_token)
        print(f"pushed to {url}")
    print(f"wrote the adapter, README.md{' and grid.png' if images else ''} to {args.output_dir}")
    return args.output_dir


if __name__ == "__main__":
    main()
