"""ESD-u and ESD-x: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023, arXiv 2303.07345), in the
VARE frame.

The diffusion method fine-tunes the noise predictor so that, under the concept c*, it predicts the frozen model's
*negatively guided* noise::

    eps_theta*(x_t, c*, t)  <-  eps_theta(x_t, t) - eta (eps_theta(x_t, c*, t) - eps_theta(x_t, t))      (MSE)

with ``eta`` = ``negative_guidance`` (1.0 in the paper). The paper's two variants differ only in what is trained:
**ESD-u** the non-cross-attention parameters ("noxattn": an unconditional erasure, for global concepts such as nudity
or a style), **ESD-x** the cross-attention parameters ("xattn": an erasure tied to the prompt's words, for objects).

Adaptation to next-scale bit prediction (as S-VARE adapts its baselines: teacher forcing on the frozen model's
trajectory r^ori of the safe prompt c, research/paper.md §1.2). The "noise prediction" is the per-scale bit logits
``e = logits(r_i | r^ori_<i, .)`` of every token of every scale, teacher-forced along r^ori; ``e_0`` is the frozen
model under the learned unconditional text (the branch classifier-free guidance uses), ``e_c`` the frozen model under
c*, and the student under c*::

    target  = e_0 - eta (e_c - e_0)                                   (both frozen, detached; logits, not bits)
    L_ESD   = mean_b sum_t w_t (1/2d) sum_j (e*_btj - target_btj)^2   (w_t = 1/L; :func:`~.losses.esd_loss`)

On LoRA targets: ESD-u trains self-attention + FFN (:data:`ESD_U_TARGET_MODULES`), ESD-x the four projections of
cross-attention (:data:`ESD_X_TARGET_MODULES`); the S-VARE-module variant stays available as method ``esd``. The
target and the loss are :func:`~var_erase.erasure.losses.esd_target_logits` and
:func:`~var_erase.erasure.losses.esd_loss` (EraseInfinity's Infinity port of ESD computes the same MSE on logits).
"""

from __future__ import annotations

import torch

from .config import default_lora_target_modules
from .losses import esd_loss, esd_target_logits

ESD_U_TARGET_MODULES: tuple[str, ...] = tuple(default_lora_target_modules("esd-u"))
"""ESD-u ("noxattn"): every linear layer of a block except cross-attention: self-attention and the FFN."""

ESD_X_TARGET_MODULES: tuple[str, ...] = tuple(default_lora_target_modules("esd-x"))
"""ESD-x ("xattn"): the cross-attention projections."""

ESD_U_FULL_FINETUNE_MODULES: tuple[str, ...] = ("attn1", "ff")
"""ESD-u as a full fine-tune (``ErasureConfig.train_modules``)."""

ESD_X_FULL_FINETUNE_MODULES: tuple[str, ...] = ("attn2",)
"""ESD-x as a full fine-tune (``ErasureConfig.train_modules``)."""


def negative_guidance_loss(
    student_logits_BL2d: torch.Tensor,
    frozen_concept_logits_BL2d: torch.Tensor,
    frozen_uncond_logits_BL2d: torch.Tensor,
    negative_guidance: float = 1.0,
    token_weight_L: torch.Tensor | None = None,
) -> torch.Tensor:
    """ESD's loss on per-scale bit logits: ``MSE(e*, e_0 - eta (e_c - e_0))`` (see the module docstring).

    Args:
        student_logits_BL2d: the fine-tuned model under the concept prompt c*, teacher-forced along r^ori.
        frozen_concept_logits_BL2d: ``e_c``, the frozen model under c* along the same tokens.
        frozen_uncond_logits_BL2d: ``e_0``, the frozen model under the unconditional text along the same tokens.
        negative_guidance: eta (1.0 in ESD).
        token_weight_L: ``(L,)`` token weights replacing ``1 / L``.
    """
    target_BL2d = esd_target_logits(frozen_concept_logits_BL2d, frozen_uncond_logits_BL2d, negative_guidance)
    return esd_loss(student_logits_BL2d, target_BL2d, token_weight_L)


__all__ = ["ESD_U_FULL_FINETUNE_MODULES", "ESD_U_TARGET_MODULES", "ESD_X_FULL_FINETUNE_MODULES",
           "ESD_X_TARGET_MODULES", "negative_guidance_loss"]
