"""LoRA products at a kernel-friendly rank: the same adapter, computed as if its rank were a multiple of 8.

A rank-4 LoRA's products have a dimension of 4 (``x A^T`` gives (N, 4), ``h B^T`` sums over 4): in bf16 that is 8
bytes, under the 16-byte alignment of cuBLAS's fast kernels, which then falls back to slow ``align2`` kernels. At
Infinity-2B's training shapes (21,042 rows) on an H200 the rank-4 products take 36-186 us each where the same products
at rank 8 take 27-112 us (``docs/performance.md``, ninth round).

:func:`padded_lora_ranks` makes every LoRA layer of a model compute with its ``A`` zero-padded to ``r'`` rows and its
``B`` to ``r'`` columns (``r'`` the rank rounded up to a multiple of :data:`RANK_MULTIPLE`). The stored parameters do
not change: the padding is made at each call, so the adapter's shapes, its state dict, what is saved and what the
optimizer holds stay those of rank ``r``. The extra components of ``x A'^T`` are exact zeros and meet zero columns of
``B'``, so the outputs are the rank-``r`` ones and the gradients of ``A`` and ``B`` too (the padded rows and columns
get gradients that are dropped with the padding). Only the kernels change, and with them the float rounding of the
products.

The padded products are the forwards of two ``nn.Linear`` subclasses that ``lora_A`` / ``lora_B`` take as their
class while inside :func:`padded_lora_ranks` (the trainer wraps each training step in it); on exit, normal or by an
exception, every module gets back the class it had, so a trained model leaves with PEFT's own modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

RANK_MULTIPLE = 8  # bf16 rows of 16 bytes: cuBLAS's aligned kernels


class _PaddedLoraA(nn.Linear):
    """``lora_A`` (r, in) computing ``x A'^T`` with ``A`` zero-padded to ``r'`` rows: output (..., r')."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102 - see the class
        pad = (-self.weight.shape[0]) % RANK_MULTIPLE
        return F.linear(x, F.pad(self.weight, (0, 0, 0, pad)))


class _PaddedLoraB(nn.Linear):
    """``lora_B`` (out, r) taking the padded (..., r') input of :class:`_PaddedLoraA`, with ``B`` zero-padded to
    ``r'`` columns."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # noqa: D102 - see the class
        pad = (-self.weight.shape[1]) % RANK_MULTIPLE
        return F.linear(h, F.pad(self.weight, (0, pad)))


def _lora_pairs(model: nn.Module):
    """``(lora_A, lora_B)`` of every adapter of every LoRA linear layer of ``model`` (no bias, plain LoRA)."""
    for module in model.modules():
        if not isinstance(module, LoraLayer) or not isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
            continue
        for name, lora_a in module.lora_A.items():
            lora_b = module.lora_B[name]
            plain = type(lora_a) in (nn.Linear, _PaddedLoraA) and type(lora_b) in (nn.Linear, _PaddedLoraB)
            plain = plain and name not in getattr(module, "lora_variant", {})
            if plain and lora_a.bias is None and lora_b.bias is None:
                yield lora_a, lora_b


def paddable_lora_layers(model: nn.Module) -> list[tuple[nn.Linear, nn.Linear]]:
    """``(lora_A, lora_B)`` of every plain LoRA linear layer of ``model`` whose rank is not a multiple of
    :data:`RANK_MULTIPLE`: what :func:`padded_lora_ranks` pads. Layers with a bias on ``lora_A``/``lora_B`` or a LoRA
    variant (DoRA, ...) are left out."""
    return [(a, b) for a, b in _lora_pairs(model) if a.weight.shape[0] % RANK_MULTIPLE]


@contextmanager
def padded_lora_ranks(model: nn.Module | list[tuple[nn.Linear, nn.Linear]]) -> Iterator[int]:
    """While inside, every layer of :func:`paddable_lora_layers` (of ``model``, or the pairs given, e.g. found once
    and reused per step) computes at the rounded-up rank; yields how many. On exit, also by an exception, each
    ``lora_A`` / ``lora_B`` gets back the class it had on entry (nested uses restore in turn)."""
    pairs = model if isinstance(model, list) else paddable_lora_layers(model)
    classes = [(a, b, type(a), type(b)) for a, b in pairs]
    try:
        for lora_a, lora_b in pairs:
            lora_a.__class__, lora_b.__class__ = _PaddedLoraA, _PaddedLoraB
        yield len(pairs)
    finally:
        for lora_a, lora_b, class_a, class_b in classes:
            lora_a.__class__, lora_b.__class__ = class_a, class_b


def pad_lora_ranks(model: nn.Module) -> int:
    """Make the layers of :func:`paddable_lora_layers` compute padded until :func:`unpad_lora_ranks`; returns how
    many. Prefer :func:`padded_lora_ranks`, which cannot leave them padded."""
    pairs = paddable_lora_layers(model)
    for lora_a, lora_b in pairs:
        lora_a.__class__, lora_b.__class__ = _PaddedLoraA, _PaddedLoraB
    return len(pairs)


def unpad_lora_ranks(model: nn.Module) -> None:
    """Back to PEFT's plain products (the parameters were never changed)."""
    for lora_a, lora_b in _lora_pairs(model):
        lora_a.__class__, lora_b.__class__ = nn.Linear, nn.Linear


__all__ = ["RANK_MULTIPLE", "pad_lora_ranks", "paddable_lora_layers", "padded_lora_ranks", "unpad_lora_ranks"]
