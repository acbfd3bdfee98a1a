"""UCE: Unified Concept Editing in Diffusion Models (Gandikota et al., WACV 2024, arXiv 2308.14761), on the
cross-attention of a next-scale transformer.

UCE edits, in closed form and without a training loop, every projection ``W`` (out x in) that reads the text: the
cross-attention keys and values. Each token feature ``c_i`` of an edited concept should be mapped to what the
original layer makes of its replacement, ``v*_i = W c*_i``, while the features ``c_j`` of preserved concepts keep
their outputs ``W c_j``. Minimising::

    e sum_i ||W' c_i - v*_i||^2  +  p sum_j ||W' c_j - W c_j||^2  +  r ||W' - W||_F^2

gives::

    W' = (e sum_i v*_i c_i^T + p sum_j W c_j c_j^T + r W) (e sum_i c_i c_i^T + p sum_j c_j c_j^T + r I)^-1

(e = ``erase_scale``, p = ``preserve_scale``, the paper's lambda; r = ``regularization``, the reference code's
``lamb``, which keeps the matrix invertible with few concepts; r = 0 is the paper's formula). :func:`closed_form_edit`
computes it; biases are not edited (``W' c + b = W c* + b`` is the same condition). The defaults e = 1, p = 1,
r = 0.5 are those of the reference code's current script (``trainscripts/uce_sd_erase.py`` of
rohitgandikota/unified-concept-editing: ``--erase_scale 1 --preserve_scale 1 --lamb 0.5``; its first script,
``train-scripts/train_erase.py``, also passes ``lamb=0.5``, with ``--preserve_scale`` 0.1).

What is edited. The reference edits the concept's own text (``--erase_concepts "Van Gogh"``), each towards a guide
text (``--guide_concepts``; default ``""``, the empty prompt, for objects and ``"art"`` for styles), and preserves a
list of other concepts' texts (``--preserve_concepts``), so the edit acts on the concept's directions only.
:func:`toy_concept_texts` builds these inputs for named toy concepts (what ``erase(..., method="uce")`` does by
default). Editing every token of whole captions instead (``uce_inputs="prompts"`` of
:class:`~var_erase.erasure.config.ErasureConfig`, an adaptation for prompt pairs without concept names) makes
hundreds of contextual features span nearly the whole text space, so the edit rewrites every prompt unless
many prompts are preserved. Tokens: the reference edits one token per text, its last word token
(``attention_mask.sum() - 2``; its first script that token and every later one, padding included) and, in its
first script, preserves every token of the preserved texts. ``edit(..., tokens="last")`` does the same (the
default of ``erase``'s concept texts); ``tokens="all"`` (the default here, and ``uce_inputs="prompts"``) edits every
real token, aligned as below, special tokens included, which all prompts share (:func:`select_tokens`).

Adaptation to a VAR transformer (Infinity). The features ``c`` are the rows of the text memory that every
cross-attention reads: the text encoder's states of a prompt, normalised and projected by the transformer
(``transformer.prepare_condition(...).context_BTC``), one row per real text token (T5 pads on the right, the padding is
masked out, so unlike CLIP's padded sequence only the prompt's tokens count). One memory feeds every block, so the
right-hand matrix is the same for all layers and is factorised once. A concept prompt and its replacement prompt may
have different token counts: token i of T is paired with token ``round(i (S - 1) / (T - 1))`` of S (the same token
for equal lengths; the replacement's first token for a one-token concept). Note what the edit leaves alone: the
attentive text pooling, whose vector starts the first scale (SOS) and modulates every block (AdaLN), reads the text
through its own projections. That, and T5's contextual features, are plausible reasons for the paper's finding that UCE
"barely erases" on Infinity (research/paper.md §2).

The edit is shipped like every trained adapter: ``W' - W`` of each edited layer as a LoRA pair
``lora_B @ lora_A`` (from its SVD, at the smallest rank that holds every layer's delta to a relative Frobenius error
``tolerance``; rank <= the number of edited tokens), with ``lora_alpha = rank`` (scale 1), in the PEFT state-dict
layout that ``pipe.load_lora_weights`` loads (:func:`write_adapter`)::

    edited = edit(pipe, ["a red circle"], ["a red square"], preserve=["a blue square"])
    write_adapter(edited, "out/uce-circle", pipe, base_model="org/var-model", concepts=["circle"])
    pipe.load_lora_weights("out/uce-circle")
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig

from ..models.attention import CrossAttention

DEFAULT_TARGET_MODULES: tuple[str, ...] = ("to_k", "to_v")
"""The projections of each cross-attention (``attn2``) that UCE edits: the keys and values of the text."""


@dataclass
class UCEEdit:
    """A UCE edit as a LoRA adapter.

    Attributes:
        state_dict: ``{"<module>.lora_A.weight": (rank, in), "<module>.lora_B.weight": (out, rank)}`` float32, the
            layout of ``peft.get_peft_model_state_dict`` (what ``VARPipeline.save_lora_weights`` takes).
        lora_config: the adapter's ``LoraConfig`` (rank, ``lora_alpha = rank``, targets).
        rank: the rank of every pair.
        relative_error: the largest ``||(W' - W) - B A||_F / ||W' - W||_F`` over the edited layers.
        hyperparameters: the settings and prompts of the edit (for the adapter's metadata).
        seconds: wall time of the edit.
    """

    state_dict: dict[str, torch.Tensor]
    lora_config: LoraConfig
    rank: int
    relative_error: float
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def closed_form_edit(
    weight_OI: torch.Tensor,
    edit_inputs_NI: torch.Tensor,
    edit_targets_NO: torch.Tensor,
    preserve_inputs_MI: torch.Tensor | None = None,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    regularization: float = 0.5,
) -> torch.Tensor:
    """UCE's closed form ``W' = (e V*^T C + p W P^T P + r W)(e C^T C + p P^T P + r I)^-1`` (module docstring).

    Args:
        weight_OI: (out, in) the layer's weight W.
        edit_inputs_NI: (N, in) the edited concepts' features c_i, one row each.
        edit_targets_NO: (N, out) their targets v*_i (UCE: ``W c*_i`` of the aligned replacement features).
        preserve_inputs_MI: (M, in) the preserved concepts' features c_j, or None.
        erase_scale, preserve_scale, regularization: e, p (lambda), r (>= 0).

    Returns:
        (out, in) W', computed in float64, in the dtype of ``weight_OI``.

    Raises:
        ValueError: bad shapes or scales, or a singular system (r = 0 with fewer independent features than ``in``).
    """
    out_dim, in_dim = weight_OI.shape
    if edit_inputs_NI.ndim != 2 or edit_inputs_NI.shape[1] != in_dim:
        raise ValueError(f"edit_inputs must be (N, {in_dim}) (one feature per row), got {tuple(edit_inputs_NI.shape)}")
    if tuple(edit_targets_NO.shape) != (edit_inputs_NI.shape[0], out_dim):
        raise ValueError(f"edit_targets must be (N, out) = ({edit_inputs_NI.shape[0]}, {out_dim}), one target per "
                         f"edited feature, got {tuple(edit_targets_NO.shape)}")
    if preserve_inputs_MI is not None and (preserve_inputs_MI.ndim != 2 or preserve_inputs_MI.shape[1] != in_dim):
        raise ValueError(f"preserve_inputs must be (M, {in_dim}), got {tuple(preserve_inputs_MI.shape)}")
    for name, value in (("erase_scale", erase_scale), ("preserve_scale", preserve_scale),
                        ("regularization", regularization)):
        if not (isinstance(value, (int, float)) and value >= 0):
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    w = weight_OI.double()
    c, v = edit_inputs_NI.double(), edit_targets_NO.double()
    lhs_OI = erase_scale * v.T @ c + regularization * w
    gram_II = erase_scale * c.T @ c + regularization * torch.eye(in_dim, dtype=torch.float64, device=w.device)
    if preserve_inputs_MI is not None:
        p = preserve_inputs_MI.double()
        lhs_OI = lhs_OI + preserve_scale * (w @ p.T) @ p
        gram_II = gram_II + preserve_scale * p.T @ p
    return _solve_right(lhs_OI, gram_II).to(weight_OI.dtype)


def _solve_right(lhs_OI: torch.Tensor, gram_II: torch.Tensor) -> torch.Tensor:
    """``lhs @ gram^-1`` for a symmetric positive (semi)definite ``gram`` (Cholesky; an error when singular)."""
    factor, info = torch.linalg.cholesky_ex(gram_II)
    if int(info) != 0:
        raise ValueError("UCE's system is singular: the edited and preserved features span fewer than all input "
                         "dimensions. Use regularization > 0 (the reference's lamb, 0.5) or more preserved "
                         "concepts")
    return torch.cholesky_solve(lhs_OI.T, factor).T


@torch.no_grad()
def text_features(pipe, prompts: Sequence[str]) -> list[torch.Tensor]:
    """The cross-attention inputs of each prompt: ``(T_i, C)`` float64 rows of
    ``pipe.transformer.prepare_condition(...).context_BTC``, its real (unmasked) tokens only."""
    states_BTC, mask_BT = pipe.encode_prompt(list(prompts), pipe.transformer.device)
    context_BTC = pipe.transformer.prepare_condition(states_BTC, mask_BT).context_BTC
    return [context_BTC[i, mask_BT[i].to(context_BTC.device)].double() for i in range(len(prompts))]


TOKEN_SELECTIONS: tuple[str, ...] = ("all", "words", "last")
"""Which real tokens of a text :func:`edit` uses (:func:`select_tokens`)."""


def select_tokens(pipe, prompts: Sequence[str], tokens: str = "all") -> list[torch.Tensor]:
    """:func:`text_features` of each prompt, restricted to some of its tokens.

    ``"all"``: every real token. ``"words"``: the text's own tokens, without the tokenizer's special tokens
    (``[CLS]`` / ``[SEP]`` of BERT, ``</s>`` of T5), which every prompt has and which, contextual or not, point in
    similar directions for every text (on the toy model, ``[CLS]`` of "red" has cosine 0.82 with ``[CLS]`` of
    "circle" and 0.74 with that of a caption), so editing them edits every prompt. ``"last"``: the last own token
    only, the reference's choice (``attention_mask.sum() - 2`` of CLIP's ``[BOS] words [EOS]``). A text with no
    own token (``""``) keeps every token for ``"words"`` and its first for ``"last"`` (the reference's ``[BOS]``).
    """
    features = text_features(pipe, prompts)
    if tokens == "all":
        return features
    special = pipe.tokenizer(list(prompts), return_special_tokens_mask=True)["special_tokens_mask"]
    selected = []
    for prompt, feature_TC, special_T in zip(prompts, features, special):
        if len(special_T) != feature_TC.shape[0]:
            raise ValueError(f"cannot tell {prompt!r}'s own tokens from its special ones: it is longer than the "
                             f"text limit ({feature_TC.shape[0]} tokens); use tokens='all' or a shorter text")
        own = [i for i, flag in enumerate(special_T) if not flag]
        if not own:
            keep = list(range(feature_TC.shape[0])) if tokens == "words" else [0]
        else:
            keep = own if tokens == "words" else own[-1:]
        selected.append(feature_TC[keep])
    return selected


def align_tokens(concept_TC: torch.Tensor, replacement_SC: torch.Tensor) -> torch.Tensor:
    """(T, C) rows of ``replacement_SC`` paired with the T concept tokens: row i is replacement token
    ``round(i (S - 1) / (T - 1))`` (token 0 when T = 1)."""
    num_concept, num_replacement = concept_TC.shape[0], replacement_SC.shape[0]
    if num_concept == 0 or num_replacement == 0:
        raise ValueError("a concept and its replacement need at least one text token each")
    steps = torch.arange(num_concept, dtype=torch.float64) * (num_replacement - 1) / max(num_concept - 1, 1)
    return replacement_SC[steps.round().long().to(replacement_SC.device)]


def lora_factors(delta_OI: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A (rank, in), lora_B (out, rank))`` with ``lora_B @ lora_A`` the best rank-``rank`` approximation of
    ``delta_OI`` (truncated SVD, the singular values split evenly between the factors)."""
    u_OK, s_K, vh_KI = torch.linalg.svd(delta_OI.double(), full_matrices=False)
    root_r = s_K[:rank].sqrt()
    lora_b = u_OK[:, :rank] * root_r
    lora_a = root_r[:, None] * vh_KI[:rank]
    pad = rank - lora_a.shape[0]  # a rank above min(out, in): zero rows / columns, the same product
    if pad > 0:
        lora_a = torch.cat([lora_a, lora_a.new_zeros(pad, lora_a.shape[1])])
        lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], pad)], dim=1)
    return lora_a, lora_b


def rank_for_tolerance(singular_values: torch.Tensor, tolerance: float) -> int:
    """The smallest rank r >= 1 whose truncation error ``sqrt(sum_{k > r} s_k^2)`` is at most ``tolerance`` times
    the norm ``sqrt(sum_k s_k^2)``."""
    energy = singular_values.double().pow(2)
    tail = energy.flip(0).cumsum(0).flip(0)  # tail[k] = sum_{j >= k} s_j^2, the squared error of rank k
    allowed = tolerance**2 * energy.sum()
    for k in range(1, len(energy)):
        if tail[k] <= allowed:
            return k
    return max(1, len(energy))


def target_layers(transformer: torch.nn.Module, target_modules: Sequence[str] = DEFAULT_TARGET_MODULES
                  ) -> dict[str, torch.nn.Linear]:
    """``{module name: linear layer}`` of the text projections to edit (``<block>.attn2.to_k`` / ``to_v``); the base
    layer where PEFT has wrapped one."""
    unknown = sorted(set(target_modules) - set(DEFAULT_TARGET_MODULES))
    if unknown or not target_modules:
        raise ValueError(f"UCE edits the projections that read the text: target_modules must be a non-empty subset "
                         f"of {list(DEFAULT_TARGET_MODULES)}, got {list(target_modules)}")
    layers = {}
    for name, module in transformer.named_modules():
        if isinstance(module, CrossAttention):
            for projection in target_modules:
                layer = getattr(module, projection)
                layers[f"{name}.{projection}"] = getattr(layer, "base_layer", layer)
    if not layers:
        raise ValueError("the transformer has no cross-attention layer (CrossAttention) for UCE to edit")
    return layers


def _check_prompts(name: str, prompts: Sequence[str] | None, allow_empty_text: bool = False) -> list[str]:
    if prompts is None:
        return []
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not all(isinstance(p, str) and (allow_empty_text or p.strip()) for p in prompts):
        raise ValueError(f"{name} must be a list of {'strings' if allow_empty_text else 'non-empty strings'}, "
                         f"got {prompts!r}")
    return prompts


def toy_concept_texts(concepts: Sequence[str], replacements: Sequence[str] = ()
                      ) -> tuple[list[str], list[str], list[str]]:
    """UCE's inputs for named toy concepts, as the reference builds them for a named concept.

    Edited: every training word of each erased concept, all forms, its name first (``"star"``, ``"star shape"``,
    ``"five-pointed star"``; the held-out paraphrases are evaluation-only and never used). Guide of each word: the
    replacement's first word of the same form (``"with dots"`` -> ``"with stripes"``), the replacement being the
    first value ``replacements`` gives the concept (entries ``"VALUE"`` / ``"CONCEPT=VALUE"`` as
    :func:`~var_erase.toy.pairs.parse_replacements`; the judge's choice under recipe ``"verified"``), or ``""``, the
    reference's default guide for objects, when none is given. Preserved: every training word of every value of
    every kind that is not erased.

    Returns:
        ``(edited, guides, preserved)`` texts for :func:`edit` (``concepts``, ``replacements``, ``preserve``).

    Raises:
        ValueError: a concept that is not a toy-world value, or a bad replacement entry.
    """
    from ..toy.concepts import CONCEPT_KINDS, KIND_FORMS, concepts_of_kind, get_concept
    from ..toy.pairs import parse_replacements

    try:
        erased = [get_concept(name) for name in dict.fromkeys(get_concept(c).name for c in concepts)]
    except KeyError as err:
        raise ValueError(f"UCE's concept texts need named toy concepts: {err.args[0]}") from err
    names = {c.name for c in erased}
    own, shared = parse_replacements(list(replacements), names)
    edited, guides = [], []
    for concept in erased:
        chosen = own.get(concept.name) or [v for v in shared.get(concept.kind, []) if v not in names]
        guide = get_concept(chosen[0]) if chosen else None
        for form in KIND_FORMS[concept.kind]:
            edited += concept.words[form]
            guides += [guide.words[form][0] if guide else ""] * len(concept.words[form])
    preserved = [w for kind in CONCEPT_KINDS for c in concepts_of_kind(kind) if c.name not in names
                 for w in c.training_words]
    return edited, guides, preserved


@torch.no_grad()
def edit(
    pipe,
    concepts: Sequence[str],
    replacements: Sequence[str] | None = None,
    preserve: Sequence[str] | None = None,
    erase_scale: float = 1.0,
    preserve_scale: float = 1.0,
    regularization: float = 0.5,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    tolerance: float = 1e-4,
    rank: int | None = None,
    tokens: str = "all",
) -> UCEEdit:
    """Erase ``concepts`` from ``pipe.transformer`` with UCE's closed form; the transformer is not modified.

    Args:
        pipe: a ``VARPipeline`` (its text encoder gives the features; its transformer's weights are edited).
        concepts: words or prompts to erase, any number at once (the reference: the concept's words, e.g.
            :func:`toy_concept_texts`; the adaptation: the unsafe prompts of the prompt pairs).
        replacements: what each concept should become (the guide texts, or the pairs' safe prompts); None = the
            empty prompt for every concept (the reference's default guide for objects).
        preserve: words or prompts whose keys and values are to be kept (UCE's preserved concepts).
        erase_scale, preserve_scale, regularization: e, p, r of :func:`closed_form_edit`.
        target_modules: ``to_k`` and / or ``to_v`` of every cross-attention.
        tolerance: the largest relative Frobenius error of a layer's low-rank delta (the rank is the smallest that
            holds it for every layer); ignored when ``rank`` is given.
        rank: a fixed LoRA rank instead.
        tokens: which real tokens of each concept and replacement text are edited (:data:`TOKEN_SELECTIONS`,
            :func:`select_tokens`): ``"all"`` (default), ``"words"`` (the text's own tokens, not the tokenizer's
            special ones) or ``"last"`` (its last own token, the reference's choice). Every real token of the
            preserved texts is preserved (as the reference's first script does), so the special tokens, which the
            edit leaves out, are held in place too. Recorded as ``hyperparameters["positions"]`` (a key without
            "token", which logs would redact).

    Returns:
        :class:`UCEEdit` (write it with :func:`write_adapter`).
    """
    start = time.perf_counter()
    concepts = _check_prompts("concepts", concepts)
    if not concepts:
        raise ValueError("concepts must name at least one concept (a prompt or word) to erase")
    replacements = _check_prompts("replacements", replacements, allow_empty_text=True) or [""] * len(concepts)
    if len(replacements) != len(concepts):
        raise ValueError(f"give one replacement per concept: {len(concepts)} concepts, {len(replacements)} "
                         "replacements (or none, for the empty prompt)")
    preserve = _check_prompts("preserve", preserve)
    if not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1):
        raise ValueError(f"tolerance must be a relative error in [0, 1), got {tolerance!r}")
    if rank is not None and not (isinstance(rank, int) and rank >= 1):
        raise ValueError(f"rank must be None (chosen by tolerance) or an integer >= 1, got {rank!r}")
    if tokens not in TOKEN_SELECTIONS:
        raise ValueError(f"tokens must be one of {list(TOKEN_SELECTIONS)}, got {tokens!r}")
    layers = target_layers(pipe.transformer, target_modules)

    # 1. features: every concept token (paired with its replacement's token) and every preserved token
    features = select_tokens(pipe, concepts + replacements, tokens) + text_features(pipe, preserve)
    edit_NC = torch.cat(features[: len(concepts)])
    replacement_NC = torch.cat([align_tokens(c, r) for c, r in zip(features[: len(concepts)],
                                                                    features[len(concepts): 2 * len(concepts)])])
    preserve_MC = torch.cat(features[2 * len(concepts):]) if preserve else None

    # 2. the closed form per layer, then the deltas as low-rank pairs of one rank
    deltas = {}
    for name, layer in layers.items():
        weight = layer.weight.detach().to(edit_NC.device).double()
        edited = closed_form_edit(weight, edit_NC, replacement_NC @ weight.T, preserve_MC, erase_scale,
                                  preserve_scale, regularization)
        deltas[name] = edited - weight
    if rank is None:
        rank = max(rank_for_tolerance(torch.linalg.svdvals(d), tolerance) for d in deltas.values())
    state_dict, error = {}, 0.0
    for name, delta in deltas.items():
        lora_a, lora_b = lora_factors(delta, rank)
        norm = float(torch.linalg.matrix_norm(delta))
        error = max(error, float(torch.linalg.matrix_norm(delta - lora_b @ lora_a)) / norm if norm > 0 else 0.0)
        state_dict[f"{name}.lora_A.weight"] = lora_a.float().cpu().contiguous()
        state_dict[f"{name}.lora_B.weight"] = lora_b.float().cpu().contiguous()
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted({".".join(n.split(".")[-2:]) for n in layers}))
    hyperparameters = {"erase_scale": erase_scale, "preserve_scale": preserve_scale, "regularization": regularization,
                       "tolerance": tolerance, "rank": rank, "target_modules": list(target_modules),
                       "positions": tokens, "concepts": concepts, "replacements": replacements, "preserve": preserve,
                       "num_edited_tokens": int(edit_NC.shape[0]),
                       "num_preserved_tokens": int(preserve_MC.shape[0]) if preserve_MC is not None else 0}
    return UCEEdit(state_dict, config, rank, error, hyperparameters, time.perf_counter() - start)


def adapter_metadata(edited: UCEEdit, pipe, base_model: str | os.PathLike, concepts: Sequence[str] | None = None):
    """The :class:`~var_erase.hub.AdapterMetadata` of ``edited`` (method ``"uce"``, the edit's hyper-parameters, the
    base model's fingerprint); ``concepts``: the concept names (default: the edited prompts)."""
    from ..hub import AdapterMetadata

    names = list(concepts) if concepts else list(edited.hyperparameters.get("concepts", []))
    return AdapterMetadata.from_training(base_model, pipe.transformer, names, "uce",
                                         hyperparameters=edited.hyperparameters | {"seconds": edited.seconds,
                                                                                   "relative_error":
                                                                                       edited.relative_error},
                                         lora_config=edited.lora_config)


def write_adapter(edited: UCEEdit, output_dir: str | os.PathLike, pipe, base_model: str | os.PathLike,
                  concepts: Sequence[str] | None = None, metadata=None) -> str:
    """Write ``edited`` as an erasure adapter folder, as training does: ``pytorch_lora_weights.safetensors`` (written
    atomically by ``VARPipeline.save_lora_weights``) with the LoRA config and the
    :class:`~var_erase.hub.AdapterMetadata` (``metadata``, default :func:`adapter_metadata`) in its header. Returns
    the file's path; the folder loads with ``pipe.load_lora_weights(output_dir)``."""
    from ..pipelines.pipeline_var import VARPipeline

    metadata = metadata or adapter_metadata(edited, pipe, base_model, concepts)
    os.makedirs(output_dir, exist_ok=True)
    return VARPipeline.save_lora_weights(output_dir, transformer_lora_layers=edited.state_dict,
                                         transformer_lora_adapter_metadata=edited.lora_config.to_dict(),
                                         extra_metadata=metadata.to_safetensors_metadata())


__all__ = ["DEFAULT_TARGET_MODULES", "TOKEN_SELECTIONS", "UCEEdit", "adapter_metadata", "align_tokens",
           "closed_form_edit", "edit", "lora_factors", "rank_for_tolerance", "select_tokens", "target_layers",
           "text_features", "toy_concept_texts", "write_adapter"]
