"""``ErasureConfig``: one erasure method as a config, consumed by one trainer (the PEFT shape).

It holds two parts: an :class:`ErasureMethodConfig` (the losses and thresholds, the anchors, and a ``peft.LoraConfig``
for the adapter, or ``train_modules`` for a full fine-tune) and :class:`ErasureTrainingArguments` (optimizer, schedule,
steps, batches, the sampling of validation images). Every setting also has a flat name on ``ErasureConfig``
(:data:`FLAT_FIELDS`, what :meth:`ErasureConfig.to_dict` stores in adapter metadata).

Defaults are the reference code's (``ndhg1213/S-VARE``: ``erase_trainer.py``, ``infinity/utils/arg_util.py``,
``scripts/train_svare.sh``) wherever the paper and the code disagree; the paper's choices are options, and
:meth:`ErasureConfig.paper` collects them. Two defaults are the product's, not the paper's: training a LoRA adapter
(the code fully fine-tunes cross-attention + FFN; ``train_modules=["attn2", "ff"]`` does that) and its learning rate.

Methods and the losses they use (:func:`losses_for`; functions of :mod:`var_erase.erasure.losses`):

=========  =========================================  ===============================================================
method     losses                                     what the trainer feeds them
=========  =========================================  ===============================================================
``svare``  filtered_cross_entropy, preservation_kl    S-VARE. FCE: student under c* teacher-forced on r^ori vs the
                                                      anchor bits r^ori. KL: student under c on r^ori vs the stored
                                                      CFG-guided teacher logits. Weighted by ``preservation_weight``.
``fce``    filtered_cross_entropy                     VARE + L_FCE without preservation (the ablation's middle row).
``vare``   vare_basic_loss                            paper Eq. 7: student under c* vs frozen under c, both on r^ori.
``naive``  naive_loss                                 paper Eq. 6: as Eq. 7 but each branch on its own history.
``esd``    esd_loss (+ esd_target_logits)             ESD negative guidance on logits, ``negative_guidance`` = eta,
                                                      on the S-VARE modules (cross-attention + FFN).
``esd-u``  esd.negative_guidance_loss                 ESD-u (:mod:`~var_erase.erasure.esd`): the same target, trained
                                                      on the non-cross-attention modules (self-attention + FFN).
``esd-x``  esd.negative_guidance_loss                 ESD-x: the same target, trained on the cross-attention modules.
``fmn``    fmn.attention_resteering_loss              Forget-Me-Not (:mod:`~var_erase.erasure.fmn`): cross-attention
                                                      mass on the concept's tokens of c*, along r^ori.
``uce``    (none: a closed-form edit)                 UCE (:mod:`~var_erase.erasure.uce`): ``uce.edit``, no trainer.
``ac-n``   ablating_concepts.noise_based_loss         AC, noise-based (:mod:`~var_erase.erasure.ablating_concepts`):
                                                      cross-entropy of the student under c* towards the bits r^ori.
``ac-m``   ablating_concepts.model_based_loss         AC, model-based: per-bit KL(frozen under c || student under c*)
                                                      along r^ori.
=========  =========================================  ===============================================================

A name with a dot is a function of that module of :mod:`var_erase.erasure` (:func:`loss_function` resolves it); a
plain name is one of :mod:`~var_erase.erasure.losses`. Each method has its default LoRA targets
(:func:`default_lora_target_modules`), used when ``lora_target_modules`` is not given.
"""

from __future__ import annotations

import copy
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

from peft import LoraConfig

UCE_INPUTS: tuple[str, ...] = ("auto", "concept", "prompts")
"""What UCE edits: the concepts' words (``"concept"``), the pairs' prompts (``"prompts"``), or by the concepts
(``"auto"``); :attr:`ErasureMethodConfig.uce_inputs`."""
METHODS: tuple[str, ...] = ("svare", "vare", "fce", "naive", "esd", "esd-u", "esd-x", "fmn", "uce", "ac-n", "ac-m")
# learning-rate schedules of ``diffusers.optimization.get_scheduler`` that need no further arguments
LR_SCHEDULERS: tuple[str, ...] = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                  "polynomial")

_METHOD_LOSSES: dict[str, tuple[str, ...]] = {
    "svare": ("filtered_cross_entropy", "preservation_kl"),
    "fce": ("filtered_cross_entropy",),
    "vare": ("vare_basic_loss",),
    "naive": ("naive_loss",),
    "esd": ("esd_loss",),
    "esd-u": ("esd.negative_guidance_loss",),
    "esd-x": ("esd.negative_guidance_loss",),
    "fmn": ("fmn.attention_resteering_loss",),
    "uce": (),  # a closed-form edit (var_erase.erasure.uce.edit), not a training loss
    "ac-n": ("ablating_concepts.noise_based_loss",),
    "ac-m": ("ablating_concepts.model_based_loss",),
}

DEFAULT_LORA_TARGET_MODULES: tuple[str, ...] = (
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out", "ff.net.0.proj", "ff.net.2",
)
"""Cross-attention and FFN of every block, the parameters S-VARE trains (self-attention excluded)."""

_METHOD_LORA_TARGETS: dict[str, tuple[str, ...]] = {
    # ESD-u: everything but cross-attention ("noxattn"); ESD-x: cross-attention only ("xattn") (Gandikota et al. 2023)
    "esd-u": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out", "ff.net.0.proj", "ff.net.2"),
    "esd-x": ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out"),
    # FMN re-steers the attention maps: the query and key projections of cross-attention decide them
    "fmn": ("attn2.to_q", "attn2.to_k"),
    # UCE edits the key/value projections of the text; AC's default parameter group is the same ("crossattn_kv")
    "uce": ("attn2.to_k", "attn2.to_v"),
    "ac-n": ("attn2.to_k", "attn2.to_v"),
    "ac-m": ("attn2.to_k", "attn2.to_v"),
}

FULL_FINETUNE_MODULES: tuple[str, ...] = ("attn2", "ff")
"""The reference's full fine-tune set (``enable_ca_layer=1, enable_ffn_layer=1, enable_sa_layer=0``)."""

REFERENCE_LEARNING_RATE = 6e-3 * 1 / 256
"""The code's lr for a full fine-tune, ``tblr * glb_batch_size / 256 = 6e-3 * 1 / 256 ≈ 2.34e-5`` (constant)."""

LORA_LEARNING_RATE = 1e-4
"""Our LoRA default (diffusers' LoRA training examples use 1e-4); not from the paper, which fine-tunes fully."""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _integer(value: Any, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _module_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, str) and m for m in value)


def losses_for(method: str) -> tuple[str, ...]:
    """Names of the functions a method optimises (see the module table; :func:`loss_function` resolves them); empty
    for ``uce``, which is a closed-form edit."""
    if method not in _METHOD_LOSSES:
        raise ValueError(f"unknown erasure method {method!r}; choose one of {list(METHODS)}")
    return _METHOD_LOSSES[method]


def loss_function(name: str) -> Callable[..., Any]:
    """The function a :func:`losses_for` name stands for: ``"module.function"`` of :mod:`var_erase.erasure`, or a
    plain function name of :mod:`var_erase.erasure.losses`."""
    module, _, function = name.rpartition(".")
    return getattr(importlib.import_module(f"var_erase.erasure.{module or 'losses'}"), function)


def default_lora_target_modules(method: str) -> list[str]:
    """The LoRA targets a method trains unless told otherwise: its source paper's parameter set (ESD-u: self-attention
    + FFN; ESD-x: cross-attention; FMN: cross-attention queries and keys; UCE and AC: cross-attention keys and values),
    else S-VARE's cross-attention + FFN (:data:`DEFAULT_LORA_TARGET_MODULES`)."""
    if method not in METHODS:
        raise ValueError(f"unknown erasure method {method!r}; choose one of {list(METHODS)}")
    return list(_METHOD_LORA_TARGETS.get(method, DEFAULT_LORA_TARGET_MODULES))


def default_learning_rate(mode: str) -> float:
    """Default learning rate for ``mode`` = ``"full"`` (the code's ≈2.34e-5) or ``"lora"`` (1e-4).

    The paper's "2e-3", as transcribed by a third-party summary, would almost surely wreck a ~1.6 B-parameter AdamW
    fine-tune; it is probably a misreading of 2e-5 and is not used. LoRA's low-rank updates need a larger rate.
    """
    if mode == "full":
        return REFERENCE_LEARNING_RATE
    if mode == "lora":
        return LORA_LEARNING_RATE
    raise ValueError(f"mode must be 'lora' or 'full', got {mode!r}")


def default_lora_config(method: str = "svare", rank: int = 4, alpha: float = 4.0, dropout: float = 0.0) -> LoraConfig:
    """The ``peft.LoraConfig`` a method trains unless given one: rank 4, alpha 4, no dropout, PEFT's ``"gaussian"``
    initialisation of ``A`` (``B`` starts at zero) and the method's own targets (:func:`default_lora_target_modules`;
    None for an unknown method, which validation reports)."""
    targets = default_lora_target_modules(method) if method in METHODS else None
    return _with_targets(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian"),
                         targets)


def _with_targets(lora_config: LoraConfig, targets: list[str] | tuple[str, ...] | None) -> LoraConfig:
    """``lora_config`` targeting ``targets``, kept as the list given: PEFT turns a list into a set when the config is
    built, which would lose the order shown in metadata and model cards; PEFT matches a list the same way."""
    lora_config.target_modules = list(targets) if targets is not None else None
    return lora_config


@dataclass
class ErasureMethodConfig:
    """The erasure method: its losses and thresholds, its anchors and its trainable parameters.

    Loss settings (see :mod:`var_erase.erasure.losses`):
        method: one of :data:`METHODS`.
        bit_threshold: gamma, ln 2. token_threshold: alpha, 0.25 (0 = no filtering with ``">="``).
        comparison: ``">="`` (code) or ``">"`` (paper). normalize: ``"all_tokens"`` (code) or ``"kept_tokens"``.
        preservation_weight: lambda on L_Pre: 0.5 (code's ``reg_lambda``); the paper's "equal weights" is 1.0.
        kl_reduction: ``"code"`` (mean over the 2d entries, ½ of the per-bit KL) or ``"paper"`` (full per-bit KL).
        update: ``"alternating"`` (code: per iteration, a backward + optimizer step on L_FCE, then another on
            lambda * L_Pre) or ``"joint"`` (one step on L_FCE + lambda * L_Pre, as the paper's total loss reads).
            Only matters for methods with two losses.
        negative_guidance: eta of ESD (methods ``esd``, ``esd-u``, ``esd-x`` only).
        uce_inputs: what UCE (method ``uce`` only) edits and preserves: ``"concept"`` (the reference's reading: the
            erased concepts' own words towards their replacement's, every kept value's words preserved; named toy
            concepts only), ``"prompts"`` (an adaptation: every pair's whole unsafe prompt towards its safe prompt,
            the safe and retain prompts preserved) or ``"auto"`` (default: ``"concept"`` for named toy concepts,
            else ``"prompts"``). See :func:`var_erase.erasure.uce.toy_concept_texts`.
        num_train_scales: train on the first N scales only; ``None`` = all (the code's ``always_training_scales=100``).
        first_erase_scale: an extension beyond the paper (default 1: off): the erase loss counts only the tokens of
            scales ``>= first_erase_scale`` (1-based; still weighted ``1 / L`` as the reference), the preservation
            loss every trained scale, so the coarse scales that every prompt shares are only preserved.
        retain_weight: the weight of the optional retain set, **an extension beyond the paper** (its L_Pre uses only
            the pairs' own neutral prompts, research/paper.md §1.4; no retain set). When the trainer is given
            ``retain_prompts`` (e.g. captions of the other concepts of the target's kind), each preserve step adds
            ``retain_weight * KL(guided teacher || student)`` on a batch of them
            (:attr:`ErasureTrainingArguments.retain_batch_size`), each along its own frozen-model trajectory.
            ``None`` = ``preservation_weight``. Without retain prompts (the default) nothing changes. Methods with a
            preservation term only (``svare``).
        preservation_teacher: the teacher of L_Pre on the pairs' safe prompts: ``"guided"`` (the reference: the frozen
            model's CFG-guided logits, guidance 4, stored with the anchors) or ``"conditional"`` (an option beyond the
            paper: the frozen model's plain conditional logits, the same forward the student runs, so the KL pulls the
            model towards itself rather than distilling guidance into its conditional branch).
        preservation_student: which student logits L_Pre compares with the teacher: ``"conditional"`` (the
            reference: the plain conditional forward under the safe prompt) or ``"guided"`` (an option beyond the
            paper: the student's own guided logits ``g * cond + (1 - g) * uncond`` at the anchors' guidance scale,
            from one forward of ``[safe; unconditional]``, both with gradients). With the reference's guided
            teacher, the guided student matches what is compared with what is sampled: at inference guidance is
            applied on top of the adapted conditional *and* unconditional branches, so keeping the conditional
            branch on the guided teacher (the reference) over-guides the safe prompts, while keeping the guided
            output keeps their samples. Costs a second forward row per pair in the preservation step.
        retain_teacher: the same choice for the retain prompts; ``"conditional"`` by default, since the retain set is
            not the paper's (distilling guidance into the conditional branch moves a prompt's guided samples away
            from the base model's, the opposite of retaining it).
        retain_student: which student logits the retain KL compares with its teacher, **an extension beyond the
            paper**: ``"conditional"`` (default; the plain conditional forward under each retain prompt, with
            condition dropout) or ``"guided"`` (the student's own guided logits at the anchors' guidance, as
            ``preservation_student="guided"`` does for the safe prompts). Costs a second forward row per retain prompt.
        uncond_preservation_weight: an extension beyond the paper (default 0: off). Each preserve step adds
            ``w * KL(frozen unconditional || student unconditional)`` along the same anchors: the LoRA also acts on
            the unconditional branch (the learned empty-text embedding goes through the same cross-attention and
            FFN), which guidance weights by ``1 - g`` (-3 at g = 4) in every prompt's logits, and nothing else keeps
            it in place (with ``cond_drop_rate`` > 0 the erase step even pulls it towards the safe anchors).

    Trainable parameters:
        lora_config: the ``peft.LoraConfig`` of the trained adapter; the trainer adds a copy of it to the
            transformer. ``None`` (default) is :func:`default_lora_config` of the method (rank 4, alpha 4, the
            method's targets, gaussian init).
        train_modules: when set (e.g. ``["attn2", "ff"]``), fully fine-tune the modules whose names contain these
            instead of training a LoRA (the reference's setting); ``lora_config`` is then unused.

    Anchors:
        anchor_*: how the frozen model samples the auxiliary tokens r^ori for each neutral prompt (guidance 4 on
            logits, tau 1, top-k 900, top-p 0.97, seed 42; top-k >= 2 is a no-op per bit but kept for fidelity).

    Validated by the :class:`ErasureConfig` that holds it.
    """

    method: str = "svare"
    bit_threshold: float = math.log(2.0)
    token_threshold: float = 0.25
    comparison: str = ">="
    normalize: str = "all_tokens"
    preservation_weight: float = 0.5
    kl_reduction: str = "code"
    update: str = "alternating"
    negative_guidance: float = 1.0
    uce_inputs: str = "auto"
    num_train_scales: int | None = None
    first_erase_scale: int = 1
    retain_weight: float | None = None
    preservation_teacher: str = "guided"
    preservation_student: str = "conditional"
    retain_teacher: str = "conditional"
    retain_student: str = "conditional"
    uncond_preservation_weight: float = 0.0
    lora_config: LoraConfig | None = None
    train_modules: list[str] | None = None
    anchor_guidance_scale: float = 4.0
    anchor_temperature: float = 1.0
    anchor_top_k: int = 900
    anchor_top_p: float = 0.97
    anchor_seed: int = 42

    def __post_init__(self) -> None:
        if self.lora_config is None:
            self.lora_config = default_lora_config(self.method)
        if isinstance(self.train_modules, (tuple, list)):
            self.train_modules = list(self.train_modules)

    @property
    def losses(self) -> tuple[str, ...]:
        return losses_for(self.method)

    @property
    def effective_retain_weight(self) -> float:
        return self.preservation_weight if self.retain_weight is None else self.retain_weight


@dataclass
class ErasureTrainingArguments:
    """How the method is trained and how its validation images are sampled (the ``TrainingArguments`` half).

    Optimisation:
        learning_rate: ``None`` = :func:`default_learning_rate` of the fine-tune mode.
        lr_scheduler / lr_warmup_steps: the learning-rate schedule, by name from ``diffusers.optimization`` (as
            diffusers' training scripts: ``"constant"``, ``"linear"``, ``"cosine"``, ...) over ``max_train_steps``
            iterations, after ``lr_warmup_steps`` iterations of linear warm-up. Default ``"constant"`` and 0: the
            reference's ``lin0`` schedule with ``wpe=1.0`` keeps the rate constant. Both optimizer steps of an
            alternating iteration advance the schedule by one iteration together.
        max_train_steps (500), train_batch_size (2 prompt pairs), retain_batch_size (retain prompts per preserve step;
        ``None`` = ``train_batch_size``), AdamW betas (0.9, 0.97), weight decay 0.005, gradient clipping 5,
        cond_drop_rate 0.1 (the text is replaced by the unconditional embedding in 10% of samples, in both steps, as
        the code's training mode does).
        ema_decay: ``None`` (default, as the reference) or ``0``: validate and save the trained weights as they are
            (``0`` turns off a recipe's average: an average with decay 0 is the weights themselves). A number
            in (0, 1): also keep an exponential moving average of the trainable weights (diffusers'
            ``training_utils.EMAModel``, updated after every optimizer step, its decay ramping as ``(1 + t) / (10 +
            t)`` up to ``ema_decay``), and validate, keep and save the averaged weights instead: an extension that
            smooths the step-to-step swings of what the adapter erases. Not in the paper or its code.

    Sampling:
        inference_*: sampling defaults for validation images (guidance 4, tau 0.5, top-k 900, top-p 0.97).

    The seed, the mixed precision and the devices are the trainer's and its ``accelerate.Accelerator``'s.
    Validated by the :class:`ErasureConfig` that holds it.
    """

    learning_rate: float | None = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_train_steps: int = 500
    train_batch_size: int = 2
    retain_batch_size: int | None = None
    adam_beta1: float = 0.9
    adam_beta2: float = 0.97
    adam_weight_decay: float = 0.005
    max_grad_norm: float = 5.0
    cond_drop_rate: float = 0.1
    ema_decay: float | None = None
    inference_guidance_scale: float = 4.0
    inference_temperature: float = 0.5
    inference_top_k: int = 900
    inference_top_p: float = 0.97

    @property
    def effective_retain_batch_size(self) -> int:
        return self.train_batch_size if self.retain_batch_size is None else self.retain_batch_size


_LORA_ALIASES: dict[str, str] = {"lora_rank": "r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout",
                                 "lora_target_modules": "target_modules"}
"""ErasureConfig's flat LoRA names -> the ``peft.LoraConfig`` attributes they stand for."""
_METHOD_FIELDS = tuple(f.name for f in fields(ErasureMethodConfig) if f.name != "lora_config")
_TRAINING_FIELDS = tuple(f.name for f in fields(ErasureTrainingArguments))
FLAT_FIELDS: tuple[str, ...] = (
    "method", "bit_threshold", "token_threshold", "comparison", "normalize", "preservation_weight", "kl_reduction",
    "negative_guidance", "uce_inputs", "num_train_scales", "first_erase_scale", "retain_weight", "retain_batch_size",
    "preservation_teacher", "preservation_student", "retain_teacher", "retain_student", "uncond_preservation_weight",
    "update", "learning_rate", "lr_scheduler", "lr_warmup_steps", "max_train_steps", "train_batch_size", "adam_beta1",
    "adam_beta2", "adam_weight_decay", "max_grad_norm", "cond_drop_rate", "ema_decay", "lora_rank", "lora_alpha",
    "lora_dropout", "lora_target_modules", "train_modules", "anchor_guidance_scale", "anchor_temperature",
    "anchor_top_k", "anchor_top_p", "anchor_seed", "inference_guidance_scale", "inference_temperature",
    "inference_top_k", "inference_top_p",
)
"""Every flat setting name :class:`ErasureConfig` accepts and :meth:`ErasureConfig.to_dict` writes, in its order."""
assert sorted(FLAT_FIELDS) == sorted(_METHOD_FIELDS + _TRAINING_FIELDS + tuple(_LORA_ALIASES)), "FLAT_FIELDS is stale"


class ErasureConfig:
    """Everything that defines an erasure run besides the model and the prompt pairs: an
    :class:`ErasureMethodConfig` (``method_config``: the losses, anchors and a ``peft.LoraConfig``) and
    :class:`ErasureTrainingArguments` (``training_args``: optimizer, schedule, batches, validation sampling).

    The two parts are primary. Every setting is also readable and writable by its flat name (``config.lora_rank``,
    ``config.learning_rate``, ...: :data:`FLAT_FIELDS`), as the constructor, :meth:`paper`, :meth:`to_dict` and
    :meth:`from_dict` take them: ``ErasureConfig(method="fce", lora_rank=8, max_train_steps=300)``. The LoRA names are
    views on the ``LoraConfig``: ``lora_rank`` is its ``r``, ``lora_alpha`` / ``lora_dropout`` its own, and
    ``lora_target_modules`` its ``target_modules`` (``None``: the method's, :func:`default_lora_target_modules`).
    Flat names given with a part override that part's setting (on a copy). Validated on construction; call
    :meth:`validate` after editing.
    """

    def __init__(self, method_config: ErasureMethodConfig | None = None,
                 training_args: ErasureTrainingArguments | None = None, **settings: Any) -> None:
        unknown = sorted(set(settings) - set(FLAT_FIELDS) - {"lora_config"})
        if unknown:
            raise TypeError(f"ErasureConfig got unknown setting(s) {unknown}; valid names are {sorted(FLAT_FIELDS)} "
                            "(or method_config=ErasureMethodConfig(...), training_args=ErasureTrainingArguments(...))")
        lora = {_LORA_ALIASES[k]: settings.pop(k) for k in list(settings) if k in _LORA_ALIASES}
        method = {k: settings.pop(k) for k in list(settings) if k in _METHOD_FIELDS or k == "lora_config"}
        if method_config is None:
            method_config = ErasureMethodConfig(**method)
        else:
            method_config = replace(method_config, **method) if method else copy.deepcopy(method_config)
        method_config.lora_config = copy.deepcopy(method_config.lora_config)  # never share a PEFT config
        if isinstance(method_config.lora_config, LoraConfig) and method_config.lora_config.target_modules is None:
            lora.setdefault("target_modules", None)  # the method's own targets
        self.method_config = method_config
        self.training_args = replace(training_args or ErasureTrainingArguments(), **settings)
        for name, value in lora.items():
            setattr(self, _flat_lora_name(name), value)
        self.validate()

    @classmethod
    def paper(cls, **overrides: Any) -> ErasureConfig:
        """The paper's reading where it differs from the code: ``comparison=">"``, ``kl_reduction="paper"``,
        ``preservation_weight=1.0`` (equal weights) and ``update="joint"`` (one summed loss). The learning rate stays
        the default (see :func:`default_learning_rate`); normalisation stays ``"all_tokens"`` (the paper is silent)."""
        settings = {"comparison": ">", "kl_reduction": "paper", "preservation_weight": 1.0, "update": "joint"}
        return cls(**{**settings, **overrides})

    # ----------------------------------------------------------------------------------------------------------------
    @property
    def lora_config(self) -> LoraConfig:
        """The ``peft.LoraConfig`` of the trained adapter (``method_config.lora_config``)."""
        return self.method_config.lora_config

    @lora_config.setter
    def lora_config(self, value: LoraConfig) -> None:
        self.method_config.lora_config = value

    @property
    def lora_target_modules(self) -> list[str] | None:
        """The LoRA targets as a list (a set that PEFT made of a list comes back sorted)."""
        targets = self.lora_config.target_modules
        if isinstance(targets, (set, frozenset)):
            return sorted(targets)
        return list(targets) if isinstance(targets, (list, tuple)) else targets

    @lora_target_modules.setter
    def lora_target_modules(self, value: list[str] | None) -> None:
        if value is None:
            value = default_lora_target_modules(self.method) if self.method in METHODS else None
        elif isinstance(value, tuple):
            value = list(value)
        if isinstance(value, list) or value is None:
            _with_targets(self.lora_config, value)
        else:
            self.lora_config.target_modules = value  # left for validate() to report

    @property
    def finetune_mode(self) -> str:
        """``"full"`` when ``train_modules`` is set, else ``"lora"``."""
        return "full" if self.train_modules else "lora"

    @property
    def effective_learning_rate(self) -> float:
        return self.learning_rate if self.learning_rate is not None else default_learning_rate(self.finetune_mode)

    @property
    def effective_retain_weight(self) -> float:
        return self.method_config.effective_retain_weight

    @property
    def effective_retain_batch_size(self) -> int:
        return self.training_args.effective_retain_batch_size

    @property
    def losses(self) -> tuple[str, ...]:
        return losses_for(self.method)

    # ----------------------------------------------------------------------------------------------------------------
    def validate(self) -> ErasureConfig:
        """Raise one ``ValueError`` listing every invalid setting (by its flat name); returns ``self`` when all are
        valid."""
        errors: list[str] = []

        def check(name: str, ok: Callable[[Any], bool], requirement: str) -> None:
            value = getattr(self, name)
            try:
                valid = bool(ok(value))
            except TypeError:
                valid = False
            if not valid:
                errors.append(f"{name} must be {requirement}, got {value!r}")

        if not isinstance(self.lora_config, LoraConfig):
            errors.append(f"lora_config must be a peft.LoraConfig, got {type(self.lora_config).__name__}")
            raise ValueError("invalid ErasureConfig:\n  - " + "\n  - ".join(errors))
        for name, allowed in (
            ("method", METHODS),
            ("comparison", (">=", ">")),
            ("normalize", ("all_tokens", "kept_tokens")),
            ("kl_reduction", ("code", "paper")),
            ("update", ("alternating", "joint")),
            ("preservation_teacher", ("guided", "conditional")),
            ("preservation_student", ("conditional", "guided")),
            ("retain_teacher", ("guided", "conditional")),
            ("retain_student", ("conditional", "guided")),
            ("uce_inputs", UCE_INPUTS),
        ):
            check(name, lambda v, allowed=allowed: v in allowed, f"one of {list(allowed)}")
        check("bit_threshold", lambda v: _number(v) and v > 0, "a positive number (gamma; ln 2 in the paper)")
        check("token_threshold", lambda v: _number(v) and 0 <= v <= 1, "a share of bits in [0, 1] (alpha)")
        check("preservation_weight", lambda v: _number(v) and v >= 0, "a number >= 0 (lambda on L_Pre)")
        check("uncond_preservation_weight", lambda v: _number(v) and v >= 0, "a number >= 0 (0: off, the paper)")
        check("negative_guidance", lambda v: _number(v) and math.isfinite(v), "a finite number (ESD's eta)")
        check("retain_weight", lambda v: v is None or (_number(v) and v >= 0),
              "None (= preservation_weight) or a number >= 0")
        check("retain_batch_size", lambda v: v is None or _integer(v, 1),
              "None (= train_batch_size) or an integer >= 1")
        check("num_train_scales", lambda v: v is None or _integer(v, 1), "None (all scales) or an integer >= 1")
        check("first_erase_scale", lambda v: _integer(v, 1) and (self.num_train_scales is None
                                                                  or v <= self.num_train_scales),
              "an integer >= 1 (1: every trained scale) and <= num_train_scales")
        check("learning_rate", lambda v: v is None or (_number(v) and v > 0), "None (the default) or a number > 0")
        check("max_train_steps", lambda v: _integer(v, 1), "an integer >= 1")
        check("lr_scheduler", lambda v: v in LR_SCHEDULERS, f"one of {list(LR_SCHEDULERS)} (diffusers' names)")
        check("lr_warmup_steps", lambda v: _integer(v, 0) and (v == 0 or self.lr_scheduler != "constant"),
              "an integer >= 0 (iterations of linear warm-up); 'constant' has none: use 'constant_with_warmup'")
        check("train_batch_size", lambda v: _integer(v, 1), "an integer >= 1")
        check("adam_beta1", lambda v: _number(v) and 0 <= v < 1, "in [0, 1)")
        check("adam_beta2", lambda v: _number(v) and 0 <= v < 1, "in [0, 1)")
        check("adam_weight_decay", lambda v: _number(v) and v >= 0, "a number >= 0")
        check("max_grad_norm", lambda v: _number(v) and v > 0, "a number > 0")
        check("cond_drop_rate", lambda v: _number(v) and 0 <= v < 1, "a probability in [0, 1)")
        check("ema_decay", lambda v: v is None or (_number(v) and 0 <= v < 1),
              "None or 0 (no weight averaging) or a number in (0, 1), e.g. 0.99")
        check("lora_rank", lambda v: _integer(v, 1), "an integer >= 1")
        check("lora_alpha", lambda v: _number(v) and v > 0, "a number > 0")
        check("lora_dropout", lambda v: _number(v) and 0 <= v < 1, "a probability in [0, 1)")
        check("lora_target_modules", _module_list, f"a non-empty list of module names such as "
              f"{list(DEFAULT_LORA_TARGET_MODULES)}")
        check("train_modules", lambda v: v is None or _module_list(v), f"None (train a LoRA) or a non-empty list of "
              f"module names such as {list(FULL_FINETUNE_MODULES)} (full fine-tune)")
        for prefix in ("anchor", "inference"):
            check(f"{prefix}_guidance_scale", lambda v: _number(v) and v >= 0, "a number >= 0 (1 = no guidance)")
            check(f"{prefix}_temperature", lambda v: _number(v) and v > 0, "a number > 0")
            check(f"{prefix}_top_k", lambda v: _integer(v, 0), "an integer >= 0 (0 disables it)")
            check(f"{prefix}_top_p", lambda v: _number(v) and 0 < v <= 1, "in (0, 1] (1 disables it)")
        check("anchor_seed", lambda v: _integer(v, 0), "an integer >= 0")
        if errors:
            raise ValueError("invalid ErasureConfig:\n  - " + "\n  - ".join(errors))
        return self

    # ----------------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every flat setting (:data:`FLAT_FIELDS`; stored in adapter metadata and model cards).
        Of the ``LoraConfig`` it records rank, alpha, dropout and targets; the adapter's saved PEFT config holds the
        rest."""
        return {name: copy.deepcopy(getattr(self, name)) for name in FLAT_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ErasureConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (missing ones take their defaults)."""
        unknown = sorted(set(data) - set(FLAT_FIELDS))
        if unknown:
            raise ValueError(f"unknown ErasureConfig field(s) {unknown}; valid fields are {sorted(FLAT_FIELDS)}")
        return cls(**data)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ErasureConfig):
            return NotImplemented
        return (self.method_config, self.training_args) == (other.method_config, other.training_args)

    __hash__ = None  # mutable, as the dataclasses it holds

    def __repr__(self) -> str:
        return f"ErasureConfig(method_config={self.method_config!r}, training_args={self.training_args!r})"


def _flat_lora_name(attribute: str) -> str:
    return next(name for name, attr in _LORA_ALIASES.items() if attr == attribute)


def _alias(part: str, name: str) -> property:
    def get(self: ErasureConfig) -> Any:
        return getattr(getattr(self, part), name)

    def set_(self: ErasureConfig, value: Any) -> None:
        setattr(getattr(self, part), name, value)

    return property(get, set_, doc=f"Alias of ``{part}.{name}``.")


for _name in ("lora_rank", "lora_alpha", "lora_dropout"):  # views on the LoraConfig (lora_rank is its r)
    setattr(ErasureConfig, _name, _alias("lora_config", _LORA_ALIASES[_name]))
for _name in _METHOD_FIELDS:
    if _name not in vars(ErasureConfig):
        setattr(ErasureConfig, _name, _alias("method_config", _name))
for _name in _TRAINING_FIELDS:
    if _name not in vars(ErasureConfig):
        setattr(ErasureConfig, _name, _alias("training_args", _name))
del _name


__all__ = ["DEFAULT_LORA_TARGET_MODULES", "FLAT_FIELDS", "FULL_FINETUNE_MODULES", "LR_SCHEDULERS", "METHODS",
           "UCE_INPUTS", "ErasureConfig", "ErasureMethodConfig", "ErasureTrainingArguments", "default_learning_rate",
           "default_lora_config", "default_lora_target_modules", "loss_function", "losses_for"]
