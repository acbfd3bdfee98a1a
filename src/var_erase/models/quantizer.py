"""Multi-scale binary spherical quantization (BSQ): Infinity's visual tokenizer, without parameters.

A VAE latent ``f`` of shape ``(B, d, H, W)`` becomes ``K`` grids of ``d``-bit tokens, coarse to fine (the grids of a
:class:`~var_erase.schedules.ScaleSchedule`). Every token is a point of the implicit codebook of all ``2**d`` sign
patterns on the unit sphere, ``code = (2 * bit - 1) / sqrt(d)``; scale ``k`` quantizes what the coarser scales left
over (a residual), and the decoder sees the sum of all scales upsampled to ``(H, W)``.

Reference behaviour (``FoundationVision/Infinity``), reproduced here:

- ``BSQ`` with ``new_quant=True`` (``infinity/models/bsq_vae/multiscale_bsq.py``): L2-normalise each token over the
  channel dim, code ``= sign / sqrt(d)`` with ``sign(0) = -1`` (``torch.where(z > 0, 1, -1)``), bit ``= z > 0``, a
  straight-through gradient, always computed in float32.
- ``MultiScaleBSQ.forward``: residual quantization with ``area`` downsampling and ``trilinear`` upsampling.
- ``BitwiseSelfCorrection.flip_requant`` (``infinity/models/bitwise_self_correction.py``): the teacher-forcing inputs
  and bit labels the transformer trains on, with random bit flips fed forward.
- ``Infinity.autoregressive_infer_cfg``: sampled bits to codes, the cumulative map, and the next scale's input, which
  uses the *upsampling* mode for its resize too (commit ``d542c51``).

Layout: latent maps here are 4D ``(B, d, h, w)``; Infinity uses 5D ``(B, d, 1, h, w)``. On a ``T = 1`` volume
``trilinear`` is ``bilinear`` with ``align_corners=False`` (equal up to float32 rounding of the kernels, ~1 ulp) and
``area`` is ``area`` (bit-identical), so ``up_mode="bilinear"`` reproduces Infinity's ``"trilinear"``. Bits are
``(B, h * w, d)`` long tensors of 0/1 in raster (row-major) order, one per scale, or concatenated over scales as
``(B, L, d)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from ..schedules import ScaleSchedule

_RESIZE_MODES = ("area", "bilinear", "bicubic", "nearest", "nearest-exact")


def _resize(x_Bdhw: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize a 4D map; identity (the same tensor) when it already has ``size``, as the reference skips the call."""
    if tuple(x_Bdhw.shape[-2:]) == tuple(size):
        return x_Bdhw
    align_corners = False if mode in ("bilinear", "bicubic") else None
    return F.interpolate(x_Bdhw, size=size, mode=mode, align_corners=align_corners)


def _flatten_tokens(x_Bdhw: torch.Tensor) -> torch.Tensor:
    """(B, d, h, w) -> (B, h*w, d), raster order, contiguous."""
    return x_Bdhw.flatten(2).transpose(1, 2).contiguous()


def _float32_region(device: torch.device) -> AbstractContextManager:
    """Autocast off: the reference forces quantization to full precision (``force_quantization_f32``)."""
    return torch.autocast(device_type=device.type, enabled=False)


class MultiScaleBSQ(nn.Module):
    """Residual multi-scale binary spherical quantizer (Infinity's ``MultiScaleBSQ`` + ``BSQ``), parameter-free.

    Args:
        codebook_dim: bits per token ``d`` (32 for Infinity); the latent has ``d`` channels.
        down_mode: resize of the residual to each scale's grid (Infinity: ``"area"``).
        up_mode: resize of codes to the latent grid and of the cumulative map to the next scale's grid (Infinity's
            ``"trilinear"`` on ``T = 1``, i.e. ``"bilinear"`` here).
    """

    def __init__(self, codebook_dim: int = 32, down_mode: str = "area", up_mode: str = "bilinear") -> None:
        super().__init__()
        if not isinstance(codebook_dim, int) or codebook_dim <= 0:
            raise ValueError(f"codebook_dim must be a positive int, got {codebook_dim!r}")
        for name, mode in (("down_mode", down_mode), ("up_mode", up_mode)):
            if mode == "trilinear":
                raise ValueError(f'{name}="trilinear" is Infinity\'s 5D spelling; latents here are 4D, pass "bilinear"')
            if mode not in _RESIZE_MODES:
                raise ValueError(f"{name} must be one of {_RESIZE_MODES}, got {mode!r}")
        self.codebook_dim = codebook_dim
        self.down_mode = down_mode
        self.up_mode = up_mode
        self.code_scale = 1.0 / math.sqrt(codebook_dim)  # every code entry is +-code_scale: a unit vector

    def extra_repr(self) -> str:
        return f"codebook_dim={self.codebook_dim}, down_mode={self.down_mode!r}, up_mode={self.up_mode!r}"

    # ----------------------------------------------------------------------------------------------------------------
    # one scale
    def bits_to_codes(self, bits_Bld: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Bits of one scale to its code map: ``code = (2 * bit - 1) / sqrt(d)``.

        Infinity's ``BSQ.indices_to_codes(label_type="bit_label")``; it L2-normalises afterwards, which leaves these
        codes unchanged up to float rounding, so we skip it and codes are exactly those :meth:`quantize_tokens` makes.

        Args:
            bits_Bld: ``(B, h*w, d)`` bool or integer 0/1 (any nonzero value counts as 1), raster order.
            grid: ``(h, w)`` of the scale.

        Returns:
            ``codes_Bdhw``, float32 ``(B, d, h, w)``.
        """
        h, w = grid
        self._check_bits(bits_Bld, grid)
        signs_Bld = bits_Bld.to(torch.bool).to(torch.float32) * 2 - 1
        codes_Bld = signs_Bld * self.code_scale
        return codes_Bld.transpose(1, 2).reshape(bits_Bld.shape[0], self.codebook_dim, h, w)

    def quantize_tokens(self, z_Bdhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BSQ of one map: L2-normalise every token over channels, then ``sign / sqrt(d)``.

        As the reference (``BSQ.forward`` with ``new_quant``): in float32, ``bit = z > 0``, so an exact zero (and an
        all-zero token, which normalises to zero) gets bit 0 and code ``-1/sqrt(d)``. When ``z`` requires grad the
        codes carry a straight-through gradient to ``z`` through the normalisation; their values are exact.

        Returns:
            ``(codes_Bdhw, bits_Bld)``: float32 ``(B, d, h, w)`` and long ``(B, h*w, d)``.
        """
        self._check_map(z_Bdhw, "z_Bdhw")
        with _float32_region(z_Bdhw.device):
            unit_Bdhw = F.normalize(z_Bdhw.float(), dim=1)
            positive_Bdhw = unit_Bdhw > 0
            codes_Bdhw = (positive_Bdhw.to(torch.float32) * 2 - 1) * self.code_scale
            if unit_Bdhw.requires_grad:
                codes_Bdhw = codes_Bdhw + (unit_Bdhw - unit_Bdhw.detach())  # value unchanged, gradient of identity
        return codes_Bdhw, _flatten_tokens(positive_Bdhw).long()

    # ----------------------------------------------------------------------------------------------------------------
    # building the cumulative map scale by scale (sampling)
    def accumulate(
        self, f_hat_BdHW: torch.Tensor | None, codes_k_Bdhw: torch.Tensor, k: int, schedule: ScaleSchedule
    ) -> torch.Tensor:
        """Add scale ``k``'s codes, upsampled to the latent grid with ``up_mode``, to the cumulative map.

        The last scale is on the latent grid already and is added as is. Out of place, so autograd sees every step.

        Args:
            f_hat_BdHW: the cumulative map of scales ``< k``, or ``None`` for ``k = 0``.
            codes_k_Bdhw: ``(B, d, h_k, w_k)`` codes of scale ``k`` (:meth:`bits_to_codes`).

        Returns:
            ``(B, d, H, W)`` cumulative map of scales ``<= k``.
        """
        self._check_scale_index(k, schedule)
        if tuple(codes_k_Bdhw.shape[-2:]) != schedule.grids[k]:
            raise ValueError(
                f"codes of scale {k} are {tuple(codes_k_Bdhw.shape[-2:])} but the schedule's grid {k} is "
                f"{schedule.grids[k]}; pass the codes of scale {k} or the schedule they were made with"
            )
        q_up_BdHW = _resize(codes_k_Bdhw, schedule.latent_grid, self.up_mode)
        return q_up_BdHW if f_hat_BdHW is None else f_hat_BdHW + q_up_BdHW

    def next_scale_input(self, f_hat_BdHW: torch.Tensor, k: int, schedule: ScaleSchedule) -> torch.Tensor:
        """The transformer's input for scale ``k + 1``: the cumulative map after scale ``k`` resized to grid ``k + 1``.

        Uses ``up_mode`` for this (down)sizing too, as Infinity's sampler and bitwise self-correction do (commit
        ``d542c51``); its older ``MultiScaleBSQ.forward`` used ``area`` here.

        Returns:
            ``(B, h_{k+1} * w_{k+1}, d)`` in raster order.
        """
        self._check_scale_index(k, schedule)
        if k == schedule.num_scales - 1:
            raise ValueError(f"scale {k} is the last of the schedule; there is no next scale to make an input for")
        return _flatten_tokens(_resize(f_hat_BdHW, schedule.grids[k + 1], self.up_mode))

    def teacher_forcing_inputs(self, bits: list[torch.Tensor], schedule: ScaleSchedule) -> torch.Tensor:
        """Replay given bits scale by scale: the inputs the sampler would build, for one forward over all scales.

        Args:
            bits: ``K`` tensors ``(B, h_k*w_k, d)``, one per scale of ``schedule``.

        Returns:
            ``(B, L - h_0*w_0, d)``: :meth:`next_scale_input` after every scale but the last, concatenated (for
            Infinity, whose first scale is 1x1, ``(B, L - 1, d)``; the first scale's input is the text's start token).
        """
        if len(bits) != schedule.num_scales:
            raise ValueError(
                f"got bits for {len(bits)} scale(s) but the schedule has {schedule.num_scales} scales; "
                f"pass one (B, h_k*w_k, d) tensor per scale"
            )
        f_hat_BdHW = None
        inputs = []
        for k, bits_Bld in enumerate(bits[:-1]):
            f_hat_BdHW = self.accumulate(f_hat_BdHW, self.bits_to_codes(bits_Bld, schedule.grids[k]), k, schedule)
            inputs.append(self.next_scale_input(f_hat_BdHW, k, schedule))
        return self._concat_inputs(inputs, bits[0])

    # ----------------------------------------------------------------------------------------------------------------
    # whole latents
    def quantize(self, f_BdHW: torch.Tensor, schedule: ScaleSchedule) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Residual multi-scale quantization of a latent (Infinity's ``MultiScaleBSQ.forward``).

        For each scale: area-downsample the residual ``f - f_hat`` to the scale's grid (not at the latent grid),
        quantize it, upsample the codes to the latent grid (not at the last scale) and add them to ``f_hat``. The
        residual is taken against a detached ``f_hat`` (the reference's ``residual - quantized.detach()``), so the
        gradient of ``f_hat`` reaches ``f`` straight through every scale and the VAE can be trained through it.

        Args:
            f_BdHW: encoder output ``(B, d, H, W)``, with ``(H, W)`` the schedule's last grid; computed in float32.

        Returns:
            ``(f_hat_BdHW, bits)``: the quantized latent (float32) and ``K`` long tensors ``(B, h_k*w_k, d)``.
        """
        f_hat_BdHW, bits, _ = self._residual_quantize(f_BdHW, schedule, flip=None, with_inputs=False)
        return f_hat_BdHW, bits

    def self_correct(
        self,
        f_BdHW: torch.Tensor,
        schedule: ScaleSchedule,
        strength: float,
        num_layers: int,
        generator: torch.Generator | None = None,
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Infinity's bitwise self-correction (``BitwiseSelfCorrection.flip_requant`` with ``noise_apply_requant``).

        Quantizes as :meth:`quantize`, but for scales ``k < num_layers`` draws ``p = randint(0, 100*strength) / 100``
        (inclusive, one ``p`` per scale for the whole batch; the reference's ``np.random.randint(0, 100*s + 1)``
        truncates a float bound, which drops the top step for strengths like 0.29 or 0.57, but not for the 0.2 / 0.3
        it is used with) and flips every bit with probability ``p``. The labels
        are the *unflipped* bits of each scale's residual; the cumulative map, the next residual and the inputs use
        the *flipped* codes, so later scales learn to correct earlier mistakes. Flipped scales pass no gradient.

        Every random draw uses ``generator`` (on its own device; the global RNG when ``None``), in the reference's
        order: per flipped scale, ``p`` then a ``(B, h*w, d)`` uniform mask. ``strength=0`` gives exactly
        :meth:`quantize`'s bits and :meth:`teacher_forcing_inputs` of them.

        Args:
            strength: maximum flip probability in ``[0, 1]`` (Infinity's ``--noise_apply_strength``, 0.3 in
                ``train.sh``).
            num_layers: how many leading scales get flips (``--noise_apply_layers``, 13 in ``train.sh``).

        Returns:
            ``(labels, inputs_BLd, f_hat_BdHW)``: ``K`` long tensors ``(B, h_k*w_k, d)``, the teacher-forcing inputs
            ``(B, L - h_0*w_0, d)`` and the (flipped) cumulative map.
        """
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength is a flip probability and must be in [0, 1], got {strength}")
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        num_steps = round(100 * strength)

        def flip(k: int, bits_Bld: torch.Tensor) -> torch.Tensor | None:
            if k >= num_layers:
                return None
            device = generator.device if generator is not None else bits_Bld.device
            p = torch.randint(0, num_steps + 1, (), generator=generator, device=device) / 100
            mask_Bld = torch.rand(bits_Bld.shape, generator=generator, device=device) < p
            return bits_Bld ^ mask_Bld.to(bits_Bld.device).long()

        f_hat_BdHW, labels, inputs_BLd = self._residual_quantize(f_BdHW, schedule, flip=flip, with_inputs=True)
        return labels, inputs_BLd, f_hat_BdHW

    def _residual_quantize(
        self,
        f_BdHW: torch.Tensor,
        schedule: ScaleSchedule,
        flip: Callable[[int, torch.Tensor], torch.Tensor | None] | None,
        with_inputs: bool,
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """The loop shared by :meth:`quantize` and :meth:`self_correct`; ``flip(k, bits)`` may return flipped bits.

        The residual of scale ``k`` is ``f - f_hat`` as in ``flip_requant`` (``MultiScaleBSQ.forward`` keeps a running
        ``residual -= q``; the two differ only by float rounding).
        """
        self._check_latent(f_BdHW, schedule)
        with _float32_region(f_BdHW.device):
            f_BdHW = f_BdHW.float()
            f_hat_BdHW, labels, inputs = None, [], []
            for k, grid in enumerate(schedule.grids):
                residual_BdHW = f_BdHW if f_hat_BdHW is None else f_BdHW - f_hat_BdHW.detach()
                codes_Bdhw, bits_Bld = self.quantize_tokens(_resize(residual_BdHW, grid, self.down_mode))
                labels.append(bits_Bld)
                flipped_Bld = flip(k, bits_Bld) if flip is not None else None
                if flipped_Bld is not None:
                    codes_Bdhw = self.bits_to_codes(flipped_Bld, grid)
                f_hat_BdHW = self.accumulate(f_hat_BdHW, codes_Bdhw, k, schedule)
                if with_inputs and k < schedule.num_scales - 1:
                    inputs.append(self.next_scale_input(f_hat_BdHW, k, schedule))
        return f_hat_BdHW, labels, self._concat_inputs(inputs, labels[0]) if with_inputs else None

    # ----------------------------------------------------------------------------------------------------------------
    # validation
    def _concat_inputs(self, inputs: list[torch.Tensor], first_bits_Bld: torch.Tensor) -> torch.Tensor:
        if inputs:
            return torch.cat(inputs, dim=1)
        return torch.zeros(first_bits_Bld.shape[0], 0, self.codebook_dim, device=first_bits_Bld.device)

    def _check_map(self, x: torch.Tensor, name: str) -> None:
        if x.ndim == 5 and x.shape[2] == 1:
            raise ValueError(f"{name} is 5D {tuple(x.shape)} (Infinity's (B, d, 1, h, w)); pass {name}.squeeze(2)")
        if x.ndim != 4 or x.shape[1] != self.codebook_dim:
            raise ValueError(
                f"{name} must be (B, {self.codebook_dim}, h, w) with codebook_dim channels, got {tuple(x.shape)}"
            )

    def _check_latent(self, f_BdHW: torch.Tensor, schedule: ScaleSchedule) -> None:
        self._check_map(f_BdHW, "f_BdHW")
        if tuple(f_BdHW.shape[-2:]) != schedule.latent_grid:
            raise ValueError(
                f"the latent is {tuple(f_BdHW.shape[-2:])} but the schedule's last grid is {schedule.latent_grid}; "
                f"use a schedule whose last grid is the latent grid (image size / VAE stride)"
            )

    def _check_bits(self, bits_Bld: torch.Tensor, grid: tuple[int, int]) -> None:
        h, w = grid
        if bits_Bld.ndim != 3 or bits_Bld.shape[1:] != (h * w, self.codebook_dim):
            raise ValueError(
                f"bits for grid {tuple(grid)} must be (B, {h * w}, {self.codebook_dim}) (raster order, d bits per "
                f"token), got {tuple(bits_Bld.shape)}"
            )
        if bits_Bld.is_floating_point() or bits_Bld.is_complex():
            raise ValueError(f"bits must be a bool or integer tensor of 0/1, got dtype {bits_Bld.dtype}")

    @staticmethod
    def _check_scale_index(k: int, schedule: ScaleSchedule) -> None:
        if not 0 <= k < schedule.num_scales:
            raise ValueError(f"scale index k must be in [0, {schedule.num_scales}), got {k}")
