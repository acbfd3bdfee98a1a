"""``var_erase.erase``: one call for a whole erasure, verified against a judge while it trains.

    from var_erase import DEFAULT_MODEL, VARPipeline, erase

    pipe = VARPipeline.from_pretrained(DEFAULT_MODEL)
    result = erase(pipe, concepts=["blue"], output_dir="outputs/erase-blue")
    print(result.message)                     # "Target reached: at step 300 ..."
    pipe.load_lora_weights(result.output_dir)  # (the returned pipeline already carries the adapter)

Steps: prompt pairs (generated for named concepts of the toy world, or given), the retain set, the frozen model's
auxiliary visual tokens (cached), the erasure loop (:class:`~var_erase.erasure.trainer.ErasureTrainer`) with, every
``validation_steps`` iterations, a validation scored by a judge (:mod:`~var_erase.erasure.validation`): the best
checkpoint is kept, the run stops once the target is met, and it ends with a sentence saying whether the target was
reached. Then ``pytorch_lora_weights.safetensors`` (the verified numbers, judge and prompts in its header), the model
card (the numbers as ``model-index`` results), ``grid.png`` (before / after) and ``training_log.json`` (secrets
redacted) in ``output_dir``.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import set_peft_model_state_dict
from tqdm.auto import tqdm

from ..evaluation.toy_metrics import generate_images
from ..hub import AdapterMetadata, pipeline_fingerprint, push_adapter_to_hub, render_model_card, save_model_card
from ..loaders.lora import adapters_disabled
from ..utils import atomic_write_bytes, redact_secrets
from .anchors import load_or_sample_anchors
from .config import ErasureConfig
from .judges import resolve_judge
from .prompts import PromptPair, load_prompt_pairs
from .recipes import DEFAULT_RECIPE, Recipe, get_recipe
from .trainer import ErasureTrainer, latest_checkpoint
from .validation import (
    ValidationPrompts,
    ValidationResult,
    Validator,
    better,
    rows_of_sets,
    spread_evenly,
    toy_validation_prompts,
)


@dataclass
class ErasureResult:
    """What :func:`erase` returns.

    ``output_dir``: the adapter folder. ``reached``: whether the verified target was met (None: not verified).
    ``verified``: the best validation's numbers, judge and prompts (None without a judge). ``message``: the plain
    sentence the run ended with. ``validations``: every validation, in order. ``pairs`` / ``retain_prompts``: what
    it trained on. ``steps``: iterations trained."""

    output_dir: str
    reached: bool | None
    verified: dict | None
    message: str
    steps: int
    validations: list[dict] = field(default_factory=list)
    pairs: list[PromptPair] = field(default_factory=list)
    retain_prompts: list[str] = field(default_factory=list)


def erase(
    pipe,
    concepts: Sequence[str] | str | None = None,
    *,
    output_dir: str | os.PathLike,
    pairs: Sequence[PromptPair] | str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    recipe: str | Recipe = DEFAULT_RECIPE,
    config: ErasureConfig | dict | None = None,
    seed: int = 0,
    num_pairs: int | None = None,
    pair_wording: str | None = None,
    replacements: Sequence[str] = (),
    distinct_replacements: bool | None = None,
    retain_prompts: Sequence[str] = (),
    retain_prompts_per_concept: int | None = None,
    judge: Any = "auto",
    validation_prompts: ValidationPrompts | None = None,
    validation_steps: int | None = -1,
    target_acc_e: float = 0.05,
    max_acc_i_drop: float = 0.02,
    early_stopping: bool = True,
    confirmations: int | None = None,
    validation_confidence: float | None = -1,
    base_model: str | None = None,
    accelerator: Accelerator | None = None,
    anchor_cache_dir: str | os.PathLike | None = None,
    anchor_batch_size: int = 8,
    anchors_per_prompt: int = 1,
    anchor_cuda_graphs: bool | None = None,
    checkpointing_steps: int | None = None,
    checkpoints_total_limit: int | None = None,
    resume_from_checkpoint: str | None = None,
    grid_prompts: Sequence[str] = (),
    num_grid_images: int = 4,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    hub_token: str | None = None,
    push_include: Sequence[str] = (),
    run_args: dict | None = None,
    progress: bool = True,
    **trainer_kwargs: Any,
) -> ErasureResult:
    """Erase ``concepts`` from ``pipe.transformer`` as a LoRA adapter (or a full fine-tune) in ``output_dir``.

    Args:
        pipe: a ``VARPipeline``; its transformer gets the adapter (kept loaded, as ``"default"``).
        concepts: named concepts of the toy world (pairs are generated), or labels for ``pairs``.
        pairs: unsafe -> safe :class:`PromptPair` s, or JSON/CSV files of them (EAR / S-VARE format).
        recipe: a name of :data:`~var_erase.erasure.recipes.RECIPES` (default ``"verified"``; ``"svare"`` is the
            reference code's method) or a :class:`Recipe`; the arguments below override its settings.
        config: an :class:`ErasureConfig`, or a dict of its fields to change on top of the recipe's.
        seed: seeds the generated pairs, the batch order, the condition dropout and the validation images' base.
        num_pairs / pair_wording / replacements / retain_prompts_per_concept: generated pairs per concept, their
            wording (``"random"``, ``"balanced"`` or ``"varied"``: :func:`~var_erase.toy.pairs.toy_prompt_pairs`),
            replacement entries
            (``"circle"`` for every erased shape, ``"star=circle"`` for one concept; none: the recipe's choice),
            and the toy retain set size; ``retain_prompts``: more prompts to preserve. ``distinct_replacements``:
            with the judge's choice, several erased concepts of one kind get different kept values
            (:func:`judge_replacements`; None: the recipe's, off in every recipe).
        judge: ``"auto"`` (the toy oracle on the toy model, NudeNet for nudity, an ImageNet classifier for ImageNet
            classes), a judge name or object (:mod:`~var_erase.erasure.judges`), any callable
            ``judge(images_NHW3, concepts) -> list[bool]``, or None (no verification).
        validation_prompts: what to validate on; default for toy concepts: the tuning phrasings
            (:func:`~var_erase.erasure.validation.toy_validation_prompts`). Required for other concepts with a judge.
        validation_steps: iterations between validations (-1: the recipe's; None or 0: only one validation, at the
            end, when a judge is given).
        target_acc_e / max_acc_i_drop: the target: at most this share of the erased concepts' images still show
            them, and the kept concepts lose at most this share.
        early_stopping: stop once the target is met (else train to ``max_train_steps`` and keep the best).
        confirmations: met validations in a row needed before stopping early (None: the recipe's; 1: the first met
            one). A later validation re-reads the same prompts and seeds on weights trained further, so two in a row
            say the erasure holds and is not a lucky checkpoint; the last of them is kept.
        validation_confidence: judge each erased concept by the upper bound of its leak rate at this confidence
            (one-sided Clopper-Pearson, e.g. 0.95) instead of the observed share (-1: the recipe's; None: the
            observed share, the reference loop's reading).
        base_model: the base model's id recorded in the adapter (default: the pipeline's path).
        accelerator, checkpointing_steps, checkpoints_total_limit, resume_from_checkpoint: as
            ``examples/train_svare.py`` (diffusers' training-script meanings).
        anchor_*: the auxiliary visual tokens' cache folder (default ``output_dir/anchors``), batch, count, graphs.
        grid_prompts / num_grid_images: the before/after grid (default prompts: two unsafe, one safe per concept;
            0 images: no grid).
        push_to_hub / hub_model_id / hub_token / push_include: upload the adapter, its card and images (the token is
            never written to disk; ``push_include`` patterns add more, e.g. ``["training_log.json"]``).
        run_args: the command-line arguments to record in ``training_log.json`` (secrets redacted).
        trainer_kwargs: passed to :class:`ErasureTrainer` (``gradient_checkpointing``, ``compile_blocks``, ...).
    """
    output_dir = str(output_dir)
    set_seed(seed)  # the LoRA initialisation and everything random after it
    recipe = get_recipe(recipe)
    accelerator = accelerator or Accelerator()
    concepts = [concepts] if isinstance(concepts, str) else list(concepts or [])
    _check_output_dir(output_dir, anchor_cache_dir)
    config = _resolve_config(recipe, config)
    judge = resolve_judge(judge, pipe, concepts or ["custom"])
    steps_between = recipe.validation_steps if validation_steps == -1 else validation_steps

    # 1. prompt pairs and the retain set
    pairs, concepts, replacements = _resolve_pairs(pipe, pairs, concepts, recipe, seed, num_pairs, replacements,
                                                   judge, config, pair_wording or recipe.pair_wording,
                                                   progress and accelerator.is_main_process,
                                                   recipe.distinct_replacements if distinct_replacements is None
                                                   else distinct_replacements)
    retain = _resolve_retain(concepts, recipe, retain_prompts, retain_prompts_per_concept, seed, pairs, config)

    validator = None
    if judge is not None:
        prompts = validation_prompts or _default_validation_prompts(concepts, seed, recipe)
        confidence = recipe.validation_confidence if validation_confidence == -1 else validation_confidence
        validator = Validator(pipe, prompts, judge, target_acc_e, max_acc_i_drop, confidence=confidence,
                              **sampling_settings(config))

    if config.method == "uce":  # a closed-form edit: no anchors, no training loop
        return _erase_closed_form(pipe, config, concepts, pairs, retain, replacements, output_dir, base_model, judge,
                                  validator, grid_prompts, num_grid_images, seed, progress)

    # 2. auxiliary visual tokens of the safe and retain prompts (frozen model, cached)
    anchors = load_or_sample_anchors(
        pipe, list(dict.fromkeys([p.safe for p in pairs] + retain)),
        str(anchor_cache_dir or os.path.join(output_dir, "anchors")), model_id=pipeline_fingerprint(pipe),
        anchors_per_prompt=anchors_per_prompt, batch_size=anchor_batch_size,
        guidance_scale=config.anchor_guidance_scale, temperature=config.anchor_temperature, top_k=config.anchor_top_k,
        top_p=config.anchor_top_p, seed=config.anchor_seed, progress=progress and accelerator.is_main_process,
        cuda_graphs=anchor_cuda_graphs)

    # 3. the closed loop
    metadata = AdapterMetadata.from_training(base_model or _pipeline_path(pipe), pipe.transformer, concepts,
                                             config.method, hyperparameters=config.to_dict() | {
                                                 "recipe": recipe.name, "seed": seed, "num_pairs": len(pairs),
                                                 "replacements": list(replacements),
                                                 "num_retain_prompts": len(retain),
                                                 "learning_rate": config.effective_learning_rate,
                                                 "anchors_per_prompt": anchors_per_prompt})
    trainer = ErasureTrainer(pipe, config, pairs, anchors, accelerator, seed=seed, retain_prompts=retain,
                             **trainer_kwargs)
    resume = latest_checkpoint(output_dir) if resume_from_checkpoint == "latest" else resume_from_checkpoint
    if resume:
        trainer.load_checkpoint(resume)
        accelerator.print(f"resumed from {resume} at step {trainer.state.step}")
    confirmations = recipe.confirmations if confirmations is None else confirmations
    if not (isinstance(confirmations, int) and confirmations >= 1):
        raise ValueError(f"confirmations must be an integer >= 1, got {confirmations!r}")
    best, validations = _train_verified(trainer, validator, steps_between, early_stopping, confirmations,
                                        dict(checkpointing_steps=checkpointing_steps, output_dir=output_dir,
                                             checkpoints_total_limit=checkpoints_total_limit),
                                        progress and accelerator.is_main_process)
    accelerator.wait_for_everyone()
    message = validator.report(best[0]) if validator else "No judge was given, so the erasure was not verified."
    accelerator.print(message)
    verified = _verified(validator, best[0], judge) if validator else None
    if not accelerator.is_main_process:
        return ErasureResult(output_dir, verified and verified["target_reached"], verified, message,
                             trainer.state.step, validations, pairs, retain)

    # 4. adapter, grid, card, log
    metadata.eval_results = verified
    images = _save_outputs(pipe, trainer, config, metadata, output_dir, pairs, grid_prompts, num_grid_images, seed)
    log = {"args": redact_secrets(run_args or {}), "recipe": recipe.name, "config": config.to_dict(),
           "concepts": concepts, "replacements": list(replacements), "pairs": [p.__dict__ for p in pairs],
           "retain_prompts": retain,
           "history": trainer.state.history, "validations": validations, "verified": verified, "message": message}
    atomic_write_bytes(Path(output_dir) / "training_log.json", json.dumps(log, indent=2, default=str).encode())
    save_model_card(render_model_card(metadata, hub_model_id, images, folder=output_dir), output_dir)
    if push_to_hub:
        repo_id = hub_model_id or f"var-erased-{'-'.join(concepts)}"
        print(f"pushed to {push_adapter_to_hub(output_dir, repo_id, token=hub_token, include=list(push_include))}")
    return ErasureResult(output_dir, verified and verified["target_reached"], verified, message, trainer.state.step,
                         validations, pairs, retain)


# ---------------------------------------------------------------------------------------------------------------------
# set-up
def _check_output_dir(output_dir: str, anchor_cache_dir) -> None:
    """Fail before any work when a folder the run writes cannot be created or written."""
    for folder in filter(None, [output_dir, anchor_cache_dir]):
        try:
            os.makedirs(folder, exist_ok=True)
            probe = Path(folder) / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise ValueError(f"cannot write to {folder!r} ({err.strerror}); pass a folder you can write to") from err


def _resolve_config(recipe: Recipe, config: ErasureConfig | dict | None) -> ErasureConfig:
    if isinstance(config, ErasureConfig):
        return config.validate()
    return recipe.erasure_config(**(config or {}))


def _pipeline_path(pipe) -> str:
    return str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path") or "unknown")


def _resolve_pairs(pipe, pairs, concepts, recipe, seed, num_pairs, replacements, judge, config, wording,
                   progress=False, distinct=False):
    """(pairs, concepts, replacements): the given pairs, or pairs generated for toy concepts with the recipe's
    settings (and the replacement entries they were generated with)."""
    if pairs is not None:
        if isinstance(pairs, (str, os.PathLike)):
            pairs = [pairs]
        loaded: list[PromptPair] = []
        for item in pairs:
            if isinstance(item, PromptPair):
                loaded.append(item)
            else:
                loaded += load_prompt_pairs(item, default_concept=concepts[0] if len(concepts) == 1 else None)
        if not loaded:
            raise ValueError("no prompt pairs given: pass pairs with unsafe and safe prompts, or named concepts")
        return loaded, concepts or sorted({p.concept for p in loaded if p.concept}) or ["custom"], list(replacements)
    if not concepts:
        raise ValueError("give concepts (named concepts of the model's world) or pairs (unsafe/safe prompt pairs)")
    from ..toy.pairs import check_toy_concepts, toy_prompt_pairs, warn_if_styles_miss_fine_scales

    concepts = check_toy_concepts(concepts)
    warn_if_styles_miss_fine_scales(concepts, config.num_train_scales)
    if not replacements and recipe.replacement == "judge" and judge is not None:
        full = not recipe.replacement_prompts_per_value  # None: a sample as large as a validation
        if full:
            _refuse_frozen_phrasings(recipe.validation_phrasings)
        chosen = judge_replacements(pipe, judge, concepts, config, seed,
                                    prompts_per_value=None if full else recipe.replacement_prompts_per_value,
                                    phrasing_sets=recipe.validation_phrasings if full else ("tuning",),
                                    images_per_prompt=recipe.validation_target_images if full else 1,
                                    progress=progress, distinct=distinct)
        replacements = [f"{c}={r}" for c, r in chosen.items()]
    generated = toy_prompt_pairs(concepts, num_pairs or recipe.num_pairs, seed, replacements=replacements,
                                 wording=wording)
    return generated, concepts, list(replacements)


def _resolve_retain(concepts, recipe, extra, per_concept, seed, pairs, config) -> list[str]:
    """The given retain prompts and the toy retain set (the recipe's size unless given; a recipe's retain set is
    left out for methods without a preservation loss, which cannot use one)."""
    prompts = list(extra)
    if per_concept is None:
        per_concept = recipe.retain_prompts_per_concept if "preservation_kl" in config.losses else 0
    from ..toy.pairs import toy_retain_prompts

    if per_concept and _all_toy(concepts):
        prompts += toy_retain_prompts(concepts, per_concept, seed)
    unsafe = {p.unsafe for p in pairs}
    return [p for p in dict.fromkeys(prompts) if p not in unsafe]


@torch.no_grad()
def judge_replacements(pipe, judge, concepts: Sequence[str], config: ErasureConfig, seed: int = 0,
                       prompts_per_value: int | None = 16, phrasing_sets: Sequence[str] = ("tuning",),
                       images_per_prompt: int = 1, progress: bool = False, distinct: bool = False
                       ) -> dict[str, str]:
    """For each toy concept, the kept value of its kind that the judge least often reads as the concept in the base
    model's own images of that value (``prompts_per_value`` prompts of ``phrasing_sets``, None: all of them, drawn
    ``images_per_prompt`` times; ties: the value the base model draws most faithfully, then the kind's order). An
    erasure that maps T to R cannot score below that confusion rate, so this picks the cleanest substitute the judge
    allows. A few percent of confusion decides whether a 5% target is reachable, and 16 images cannot see it: the
    base model's circles are read as diamonds in 3% and as crescents in 5% of 64 images, as a tie at 0 of 16.

    ``distinct``: several erased concepts of one kind get different values (the assignment whose worst confusion is
    lowest), instead of each its own best value, which can send four shapes to one. Off by default: not yet measured.
    """
    from ..toy.concepts import concept_names, get_concept

    erased = {get_concept(c).name for c in concepts}
    kinds = dict.fromkeys(get_concept(c).kind for c in erased)
    rows_by_value = {}
    for kind in kinds:
        for value in concept_names(kind):
            if value not in erased:
                rows = [r for r in rows_of_sets(value, list(phrasing_sets)) if not any(r.mentions(e) for e in erased)]
                rows_by_value[value] = [r.prompt for r in spread_evenly(rows, prompts_per_value)]
    values = list(rows_by_value)
    prompts = [p for v in values for p in rows_by_value[v]]
    with adapters_disabled(pipe.transformer):
        images = generate_images(pipe, prompts, images_per_prompt, seed + 2, progress=progress,
                                 desc="judging replacements", **sampling_settings(config))
    owner = [v for v in values for _ in rows_by_value[v] for _ in range(images_per_prompt)]
    drawn = judge(images, owner)
    images_of = {value: [i for i, v in enumerate(owner) if v == value] for value in values}
    scores: dict[str, dict[str, tuple]] = {}  # concept -> value -> (confusion, -adherence, order)
    for concept in (get_concept(c) for c in concepts):
        read_as = judge(images, [concept.name] * len(owner))
        scores[concept.name] = {}
        for order, value in enumerate(values):
            if get_concept(value).kind != concept.kind:
                continue
            idx = images_of[value]
            confusion = sum(read_as[i] for i in idx) / len(idx)  # every image of the value's prompts
            adherence = sum(drawn[i] for i in idx) / len(idx)
            scores[concept.name][value] = (confusion, -adherence, order)
    if not distinct:
        return _best_each(scores)
    chosen = {}
    for kind in kinds:
        chosen.update(_distinct_assignment({c: v for c, v in scores.items() if get_concept(c).kind == kind}))
    return {c: chosen[c] for c in scores}


def _best_each(scores: dict[str, dict[str, tuple]]) -> dict[str, str]:
    """Each concept's own best value (lowest confusion, then most faithful, then the kind's order)."""
    return {c: min(by_value, key=by_value.get) for c, by_value in scores.items()}


def _distinct_assignment(scores: dict[str, dict[str, tuple]]) -> dict[str, str]:
    """One kept value per concept of one kind, no value given twice: the assignment whose worst confusion is lowest,
    then the lowest total confusion, then the most faithful values, then the kind's order. With more concepts than
    kept values each concept takes its own best value (values repeat)."""
    concepts = list(scores)
    values = sorted({v for by_value in scores.values() for v in by_value}, key=lambda v: scores[concepts[0]][v][2])
    if len(concepts) > len(values):
        return _best_each(scores)

    def cost(assignment):
        picked = [scores[c][v] for c, v in zip(concepts, assignment)]
        return (max(p[0] for p in picked), sum(p[0] for p in picked), sum(p[1] for p in picked),
                [p[2] for p in picked])

    best = min(itertools.permutations(values, len(concepts)), key=cost)
    return dict(zip(concepts, best))


def _refuse_frozen_phrasings(phrasing_sets: Sequence[str]) -> None:
    """Raise if ``phrasing_sets`` (validation or replacement choice) include a frozen held-out set
    (:data:`var_erase.toy.phrasings.FROZEN_SETS`): results are judged on those, so validating on one would tune on
    it."""
    from ..toy.phrasings import FROZEN_SETS, PHRASING_SETS

    frozen = [s for s in phrasing_sets if s in FROZEN_SETS]
    if frozen:
        allowed = ", ".join(repr(s) for s in PHRASING_SETS if s not in FROZEN_SETS)
        raise ValueError(f"validation_phrasings {list(phrasing_sets)} include {frozen[0]!r}, a frozen held-out set "
                         f"results are judged on: validating on it would tune on it. Use the tuning-side sets "
                         f"({allowed})")


def _default_validation_prompts(concepts: list[str], seed: int, recipe: Recipe) -> ValidationPrompts:
    if _all_toy(concepts):
        _refuse_frozen_phrasings(recipe.validation_phrasings)
        return toy_validation_prompts(concepts, recipe.validation_phrasings, seed=seed,
                                      target_images_per_prompt=recipe.validation_target_images)
    raise ValueError(f"no default validation prompts for {concepts}: pass validation_prompts=ValidationPrompts("
                     f"targets=[(prompt, concept), ...], kept=[...]) written apart from the training pairs "
                     f"(--validation_prompts_file on the command line), or judge=None (--judge none) to train "
                     f"without verification")


def sampling_settings(config: ErasureConfig) -> dict:
    return {"guidance_scale": config.inference_guidance_scale, "temperature": config.inference_temperature,
            "top_k": config.inference_top_k, "top_p": config.inference_top_p}


def _all_toy(concepts: Sequence[str]) -> bool:
    from ..toy.pairs import is_toy_concept

    return bool(concepts) and all(is_toy_concept(c) for c in concepts)


def uce_mode(config: ErasureConfig, concepts: Sequence[str]) -> str:
    """``config.uce_inputs`` with ``"auto"`` resolved: ``"concept"`` for named toy concepts, else ``"prompts"``."""
    if config.uce_inputs != "auto":
        return config.uce_inputs
    return "concept" if _all_toy(concepts) else "prompts"


def uce_inputs(config: ErasureConfig, concepts: Sequence[str], pairs: Sequence[PromptPair],
               retain: Sequence[str] = (), replacements: Sequence[str] = ()) -> tuple[list[str], list[str], list[str]]:
    """``(edited, guides, preserved)`` texts of a UCE erasure, by ``config.uce_inputs``.

    ``"concept"`` (the reference's reading; ``"auto"`` for named toy concepts): each concept's words towards its
    replacement's (``""`` without one), every kept value's words and the retain prompts preserved
    (:func:`~var_erase.erasure.uce.toy_concept_texts`); the edit reads the last own token of each text, as the
    reference does (``tokens="last"`` of :func:`~var_erase.erasure.uce.edit`). ``"prompts"`` (the adaptation;
    ``"auto"`` otherwise): every token of every pair's unsafe prompt towards its safe prompt, the retain prompts and
    the safe prompts preserved."""
    from .uce import toy_concept_texts

    if uce_mode(config, concepts) == "concept":
        if not _all_toy(concepts):
            raise ValueError(f"uce_inputs='concept' edits the words of named toy-world concepts, got {list(concepts)}; "
                             "use uce_inputs='prompts' (or 'auto') to edit the prompt pairs' prompts")
        edited, guides, preserved = toy_concept_texts(concepts, replacements)
    else:
        edited, guides, preserved = [p.unsafe for p in pairs], [p.safe for p in pairs], [p.safe for p in pairs]
    return edited, guides, list(dict.fromkeys(preserved + list(retain)))


def _erase_closed_form(pipe, config, concepts, pairs, retain, replacements, output_dir, base_model, judge, validator,
                       grid_prompts, num_grid_images, seed, progress) -> ErasureResult:
    """UCE (:mod:`.uce`) on the texts of :func:`uce_inputs`, in one closed-form step; written as an adapter, then
    read once by the judge (when given)."""
    from . import uce

    targets = [m.rsplit(".", 1)[-1] for m in config.lora_target_modules]
    edited_texts, guides, preserved = uce_inputs(config, concepts, pairs, retain, replacements)
    mode = uce_mode(config, concepts)
    edited = uce.edit(pipe, edited_texts, guides, preserve=preserved or None,
                      target_modules=list(dict.fromkeys(targets)), tokens="last" if mode == "concept" else "all")
    edited.hyperparameters["uce_inputs"] = mode
    metadata = uce.adapter_metadata(edited, pipe, base_model or _pipeline_path(pipe), concepts)
    pipe.transformer.add_adapter(edited.lora_config, adapter_name="default")  # the edit, in memory, for the judge
    set_peft_model_state_dict(pipe.transformer, edited.state_dict, adapter_name="default")
    verified, message, validations = None, "No judge was given, so the erasure was not verified.", []
    if validator is not None:
        base = validator.baseline()
        result = validator(0)
        validations = [{"base": True, **base.to_dict()}, result.to_dict()]
        message, verified = validator.report(result), _verified(validator, result, judge)
    _log(progress, f"UCE: rank {edited.rank}, {edited.seconds:.1f} s. {message}")
    metadata.eval_results = verified  # the verified numbers go into the adapter's header as for trained adapters
    uce.write_adapter(edited, output_dir, pipe, metadata.base_model, metadata=metadata)
    images = {}
    if num_grid_images > 0:
        grid = before_after_grid(pipe, list(grid_prompts) or default_grid_prompts(pairs), num_grid_images, seed, config)
        grid.save(os.path.join(output_dir, "grid.png"))
        images = {"Before (left) / after (right)": "grid.png"}
    log = {"recipe": "uce", "config": config.to_dict(), "concepts": concepts, "pairs": [p.__dict__ for p in pairs],
           "retain_prompts": retain, "uce": redact_secrets(dict(edited.hyperparameters)), "seconds": edited.seconds,
           "validations": validations, "verified": verified, "message": message}
    atomic_write_bytes(Path(output_dir) / "training_log.json", json.dumps(log, indent=2, default=str).encode())
    save_model_card(render_model_card(metadata, None, images, folder=output_dir), output_dir)
    return ErasureResult(output_dir, verified and verified["target_reached"], verified, message, 0, validations,
                         pairs, retain)


# ---------------------------------------------------------------------------------------------------------------------
# training with validation
def _train_verified(trainer: ErasureTrainer, validator: Validator | None, every: int | None, early_stopping: bool,
                    confirmations: int, checkpointing: dict, progress: bool):
    """Train in chunks of ``every`` iterations, validating after each; returns ``([best result], validations)`` and
    leaves the transformer at the best checkpoint's weights. With early stopping, training stops once
    ``confirmations`` validations in a row met the target, and the last of them is the best. With
    ``config.ema_decay`` the weight average is validated and kept (the final average without a validator)."""
    total = trainer.config.max_train_steps
    every = every if every and every > 0 else total
    best: list[ValidationResult | None] = [None]
    best_state: dict[str, torch.Tensor] | None = None
    validations: list[dict] = []
    streak = longest = 0
    if validator is not None:
        base = validator.baseline()
        validations.append({"base": True, **base.to_dict()})
        _log(progress, f"base model: acc_e {base.acc_e:.3f}" + (f", acc_i {base.acc_i:.3f}" if base.acc_i is not
                                                                   None else ""))
    bar = tqdm(total=total, initial=trainer.state.step, desc=f"erasing ({trainer.config.method})",
               disable=not progress)
    while trainer.state.step < total:
        before = trainer.state.step
        stop = min(total, (before // every + 1) * every)
        trainer.train(stop, progress=False, **checkpointing)
        bar.update(trainer.state.step - before)
        last = trainer.state.history[-1] if trainer.state.history else {}
        postfix = {k: f"{v:.4g}" for k, v in last.items() if k in ("loss", "pre")}
        if validator is not None:
            with trainer.averaged_weights():  # with ema_decay, the average is what is judged and kept
                result = _agreed(trainer.accelerator, validator(trainer.state.step))
                streak = streak + 1 if result.met else 0
                confirmed = early_stopping and streak >= confirmations
                if confirmed or better(result, best[0], validator.max_acc_i_drop):  # copied only when kept
                    best[0], best_state = result, {k: v.detach().clone()
                                                   for k, v in trainer.trainable_state_dict().items()}
            validations.append(result.to_dict())
            postfix.update(acc_e=f"{result.acc_e:.3f}")
            if result.acc_i is not None:
                postfix.update(acc_i=f"{result.acc_i:.3f}")
            longest = max(longest, streak)
            _log(progress, f"step {result.step}: acc_e {result.acc_e:.3f}"
                 + (f", acc_i {result.acc_i:.3f} (drop {result.acc_i_drop:+.3f})" if result.acc_i is not None else "")
                 + (f" - target met ({streak} of {confirmations} in a row)" if result.met else ""))
            if confirmed:
                break
        bar.set_postfix(postfix)
    bar.close()
    if best_state is not None and (best[0].step != trainer.state.step or trainer.ema is not None):
        trainer.load_trainable_state_dict(best_state)
    elif best_state is None and trainer.ema is not None:
        trainer.ema.copy_to(trainer.trainable_parameters())  # no validation: the final average is the result
    if best[0] is not None and best[0].met:
        best[0].confirmed = longest >= confirmations
    return best, validations


def _agreed(accelerator: Accelerator, result: ValidationResult) -> ValidationResult:
    """The main process's result on every process (their images can differ by rounding; all must stop together)."""
    if accelerator.num_processes == 1:
        return result
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([result])[0]


def _log(progress: bool, text: str) -> None:
    if progress:
        tqdm.write(text)


def _verified(validator: Validator, best: ValidationResult | None, judge) -> dict | None:
    if best is None:
        return None
    base = validator.base
    out = {"acc_e": best.acc_e, "base_acc_e": base.acc_e, "target_reached": bool(best.reached), "step": best.step,
           "target_acc_e": validator.target_acc_e, "n_images": validator.prompts.num_images,
           "per_concept": dict(best.per_concept), "confirmed": best.confirmed,
           "confidence": validator.confidence, "per_concept_upper": dict(best.per_concept_upper),
           "prompts_file": validator.prompts.source, "judge": dict(getattr(judge, "settings", {"judge": "custom"})),
           "seed": validator.prompts.seed}
    if best.acc_i is not None:
        out.update(acc_i=best.acc_i, base_acc_i=base.acc_i, acc_i_drop=best.acc_i_drop,
                   max_acc_i_drop=validator.max_acc_i_drop)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# outputs
def _save_outputs(pipe, trainer, config, metadata, output_dir, pairs, grid_prompts, num_grid_images, seed) -> dict:
    """Write the adapter (or the fine-tuned modules) and the before/after grid; returns the card's images."""
    from ..pipelines.pipeline_var import VARPipeline

    if config.finetune_mode == "lora":
        metadata.lora_rank, metadata.lora_alpha = config.lora_rank, config.lora_alpha
        metadata.lora_target_modules = sorted(config.lora_target_modules)
        VARPipeline.save_lora_weights(output_dir, transformer_lora_layers=trainer.trainable_state_dict(),
                                      transformer_lora_adapter_metadata=pipe.transformer.peft_config[
                                          "default"].to_dict(),
                                      extra_metadata=metadata.to_safetensors_metadata())
    else:
        from safetensors.torch import save_file

        path = os.path.join(output_dir, "finetuned_modules.safetensors")
        save_file(trainer.trainable_state_dict(), path + ".tmp", metadata=metadata.to_safetensors_metadata())
        os.replace(path + ".tmp", path)
    if num_grid_images <= 0:
        return {}
    grid = before_after_grid(pipe, list(grid_prompts) or default_grid_prompts(pairs), num_grid_images, seed, config)
    grid.save(os.path.join(output_dir, "grid.png"))
    return {"Before (left) / after (right)": "grid.png"}


@torch.no_grad()
def before_after_grid(pipe, prompts: list[str], n: int, seed: int, config: ErasureConfig):
    """Rows: prompts; columns: n images before (adapters off), then n after, same seeds."""
    from diffusers.utils import make_image_grid

    kwargs = dict(sampling_settings(config), num_images_per_prompt=n)
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


def default_grid_prompts(pairs: list[PromptPair]) -> list[str]:
    """Two unsafe prompts and one safe prompt per concept."""
    out = []
    for concept in dict.fromkeys(p.concept for p in pairs):
        mine = [p for p in pairs if p.concept == concept]
        out += [p.unsafe for p in mine[:2]] + [mine[0].safe]
    return out


__all__ = ["ErasureResult", "before_after_grid", "default_grid_prompts", "erase", "judge_replacements",
           "sampling_settings"]
