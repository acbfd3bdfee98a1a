"""FMN: Forget-Me-Not: Learning to Forget in Text-to-Image Diffusion Models (Zhang et al., CVPR-W 2024,
arXiv 2303.17591), "attention re-steering", in the VARE frame.

The diffusion method fine-tunes the UNet so that its cross-attention no longer looks at the concept's words: for the
prompt c* and the positions P of the concept's tokens in it, it minimises the norm of the attention probabilities that
the image queries give to those tokens, over every cross-attention layer::

    L_FMN = || A[P] ||_F,      A[P] = concat over layers l, samples b, heads h, queries q of (a^l_bhq,p)_{p in P}

(the reference's ``AttnController.loss``: ``torch.cat(target_attns).norm()``), for a few dozen steps.

Adaptation to next-scale bit prediction (the VARE frame, research/paper.md §1.2): the image queries are the tokens of
every scale of the frozen model's trajectory r^ori of the safe prompt c, teacher-forced under c*, and the attention is
the transformer's cross-attention to the text in every block (``attn2``; the attentive text pooling that feeds the
SOS token and AdaLN is not a cross-attention map and is left alone). The norm is divided by the square root of the
number of rows (layers x samples x heads x queries), so the loss is a root-mean-square, in [0, 1] and independent of
the resolution and the depth: the same minimiser, a learning rate that transfers::

    L_FMN = sqrt( (1 / N) sum_{l,b,h,q} sum_{p in P_b} (a^l_bhqp)^2 ),      N = layers * B * H * L

The concept's tokens P_b (:func:`concept_token_positions`) are where the tokenised concept name occurs in c*, or,
when the name does not occur (a paraphrase), the tokens of c* that its pair's safe prompt c does not share. The text
is never dropped in this step (a dropped text has no concept tokens to re-steer). Default trained parameters: the
queries and keys of cross-attention, which decide the attention maps.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from ..models.attention import CrossAttention


def concept_token_positions(tokenizer, prompt: str, concept: str | None, anchor_prompt: str | None = None,
                            max_length: int | None = None) -> list[int]:
    """Indices of the concept's tokens in ``tokenizer(prompt)`` (the positions of the text features the pipeline's
    ``encode_prompt`` gives the transformer).

    Every occurrence of the tokenised ``concept`` (alone, or after a space, as word-piece and sentence-piece
    tokenizers mark a word start) counts. Without a match (no concept name, or a paraphrase), the tokens of
    ``prompt`` outside the longest blocks it shares with ``anchor_prompt`` (its pair's safe prompt) are taken.

    Raises:
        ValueError: neither way finds a token (say which words of the prompt are the concept, or give a pair whose
            prompts differ).
    """
    kwargs = {"truncation": max_length is not None, "max_length": max_length}
    ids = list(tokenizer(prompt, **kwargs)["input_ids"])
    positions: list[int] = []
    if concept and concept.strip():
        for variant in (concept.strip(), " " + concept.strip()):
            pattern = list(tokenizer(variant, add_special_tokens=False)["input_ids"])
            positions = _occurrences(ids, pattern)
            if positions:
                return positions
    if anchor_prompt is not None:
        other = list(tokenizer(anchor_prompt, **kwargs)["input_ids"])
        shared = set()
        for block in difflib.SequenceMatcher(a=ids, b=other, autojunk=False).get_matching_blocks():
            shared.update(range(block.a, block.a + block.size))
        positions = [i for i in range(len(ids)) if i not in shared]
    if not positions:
        raise ValueError(f"FMN needs the concept's tokens in the prompt {prompt!r}: the concept {concept!r} does not "
                         f"occur in it and it has no tokens that its safe prompt {anchor_prompt!r} lacks. Give pairs "
                         "whose unsafe prompt names the concept (PromptPair.concept) or differs from the safe prompt")
    return positions


def _occurrences(ids: Sequence[int], pattern: Sequence[int]) -> list[int]:
    """Positions covered by every occurrence of ``pattern`` in ``ids``."""
    n = len(pattern)
    if n == 0:
        return []
    found: list[int] = []
    for start in range(len(ids) - n + 1):
        if list(ids[start: start + n]) == list(pattern):
            found += [i for i in range(start, start + n) if i not in found]
    return found


def concept_token_mask(positions: Sequence[Sequence[int]], num_tokens: int) -> torch.Tensor:
    """(B, T) bool mask, True at each sample's concept-token positions (those below ``num_tokens``)."""
    mask_BT = torch.zeros(len(positions), num_tokens, dtype=torch.bool)
    for b, row in enumerate(positions):
        mask_BT[b, [p for p in row if p < num_tokens]] = True
    return mask_BT


class CrossAttentionRecorder:
    """Collects, per cross-attention layer, what FMN needs of the (B, H, L, T) attention probabilities on the concept's
    tokens: the sum of their squares (with gradients), the number of (sample, head, query) rows, and the mean
    attention mass on the concept (detached, for logging). Filled inside :func:`record_cross_attention`; only scalars
    are kept, the probabilities themselves live only as long as autograd needs them."""

    def __init__(self, concept_mask_BT: torch.Tensor) -> None:
        self.concept_mask_B11T = concept_mask_BT[:, None, None, :]
        self.squares: list[torch.Tensor] = []
        self.masses: list[torch.Tensor] = []
        self.rows = 0

    def __call__(self, probs_BHLT: torch.Tensor) -> None:
        mask = self.concept_mask_B11T.to(probs_BHLT.device)
        if mask.shape[0] != probs_BHLT.shape[0] or mask.shape[-1] > probs_BHLT.shape[-1]:
            raise ValueError(f"the concept-token mask is {tuple(mask.shape[::3])} (batch, text tokens), the attention "
                             f"{tuple(probs_BHLT.shape)}: build it for the batch and text actually run")
        mask = torch.nn.functional.pad(mask, (0, probs_BHLT.shape[-1] - mask.shape[-1]))
        concept_BHLT = probs_BHLT.float() * mask
        self.squares.append(concept_BHLT.pow(2).sum())
        self.masses.append(concept_BHLT.detach().sum(-1).mean())
        self.rows += probs_BHLT[..., 0].numel()

    @property
    def concept_mass(self) -> torch.Tensor:
        """Mean over layers, samples, heads and queries of the attention mass on the concept's tokens (detached)."""
        return torch.stack(self.masses).mean()


@contextmanager
def record_cross_attention(transformer: torch.nn.Module, concept_mask_BT: torch.Tensor
                           ) -> Iterator[CrossAttentionRecorder]:
    """While inside, every cross-attention layer of ``transformer`` hands its attention probabilities to the yielded
    :class:`CrossAttentionRecorder` (``CrossAttention.attention_probe``); the probes are removed on exit, so a
    backward that recomputes the forward (gradient checkpointing) records nothing more."""
    layers = [m for m in transformer.modules() if isinstance(m, CrossAttention)]
    if not layers:
        raise ValueError("the model has no cross-attention layer (CrossAttention) to re-steer")
    recorder = CrossAttentionRecorder(concept_mask_BT)
    previous = [layer.attention_probe for layer in layers]
    try:
        for layer in layers:
            layer.attention_probe = recorder
        yield recorder
    finally:
        for layer, probe in zip(layers, previous):
            layer.attention_probe = probe


def attention_resteering_loss(recorder: CrossAttentionRecorder) -> torch.Tensor:
    """FMN's loss: the root-mean-square over (layer, sample, head, query) rows of the norm of the attention on the
    concept's tokens (the reference's Frobenius norm divided by the square root of the number of rows)."""
    if not recorder.squares:
        raise ValueError("no cross-attention was recorded: run the transformer inside record_cross_attention(...)")
    return (torch.stack(recorder.squares).sum() / recorder.rows).clamp_min(1e-20).sqrt()


__all__ = ["CrossAttentionRecorder", "attention_resteering_loss", "concept_token_mask", "concept_token_positions",
           "record_cross_attention"]
