"""The building blocks shared by encoder and decoder; attribute names equal diffusers' state-dict keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import bands, groupnorm
from .groupnorm import recording

GROUP_NORM_EPS = 1e-6


def group_norm(num_channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, num_channels, eps=GROUP_NORM_EPS)


def by_bands(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether `module(x)` takes the row-band path of `sdvae.bands`: on the CPU, for a channels-last `x` (each row
    band one run of memory), when autograd does not record it and torch.compile is not tracing it (row bands write
    in place; GPUs and compiled graphs keep whole maps)."""
    return (x.device.type == "cpu" and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.compiler.is_compiling() and not recording(module, x))


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """SiLU(GroupNorm(x)): the pair that opens every resnet branch and closes both halves.

    Exact statistics (see `sdvae.groupnorm`); the SiLU runs in place on the normalized tensor, and `inplace`
    normalizes `x` itself where nothing reads it afterwards, so no full-size tensor is allocated.
    """
    return groupnorm.group_norm(norm, x, silu=True, inplace=inplace)


class ResnetBlock(nn.Module):
    """`shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`; the shortcut is a 1x1 conv when widths differ.

    In inference on the CPU (autograd not recording) it runs by row bands (`sdvae.bands`) and, when the widths
    match, its output overwrites `x`: the encoder and decoder never read a block's input again. On GPUs, whole
    maps keep the kernels large.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if by_bands(self, x):
            return bands.resnet(self, x)
        # Whole maps (GPUs, autograd): one statement per step frees each intermediate once the next exists.
        h = self.conv1(norm_silu(self.norm1, x))
        h = self.conv2(norm_silu(self.norm2, h, inplace=True))
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


class Attention(nn.Module):
    """Single-head self-attention over all pixels, with a GroupNorm in front and a residual around it."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # [B, C, H, W] -> [B, HW, C]: a view, not a copy, for channels-last input.
        tokens = groupnorm.group_norm(self.group_norm, x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        q, k, v = (proj(tokens).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = self.to_out[0](F.scaled_dot_product_attention(q, k, v).squeeze(1))
        return out.reshape(b, h, w, c).permute(0, 3, 1, 2).add_(x)


class MidBlock(nn.Module):
    """Resnet, Attention (unless disabled), Resnet, all at the deepest width."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 conv: output floor(H/2) x floor(W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if by_bands(self, x):
            return bands.downsample(self.conv, x)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def resnet_stack(in_channels: int, out_channels: int, num_layers: int, groups: int) -> nn.ModuleList:
    """`num_layers` resnets, the first changing the width from `in_channels` to `out_channels`."""
    widths = [in_channels] + [out_channels] * num_layers
    return nn.ModuleList(ResnetBlock(a, b, groups) for a, b in zip(widths, widths[1:]))


class DownBlock(nn.Module):
    """`num_layers` resnets, then an optional Downsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = resnet_stack(in_channels, out_channels, num_layers, groups)
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (*self.resnets, *self.downsamplers):
            x = layer(x)
        return x


class UpBlock(nn.Module):
    """`num_layers` resnets, then an optional Upsample."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = resnet_stack(in_channels, out_channels, num_layers, groups)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (*self.resnets, *self.upsamplers):
            x = layer(x)
        return x
