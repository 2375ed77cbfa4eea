"""`VaeEncoder`: images `[B, C, H, W]` in [-1, 1] to the diagonal Gaussian over latents, as diffusers computes it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..model.config import VaeConfig
from ..model.distribution import DiagonalGaussian
from ..model.network import Runner
from ..model.networks import encoder_network
from ..model.scaling import LatentScaling, LatentStats
from ..tiled.budget import plan_tiling
from ..tiled.tiling import TilePlan, tiled_params
from .base import VaeModule


class VaeEncoder(VaeModule):
    """The AutoencoderKL encoder: `encoder.*` then `quant_conv.*` (when the config has one); FLUX.2's also holds the
    latent statistics `bn.*`. With `config.network == "wan"`, the Wan 2.1 / Qwen-Image encoder for one frame
    (`sdvae.model.wan`), which also takes diffusers' `[B, 3, 1, H, W]` and then answers with a frame axis."""

    def __init__(self, config: VaeConfig):
        super().__init__()
        self.config = config
        self.encoder = encoder_network(config)
        n = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(n, n, 1) if config.use_quant_conv else None
        self.bn = LatentStats.of(config)
        self.to_channels_last()

    @property
    def scaling(self) -> LatentScaling:
        """How `encode_with_scaling` maps VAE latents to the diffusion model's (`sdvae.model.scaling`)."""
        return LatentScaling.of(self.config, self.bn)

    def _network(self, x: torch.Tensor, run: Runner) -> torch.Tensor:
        h = self.encoder(x, run)
        return h if self.quant_conv is None else self.quant_conv(h)

    def _params(self, x: torch.Tensor, plan: TilePlan | None = None) -> torch.Tensor:
        if plan is not None:
            return tiled_params(self.encoder, self.quant_conv, x, plan)
        return self._run(x)

    def forward(self, x: torch.Tensor, tile_size: int | None = None,
                max_memory: int | str | None = None) -> torch.Tensor:
        """Raw distribution parameters `[B, 2L, H/8, W/8]` (mean and logvar stacked on channels, unclamped).

        `max_memory` (bytes or "2GiB"; default: the memory free on the device) bounds the peak rise of resident
        memory during the call: an input whose activations would not fit is encoded in exact tiles (the same
        result, `sdvae.tiled.tiling`), with a log line saying so; where even that would not fit, the full-size
        activations of the largest stages go to scratch files, or are recomputed (`sdvae.tiled.budget`); where
        nothing fits, MemoryError is raised before encoding. `tile_size` (pixels) tiles by itself: alone, in the
        plan of that size that needs the least memory (activations in scratch files, or recomputed: slower); with
        `max_memory`, in the fastest plan of that size that fits.
        """
        x, frame = self._one_frame(x, "images")
        x = self._check_input(x, self.config.in_channels, self.config.downsample_factor, "images")
        if tile_size is not None and (not isinstance(tile_size, int) or isinstance(tile_size, bool) or tile_size < 1):
            raise ValueError(f"tile_size must be a positive number of pixels, got {tile_size!r}")
        plan = plan_tiling(self.encoder, self.config, tuple(x.shape), x.dtype, x.device, tile_size, max_memory)
        out = self._guarded(lambda t: self._params(t, plan), x,
                            {"tile_size": tile_size, "max_memory": max_memory}).contiguous()
        return out.unsqueeze(2) if frame else out

    def encode(self, x: torch.Tensor, tile_size: int | None = None,
               max_memory: int | str | None = None) -> DiagonalGaussian:
        """The latent distribution of each image: `.mean`, `.logvar` (clamped), `.std`, `.mode()`, `.sample()`."""
        return DiagonalGaussian(self(x, tile_size=tile_size, max_memory=max_memory))

    def encode_with_scaling(self, x: torch.Tensor, seed: int | Sequence[int] | None = None,
                            generator: torch.Generator | list[torch.Generator] | None = None,
                            mode: bool | None = None, tile_size: int | None = None,
                            max_memory: int | str | None = None) -> torch.Tensor:
        """Latents ready for a diffusion model: `(z - shift_factor) * scaling_factor`, per channel where the config
        has statistics; FLUX.2's patchified 2x2 and normalized by its `bn` statistics, `[B, 128, H/16, W/16]`.

        `z` is a sample (seeded per image with `seed`, or drawn from `generator` as diffusers does) or, with
        `mode=True`, the mean. By default (`mode=None`) it is what the family's pipelines use: the mean for FLUX.2
        unless a seed or generator asks for a sample, else a sample.
        """
        x, frame = self._one_frame(x, "images")
        multiple = self.config.latent_multiple
        if x.ndim == 4 and (x.shape[-2] % multiple or x.shape[-1] % multiple):
            raise ValueError(f"images {list(x.shape)}: the scaled latents of this VAE need sides that are multiples "
                             f"of {multiple} px (the raw forward/encode take multiples of "
                             f"{self.config.downsample_factor})")
        dist = self.encode(x, tile_size=tile_size, max_memory=max_memory)
        if mode is None:
            mode = self.config.uses_mean and seed is None and generator is None
        if mode:
            if seed is not None or generator is not None:
                raise ValueError("mode=True takes no seed or generator: it returns the mean")
            z = dist.mode()
        else:
            z = dist.sample(generator, seed=seed)
        z = self.scaling.scale(z)
        return z.unsqueeze(2) if frame else z
