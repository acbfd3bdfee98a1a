"""``VARPipeline``: text-to-image generation with a next-scale (VAR / Infinity) model, diffusers-style.

Reads top to bottom as diffusers pipelines do: ``check_inputs`` -> ``encode_prompt`` -> ``prepare_schedule`` ->
``__call__`` (scale loop with ``self.progress_bar`` and ``callback_on_step_end``) -> decode.

The scale loop is Infinity's ``autoregressive_infer_cfg`` (research/var_models.md §1.4): the positive and the
unconditional branch run as one batch through the transformer with a KV cache; guidance is applied on the logits; each
bit is sampled independently; the sampled codes are accumulated on the final latent grid, and the next scale's input is
that map resized to the next grid. With ``return_trajectory=True`` the pipeline also returns what S-VARE's auxiliary
visual tokens are made of: the sampled bits of every scale, the teacher-forcing inputs that replay them, the guided
logits they were drawn from, and the conditional branch's logits (kept from the guidance batch, so no second forward).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput

from ..loaders.lora import VARLoraLoaderMixin
from ..models.autoencoder_bsq import BSQAutoencoder
from ..models.transformer_var import VARTransformer2DModel
from ..schedules import ScaleSchedule
from .cuda_graphs import TEXT_BUCKET, ScaleGraphs
from .custom_pipeline import importable_config, with_custom_form, write_custom_code
from .sampling import check_sampling_args, guide_logits, sample_bits


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
        transformer: a :class:`VARTransformer2DModel`.
        vae: a :class:`BSQAutoencoder`.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["f_hat", "bits"]

    def __init__(self, tokenizer, text_encoder, transformer: VARTransformer2DModel, vae: BSQAutoencoder):
        super().__init__()
        self.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_stride, do_normalize=True)

    @property
    def vae_stride(self) -> int:
        return self.vae.vae_stride if getattr(self, "vae", None) is not None else 16

    # ----------------------------------------------------------------------------------------------------------------
    # 1. inputs
    def check_inputs(self, prompt, negative_prompt, height, width, guidance_scale, temperature, top_k, top_p,
                     num_images_per_prompt, output_type, callback_on_step_end_tensor_inputs) -> None:
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a non-empty string or a non-empty list of strings, got {prompt!r}")
        if negative_prompt is not None:
            negatives = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            if not isinstance(negatives, list) or len(negatives) not in (1, len(prompts)):
                raise ValueError(
                    f"negative_prompt must be a string or a list of {len(prompts)} strings (one per prompt), "
                    f"got {negative_prompt!r}"
                )
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer number of pixels, got {value!r}")
            if value % self.vae_stride:
                raise ValueError(f"{name}={value} is not a multiple of the VAE stride {self.vae_stride}")
        check_sampling_args(guidance_scale, temperature, top_k, top_p)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be one of 'pil', 'np', 'pt', 'latent', got {output_type!r}")
        unknown = set(callback_on_step_end_tensor_inputs or []) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {sorted(unknown)} not in {self._callback_tensor_inputs}"
            )

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
        prompt: str | list[str],
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        max_sequence_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text features ``(B * n, T, C)`` and key mask ``(B * n, T)`` bool; padding is masked (Infinity keeps
        only the unpadded tokens, which is the same thing)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = device or self._execution_device
        max_len = min(max_sequence_length or self.transformer.config.max_text_len,
                      self.transformer.config.max_text_len)
        tokens = self.tokenizer(prompts, padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
        input_ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        states = self.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        states = states.to(dtype=self.transformer.dtype)
        states = states.repeat_interleave(num_images_per_prompt, dim=0)
        mask = mask.bool().repeat_interleave(num_images_per_prompt, dim=0)
        return states, mask

    def _guidance_condition(self, states_BTC, mask_BT, negative_states, negative_mask, guidance_scale):
        """Prepared condition for the batch actually run: ``[cond; uncond]`` with guidance, else ``cond``."""
        if guidance_scale == 1.0:
            return self.transformer.prepare_condition(states_BTC, mask_BT)
        if negative_states is None:  # Infinity: the learned uncond embeddings, as many tokens as the prompt
            negative_states = self.transformer.unconditional_states(states_BTC.shape[0], states_BTC.shape[1])
            negative_states, negative_mask = negative_states.to(states_BTC), mask_BT
        length = max(states_BTC.shape[1], negative_states.shape[1])
        states = torch.cat([_pad(states_BTC, length), _pad(negative_states, length)])
        mask = torch.cat([_pad(mask_BT, length), _pad(negative_mask, length)])
        return self.transformer.prepare_condition(states, mask)

    # ----------------------------------------------------------------------------------------------------------------
    # 3. generation
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
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
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        return_trajectory: bool = False,
        max_sequence_length: int | None = None,
    ) -> VARPipelineOutput | tuple:
        """Generate images scale by scale.

        Args:
            prompt: text or list of texts.
            negative_prompt: replaces the learned unconditional embedding in the guidance branch.
            height, width: image size in pixels (default: the model's ``sample_size``); must be a size of one of
                Infinity's aspect-ratio templates at some pixel budget (e.g. 1024x1024, 512x512, 864x1152).
            guidance_scale: ``g`` in ``g * cond + (1 - g) * uncond`` on logits; 1 disables guidance.
            temperature: logits are divided by it before sampling (Infinity's tau).
            top_k, top_p: per-bit filtering (top_k >= 2 has no effect on 2-way bits, 1 is greedy).
            num_images_per_prompt: images per prompt.
            generator: a ``torch.Generator`` or one per image; the same generator gives the same images.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` (images in [0, 1]) or ``"latent"`` (the summed code map).
            callback_on_step_end: ``fn(pipe, scale_index, scale_index, tensors) -> dict`` after every scale;
                tensors named in ``callback_on_step_end_tensor_inputs`` (``"f_hat"``, ``"bits"``) may be replaced.
            return_trajectory: also return the sampled bits, teacher-forcing inputs, guided logits and conditional
                logits (:class:`VARTrajectory`).
            max_sequence_length: cap on text tokens (default the transformer's ``max_text_len``).
        """
        height = self.transformer.config.sample_size if height is None else height
        width = self.transformer.config.sample_size if width is None else width
        self.check_inputs(prompt, negative_prompt, height, width, guidance_scale, temperature, top_k, top_p,
                          num_images_per_prompt, output_type, callback_on_step_end_tensor_inputs)
        device = self._execution_device
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts) * num_images_per_prompt
        schedule = self.prepare_schedule(height, width)

        # text: positive and (optional) negative prompt, then the guidance batch
        states, mask = self.encode_prompt(prompts, device, num_images_per_prompt, max_sequence_length)
        neg_states = neg_mask = None
        if negative_prompt is not None and guidance_scale != 1.0:
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
            negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
            neg_states, neg_mask = self.encode_prompt(negatives, device, num_images_per_prompt, max_sequence_length)
        condition = self._guidance_condition(states, mask, neg_states, neg_mask, guidance_scale)

        f_hat, trajectory = self._sample_scales(
            schedule, condition, batch, guidance_scale, temperature, top_k, top_p, generator,
            callback_on_step_end, callback_on_step_end_tensor_inputs or [], return_trajectory,
        )
        images = self._decode(f_hat, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, trajectory) if return_trajectory else (images,)
        return VARPipelineOutput(images=images, trajectory=trajectory)

    def _sample_scales(self, schedule, condition, batch, guidance_scale, temperature, top_k, top_p, generator,
                       callback, callback_inputs, return_trajectory):
        """Infinity's scale loop. Returns the summed code map f_hat (B, d, H, W) and the trajectory if asked."""
        transformer, quantizer = self.transformer, self.vae.quantizer
        step = self._scale_step(schedule, condition)
        guided = guidance_scale != 1.0
        f_hat, inputs_Bld = None, None
        all_bits, all_inputs, all_logits, all_cond = [], [], [], []
        with self.progress_bar(total=schedule.num_scales) as progress_bar:
            for k, grid in enumerate(schedule.grids):
                x = None if inputs_Bld is None else inputs_Bld.to(transformer.dtype)
                if x is not None and guided:
                    x = torch.cat([x, x])
                logits = cond = step(x, k).float()  # (B or 2B, hw, 2d)
                if guided:
                    cond, uncond = logits.chunk(2)
                    logits = guide_logits(cond, uncond, guidance_scale)
                bits_Bld = sample_bits(logits, temperature, top_k, top_p, generator)
                if callback is not None:
                    out = callback(self, k, k, _callback_tensors(callback_inputs, f_hat=f_hat, bits=bits_Bld)) or {}
                    bits_Bld = out.get("bits", bits_Bld)
                    f_hat = out.get("f_hat", f_hat)
                codes = quantizer.bits_to_codes(bits_Bld, grid)
                f_hat = quantizer.accumulate(f_hat, codes, k, schedule)
                if return_trajectory:
                    all_bits.append(bits_Bld)
                    all_logits.append(logits / temperature)
                    all_cond.append(cond)
                if k + 1 < schedule.num_scales:
                    inputs_Bld = quantizer.next_scale_input(f_hat, k, schedule)
                    if return_trajectory:
                        all_inputs.append(inputs_Bld)
                progress_bar.update()
        trajectory = None
        if return_trajectory:
            d = all_bits[0].shape[-1]
            inputs = torch.cat(all_inputs, 1) if all_inputs else f_hat.new_zeros(batch, 0, d)
            trajectory = VARTrajectory(torch.cat(all_bits, 1), inputs, torch.cat(all_logits, 1), schedule,
                                       torch.cat(all_cond, 1))
        return f_hat, trajectory

    def _scale_step(self, schedule, condition):
        """``step(token_inputs | None, k) -> logits`` of one generation: replayed CUDA graphs when enabled (and the
        condition is on a GPU), else the eager ``transformer.forward_scale`` with a fresh KV cache."""
        graphs = getattr(self, "_cuda_graphs", None)
        if graphs is not None and condition.context_BTC.is_cuda:
            return graphs.generation(schedule, condition)
        cache = self.transformer.new_kv_cache()
        return lambda token_inputs, k: self.transformer.forward_scale(token_inputs, k, schedule, condition, cache)

    def _decode(self, f_hat_BdHW: torch.Tensor, output_type: str):
        if output_type == "latent":
            return f_hat_BdHW
        images = self.vae.decode(f_hat_BdHW.to(self.vae.dtype))
        return self.image_processor.postprocess(images.float(), output_type=output_type)

    # ----------------------------------------------------------------------------------------------------------------
    # 4. speed
    def enable_cuda_graphs(self, text_bucket: int = TEXT_BUCKET) -> None:
        """Replay every scale of the transformer as a CUDA graph (:mod:`var_erase.pipelines.cuda_graphs`).

        The first generation of each (size, batch, prompt length rounded up to ``text_bucket`` tokens) captures the
        graphs; later ones replay them, which removes the host's kernel-launch time (most of the early, small scales
        at batch 1). The text is padded with masked tokens to that length, so the images are the same as without
        graphs; ``text_bucket=1`` captures each prompt length apart. The graphs keep their key/value buffers between
        calls (about 5.5 GB for one guided 1024x1024 image of Infinity-2B); :meth:`disable_cuda_graphs` frees them.
        Loading, switching or fusing LoRA adapters is detected and the graphs are captured again.
        """
        self._cuda_graphs = ScaleGraphs(self.transformer, text_bucket=text_bucket)

    def disable_cuda_graphs(self) -> None:
        """Go back to eager scale steps and free the graphs' memory."""
        self._cuda_graphs = None

    @property
    def cuda_graphs_enabled(self) -> bool:
        """Whether :meth:`enable_cuda_graphs` is in effect."""
        return getattr(self, "_cuda_graphs", None) is not None

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
