"""BSQAutoencoder: Infinity's BSQ VAE as a diffusers model (conv encoder, multi-scale BSQ, conv decoder).

Infinity's tokenizer (``infinity/models/bsq_vae/flux_vqgan.py`` ``AutoEncoder``) is a Flux/LDM-style convolutional
encoder and decoder with no attention, no quant/post-quant convolutions and no projection around the quantizer: the
encoder writes ``codebook_dim`` channels that :class:`~var_erase.models.quantizer.MultiScaleBSQ` quantizes directly.
diffusers' ``Encoder``/``Decoder`` built as below have exactly its layers, so the official weights load into
``encoder``/``decoder`` with ``strict=True`` after a key rename (``var_erase.conversion``). The quantizer has no
parameters, so ``encoder`` and ``decoder`` hold every weight of this model.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import Decoder, Encoder
from diffusers.utils.accelerate_utils import apply_forward_hook

from ..schedules import ScaleSchedule
from .quantizer import MultiScaleBSQ


class BSQAutoencoder(ModelMixin, ConfigMixin):
    """Image <-> multi-scale bit tokens. Infinity-2B's VAE is the default config (``infinity_vae_d32reg``).

    Args:
        in_channels / out_channels: image channels.
        block_out_channels: channels per resolution level; the image is downsampled ``len - 1`` times by 2, so the
            VAE stride is ``2 ** (len(block_out_channels) - 1)`` (16 for Infinity).
        layers_per_block: resnets per encoder level (the decoder has one more, as Infinity's).
        norm_num_groups: GroupNorm groups (eps 1e-6, as Infinity).
        codebook_dim: latent channels = bits per token ``d``.
        down_mode / up_mode: the quantizer's resize modes (see :class:`MultiScaleBSQ`).

    ``encode`` and ``decode`` trigger ``enable_model_cpu_offload``'s hook as ``forward`` does (diffusers'
    ``apply_forward_hook``), and block-level group offloading groups the blocks inside ``encoder`` and ``decoder``.
    """

    _group_offload_block_modules = ["encoder", "decoder"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 512),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        codebook_dim: int = 32,
        down_mode: str = "area",
        up_mode: str = "bilinear",
    ) -> None:
        super().__init__()
        block_out_channels = tuple(block_out_channels)
        num_levels = len(block_out_channels)
        # 1. encoder: image -> unquantized latent with codebook_dim channels (no double_z, no attention)
        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=codebook_dim,
            down_block_types=("DownEncoderBlock2D",) * num_levels,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn="silu",
            double_z=False,
            mid_block_add_attention=False,
        )
        # 2. quantizer: parameter-free multi-scale BSQ
        self.quantizer = MultiScaleBSQ(codebook_dim=codebook_dim, down_mode=down_mode, up_mode=up_mode)
        # 3. decoder: quantized latent -> image
        self.decoder = Decoder(
            in_channels=codebook_dim,
            out_channels=out_channels,
            up_block_types=("UpDecoderBlock2D",) * num_levels,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            act_fn="silu",
            mid_block_add_attention=False,
        )

    @property
    def vae_stride(self) -> int:
        """Pixels per latent cell: ``2 ** (len(block_out_channels) - 1)``."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @apply_forward_hook
    def encode(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Images in ``[-1, 1]``, ``(B, C, H, W)`` with ``H, W`` multiples of :attr:`vae_stride`, to the unquantized
        latent ``f_BdHW`` ``(B, codebook_dim, H / stride, W / stride)``."""
        self._check_images(images_B3HW)
        return self.encoder(images_B3HW.to(self.dtype))

    @apply_forward_hook
    def decode(self, f_hat_BdHW: torch.Tensor) -> torch.Tensor:
        """A (quantized) latent ``(B, codebook_dim, h, w)`` to images in ``[-1, 1]`` (clamped, as Infinity's
        ``AutoEncoder.decode``), ``(B, out_channels, h * stride, w * stride)``."""
        return self._decode_unclamped(f_hat_BdHW).clamp(-1, 1)

    def forward(
        self, images_B3HW: torch.Tensor, schedule: ScaleSchedule
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode, quantize over ``schedule`` and decode, for training the VAE through the quantizer.

        The quantizer passes gradients straight through. As in Infinity's ``AutoEncoder.forward`` the reconstruction
        is **not** clamped, so a reconstruction loss still has gradients where the decoder overshoots ``[-1, 1]``;
        use :meth:`decode` for images.

        Returns:
            ``(reconstruction_B3HW, bits)``: ``bits`` is ``K`` long tensors ``(B, h_k*w_k, codebook_dim)``.
        """
        self._check_images(images_B3HW)
        height, width = images_B3HW.shape[-2:]
        if (height, width) != (schedule.height, schedule.width) or schedule.vae_stride != self.vae_stride:
            raise ValueError(
                f"images are {height}x{width} with VAE stride {self.vae_stride}, but the schedule draws "
                f"{schedule.height}x{schedule.width} with stride {schedule.vae_stride}; build the schedule for this "
                f"image size and stride, e.g. ScaleSchedule.from_patch_nums(..., vae_stride={self.vae_stride}) ending "
                f"at {height // self.vae_stride}x{width // self.vae_stride}"
            )
        f_hat_BdHW, bits = self.quantizer.quantize(self.encode(images_B3HW), schedule)
        return self._decode_unclamped(f_hat_BdHW), bits

    def _decode_unclamped(self, f_hat_BdHW: torch.Tensor) -> torch.Tensor:
        codebook_dim = self.config.codebook_dim
        if f_hat_BdHW.ndim != 4 or f_hat_BdHW.shape[1] != codebook_dim:
            raise ValueError(
                f"latents must be (B, {codebook_dim}, h, w) (codebook_dim channels), got {tuple(f_hat_BdHW.shape)}"
                + ("; squeeze Infinity's T=1 axis with .squeeze(2)" if f_hat_BdHW.ndim == 5 else "")
            )
        return self.decoder(f_hat_BdHW.to(self.dtype))

    def _check_images(self, images_B3HW: torch.Tensor) -> None:
        in_channels, stride = self.config.in_channels, self.vae_stride
        if images_B3HW.ndim != 4 or images_B3HW.shape[1] != in_channels:
            raise ValueError(
                f"images must be (B, {in_channels}, H, W) in [-1, 1], got shape {tuple(images_B3HW.shape)}; "
                f"convert to {in_channels} channels (e.g. RGB) and add a batch axis"
            )
        height, width = images_B3HW.shape[-2:]
        if height % stride or width % stride:
            raise ValueError(
                f"image size {height}x{width} is not divisible by the VAE stride {stride}; resize or crop to "
                f"{height // stride * stride or stride}x{width // stride * stride or stride}"
            )
