"""`VaeDecoder`: the mirror of the encoder, latents back to images in [-1, 1], to check latents by eye."""

from __future__ import annotations

import torch
from torch import nn

from .config import VaeConfig
from .layers import MidBlock, UpBlock, group_norm, norm_silu
from .module import VaeModule
from .scaling import unscale_latents


class Decoder(nn.Module):
    """conv_in, mid block, up blocks (each but the last doubles H and W), GroupNorm+SiLU, conv_out."""

    def __init__(self, config: VaeConfig):
        super().__init__()
        boc, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, boc[0], 3, padding=1)
        self.mid_block = MidBlock(boc[0], groups, config.mid_block_add_attention)
        widths = [boc[0], *boc]
        self.up_blocks = nn.ModuleList(
            UpBlock(widths[i], widths[i + 1], config.layers_per_block + 1, groups, upsample=i < len(boc) - 1)
            for i in range(len(boc))
        )
        self.conv_norm_out = group_norm(boc[-1], groups)
        self.conv_out = nn.Conv2d(boc[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(norm_silu(self.conv_norm_out, x, inplace=True))


class VaeDecoder(VaeModule):
    """The AutoencoderKL decoder: `post_quant_conv.*` (when the config has one) then `decoder.*`."""

    def __init__(self, config: VaeConfig):
        super().__init__()
        self.config = config
        n = config.latent_channels
        self.post_quant_conv = nn.Conv2d(n, n, 1) if config.use_post_quant_conv else None
        self.decoder = Decoder(config)
        self._channels_last()

    def _network(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Images `[B, out_channels, 8h, 8w]` (nominally in [-1, 1]) from VAE latents `[B, L, h, w]`."""
        z = self._check_input(z, self.config.latent_channels, 1, "latents")
        return self._guarded(self._run, z).contiguous()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images from unscaled VAE latents (a sample or the mean of `VaeEncoder.encode`)."""
        return self(z)

    def decode_with_scaling(self, z: torch.Tensor) -> torch.Tensor:
        """Images from diffusion latents: undoes `encode_with_scaling`'s scaling and shift, then decodes."""
        return self(unscale_latents(z, self.config))
