"""`VaeDecoder`: the mirror of the encoder, latents back to images in [-1, 1], to check latents by eye."""

from __future__ import annotations

import torch
from torch import nn

from ..model.config import VaeConfig
from ..model.network import Runner
from ..model.networks import decoder_network
from ..model.scaling import LatentScaling, LatentStats
from .base import VaeModule


class VaeDecoder(VaeModule):
    """The AutoencoderKL decoder: `post_quant_conv.*` (when the config has one) then `decoder.*`; FLUX.2's also
    holds the latent statistics `bn.*`. With `config.network == "wan"`, the Wan 2.1 / Qwen-Image decoder for one
    frame, output clamped to [-1, 1]; it also takes `[B, L, 1, h, w]` and then answers with a frame axis."""

    def __init__(self, config: VaeConfig):
        super().__init__()
        self.config = config
        n = config.latent_channels
        self.post_quant_conv = nn.Conv2d(n, n, 1) if config.use_post_quant_conv else None
        self.decoder = decoder_network(config)
        self.bn = LatentStats.of(config)
        self.to_channels_last()

    @property
    def scaling(self) -> LatentScaling:
        """How `decode_with_scaling` maps the diffusion model's latents back (`sdvae.model.scaling`)."""
        return LatentScaling.of(self.config, self.bn)

    def _network(self, z: torch.Tensor, run: Runner) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z, run)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Images `[B, out_channels, 8h, 8w]` (nominally in [-1, 1]) from VAE latents `[B, L, h, w]`."""
        z, frame = self._one_frame(z, "latents")
        z = self._check_input(z, self.config.latent_channels, 1, "latents")
        out = self._guarded(self._run, z).contiguous()
        return out.unsqueeze(2) if frame else out

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images from unscaled VAE latents (a sample or the mean of `VaeEncoder.encode`)."""
        return self(z)

    def decode_with_scaling(self, z: torch.Tensor) -> torch.Tensor:
        """Images from diffusion latents: undoes `encode_with_scaling` (FLUX.2: its normalization and patches),
        then decodes."""
        z, frame = self._one_frame(z, "latents")
        if z.ndim != 4:
            raise ValueError(f"latents {list(z.shape)}: expected [B, C, h, w]")
        scaling = self.scaling
        want = scaling.scaled_shape((self.config.latent_channels, scaling.patch, scaling.patch))[0]
        if z.shape[1] != want:
            raise ValueError(f"latents {list(z.shape)}: this VAE's scaled latents have {want} channels")
        out = self(scaling.unscale(z))
        return out.unsqueeze(2) if frame else out
