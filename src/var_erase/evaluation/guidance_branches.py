"""Apply a LoRA adapter to one guidance branch only: a diagnostic of where an erasure's side effects come from.

With guidance on, ``VARPipeline`` runs the conditional and the unconditional branch as one batch ``[cond; uncond]``
(``2B`` rows) through the transformer and mixes their logits as ``g * cond + (1 - g) * uncond``. An adapter trained by
S-VARE changes both branches: the erase step also trains the 10% condition-dropped (unconditional) samples, and the
adapter's weights act on the learned unconditional embedding as on any prompt. :func:`adapter_on_branch` lets the
adapter act on the conditional rows only (``"cond"``) or the unconditional rows only (``"uncond"``), the other half
running the base weights, through PEFT's mixed-batch inference (``adapter_names`` per row; ``"__base__"`` = no
adapter). Comparing the three settings says which branch carries the erasure and which the collateral damage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from peft.tuners.lora import LoraLayer

BRANCHES = ("both", "cond", "uncond")


def _row_adapters(batch: int, adapter_name: str, branch: str) -> list[str]:
    """Per-row adapter names for a ``[cond; uncond]`` batch of ``batch = 2B`` rows."""
    if batch % 2:
        raise ValueError(
            f"adapter_on_branch needs the guidance batch [cond; uncond] (an even number of rows), got {batch} rows; "
            "sample with guidance_scale != 1 (or use branch='both')"
        )
    on, off = [adapter_name] * (batch // 2), ["__base__"] * (batch // 2)
    return on + off if branch == "cond" else off + on


@contextlib.contextmanager
def adapter_on_branch(transformer: torch.nn.Module, adapter_name: str, branch: str = "both") -> Iterator[None]:
    """Within the block, LoRA adapter ``adapter_name`` acts only on the ``branch`` half of every guidance batch.

    Args:
        transformer: the pipeline's transformer with the adapter loaded (e.g. by ``pipe.load_lora_weights(...,
            adapter_name=...)``); adapters must not be fused.
        adapter_name: the adapter to restrict.
        branch: ``"both"`` (no change), ``"cond"`` (conditional rows only) or ``"uncond"`` (unconditional rows only).

    Raises:
        ValueError: unknown ``branch``, no LoRA layer holds ``adapter_name``, or (while sampling) a batch that is not a
            guidance batch.
    """
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
    layers = [m for m in transformer.modules() if isinstance(m, LoraLayer) and adapter_name in m.lora_A]
    if not layers:
        raise ValueError(f"no LoRA layer of the transformer holds an adapter named {adapter_name!r}; load it first")
    if branch == "both":
        yield
        return

    def add_row_adapters(module, args, kwargs):
        return args, {**kwargs, "adapter_names": _row_adapters(args[0].shape[0], adapter_name, branch)}

    handles = [layer.register_forward_pre_hook(add_row_adapters, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
