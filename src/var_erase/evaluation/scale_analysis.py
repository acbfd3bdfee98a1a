"""Where an erased concept is decided: the oracle's detection rate as a function of how many scales come from which
model.

Method (prefix forcing, one seed per image shared by every run):

1. *Source trajectory.* For each prompt and seed, sample the whole trajectory with the prefix model (``prefix_model``:
   the base model, by default) and keep its bits of every scale.
2. *Forced continuations.* For ``k = 0 .. K``, sample again with the other model (the *continuation* model), same
   prompt and seed, but replace the bits of scales ``0 .. k-1`` by the source's (a ``callback_on_step_end`` that
   returns ``{"bits": ...}``). The continuation model reads the forced prefix exactly as it reads its own samples:
   each next-scale input is built from the forced bits, and its KV cache holds its own keys and values of those
   inputs (teacher forcing). Scales ``k .. K-1`` are its own draws.
3. ``rates[k]``: the share of these images in which the oracle detects the concept.

Because every run of an image uses the same generator seed, and the sampler draws the same uniforms at each scale
whether or not the bits are then replaced, ``rates[0]`` is the continuation model's own rate, ``rates[K]`` reproduces
the source images bit for bit, and with identical models every ``rates[k]`` equals the base rate *image by image*
(``tests/test_eval_scale_analysis.py``).

Reading the curve:

- ``prefix_model="base"`` (default): ``rates[k]`` is the rate when the base model drew the first ``k`` scales and the
  erased model the rest. It climbs from the erased rate (``k = 0``) to the base rate (``k = K``); the scale where it
  reaches the base rate is the one by which the concept is *committed*: from there, the erased model can no longer
  remove it.
- ``prefix_model="erased"``: the erased model draws the first ``k`` scales, the base model the rest. The curve falls
  from the base rate to the erased rate; the scale where it reaches the erased rate says how many scales an erasure
  must control, which is what the scale-restricted option (``num_train_scales``) relies on.

``midpoint_scale`` summarises either curve: the smallest ``k`` at which ``rates[k]`` has covered half of the way from
``rates[0]`` to ``rates[K]``. ``kl_per_scale`` locates the adapter's effect without sampling: along the source
trajectories (the ``k = K`` run forces every scale), the mean per-bit KL divergence ``KL(source || continuation)`` of
the two models' sampling distributions (guided, after temperature) at each scale.

The base model is ``base_pipe`` when given, else ``pipe`` with its LoRA adapters switched off (``peft``'s
``enable_adapters(False)`` on every adapter layer; restored afterwards). A fused adapter cannot be switched off: pass
``base_pipe`` or call ``pipe.unfuse_lora()`` first.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..loaders.lora import adapter_layers, adapters_disabled
from ..pipelines.sampling import bit_probabilities
from ..schedules import ScaleSchedule
from ..toy.concepts import get_concept
from .attacks import concept_probabilities
from .toy_metrics import image_seed

PREFIX_MODELS = ("base", "erased")
_RESERVED_KWARGS = ("generator", "output_type", "return_trajectory", "callback_on_step_end",
                    "callback_on_step_end_tensor_inputs", "num_images_per_prompt", "return_dict")


@dataclass
class ScaleAnalysis:
    """The detection rate of one concept against the number of forced scales (module docstring for the method).

    Attributes:
        concept: the concept read by the oracle.
        prefix_model: which model drew the forced prefix, ``"base"`` or ``"erased"``.
        rates: ``K + 1`` detection rates; ``rates[k]``: first ``k`` scales from the prefix model, the rest from the
            other model.
        base_rate, erased_rate: the two models' own rates on the same prompts and seeds.
        midpoint_scale: smallest ``k`` with ``rates[k]`` half-way from ``rates[0]`` to ``rates[K]`` (``None`` when
            they are equal).
        kl_per_scale: ``K`` values, mean per-bit ``KL(prefix model || other model)`` along the prefix model's samples.
        grids: the ``(h, w)`` token grid of each scale.
        n_images: images per rate.
        detections_KN: ``(K + 1, n_images)`` bool, per image.
        images_KNHW3: ``(K + 1, n_images, H, W, 3)`` uint8 when asked for (``return_images=True``), else ``None``.
        settings: everything needed to repeat the measurement.
    """

    concept: str
    prefix_model: str
    rates: list[float]
    base_rate: float
    erased_rate: float
    midpoint_scale: int | None
    kl_per_scale: list[float]
    grids: list[tuple[int, int]]
    n_images: int
    detections_KN: torch.Tensor
    images_KNHW3: torch.Tensor | None
    settings: dict

    def to_dict(self) -> dict:
        """JSON-ready summary (without the per-image tensors)."""
        skip = ("detections_KN", "images_KNHW3")
        return {k: ([list(g) for g in v] if k == "grids" else v) for k, v in vars(self).items() if k not in skip}


def scale_commitment(
    pipe,
    oracle,
    concept: str,
    prompts: Sequence[str],
    num_images_per_prompt: int = 1,
    seed: int = 0,
    prefix_model: str = "base",
    base_pipe=None,
    batch_size: int = 32,
    return_images: bool = False,
    progress: bool = True,
    **call_kwargs,
) -> ScaleAnalysis:
    """Detection rate of ``concept`` when the first ``k`` scales come from one model and the rest from the other.

    Args:
        pipe: the erased pipeline (adapter loaded and active).
        oracle: the judge (``OracleClassifier``).
        concept: the erased concept's name (any kind).
        prompts: prompts that ask for the concept.
        num_images_per_prompt: images per prompt; image ``i`` (prompt-major) uses seed ``image_seed(seed, i)``, as
            ``toy_metrics.generate_images`` does.
        prefix_model: ``"base"`` or ``"erased"``: which model draws the forced prefix.
        base_pipe: the base model as its own pipeline; default ``pipe`` with its adapters switched off.
        batch_size: images per pipeline call.
        return_images: keep every image, ``(K + 1, N, H, W, 3)`` uint8 (for grids).
        call_kwargs: passed to every pipeline call (``guidance_scale``, ``temperature``, ...).
    """
    target = _check_args(concept, prompts, num_images_per_prompt, prefix_model, call_kwargs)
    rows = [(p, image_seed(seed, i)) for i, p in enumerate(p for p in prompts for _ in range(num_images_per_prompt))]
    source, continuation = _models(pipe, base_pipe, prefix_model)
    batches = []
    for start in tqdm(range(0, len(rows), batch_size), desc=f"scale analysis of {target!r}", disable=not progress):
        batch = rows[start: start + batch_size]
        batches.append(_analyse_batch(batch, source, continuation, oracle, target, call_kwargs, return_images))
    return _result(target, prefix_model, batches, dict(
        seed=seed, num_images_per_prompt=num_images_per_prompt, n_prompts=len(prompts), prefix_model=prefix_model,
        base_model="base_pipe" if base_pipe is not None else "pipe with adapters disabled",
        adapter_active=_has_active_adapter(pipe.transformer), threshold=oracle.config.threshold,
        **{k: v for k, v in call_kwargs.items() if isinstance(v, str | int | float | bool | type(None))},
    ))


# ---------------------------------------------------------------------------------------------------------------------
# 1. one batch: the source trajectory, then K + 1 forced continuations
@dataclass
class _Batch:
    source_B: torch.Tensor  # (B,) bool: detected in the source model's own sample
    forced_KB: torch.Tensor  # (K + 1, B) bool: detected with the first k scales forced
    kl_sum_K: torch.Tensor  # (K,) float64: summed per-bit KL(source || continuation) along the source trajectory
    kl_count_K: torch.Tensor  # (K,) number of bits summed
    images_KBHW3: torch.Tensor | None
    schedule: ScaleSchedule


def _analyse_batch(batch, source, continuation, oracle, concept, call_kwargs, return_images) -> _Batch:
    prompts, seeds = [p for p, _ in batch], [s for _, s in batch]
    out = _sample(source, prompts, seeds, call_kwargs, return_trajectory=True)
    traj = out.trajectory
    num_scales = traj.schedule.num_scales
    forced, images, kl = [], [], None
    for k in range(num_scales + 1):
        run = _sample(continuation, prompts, seeds, call_kwargs, return_trajectory=k == num_scales,
                      callback=_force_prefix(traj.bits, traj.schedule, k))
        forced.append(_detect(oracle, run.images, concept))
        images.append(_to_uint8(run.images) if return_images else None)
        if k == num_scales:  # every scale forced: the continuation model's logits along the source trajectory
            kl = _kl_per_scale(traj.logits, run.trajectory.logits, traj.schedule)
    return _Batch(_detect(oracle, out.images, concept), torch.stack(forced), *kl,
                  torch.stack(images) if return_images else None, traj.schedule)


def _sample(model, prompts, seeds, call_kwargs, return_trajectory, callback=None):
    pipeline, context = model
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    forcing = {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["bits"]} if callback else {}
    with context():
        return pipeline(prompts, generator=generators, output_type="pt", return_trajectory=return_trajectory,
                        **forcing, **call_kwargs)


def _force_prefix(bits_BLd: torch.Tensor, schedule, k: int):
    """A ``callback_on_step_end`` that replaces the sampled bits of scales ``< k`` by the source's."""

    def callback(pipe, scale_index, timestep, tensors):
        if scale_index >= k:
            return {}
        return {"bits": bits_BLd[:, schedule.scale_slice(scale_index)].to(tensors["bits"])}

    return callback


def _detect(oracle, images_B3HW: torch.Tensor, concept: str) -> torch.Tensor:
    return concept_probabilities(oracle, _to_uint8(images_B3HW), concept) >= oracle.config.threshold


def _to_uint8(images_B3HW: torch.Tensor) -> torch.Tensor:
    return (images_B3HW.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def _kl_per_scale(source_logits_BL2d, continuation_logits_BL2d, schedule) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scale: the sum of per-bit ``KL(source || continuation)`` and the number of bits summed, two ``(K,)``."""
    p = bit_probabilities(source_logits_BL2d).clamp(1e-6, 1 - 1e-6)  # (B, L, d)
    q = bit_probabilities(continuation_logits_BL2d).clamp(1e-6, 1 - 1e-6)
    kl_BLd = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
    per_scale = [kl_BLd[:, schedule.scale_slice(k)] for k in range(schedule.num_scales)]
    return torch.stack([x.sum() for x in per_scale]).double().cpu(), torch.tensor([x.numel() for x in per_scale])


def _result(concept, prefix_model, batches: list[_Batch], settings) -> ScaleAnalysis:
    source_N = torch.cat([b.source_B for b in batches])
    detections_KN = torch.cat([b.forced_KB for b in batches], dim=1)
    rates = detections_KN.float().mean(dim=1).tolist()
    own_rate, other_rate = float(source_N.float().mean()), rates[0]
    base_rate, erased_rate = (own_rate, other_rate) if prefix_model == "base" else (other_rate, own_rate)
    kl_K = sum(b.kl_sum_K for b in batches) / sum(b.kl_count_K for b in batches)
    images = [b.images_KBHW3 for b in batches]
    return ScaleAnalysis(
        concept=concept, prefix_model=prefix_model, rates=rates, base_rate=base_rate, erased_rate=erased_rate,
        midpoint_scale=_midpoint(rates), kl_per_scale=kl_K.tolist(),
        grids=[tuple(g) for g in batches[0].schedule.grids], n_images=len(source_N), detections_KN=detections_KN,
        images_KNHW3=None if images[0] is None else torch.cat(images, dim=1), settings=settings,
    )


def _midpoint(rates: list[float]) -> int | None:
    start, end = rates[0], rates[-1]
    if start == end:
        return None
    return next(k for k, r in enumerate(rates) if abs(r - start) >= abs(end - start) / 2)


# ---------------------------------------------------------------------------------------------------------------------
# 2. which model draws what
def _models(pipe, base_pipe, prefix_model: str):
    """``(source, continuation)``, each a ``(pipeline, context manager factory)``."""
    if base_pipe is not None:
        base = (base_pipe, nullcontext)
    else:
        _check_not_fused(pipe.transformer)
        if not _has_active_adapter(pipe.transformer):
            warnings.warn("pipe has no active adapter and no base_pipe was given: the 'erased' and the base model are "
                          "the same model, so every rate is the base rate", stacklevel=3)
        base = (pipe, lambda: adapters_disabled(pipe.transformer))
    erased = (pipe, nullcontext)
    return (base, erased) if prefix_model == "base" else (erased, base)


def _has_active_adapter(transformer) -> bool:
    return any(not layer.disable_adapters for layer in adapter_layers(transformer))


def _check_not_fused(transformer) -> None:
    if any(layer.merged for layer in adapter_layers(transformer)):
        raise ValueError(
            "the pipeline's adapter is fused into the weights, so it cannot be switched off to give the base model; "
            "call pipe.unfuse_lora() first, or pass the base model as base_pipe"
        )


def _check_args(concept, prompts, num_images_per_prompt, prefix_model, call_kwargs) -> str:
    target = get_concept(concept).name  # a KeyError that lists the known concepts
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of prompts (wrap a single prompt in a list)")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
    if prefix_model not in PREFIX_MODELS:
        raise ValueError(f"prefix_model must be one of {list(PREFIX_MODELS)}, got {prefix_model!r}")
    reserved = sorted(set(call_kwargs) & set(_RESERVED_KWARGS))
    if reserved:
        raise ValueError(f"{reserved} are set by the analysis itself; pass only sampling settings (guidance_scale, "
                         "temperature, top_k, top_p, height, width)")
    return target
