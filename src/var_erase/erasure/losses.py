"""Erasure losses of VARE / S-VARE (Zhong et al., ICLR 2026, arXiv 2509.22400) as pure tensor functions.

Every loss reads Infinity's bitwise head: ``logits_BL2d`` is ``(B, L, 2d)`` and ``logits_BL2d.reshape(B, L, d, 2)``
holds one 2-way logit pair per bit (class 1 = bit 1); bits are ``(B, L, d)`` integers in {0, 1}. ``L`` counts the
tokens of all scales of a schedule (10,521 for Infinity at 1024²), ``d`` the bits per token (32 for Infinity).

Token reduction. The reference code (``ndhg1213/S-VARE``, ``erase_trainer.py``) reduces every per-token loss ``x_bt``
as ``x.mul(1 / L).sum(-1).mean()``: mean over tokens of *all* scales, then mean over the batch. Each loss here takes
an optional ``token_weight_L`` that replaces the ``1 / L``: :func:`scale_reweight_weights` (Infinity's pretraining
weights) or :func:`equal_scale_weights` (every scale counts the same). The reference trains all 13 scales; its
scale-restricted mode (``always_training_scales = K``) runs the model on the first ``K`` scales only, so ``L`` is
then ``L_K``: slice the logits and bits to ``schedule.truncated(K).total_tokens`` and keep the default weights.

Precision. Logits are upcast to float32 before any softmax, which is what autocast does in the reference trainer.
Teachers and targets are detached: the frozen model never receives gradient.

Paper vs code (the code's behaviour is the default; the paper's is an option):

================================  ===========================  ==========================================
point                             code (default)               paper text (option)
================================  ===========================  ==========================================
token kept when wrong-bit share   ``>= alpha``                 ``> alpha`` (``comparison=">"``)
L_FCE normalised by               all tokens (``1 / L``)       not stated; ``normalize="kept_tokens"``
L_Pre per-bit KL                  mean over the 2d entries     sum over 2 classes, mean over bits
                                  (= ½ · KL per bit)           (``reduction_code=False``)
================================  ===========================  ==========================================

The weight of L_Pre (``reg_lambda = 0.5`` in the code, "equal weights" in the paper) and the alternating vs joint
update are the trainer's business: see :class:`var_erase.erasure.config.ErasureConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

BIT_ERROR_THRESHOLD = math.log(2.0)
"""gamma: a bit is wrong when its cross-entropy exceeds ln 2, i.e. p(target bit) < 0.5."""

TOKEN_ERROR_THRESHOLD = 0.25
"""alpha: a token enters L_FCE when at least this share of its bits is wrong (Infinity's self-correction range)."""


class FilteredCEOutput(NamedTuple):
    """Result of :func:`filtered_cross_entropy`."""

    loss: torch.Tensor  # scalar, differentiable
    kept_ratio: torch.Tensor  # scalar, detached: share of (weighted-in) tokens that entered the loss
    bit_error_rate: torch.Tensor  # scalar, detached: share of bits with cross-entropy above the bit threshold


# ---------------------------------------------------------------------------------------------------------------------
# shape checks and reductions


def _check_logits(logits_BL2d: torch.Tensor, name: str) -> tuple[int, int, int]:
    """(B, L, d) of a bitwise-logit tensor, or a ValueError saying what was given."""
    if not isinstance(logits_BL2d, torch.Tensor) or logits_BL2d.dim() != 3 or logits_BL2d.shape[-1] % 2:
        shape = tuple(logits_BL2d.shape) if isinstance(logits_BL2d, torch.Tensor) else type(logits_BL2d).__name__
        raise ValueError(
            f"{name} must be bitwise logits of shape (B, L, 2*d) with an even last dimension "
            f"(reshape to (B, L, d, 2) gives per-bit 2-way logits), got {shape}"
        )
    if not logits_BL2d.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of logits, got dtype {logits_BL2d.dtype}")
    B, L, two_d = logits_BL2d.shape
    return B, L, two_d // 2


def _check_bits(logits_BL2d: torch.Tensor, bits_BLd: torch.Tensor, logits_name: str) -> tuple[int, int, int]:
    B, L, d = _check_logits(logits_BL2d, logits_name)
    if not isinstance(bits_BLd, torch.Tensor) or tuple(bits_BLd.shape) != (B, L, d):
        shape = tuple(bits_BLd.shape) if isinstance(bits_BLd, torch.Tensor) else type(bits_BLd).__name__
        raise ValueError(
            f"bits must have shape (B, L, d) = {(B, L, d)} to match {logits_name} of shape {tuple(logits_BL2d.shape)}, "
            f"got {shape}"
        )
    if bits_BLd.is_floating_point() or bits_BLd.is_complex():
        raise ValueError(f"bits must be an integer (or bool) tensor of 0/1 values, got dtype {bits_BLd.dtype}")
    return B, L, d


def _check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> tuple[int, int, int]:
    B, L, d = _check_logits(a, name_a)
    _check_logits(b, name_b)
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape (B, L, 2*d), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return B, L, d


def _token_weight(token_weight_L: torch.Tensor | None, L: int, like: torch.Tensor) -> float | torch.Tensor:
    """The per-token weight of the reduction: the reference's scalar ``1 / L``, or the given ``(L,)`` weights."""
    if token_weight_L is None:
        return 1.0 / L
    if not isinstance(token_weight_L, torch.Tensor) or tuple(token_weight_L.shape) != (L,):
        shape = tuple(token_weight_L.shape) if isinstance(token_weight_L, torch.Tensor) else type(token_weight_L)
        raise ValueError(f"token_weight_L must be a tensor of shape (L,) = ({L},), one weight per token, got {shape}")
    return token_weight_L.to(device=like.device, dtype=like.dtype)


def _reduce_tokens(per_token_BL: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    """``sum_t w_t x_bt``, then mean over the batch (the reference's ``x.mul(lw).sum(dim=-1).mean()``)."""
    return per_token_BL.mul(weight).sum(dim=-1).mean()


def _bit_cross_entropy(logits_BL2d: torch.Tensor, bits_BLd: torch.Tensor) -> torch.Tensor:
    """(B, L, d) 2-class cross-entropy of every bit, computed as the reference does (classes on dim 1)."""
    B, L, d = bits_BLd.shape
    logits_B2Ld = logits_BL2d.float().reshape(B, L, d, 2).permute(0, 3, 1, 2)
    return F.cross_entropy(logits_B2Ld, bits_BLd.long(), reduction="none")


def _bit_one_probability(logits_BL2d: torch.Tensor) -> torch.Tensor:
    """(B, L, d) probability that each bit is 1 (softmax over its 2 classes)."""
    B, L, two_d = logits_BL2d.shape
    return torch.softmax(logits_BL2d.float().reshape(B, L, two_d // 2, 2), dim=-1)[..., 1]


# ---------------------------------------------------------------------------------------------------------------------
# S-VARE


def filtered_cross_entropy(
    logits_BL2d: torch.Tensor,
    target_bits_BLd: torch.Tensor,
    bit_threshold: float = BIT_ERROR_THRESHOLD,
    token_threshold: float = TOKEN_ERROR_THRESHOLD,
    comparison: str = ">=",
    normalize: str = "all_tokens",
    token_weight_L: torch.Tensor | None = None,
) -> FilteredCEOutput:
    """S-VARE's filtered cross-entropy L_FCE, exactly as the reference code computes it.

    ``logits_BL2d`` is the fine-tuned model under the unsafe prompt c*, teacher-forced on the anchor tokens r^ori;
    ``target_bits_BLd`` are the anchor's sampled bits r^ori (hard targets)::

        CE_btk  = -log p_theta*(r^ori_btk | r^ori_<scale(t), c*)
        F_bt    = 1[ (1/d) sum_k 1[CE_btk > gamma]  >=  alpha ]         (detached; gamma = ln 2, alpha = 0.25)
        L_FCE   = mean_b  sum_t w_t F_bt (1/d) sum_k CE_btk              (w_t = 1/L: all tokens, kept or not)

    Args:
        bit_threshold: gamma; a bit is wrong when its CE is above it (strictly, as the code).
        token_threshold: alpha in [0, 1]. With the code's ``>=``, ``alpha = 0`` keeps every token (plain CE, the
            "alpha = 0%" ablation); with ``">"`` and ``alpha = 0`` a token with no wrong bit is dropped.
        comparison: ``">="`` (code, default) or ``">"`` (paper text: "exceeds alpha").
        normalize: ``"all_tokens"`` (code: divide by all L tokens) or ``"kept_tokens"`` (per sample, divide by the
            weight of the kept tokens, i.e. mean over kept tokens; 0 when none is kept).
        token_weight_L: ``(L,)`` weights replacing ``1 / L``.

    Returns:
        ``FilteredCEOutput(loss, kept_ratio, bit_error_rate)``; the ratios are detached scalars over the tokens with
        positive weight (no host sync: call ``.item()`` only when logging).
    """
    B, L, d = _check_bits(logits_BL2d, target_bits_BLd, "logits_BL2d")
    if comparison not in (">=", ">"):
        raise ValueError(f"comparison must be '>=' (reference code) or '>' (paper text), got {comparison!r}")
    if normalize not in ("all_tokens", "kept_tokens"):
        raise ValueError(f"normalize must be 'all_tokens' (reference code) or 'kept_tokens', got {normalize!r}")
    if not 0.0 <= token_threshold <= 1.0:
        raise ValueError(f"token_threshold (alpha) is a share of bits and must be in [0, 1], got {token_threshold}")

    bit_ce_BLd = _bit_cross_entropy(logits_BL2d, target_bits_BLd)
    bit_wrong_BLd = (bit_ce_BLd.detach() > bit_threshold).float()
    wrong_share_BL = bit_wrong_BLd.mean(dim=-1)
    keep_BL = (wrong_share_BL >= token_threshold if comparison == ">=" else wrong_share_BL > token_threshold).float()
    token_ce_BL = bit_ce_BLd.mean(dim=-1) * keep_BL

    weight = _token_weight(token_weight_L, L, bit_ce_BLd)
    if normalize == "all_tokens":
        loss = _reduce_tokens(token_ce_BL, weight)
    else:
        kept_weight_B = keep_BL.mul(weight).sum(dim=-1).clamp_min(torch.finfo(bit_ce_BLd.dtype).tiny)
        loss = (token_ce_BL.mul(weight).sum(dim=-1) / kept_weight_B).mean()

    counted_L = torch.ones(L, device=keep_BL.device) if token_weight_L is None else (weight > 0).float()
    n_counted = counted_L.sum().clamp_min(1.0) * B
    kept_ratio = (keep_BL * counted_L).sum() / n_counted
    bit_error_rate = (wrong_share_BL * counted_L).sum() / n_counted
    return FilteredCEOutput(loss, kept_ratio.detach(), bit_error_rate.detach())


def preservation_kl(
    student_logits_BL2d: torch.Tensor,
    teacher_logits_BL2d: torch.Tensor,
    reduction_code: bool = True,
    token_weight_L: torch.Tensor | None = None,
) -> torch.Tensor:
    """S-VARE's preservation loss L_Pre: per-bit KL(teacher || student), reduced as the reference code does.

    Both logits are under the neutral prompt c on the same anchor tokens r^ori. In the reference the teacher is the
    frozen model's CFG-guided (g = 4, tau = 1) logits stored with the anchors; the student is the plain conditional
    forward. Paper: ``L_Pre = sum_i KL(p_theta(r_i | r^ori_<i, c) || p_theta*(r_i | r^ori_<i, c))``. Code::

        kl_btkj = q_btkj (log q_btkj - log p_btkj)       q = softmax(teacher), p = softmax(student) over j in {0, 1}
        L_Pre   = mean_b sum_t w_t (1/2d) sum_{k,j} kl_btkj        (F.kl_div(log p, q, reduction='none'), w_t = 1/L)

    The mean over the 2d entries is ½ of the per-bit KL. ``reduction_code=False`` gives the paper's form (our reading
    of it): the full per-bit KL (sum over the 2 classes), mean over bits, then the same token reduction, i.e. twice
    the code's value. The weight lambda (``reg_lambda = 0.5`` in the code) is applied by the trainer, not here.
    """
    B, L, d = _check_same_shape(student_logits_BL2d, teacher_logits_BL2d, "student_logits_BL2d", "teacher_logits_BL2d")
    student_log_probs = torch.log_softmax(student_logits_BL2d.float().reshape(B, -1, 2), dim=-1)
    teacher_probs = torch.softmax(teacher_logits_BL2d.detach().float().reshape(B, -1, 2), dim=-1)
    kl_BL2d = F.kl_div(student_log_probs, teacher_probs, reduction="none").reshape(B, L, 2 * d)
    if reduction_code:
        token_kl_BL = kl_BL2d.mean(dim=-1)
    else:
        token_kl_BL = kl_BL2d.reshape(B, L, d, 2).sum(dim=-1).mean(dim=-1)
    return _reduce_tokens(token_kl_BL, _token_weight(token_weight_L, L, token_kl_BL))


# ---------------------------------------------------------------------------------------------------------------------
# VARE basic (Eq. 7) and the naive port (Eq. 6)


def probability_mse(
    student_logits_BL2d: torch.Tensor,
    teacher_logits_BL2d: torch.Tensor,
    token_weight_L: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared error between the per-bit probabilities of bit 1 of a student and a (detached) teacher::

        loss = mean_b sum_t w_t (1/d) sum_k (p*_btk - p_btk)^2,    p_btk = softmax(logits_btk)[1],   w_t = 1/L

    The paper writes ``||p_theta* - p_theta||^2`` over per-scale distributions without fixing the norm (reviewers
    flagged the notation). On a bitwise head we compare the probability of class 1 of every bit: the squared L2 over
    both classes of a bit is exactly twice that, so only the scale changes. We take the mean (not the sum) over bits
    and tokens so the magnitude does not grow with resolution, matching the reductions of L_FCE and L_Pre.
    """
    B, L, d = _check_same_shape(student_logits_BL2d, teacher_logits_BL2d, "student_logits_BL2d", "teacher_logits_BL2d")
    p_student_BLd = _bit_one_probability(student_logits_BL2d)
    p_teacher_BLd = _bit_one_probability(teacher_logits_BL2d.detach())
    token_se_BL = (p_student_BLd - p_teacher_BLd).pow(2).mean(dim=-1)
    return _reduce_tokens(token_se_BL, _token_weight(token_weight_L, L, token_se_BL))


def vare_basic_loss(
    student_logits_BL2d: torch.Tensor,
    teacher_logits_BL2d: torch.Tensor,
    token_weight_L: torch.Tensor | None = None,
) -> torch.Tensor:
    """VARE, paper Eq. 7: ``|| p_theta*(r_i | r^ori_<i, c*) - p_theta(r_i | r^ori_<i, c) ||^2``.

    Both branches are teacher-forced on the same auxiliary tokens r^ori (the frozen model's sample for the neutral
    prompt c): the student is the fine-tuned model under the unsafe prompt c*, the teacher the frozen model under c.
    The trainer obtains the logits; the formula is :func:`probability_mse` (per-bit probability of bit 1).
    """
    return probability_mse(student_logits_BL2d, teacher_logits_BL2d, token_weight_L)


def naive_loss(
    student_logits_BL2d: torch.Tensor,
    teacher_logits_BL2d: torch.Tensor,
    token_weight_L: torch.Tensor | None = None,
) -> torch.Tensor:
    """Naive port of diffusion erasure, paper Eq. 6: ``|| p_theta*(r_i | r_<i, c*) - p_theta(r_i | r_<i, c) ||^2``.

    The same formula as Eq. 7 (:func:`probability_mse`), but each branch is conditioned on *its own* history r_<i:
    the trainer rolls out the student under c* and the frozen model under c separately. Histories diverge across
    scales, which is why the paper reports collapse with this loss.
    """
    return probability_mse(student_logits_BL2d, teacher_logits_BL2d, token_weight_L)


# ---------------------------------------------------------------------------------------------------------------------
# ESD-style negative guidance


def esd_target_logits(
    base_cond_logits_BL2d: torch.Tensor,
    base_uncond_logits_BL2d: torch.Tensor,
    negative_guidance: float = 1.0,
) -> torch.Tensor:
    """ESD's negative-guidance target on logits: ``e_0 - eta (e_p - e_0)`` (detached).

    ``e_p`` is the frozen model under the concept prompt, ``e_0`` the frozen model under the empty / unconditional
    prompt, ``eta = negative_guidance`` (EraseInfinity's Infinity port of ESD uses 1.0).
    """
    _check_same_shape(
        base_cond_logits_BL2d, base_uncond_logits_BL2d, "base_cond_logits_BL2d", "base_uncond_logits_BL2d"
    )
    if not math.isfinite(negative_guidance):
        raise ValueError(f"negative_guidance must be a finite number, got {negative_guidance}")
    e_p, e_0 = base_cond_logits_BL2d.detach(), base_uncond_logits_BL2d.detach()
    return e_0 - negative_guidance * (e_p - e_0)


def esd_loss(
    student_logits_BL2d: torch.Tensor,
    target_logits_BL2d: torch.Tensor,
    token_weight_L: torch.Tensor | None = None,
) -> torch.Tensor:
    """ESD adapted to next-scale models: ``MSE(e_n, e_0 - eta (e_p - e_0))`` on logits (EraseInfinity port)::

        loss = mean_b sum_t w_t (1/2d) sum_j (e_n,btj - target_btj)^2,     w_t = 1/L

    ``e_n`` is the fine-tuned model under the concept prompt; the target comes from :func:`esd_target_logits`. With
    the default weights this is ``F.mse_loss`` over all entries. EraseInfinity averages per-scale MSEs over the scales
    it trains; pass :func:`equal_scale_weights` of those scales to reproduce that.
    """
    B, L, d = _check_same_shape(student_logits_BL2d, target_logits_BL2d, "student_logits_BL2d", "target_logits_BL2d")
    token_se_BL = (student_logits_BL2d.float() - target_logits_BL2d.detach().float()).pow(2).mean(dim=-1)
    return _reduce_tokens(token_se_BL, _token_weight(token_weight_L, L, token_se_BL))


# ---------------------------------------------------------------------------------------------------------------------
# Infinity's pretraining loss and token weights


def bitwise_cross_entropy(
    logits_BL2d: torch.Tensor,
    bits_BLd: torch.Tensor,
    token_weight_L: torch.Tensor | None = None,
) -> torch.Tensor:
    """Infinity's training loss: 2-class cross-entropy per bit, mean over bits, weighted sum over tokens, batch mean::

        loss = mean_b sum_t w_t (1/d) sum_k CE_btk,     w_t = 1/L, or scale_reweight_weights(schedule)

    (``infinity/trainer.py`` with ``bitloss_type='mean'``; ``reweight_loss_by_scale`` is the weighted form.)
    """
    B, L, d = _check_bits(logits_BL2d, bits_BLd, "logits_BL2d")
    token_ce_BL = _bit_cross_entropy(logits_BL2d, bits_BLd).mean(dim=-1)
    return _reduce_tokens(token_ce_BL, _token_weight(token_weight_L, L, token_ce_BL))


def _scale_sizes(schedule: Any) -> list[int]:
    """Tokens per scale of a ``ScaleSchedule`` (anything with ``.grids``) or a list of (h, w) / (t, h, w) grids."""
    grids: Sequence[Sequence[int]] = getattr(schedule, "grids", schedule)
    try:
        sizes = [math.prod(int(n) for n in grid) for grid in grids]
    except TypeError as err:
        raise ValueError(f"expected a ScaleSchedule or a list of (h, w) grids, got {schedule!r}") from err
    if not sizes or any(n <= 0 for n in sizes):
        raise ValueError(f"a schedule needs at least one scale and positive grids, got {schedule!r}")
    return sizes


def scale_reweight_weights(schedule: Any, device: torch.device | str | None = None) -> torch.Tensor:
    """(L,) float32 weights of Infinity's ``reweight_loss_by_scale``: ``w_t ∝ 1 / sqrt(h_k w_k)``, summing to 1.

    A scale's total weight is therefore ∝ ``sqrt(h_k w_k)``, so coarse scales count far more per token than with
    ``1 / L``. ``schedule`` is a :class:`~var_erase.schedules.ScaleSchedule` or a list of (h, w) grids.
    """
    sizes = _scale_sizes(schedule)
    per_token = torch.cat([torch.full((n,), 1.0 / math.sqrt(n), dtype=torch.float64) for n in sizes])
    return (per_token / per_token.sum()).to(device=device, dtype=torch.float32)


def equal_scale_weights(schedule: Any, device: torch.device | str | None = None) -> torch.Tensor:
    """(L,) float32 weights giving every scale the same total weight ``1 / K`` (``w_t = 1 / (K n_k)``).

    The token reduction then equals the mean over scales of each scale's mean, e.g. EraseInfinity's averaged
    per-scale ESD losses.
    """
    sizes = _scale_sizes(schedule)
    return torch.cat([torch.full((n,), 1.0 / (len(sizes) * n), dtype=torch.float64) for n in sizes]).to(
        device=device, dtype=torch.float32
    )
