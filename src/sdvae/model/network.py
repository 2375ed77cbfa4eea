"""The AutoencoderKL network as diffusers computes it: plain torch modules, attribute names = its state-dict keys.

Each network lists its layers in the order they run, by stage (`Encoder.stages`, `Decoder.stages`). `forward`
runs that list, and the fast path (`sdvae.fast`) and the tiled encoder (`sdvae.tiled.tiling`) read the same list,
so the structure is written here alone. `forward(x, run)` calls `run(layer, x)` for each layer: the plain call by
default, the fast path's kernels when `sdvae.fast` passes its own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import VaeConfig

GROUP_NORM_EPS = 1e-6
NormSilu = Callable[[nn.GroupNorm, torch.Tensor], torch.Tensor]
Runner = Callable[[Callable[..., torch.Tensor], torch.Tensor], torch.Tensor]


def call(layer: Callable[..., torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The plain way to run one layer (or norm)."""
    return layer(x)


def norm_layer(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPS)


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """SiLU(GroupNorm(x)): the pair that opens every resnet branch and closes both networks."""
    return F.silu(norm(x))


class ResnetBlock(nn.Module):
    """`shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`; the shortcut is a 1x1 conv when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = norm_layer(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = norm_layer(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, norm_silu: NormSilu = norm_silu) -> torch.Tensor:
        h = self.conv1(norm_silu(self.norm1, x))
        h = self.conv2(norm_silu(self.norm2, h))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over all pixels, with a GroupNorm in front and a residual around it."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = norm_layer(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor, norm: Runner = call) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = norm(self.group_norm, x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, HW, C]
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = self.to_out[0](F.scaled_dot_product_attention(q, k, v).squeeze(1))
        return out.reshape(b, h, w, c).permute(0, 3, 1, 2).add_(x)  # (into a fresh map: autograd allows it)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 conv: output floor(H/2) x floor(W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class OutputHead:
    """`conv(silu(norm(x)))`, the end of both networks, as one layer of their stage lists (not a module: its two
    modules are the network's own `conv_norm_out` and `conv_out`)."""

    def __init__(self, norm: nn.GroupNorm, conv: nn.Conv2d):
        self.norm, self.conv = norm, conv

    def __call__(self, x: torch.Tensor, norm_silu: NormSilu = norm_silu) -> torch.Tensor:
        return self.conv(norm_silu(self.norm, x))


def resnet_stack(in_channels: int, out_channels: int, num_layers: int, groups: int) -> nn.ModuleList:
    """`num_layers` resnets, the first changing the width from `in_channels` to `out_channels`."""
    widths = [in_channels] + [out_channels] * num_layers
    return nn.ModuleList(ResnetBlock(a, b, groups) for a, b in zip(widths, widths[1:]))


class MidBlock(nn.Module):
    """Holds the resnet, attention (unless disabled), resnet at the deepest width; `layers` in that order."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)] if add_attention else [])

    def layers(self) -> list[nn.Module]:
        return [self.resnets[0], *self.attentions, self.resnets[1]]


class DownBlock(nn.Module):
    """Holds `num_layers` resnets, then an optional Downsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = resnet_stack(in_channels, out_channels, num_layers, groups)
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])


class UpBlock(nn.Module):
    """Holds `num_layers` resnets, then an optional Upsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = resnet_stack(in_channels, out_channels, num_layers, groups)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])


def run_stages(stages: list[list[Callable[..., torch.Tensor]]], x: torch.Tensor, run: Runner) -> torch.Tensor:
    for stage in stages:
        for layer in stage:
            x = run(layer, x)
    return x


class Encoder(nn.Module):
    """Images `[B, C, H, W]` to `[B, 2L, H/8, W/8]`: conv_in, down blocks (each but the last halves H and W), mid
    block, GroupNorm+SiLU, conv_out."""

    def __init__(self, config: VaeConfig):
        super().__init__()
        boc, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, boc[0], 3, padding=1)
        widths = [boc[0], *boc]
        self.down_blocks = nn.ModuleList(
            DownBlock(widths[i], widths[i + 1], config.layers_per_block, groups, downsample=i < len(boc) - 1)
            for i in range(len(boc))
        )
        self.mid_block = MidBlock(boc[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = norm_layer(boc[-1], groups)
        self.conv_out = nn.Conv2d(boc[-1], 2 * config.latent_channels, 3, padding=1)
        # the layers in order by stage: each down block (conv_in opening the first), then the mid block and the end
        down = [[*block.resnets, *block.downsamplers] for block in self.down_blocks]
        self.stages = [[self.conv_in, *down[0]], *down[1:],
                       [*self.mid_block.layers(), OutputHead(self.conv_norm_out, self.conv_out)]]

    def forward(self, x: torch.Tensor, run: Runner = call) -> torch.Tensor:
        return run_stages(self.stages, x, run)


class Decoder(nn.Module):
    """Latents `[B, L, h, w]` to images `[B, C, 8h, 8w]`: conv_in, mid block, up blocks (each but the last doubles
    H and W), GroupNorm+SiLU, conv_out."""

    def __init__(self, config: VaeConfig):
        super().__init__()
        boc, groups = tuple(reversed(config.decoder_widths)), config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, boc[0], 3, padding=1)
        self.mid_block = MidBlock(boc[0], groups, config.mid_block_add_attention)
        widths = [boc[0], *boc]
        self.up_blocks = nn.ModuleList(
            UpBlock(widths[i], widths[i + 1], config.layers_per_block + 1, groups, upsample=i < len(boc) - 1)
            for i in range(len(boc))
        )
        self.conv_norm_out = norm_layer(boc[-1], groups)
        self.conv_out = nn.Conv2d(boc[-1], config.out_channels, 3, padding=1)
        # the layers in order by stage: conv_in and the mid block, each up block, the end
        self.stages = [[self.conv_in, *self.mid_block.layers()],
                       *[[*block.resnets, *block.upsamplers] for block in self.up_blocks],
                       [OutputHead(self.conv_norm_out, self.conv_out)]]

    def forward(self, z: torch.Tensor, run: Runner = call) -> torch.Tensor:
        return run_stages(self.stages, z, run)
