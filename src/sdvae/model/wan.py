"""The Wan 2.1 / Qwen-Image VAE for one frame, as the 2-D network it is (diffusers `AutoencoderKLQwenImage`).

The video VAE sees a still image as one frame. Each causal 3x3x3 conv pads two zero frames in front of it, so on
one frame it is the 2-D conv of its kernel's last temporal slice; the temporal convs (`time_conv`) of the
resamplers do not run on the first frame. What is left is a plain 2-D network (diffusers' arithmetic, 0.39x of
its Conv3d over the zero frames): RMS norms over channels per pixel, SiLU, residual blocks, a single-head
attention in the middle, and a decoder that ends clamped to [-1, 1]. Attribute names are diffusers' state-dict keys;
the loader takes the 3-D kernels' last slices (`sdvae.checkpoint.convert`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VaeConfig
from .network import Runner, call, run_stages


class RMSNorm(nn.Module):
    """`normalize(x over channels) * sqrt(C) * gamma`, per pixel; computed in float32 for half-precision input, as
    diffusers does."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels, 1, 1))
        self.scale = channels ** 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.dtype in (torch.float16, torch.bfloat16)
        return F.normalize(x.float() if half else x, dim=1).to(x.dtype) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """`shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`; the shortcut is a 1x1 conv when widths differ."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = RMSNorm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = RMSNorm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels: RMS norm, one 1x1 conv for queries, keys and values, a 1x1
    projection, and the residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = RMSNorm(channels)
        self.to_qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, 1, 3 * c, h * w).transpose(2, 3)
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b, c, h, w)
        return self.proj(out) + x


class Upsample2x(nn.Module):
    """Nearest-neighbour 2x computed in float32 and cast back, as diffusers does (float64 maps round here too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)


class Resample(nn.Module):
    """Downsample (zero-pad right and bottom, stride-2 3x3 conv) or upsample (2x, then a 3x3 conv to half the
    width); `resample` is a Sequential so its conv's key is `resample.1`."""

    def __init__(self, channels: int, up: bool):
        super().__init__()
        if up:
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(channels, channels // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(channels, channels, 3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resample(x)


class MidBlock(nn.Module):
    """Residual block, attention, residual block."""

    def __init__(self, channels: int):
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(channels)])
        self.resnets = nn.ModuleList([ResidualBlock(channels, channels) for _ in range(2)])

    def layers(self) -> list[nn.Module]:
        return [self.resnets[0], self.attentions[0], self.resnets[1]]


class OutputHead:
    """`conv(silu(norm(x)))`, the end of both networks (not a module: its modules are the network's own)."""

    def __init__(self, norm: RMSNorm, conv: nn.Conv2d):
        self.norm, self.conv = norm, conv

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.silu(self.norm(x)))


class WanEncoder(nn.Module):
    """Images `[B, 3, H, W]` to `[B, 2L, H/8, W/8]`: conv_in; per level its residual blocks, then a downsample
    (but the last); the mid block; RMS norm, SiLU, conv_out. `down_blocks` is one flat list, as diffusers has it."""

    def __init__(self, config: VaeConfig):
        super().__init__()
        widths = config.block_out_channels
        self.conv_in = nn.Conv2d(config.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        stages: list[list[nn.Module]] = []
        previous = widths[0]
        for level, width in enumerate(widths):
            stage = []
            for _ in range(config.layers_per_block):
                stage.append(ResidualBlock(previous, width))
                previous = width
            if level < len(widths) - 1:
                stage.append(Resample(width, up=False))
            self.down_blocks.extend(stage)
            stages.append(stage)
        self.mid_block = MidBlock(widths[-1])
        self.norm_out = RMSNorm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)
        self.stages = [[self.conv_in, *stages[0]], *stages[1:],
                       [*self.mid_block.layers(), OutputHead(self.norm_out, self.conv_out)]]

    def forward(self, x: torch.Tensor, run: Runner = call) -> torch.Tensor:
        return run_stages(self.stages, x, run)


class UpBlock(nn.Module):
    """`layers_per_block + 1` residual blocks, then an optional upsample to half the width."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, upsample: bool):
        super().__init__()
        widths = [in_channels] + [out_channels] * num_layers
        self.resnets = nn.ModuleList(ResidualBlock(a, b) for a, b in zip(widths, widths[1:]))
        self.upsamplers = nn.ModuleList([Resample(out_channels, up=True)] if upsample else [])


class WanDecoder(nn.Module):
    """Latents `[B, L, h, w]` to images `[B, 3, 8h, 8w]` in [-1, 1]: conv_in, mid block, up blocks (each upsample
    halves the width, the next block's first residual block widens it again), RMS norm, SiLU, conv_out, clamp."""

    def __init__(self, config: VaeConfig):
        super().__init__()
        widths = tuple(reversed(config.decoder_widths))
        self.conv_in = nn.Conv2d(config.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0])
        self.up_blocks = nn.ModuleList()
        previous = widths[0]
        for level, width in enumerate(widths):
            upsample = level < len(widths) - 1
            self.up_blocks.append(UpBlock(previous, width, config.layers_per_block + 1, upsample))
            previous = width // 2 if upsample else width
        self.norm_out = RMSNorm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], config.out_channels, 3, padding=1)
        self.stages = [[self.conv_in, *self.mid_block.layers()],
                       *[[*block.resnets, *block.upsamplers] for block in self.up_blocks],
                       [OutputHead(self.norm_out, self.conv_out)]]

    def forward(self, z: torch.Tensor, run: Runner = call) -> torch.Tensor:
        return run_stages(self.stages, z, run).clamp_(-1.0, 1.0)
