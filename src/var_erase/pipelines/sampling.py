"""Sampling of bitwise logits: guidance on logits, temperature, top-k / top-p per bit, caller-owned generators.

Infinity's head predicts, for every token, ``d`` independent 2-way distributions (one per bit of the BSQ code). Its
sampler (``Infinity.autoregressive_infer_cfg``) applies, per scale:

1. guidance on logits: ``g * cond + (1 - g) * uncond`` (``g = 1`` is no guidance; VAR's ``(1 + t) c - t u`` is the
   same with ``t = g - 1``);
2. temperature: ``logits / tau``;
3. top-k and top-p per bit, over the 2 classes (Infinity's ``sample_with_top_k_top_p_also_inplace_modifying_logits_``
   in ``infinity/models/infinity.py``): top-k >= 2 has no effect; top-k = 1 removes a class whose logit is below the
   other's, so it is greedy, except that exactly tied logits both stay (a 50/50 draw). Top-p sorts the two classes
   by probability and removes those whose cumulative probability is at most ``1 - top_p``, never the last (most
   likely) one: so the less likely value goes when its probability is at most ``1 - top_p`` (with 0.97, bits with
   p >= 0.97 become certain), and with ``top_p <= 0.5`` it always goes (greedy), the more likely value always stays;
   of two exactly tied values the first in the ascending sort (value 0) goes. Top-k is applied first, then top-p;
4. one independent draw per bit.

The reference draws each bit with ``torch.multinomial``; here a bit is ``u < p(bit = 1)`` with ``u ~ U(0, 1)`` from the
caller's generator, which is the same distribution at a fraction of the cost. Samples are therefore reproducible for a
fixed generator, but not bit-identical to the reference's random stream (nor can they be: bf16 logits differ across
kernels, research/var_models.md §1.4).
"""

from __future__ import annotations

import torch


def check_sampling_args(guidance_scale: float, temperature: float, top_k: int, top_p: float) -> None:
    """Raise a ``ValueError`` naming the fix for out-of-range sampling settings."""
    if guidance_scale < 0:
        raise ValueError(
            f"guidance_scale must be >= 0 (Infinity's guidance is g*cond + (1-g)*uncond; 1 disables it, 3-4 is "
            f"typical), got {guidance_scale}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (1.0 samples the model's distribution), got {temperature}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative integer (0 disables it), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {top_p}")


def guide_logits(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Infinity's guidance on logits: ``g * cond + (1 - g) * uncond``."""
    return guidance_scale * cond_logits + (1.0 - guidance_scale) * uncond_logits


def bit_probabilities(logits_Bl2d: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, l, 2d) bitwise logits -> (B, l, d) probability that each bit is 1 (softmax over its 2 classes)."""
    logits = logits_Bl2d.float().unflatten(-1, (-1, 2)) / temperature  # (B, l, d, 2)
    return torch.sigmoid(logits[..., 1] - logits[..., 0])


def filter_bit_probabilities(p1_Bld: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Apply top-k, then top-p, to per-bit probabilities of class 1, as Infinity's top-k / top-p over each bit's 2
    classes (module docstring, step 3). A tie is ``p1 == 0.5`` exactly (equal logits)."""
    one, zero = torch.ones_like(p1_Bld), torch.zeros_like(p1_Bld)
    if top_k == 1:  # removes the class below the other; exactly tied logits both stay, as Infinity's top-k
        p1_Bld = torch.where(p1_Bld == 0.5, p1_Bld, (p1_Bld > 0.5).to(p1_Bld.dtype))
    if top_p < 1.0:
        cutoff = 1.0 - top_p  # the less likely class goes when its probability (its cumsum) is at most this
        ones_first = p1_Bld < 0.5  # class 1 is the less likely one (first in the ascending sort); else class 0
        p1_Bld = torch.where(ones_first & (p1_Bld <= cutoff), zero, p1_Bld)
        p1_Bld = torch.where(~ones_first & (1.0 - p1_Bld <= cutoff), one, p1_Bld)
    return p1_Bld


def uniform_like(
    shape: tuple[int, ...],
    generator: torch.Generator | list[torch.Generator] | None,
    device: torch.device,
) -> torch.Tensor:
    """U(0, 1) draws of ``shape`` on ``device`` from one generator, or one generator per batch row (diffusers style).

    Draws happen on the generator's device and are moved, so a CPU generator gives the same samples on any device.
    """
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(
                f"got a list of {len(generator)} generators for a batch of {shape[0]} images; pass one generator, "
                f"or exactly one per image (batch = len(prompt) * num_images_per_prompt)"
            )
        rows = [uniform_like((1, *shape[1:]), g, device) for g in generator]
        return torch.cat(rows, dim=0)
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)


def sample_bits(
    logits_Bl2d: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Sample every bit independently from (guided) bitwise logits. Returns (B, l, d) long bits."""
    p1_Bld = filter_bit_probabilities(bit_probabilities(logits_Bl2d, temperature), top_k, top_p)
    u_Bld = uniform_like(tuple(p1_Bld.shape), generator, p1_Bld.device)
    return (u_Bld < p1_Bld).long()
