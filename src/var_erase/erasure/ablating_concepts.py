"""AC-N and AC-M: Ablating Concepts in Text-to-Image Diffusion Models (Kumari et al., ICCV 2023, arXiv 2303.13516), in
the VARE frame.

The diffusion method fine-tunes the model so that the target concept c* ("Van Gogh painting") generates what an
anchor concept c ("painting") generates, on images x of the anchor (sampled from the frozen model for c), noised to
x_t. Its two objectives:

- **model-based** ("AC-M"): match the frozen model's prediction for the anchor prompt::

      L = || eps_theta*(x_t, c*, t) - sg(eps_theta(x_t, c, t)) ||^2

- **noise-based** ("AC-N"): the ordinary denoising loss, with the anchor image's true noise as target under c*::

      L = || eps_theta*(x_t, c*, t) - eps ||^2

Adaptation to next-scale bit prediction (teacher forcing on the frozen model's trajectory r^ori of c, the VARE frame,
research/paper.md §1.2). The anchor image is r^ori itself; "noising" becomes teacher forcing along r^ori, and the
student is the fine-tuned model under c* along r^ori:

- AC-M (:func:`model_based_loss`): the target is the frozen model's per-bit distribution under c along r^ori (the
  anchors' ``cond_logits``, the plain conditional branch, no guidance), and the squared error on a distribution becomes
  the per-bit KL divergence, the divergence of a distribution over bits::

      L_AC-M = mean_b sum_t w_t (1/d) sum_k KL( p_theta(r_tk | r^ori_<t, c) || p_theta*(r_tk | r^ori_<t, c*) )

- AC-N (:func:`noise_based_loss`): the target is the data itself, the anchor's sampled bits r^ori (the analogue of the
  true noise eps), with Infinity's training loss, the bitwise cross-entropy::

      L_AC-N = mean_b sum_t w_t (1/d) sum_k CE( p_theta*(. | r^ori_<t, c*), r^ori_tk )

``w_t = 1 / L`` as every loss of :mod:`~var_erase.erasure.losses`. AC-N is S-VARE's L_FCE without its token filter
(the alpha = 0 ablation), and AC-M is VARE's Eq. 7 with a KL in place of the probability MSE: the VARE frame brings
the two families close. Default trained parameters: the cross-attention keys and values (AC's ``crossattn_kv``).
AC's optional regularisation on the anchor prompt itself is not part of these baselines (S-VARE's L_Pre is that term).

Naming: Kumari et al. call the objectives "model-based" and "noise-based"; AC-M and AC-N follow those initials.
"""

from __future__ import annotations

import torch

from .losses import bitwise_cross_entropy, preservation_kl


def model_based_loss(
    student_logits_BL2d: torch.Tensor,
    anchor_logits_BL2d: torch.Tensor,
    token_weight_L: torch.Tensor | None = None,
) -> torch.Tensor:
    """AC-M: per-bit ``KL(frozen model under c || student under c*)`` along r^ori (see the module docstring).

    Args:
        student_logits_BL2d: (B, L, 2d) the fine-tuned model under the concept prompt c*, teacher-forced on r^ori.
        anchor_logits_BL2d: (B, L, 2d) the frozen model under the anchor prompt c along r^ori (detached here).
        token_weight_L: ``(L,)`` token weights replacing ``1 / L``.
    """
    return preservation_kl(student_logits_BL2d, anchor_logits_BL2d, reduction_code=False,
                           token_weight_L=token_weight_L)


def noise_based_loss(
    student_logits_BL2d: torch.Tensor,
    anchor_bits_BLd: torch.Tensor,
    token_weight_L: torch.Tensor | None = None,
) -> torch.Tensor:
    """AC-N: bitwise cross-entropy of the student under c* towards the anchor's sampled bits r^ori.

    Args:
        student_logits_BL2d: (B, L, 2d) the fine-tuned model under the concept prompt c*, teacher-forced on r^ori.
        anchor_bits_BLd: (B, L, d) the bits r^ori the frozen model sampled for the anchor prompt c.
        token_weight_L: ``(L,)`` token weights replacing ``1 / L``.
    """
    return bitwise_cross_entropy(student_logits_BL2d, anchor_bits_BLd, token_weight_L)


__all__ = ["model_based_loss", "noise_based_loss"]
