"""``VARPipeline``: text-to-image generation with a next-scale (VAR / Infinity) model, diffusers-style.

Reads top to bottom as diffusers pipelines do: ``check_inputs`` -> ``encode_prompt`` -> ``prepare_schedule`` ->
``__call__`` (scale loop with ``self.progress_bar`` and ``callback_on_step_end``) -> decode.

The scale loop is Infinity's ``autoregressive_infer_cfg`` (research/var_models.md §1.4): the positive and the
unconditional branch run as one batch through the transformer with a KV cache; guidance is applied on the logits; each
bit is sampled independently; the sampled codes are accumulated on the final latent grid, and the next scale's input is
that map resized to the next grid. With ``return_trajectory=True`` the pipeline also returns what S-VARE's auxiliary
visual tokens are made of: the sampled bits of every scale, the teacher-forcing inputs that replay them, the guided
logits they were drawn from, and the conditional branch's logits (kept from the guidance batch, so no second forward).

What a diffusers user reaches for works as in diffusers' transformer pipelines (Sana, PixArt): ``callback_on_step_end``
after every scale with ``latents`` (and ``pipe.guidance_scale`` / ``pipe._interrupt`` read at every scale),
``encode_prompt`` on the text components alone and ``prompt_embeds`` / ``negative_prompt_embeds`` in ``__call__``,
``attention_kwargs={"scale": s}`` for a per-call LoRA scale, and model, sequential and group offloading.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput, logging, scale_lora_layers

from ..loaders.lora import VARLoraLoaderMixin, adapter_layers
from ..models.autoencoder_bsq import BSQAutoencoder
from ..models.transformer_var import VARTransformer2DModel
from ..schedules import ScaleSchedule
from .cuda_graphs import TEXT_BUCKET, ScaleGraphs
from .custom_pipeline import importable_config, with_custom_form, write_custom_code
from .sampling import check_sampling_args, guide_logits, sample_bits

logger = logging.get_logger(__name__)

DEFAULT_TEXT_LIMIT = 512  # text tokens when the pipeline has no transformer to read max_text_len from (Infinity's T5)
_NOT_SLICED = (
    "VARPipeline does not slice attention: every attention call goes through torch's scaled_dot_product_attention, "
    "which already picks memory-efficient kernels, and the keys/values of the earlier scales are cached once. To lower "
    "peak GPU memory use pipe.enable_model_cpu_offload(), pipe.enable_sequential_cpu_offload() or "
    "pipe.enable_group_offload(...), fewer images per call, or a bfloat16 pipeline (from_pretrained(..., "
    "dtype=torch.bfloat16))."
)


@dataclass
class VARTrajectory(BaseOutput):
    """A sampled token trajectory: everything needed to teacher-force the model along it.

    Attributes:
        bits: (B, L, d) long, the sampled bits of every scale, concatenated in schedule order.
        inputs: (B, L - 1, d) float, the next-scale inputs of scales 1..K-1 (what ``transformer.forward`` takes).
        logits: (B, L, 2d) float32, the guided logits each scale was sampled from (after temperature, before
            top-k/top-p).
        schedule: the scale schedule of the trajectory.
        cond_logits: (B, L, 2d) float32, the conditional branch's logits along the trajectory (before guidance and
            temperature): what a teacher-forced forward under the prompt gives, within rounding, at no extra cost.
    """

    bits: torch.Tensor
    inputs: torch.Tensor
    logits: torch.Tensor
    schedule: ScaleSchedule
    cond_logits: torch.Tensor | None = None


@dataclass
class VARPipelineOutput(BaseOutput):
    """Images (PIL list, numpy array, tensor or latent map, by ``output_type``) and, if asked, the trajectory."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    trajectory: VARTrajectory | None = None


class VARPipeline(DiffusionPipeline, VARLoraLoaderMixin):
    """Text-to-image with a next-scale prediction transformer over a BSQ multi-scale tokenizer.

    Args:
        tokenizer: any transformers tokenizer (T5 for Infinity, a BERT one for the embedded toy model).
        text_encoder: the matching transformers encoder; its ``last_hidden_state`` feeds the transformer.
        transformer: a :class:`VARTransformer2DModel` (may be None for a pipeline that only runs
            :meth:`encode_prompt`).
        vae: a :class:`BSQAutoencoder` (may be None likewise).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    # latents: the accumulated latent after the scale's codes are added; f_hat: the one before them (None at scale 0);
    # bits: the scale's sampled bits
    _callback_tensor_inputs = ["latents", "f_hat", "bits"]
    _optional_components = ["transformer", "vae"]

    # the state of the current call, read by the scale loop at every scale (a callback may change it)
    _guidance_scale: float = 4.0
    _num_timesteps: int | None = None
    _interrupt: bool = False
    _attention_kwargs: dict | None = None

    def __init__(self, tokenizer, text_encoder, transformer: VARTransformer2DModel | None,
                 vae: BSQAutoencoder | None):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_stride, do_normalize=True)

    @property
    def vae_stride(self) -> int:
        return self.vae.vae_stride if getattr(self, "vae", None) is not None else 16

    # ----------------------------------------------------------------------------------------------------------------
    # the state of the current call (as diffusers' pipelines)
    @property
    def guidance_scale(self) -> float:
        """``g`` of this call; read at every scale, so a callback may change it (``pipe._guidance_scale = g``)."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the unconditional branch runs: ``guidance_scale != 1`` (Infinity's ``g * cond + (1 - g) * uncond``
        guides for any ``g`` but 1, also below 1)."""
        return self._guidance_scale != 1.0

    @property
    def num_timesteps(self) -> int | None:
        """Number of scales of the current (or last) call: the steps ``callback_on_step_end`` sees."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set ``pipe._interrupt = True`` from a callback to stop after the current scale; the latent accumulated so
        far is decoded (a coarser image) and the trajectory holds the scales that ran."""
        return self._interrupt

    @property
    def attention_kwargs(self) -> dict | None:
        """``attention_kwargs`` of the current call; ``{"scale": s}`` scales every loaded LoRA adapter by ``s``."""
        return self._attention_kwargs

    # ----------------------------------------------------------------------------------------------------------------
    # 1. inputs
    def check_inputs(self, prompt, negative_prompt, height, width, guidance_scale, temperature, top_k, top_p,
                     num_images_per_prompt, output_type, callback_on_step_end_tensor_inputs, prompt_embeds=None,
                     prompt_attention_mask=None, negative_prompt_embeds=None, negative_prompt_attention_mask=None,
                     attention_kwargs=None, max_sequence_length=None) -> None:
        batch = self._check_prompts(prompt, prompt_embeds, prompt_attention_mask)
        self._check_negative(negative_prompt, negative_prompt_embeds, negative_prompt_attention_mask, batch,
                             prompt_embeds)
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer number of pixels, got {value!r}")
            if value % self.vae_stride:
                raise ValueError(f"{name}={value} is not a multiple of the VAE stride {self.vae_stride}")
        for name, value in (("guidance_scale", guidance_scale), ("temperature", temperature), ("top_p", top_p)):
            _check_finite(name, value)
        check_sampling_args(guidance_scale, temperature, top_k, top_p)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be one of 'pil', 'np', 'pt', 'latent', got {output_type!r}")
        unknown = [n for n in callback_on_step_end_tensor_inputs or [] if n not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} not in {self._callback_tensor_inputs}: 'latents' is "
                "the accumulated latent after each scale's codes are added, 'f_hat' the one before them, 'bits' the "
                "scale's sampled bits"
            )
        _check_attention_kwargs(attention_kwargs)
        if max_sequence_length is not None and (not isinstance(max_sequence_length, int) or max_sequence_length < 1):
            raise ValueError(f"max_sequence_length must be a positive number of text tokens, got "
                             f"{max_sequence_length!r}")

    def _check_prompts(self, prompt, prompt_embeds, prompt_attention_mask) -> int:
        """Check ``prompt`` / ``prompt_embeds``; returns the number of prompts."""
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either prompt or prompt_embeds (with prompt_attention_mask, from "
                             "pipe.encode_prompt), not both")
        if prompt_embeds is None:
            if prompt_attention_mask is not None:
                raise ValueError("prompt_attention_mask goes with prompt_embeds; pass both (pipe.encode_prompt "
                                 "returns them) or neither")
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"prompt must be a non-empty string or a non-empty list of strings (or pass "
                                 f"prompt_embeds), got {prompt!r}")
            return len(prompts)
        self._check_embeds("prompt_embeds", prompt_embeds, "prompt_attention_mask", prompt_attention_mask)
        return prompt_embeds.shape[0]

    def _check_negative(self, negative_prompt, negative_embeds, negative_mask, batch, prompt_embeds) -> None:
        if negative_prompt is not None and negative_embeds is not None:
            raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
        if negative_prompt is not None:
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            if (not isinstance(negatives, list) or len(negatives) not in (1, batch)
                    or not all(isinstance(n, str) for n in negatives)):
                raise ValueError(
                    f"negative_prompt must be a string or a list of {batch} strings (one per prompt), "
                    f"got {negative_prompt!r}"
                )
        if negative_embeds is None:
            if negative_mask is not None:
                raise ValueError("negative_prompt_attention_mask goes with negative_prompt_embeds; pass both or "
                                 "neither")
            return
        self._check_embeds("negative_prompt_embeds", negative_embeds, "negative_prompt_attention_mask", negative_mask)
        if negative_embeds.shape[0] != batch:
            raise ValueError(f"negative_prompt_embeds has {negative_embeds.shape[0]} rows but there are {batch} "
                             "prompts: pass one negative embedding per prompt (num_images_per_prompt repeats both)")
        if prompt_embeds is not None and negative_embeds.shape[2] != prompt_embeds.shape[2]:
            raise ValueError(f"negative_prompt_embeds has {negative_embeds.shape[2]} channels but prompt_embeds has "
                             f"{prompt_embeds.shape[2]}; encode both with the same text encoder")

    def _check_embeds(self, name: str, embeds, mask_name: str, mask) -> None:
        if not torch.is_tensor(embeds) or embeds.ndim != 3 or not embeds.is_floating_point():
            raise ValueError(f"{name} must be a float tensor (batch, tokens, channels) from pipe.encode_prompt, got "
                             f"{type(embeds).__name__} {tuple(getattr(embeds, 'shape', ()))}")
        text_dim = self.transformer.config.text_dim if getattr(self, "transformer", None) is not None else None
        if text_dim is not None and embeds.shape[2] != text_dim:
            raise ValueError(f"{name} has {embeds.shape[2]} channels but the transformer takes text_dim={text_dim}; "
                             "encode the prompt with this pipeline's text encoder")
        if mask is None:
            raise ValueError(f"{name} needs {mask_name} ((batch, tokens), True/1 for real tokens), which "
                             "pipe.encode_prompt returns with it")
        if not torch.is_tensor(mask) or tuple(mask.shape) != tuple(embeds.shape[:2]):
            raise ValueError(f"{mask_name} must be a tensor of shape {tuple(embeds.shape[:2])} (the batch and tokens "
                             f"of {name}), got {type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}")

    def prepare_schedule(self, height: int, width: int) -> ScaleSchedule:
        """The Infinity schedule for ``height x width`` (nearest template and pixel budget)."""
        max_scales = self.transformer.config.num_scale_embeddings
        schedule = ScaleSchedule.for_image_size(height, width, self.vae_stride, max_scales=max_scales)
        if (schedule.height, schedule.width) != (height, width):
            raise ValueError(
                f"{height}x{width} is not a size this model draws; the nearest is "
                f"{schedule.height}x{schedule.width} (Infinity's templates fix the size per aspect ratio and pixel "
                f"budget). Pass height={schedule.height}, width={schedule.width}."
            )
        return schedule

    # ----------------------------------------------------------------------------------------------------------------
    # 2. text
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = False,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Text features ``(B * n, T, C)`` and their key mask ``(B * n, T)`` bool (padding is masked; Infinity keeps
        only the unpadded tokens, which is the same thing). Needs only the tokenizer and the text encoder.

        Args:
            prompt: text or list of texts (None when ``prompt_embeds`` is given).
            device: where the features go (default: the pipeline's execution device).
            num_images_per_prompt: ``n``; each prompt's rows are repeated ``n`` times in a row.
            do_classifier_free_guidance: also return the negative branch (see Returns).
            negative_prompt: encoded for the guidance branch when given; without it the transformer's learned
                unconditional embedding is used, which is not a text feature, so the negative outputs are None.
            prompt_embeds, prompt_attention_mask: precomputed features (e.g. cached or weighted) instead of
                ``prompt``; a missing mask means every token is real.
            negative_prompt_embeds, negative_prompt_attention_mask: likewise for the negative branch.
            max_sequence_length: text token limit (default and upper bound: the transformer's ``max_text_len``, the
                rows of its learned unconditional embedding; 512 without a transformer). Longer prompts are cut
                with a warning naming the dropped text.

        Returns:
            ``(prompt_embeds, prompt_attention_mask)``, and with ``do_classifier_free_guidance=True`` also
            ``(negative_prompt_embeds, negative_prompt_attention_mask)`` (None without a negative prompt): pass them
            to ``__call__`` under the same names.
        """
        device = device or self._execution_device
        limit = self._text_limit(max_sequence_length)
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("encode_prompt needs a prompt (a string or a list of strings) or prompt_embeds")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds, prompt_attention_mask = self._encode_text(prompts, device, limit)
        prompt_embeds, prompt_attention_mask = self._prepare_embeds(prompt_embeds, prompt_attention_mask, device,
                                                                    num_images_per_prompt)
        if not do_classifier_free_guidance:
            return prompt_embeds, prompt_attention_mask
        if negative_prompt_embeds is None and negative_prompt is not None:
            batch = prompt_embeds.shape[0] // num_images_per_prompt
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            negatives = negatives * batch if len(negatives) == 1 else negatives
            negative_prompt_embeds, negative_prompt_attention_mask = self._encode_text(negatives, device, limit)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds, negative_prompt_attention_mask = self._prepare_embeds(
                negative_prompt_embeds, negative_prompt_attention_mask, device, num_images_per_prompt)
        return prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask

    def _text_limit(self, max_sequence_length: int | None) -> int:
        """Text tokens kept: ``max_sequence_length`` capped at the transformer's ``max_text_len``."""
        if getattr(self, "transformer", None) is None:
            return max_sequence_length or DEFAULT_TEXT_LIMIT
        max_text_len = self.transformer.config.max_text_len
        return min(max_sequence_length or max_text_len, max_text_len)

    def _encode_text(self, prompts: list[str], device: torch.device, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, C) text-encoder features and (B, T) mask, cut at ``limit`` tokens (with a warning)."""
        tokens = self.tokenizer(prompts, padding="longest", truncation=True, max_length=limit, return_tensors="pt")
        if tokens.input_ids.shape[1] >= limit:
            self._warn_truncated(prompts, limit)
        input_ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        return self.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state, mask

    def _warn_truncated(self, prompts: list[str], limit: int) -> None:
        """Warn, as diffusers' pipelines do, for every prompt cut at ``limit`` tokens: how many tokens and which
        text were dropped."""
        full_ids = self.tokenizer(prompts, padding=False, truncation=False).input_ids
        start = limit - 1 if self.tokenizer.num_special_tokens_to_add() > 0 else limit  # the end token is kept
        for i, ids in enumerate(full_ids):
            if len(ids) > limit:
                dropped = self.tokenizer.decode(ids[start:], skip_special_tokens=True)
                logger.warning(
                    f"prompt {i} has {len(ids)} text tokens but the limit is {limit} (max_sequence_length, at most "
                    f"the transformer's max_text_len): its last {len(ids) - limit} tokens were dropped: {dropped!r}"
                )

    def _prepare_embeds(self, embeds_BTC, mask_BT, device, num_images_per_prompt):
        """Move to ``device`` (and the transformer's dtype), default the mask to all-real, repeat per image."""
        dtype = self.transformer.dtype if getattr(self, "transformer", None) is not None else embeds_BTC.dtype
        embeds_BTC = embeds_BTC.to(device=device, dtype=dtype)
        if mask_BT is None:
            mask_BT = torch.ones(embeds_BTC.shape[:2], dtype=torch.bool, device=device)
        mask_BT = mask_BT.to(device).bool()
        return (embeds_BTC.repeat_interleave(num_images_per_prompt, dim=0),
                mask_BT.repeat_interleave(num_images_per_prompt, dim=0))

    def _guidance_condition(self, states_BTC, mask_BT, negative_states, negative_mask, guidance_scale):
        """Prepared condition for the batch actually run: ``[cond; uncond]`` with guidance, else ``cond``."""
        if guidance_scale == 1.0:
            return self.transformer.prepare_condition(states_BTC, mask_BT)
        if negative_states is None:  # Infinity: the learned uncond embeddings, as many tokens as the prompt
            negative_states = self.transformer.unconditional_states(states_BTC.shape[0], states_BTC.shape[1])
            negative_states, negative_mask = negative_states.to(states_BTC), mask_BT
        length = max(states_BTC.shape[1], negative_states.shape[1])
        states = torch.cat([_pad(states_BTC, length), _pad(negative_states.to(states_BTC), length)])
        mask = torch.cat([_pad(mask_BT, length), _pad(negative_mask.to(mask_BT), length)])
        return self.transformer.prepare_condition(states, mask)

    # ----------------------------------------------------------------------------------------------------------------
    # 3. generation
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float = 4.0,
        temperature: float = 0.5,
        top_k: int = 900,
        top_p: float = 0.97,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        return_trajectory: bool = False,
        max_sequence_length: int | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        attention_kwargs: dict | None = None,
    ) -> VARPipelineOutput | tuple:
        """Generate images scale by scale.

        Args:
            prompt: text or list of texts (or pass ``prompt_embeds``).
            negative_prompt: replaces the learned unconditional embedding in the guidance branch.
            height, width: image size in pixels (default: the model's ``sample_size``); must be a size of one of
                Infinity's aspect-ratio templates at some pixel budget (e.g. 1024x1024, 512x512, 864x1152).
            guidance_scale: ``g`` in ``g * cond + (1 - g) * uncond`` on logits; 1 disables guidance. Finite, >= 0.
            temperature: logits are divided by it before sampling (Infinity's tau). Finite, > 0.
            top_k, top_p: per-bit filtering (top_k >= 2 has no effect on 2-way bits, 1 is greedy; top_p in (0, 1]).
            num_images_per_prompt: images per prompt.
            generator: a ``torch.Generator`` or one per image; the same generator gives the same images.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` (images in [0, 1]) or ``"latent"`` (the accumulated latent
                ``(B, d, H, W)`` that the VAE decodes).
            callback_on_step_end: ``fn(pipe, i, t, callback_kwargs) -> dict`` after every scale ``i`` (``t`` is the
                scale index too: VAR has no timesteps; the scale's grid is ``schedule.grids[i]``), or a diffusers
                ``PipelineCallback``. ``callback_kwargs`` holds the tensors named in
                ``callback_on_step_end_tensor_inputs``; the tensors the callback returns replace the pipeline's state
                for the next scale: a returned ``latents`` replaces the latent; otherwise a returned ``bits`` or
                ``f_hat`` (a new tensor) rebuilds it as ``f_hat + codes(bits)``. The callback may also change
                ``pipe._guidance_scale`` or set ``pipe._interrupt = True``.
            callback_on_step_end_tensor_inputs: names from ``_callback_tensor_inputs`` (default ``["latents"]``):
                ``"latents"`` (B, d, H, W), the accumulated latent after this scale's codes are added; ``"f_hat"``,
                the latent before them (None at scale 0); ``"bits"`` (B, h*w, d), this scale's sampled bits.
            return_trajectory: also return the sampled bits, teacher-forcing inputs, guided logits and conditional
                logits (:class:`VARTrajectory`).
            max_sequence_length: cap on text tokens (default the transformer's ``max_text_len``); longer prompts are
                cut with a warning.
            prompt_embeds, prompt_attention_mask: text features and mask from :meth:`encode_prompt` instead of
                ``prompt``.
            negative_prompt_embeds, negative_prompt_attention_mask: likewise instead of ``negative_prompt``.
            attention_kwargs: ``{"scale": s}`` multiplies the scale of every loaded LoRA adapter by ``s`` for this
                call (diffusers' ``scale_lora_layers``; the same as ``set_adapters`` with that weight, or
                ``fuse_lora(lora_scale=s)``); the adapters' scales are restored afterwards.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = ["latents"]
        height = self.transformer.config.sample_size if height is None else height
        width = self.transformer.config.sample_size if width is None else width
        self.check_inputs(prompt, negative_prompt, height, width, guidance_scale, temperature, top_k, top_p,
                          num_images_per_prompt, output_type, callback_on_step_end_tensor_inputs, prompt_embeds,
                          prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask,
                          attention_kwargs, max_sequence_length)
        self._guidance_scale, self._attention_kwargs, self._interrupt = guidance_scale, attention_kwargs, False
        device = self._execution_device
        schedule = self.prepare_schedule(height, width)
        lora_scale = (attention_kwargs or {}).get("scale")

        with self._lora_scaled(lora_scale):
            # text: positive and (optional) negative prompt, then the guidance batch
            encoded = self.encode_prompt(
                prompt, device, num_images_per_prompt, self.do_classifier_free_guidance, negative_prompt,
                prompt_embeds, negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask,
                max_sequence_length,
            )
            states, mask, neg_states, neg_mask = encoded if len(encoded) == 4 else (*encoded, None, None)
            condition = self._guidance_condition(states, mask, neg_states, neg_mask, guidance_scale)
            latents, trajectory = self._sample_scales(
                schedule, condition, states.shape[0], guidance_scale, temperature, top_k, top_p, generator,
                callback_on_step_end, callback_on_step_end_tensor_inputs, return_trajectory,
            )
        images = self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, trajectory) if return_trajectory else (images,)
        return VARPipelineOutput(images=images, trajectory=trajectory)

    @contextmanager
    def _lora_scaled(self, scale: float | None):
        """Every loaded LoRA adapter's scale multiplied by ``scale`` inside the block (diffusers'
        ``scale_lora_layers``), and restored exactly afterwards (also for ``scale=0``, which
        ``unscale_lora_layers`` cannot undo)."""
        if scale is None or scale == 1.0:
            yield
            return
        saved = [(layer, dict(layer.scaling)) for layer in adapter_layers(self.transformer)
                 if isinstance(getattr(layer, "scaling", None), dict)]
        scale_lora_layers(self.transformer, scale)
        try:
            yield
        finally:
            for layer, scaling in saved:
                layer.scaling.update(scaling)

    def _sample_scales(self, schedule, condition, batch, guidance_scale, temperature, top_k, top_p, generator,
                       callback, callback_inputs, return_trajectory):
        """Infinity's scale loop. Returns the accumulated latent (B, d, H, W) and the trajectory if asked.

        ``guidance_scale`` decides whether the batch holds the unconditional half; the value applied at each scale
        is ``self.guidance_scale``, which a callback may change.
        """
        quantizer = self.vae.quantizer
        self._guidance_scale, self._num_timesteps, self._interrupt = guidance_scale, schedule.num_scales, False
        step = self._scale_step(schedule, condition)
        guided = guidance_scale != 1.0
        latents, inputs_Bld = None, None
        all_bits, all_inputs, all_logits, all_cond = [], [], [], []
        with self.progress_bar(total=schedule.num_scales) as progress_bar:
            for k, grid in enumerate(schedule.grids):
                if self.interrupt:
                    break
                x = None if inputs_Bld is None else inputs_Bld.to(self.transformer.dtype)
                if x is not None and guided:
                    x = torch.cat([x, x])
                logits = cond = step(x, k).float()  # (B or 2B, hw, 2d)
                if guided:
                    cond, uncond = logits.chunk(2)
                    logits = guide_logits(cond, uncond, self._scale_guidance(guided))
                else:
                    self._scale_guidance(guided)
                bits_Bld = sample_bits(logits, temperature, top_k, top_p, generator)
                previous = latents
                latents = quantizer.accumulate(previous, quantizer.bits_to_codes(bits_Bld, grid), k, schedule)
                if callback is not None:
                    latents, bits_Bld = self._run_callback(callback, callback_inputs, k, schedule, previous, latents,
                                                           bits_Bld)
                if return_trajectory:
                    all_bits.append(bits_Bld)
                    all_logits.append(logits / temperature)
                    all_cond.append(cond)
                if k + 1 < schedule.num_scales:
                    inputs_Bld = quantizer.next_scale_input(latents, k, schedule)
                    if return_trajectory and not self.interrupt:
                        all_inputs.append(inputs_Bld)
                progress_bar.update()
        trajectory = None
        if return_trajectory:
            d = all_bits[0].shape[-1]
            inputs = torch.cat(all_inputs, 1) if all_inputs else latents.new_zeros(batch, 0, d)
            trajectory = VARTrajectory(torch.cat(all_bits, 1), inputs, torch.cat(all_logits, 1), schedule,
                                       torch.cat(all_cond, 1))
        return latents, trajectory

    def _scale_guidance(self, guided: bool) -> float:
        """The guidance scale of this scale (``self.guidance_scale``, which a callback may have changed)."""
        g = self._guidance_scale
        _check_finite("guidance_scale", g)
        check_sampling_args(g, 1.0, 0, 1.0)
        if not guided and g != 1.0:
            raise ValueError(f"guidance_scale was set to {g} during a run that started without guidance "
                             "(guidance_scale=1), so there is no unconditional branch to guide with; start the run "
                             "with guidance and set pipe._guidance_scale = 1.0 from the callback to turn it off")
        return g

    def _run_callback(self, callback, names, k, schedule, previous, latents, bits_Bld):
        """Call ``callback`` after scale ``k``; returns the (possibly replaced) latent and bits."""
        tensors = {"latents": latents, "f_hat": previous, "bits": bits_Bld}
        out = callback(self, k, k, {name: tensors[name] for name in names})
        out = {} if out is None else out
        if not isinstance(out, dict):
            raise TypeError(f"callback_on_step_end must return a dict of tensors (or None), got {type(out).__name__}")
        unknown = sorted(set(out) - set(self._callback_tensor_inputs))
        if unknown:
            raise ValueError(f"callback_on_step_end returned {unknown}; only {self._callback_tensor_inputs} replace "
                             "the pipeline's state")
        new_bits, new_previous = out.get("bits", bits_Bld), out.get("f_hat", previous)
        _check_same_shape("bits", new_bits, bits_Bld)
        _check_same_shape("f_hat", new_previous, previous)
        new_latents = out.get("latents", latents)
        if new_latents is not latents:
            _check_same_shape("latents", new_latents, latents)
            return new_latents, new_bits
        if new_bits is not bits_Bld or new_previous is not previous:  # rebuild from the replaced parts
            codes = self.vae.quantizer.bits_to_codes(new_bits, schedule.grids[k])
            new_latents = self.vae.quantizer.accumulate(new_previous, codes, k, schedule)
        return new_latents, new_bits

    def _scale_step(self, schedule, condition):
        """``step(token_inputs | None, k) -> logits`` of one generation: replayed CUDA graphs when enabled (and the
        condition is on a GPU), else the eager ``transformer.forward_scale`` with a fresh KV cache."""
        graphs = getattr(self, "_cuda_graphs", None)
        if graphs is not None and condition.context_BTC.is_cuda:
            return graphs.generation(schedule, condition)
        cache = self.transformer.new_kv_cache()
        return lambda token_inputs, k: self.transformer.forward_scale(token_inputs, k, schedule, condition, cache)

    def _decode(self, latents_BdHW: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents_BdHW
        images = self.vae.decode(latents_BdHW.to(self.vae.dtype))
        return self.image_processor.postprocess(images.float(), output_type=output_type)

    # ----------------------------------------------------------------------------------------------------------------
    # 4. speed and memory
    def enable_cuda_graphs(self, text_bucket: int = TEXT_BUCKET) -> None:
        """Replay every scale of the transformer as a CUDA graph (:mod:`var_erase.pipelines.cuda_graphs`).

        The first generation of each (size, batch, prompt length rounded up to ``text_bucket`` tokens) captures the
        graphs; later ones replay them, which removes the host's kernel-launch time (most of the early, small scales
        at batch 1). The text is padded with masked tokens to that length, so the images are the same as without
        graphs; ``text_bucket=1`` captures each prompt length apart. The graphs keep their key/value buffers between
        calls (about 5.5 GB for one guided 1024x1024 image of Infinity-2B); :meth:`disable_cuda_graphs` frees them.
        Loading, switching or fusing LoRA adapters is detected and the graphs are captured again (so is a call with
        ``attention_kwargs={"scale": s}``, and the call after it).
        """
        self._cuda_graphs = ScaleGraphs(self.transformer, text_bucket=text_bucket)

    def disable_cuda_graphs(self) -> None:
        """Go back to eager scale steps and free the graphs' memory."""
        self._cuda_graphs = None

    @property
    def cuda_graphs_enabled(self) -> bool:
        """Whether :meth:`enable_cuda_graphs` is in effect."""
        return getattr(self, "_cuda_graphs", None) is not None

    def enable_attention_slicing(self, slice_size: str | int | None = "auto") -> None:
        """Not supported: raises ``NotImplementedError`` naming what lowers memory instead."""
        raise NotImplementedError(_NOT_SLICED)

    def disable_attention_slicing(self) -> None:
        """Attention is never sliced, so there is nothing to turn off."""

    def enable_xformers_memory_efficient_attention(self, attention_op: Callable | None = None) -> None:
        """Not supported: attention already runs through torch's memory-efficient ``scaled_dot_product_attention``
        kernels; raises ``NotImplementedError``."""
        raise NotImplementedError("VARPipeline has no xformers attention: " + _NOT_SLICED.split(": ", 1)[1])
    # ----------------------------------------------------------------------------------------------------------------
    # 5. loading through DiffusionPipeline (custom_pipeline.py says how diffusers resolves the class)
    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> None:
        """``model_index.json`` plus the small files that let ``DiffusionPipeline.from_pretrained(folder_or_repo,
        trust_remote_code=True)`` load it (``pipeline.py``, ``transformer/transformer_var.py``, ...)."""
        write_custom_code(save_directory, self.config, type(self))
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)

    def to_json_string(self) -> str:
        """diffusers' JSON in its custom-pipeline form: ``_class_name`` ``["pipeline", "VARPipeline"]``."""
        return with_custom_form(super().to_json_string(), type(self))

    @classmethod
    def _dict_from_json_file(cls, json_file: str | os.PathLike) -> dict:
        # diffusers' from_pretrained reads model_index.json through this: an explicit VARPipeline load takes the
        # custom form back as import paths and needs no trust_remote_code (tests/test_custom_pipeline.py)
        return importable_config(super()._dict_from_json_file(json_file))


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 1 of (B, T, ...) to ``length`` (padding keys are masked out)."""
    if x.shape[1] == length:
        return x
    pad = x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], dim=1)


def _callback_tensors(names: list[str], **tensors) -> dict:
    return {name: tensors[name] for name in names}


def _check_finite(name: str, value) -> None:
    """A real, finite number (NaN and infinity would silently give black or noise images)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def _check_attention_kwargs(attention_kwargs) -> None:
    if attention_kwargs is None:
        return
    if not isinstance(attention_kwargs, dict):
        raise ValueError(f"attention_kwargs must be a dict such as {{'scale': 0.5}}, got {attention_kwargs!r}")
    unknown = sorted(set(attention_kwargs) - {"scale"})
    if unknown:
        raise ValueError(f"attention_kwargs {unknown} are not used by VARPipeline; the only key is 'scale' (the "
                         "LoRA scale of this call)")
    if "scale" in attention_kwargs:
        _check_finite("attention_kwargs['scale']", attention_kwargs["scale"])


def _check_same_shape(name: str, new: torch.Tensor | None, old: torch.Tensor | None) -> None:
    """A tensor returned by a callback must have the shape of the one it replaces."""
    if new is old:
        return
    if not torch.is_tensor(new) or old is None or new.shape != old.shape:
        raise ValueError(f"callback_on_step_end returned {name} {type(new).__name__} "
                         f"{tuple(getattr(new, 'shape', ()))}, but it replaces a tensor of shape "
                         f"{tuple(getattr(old, 'shape', ()))}")
