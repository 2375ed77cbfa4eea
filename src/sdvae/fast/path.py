"""The fast path: the network's layers (`sdvae.model.network`) run by kernels that each equal the plain layer.

- GroupNorms from exact statistics (`sdvae.fast.groupnorm`), GroupNorm+SiLU in one pass, in place where nothing reads
  the input again;
- on the CPU in inference, resnets and downsamples by bands of rows (`sdvae.fast.bands`), their wide float32 convs as
  Winograd's F(4x4, 3x3) (`sdvae.fast.winograd`);
- elsewhere (GPUs, torch.compile), resnets on whole maps with in-place SiLU and residual add.
It is the default. `with sdvae.fast_path(False):` runs the plain network instead, as diffusers computes it: the
reference the fast path is tested against, on any device.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..model import wan
from ..model.network import Attention, Downsample, OutputHead, ResnetBlock, call
from . import bands
from .groupnorm import exact_group_norm, in_place_ok

_ENABLED = contextvars.ContextVar("sdvae_fast_path", default=True)


@contextlib.contextmanager
def fast_path(enabled: bool = True) -> Iterator[None]:
    """Within the block (this thread or task), run the fast path, or with `enabled=False` the plain network."""
    token = _ENABLED.set(bool(enabled))
    try:
        yield
    finally:
        _ENABLED.reset(token)


def enabled() -> bool:
    """Whether the fast path is on here (it is unless a `fast_path(False)` block is open)."""
    return _ENABLED.get()


def by_bands(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether `module(x)` runs by row bands: on the CPU, for a channels-last `x` (each band one run of memory),
    when it may write in place (row bands do)."""
    return (x.device.type == "cpu" and x.is_contiguous(memory_format=torch.channels_last)
            and in_place_ok(module, x))


def norm_silu(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    return exact_group_norm(norm, x, silu=True)


def norm_silu_in_place(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """SiLU(GroupNorm(x)) written over `x` (unless autograd records it): for inputs nothing reads again."""
    return exact_group_norm(norm, x, silu=True, inplace=True)


def run_layer(layer: Callable[..., torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """One layer of a network's stages on the fast path: `layer(x)`, by the kernel that has it."""
    if isinstance(layer, ResnetBlock):
        return bands.resnet(layer, x) if by_bands(layer, x) else resnet_in_place(layer, x)
    if isinstance(layer, wan.ResidualBlock) and by_bands(layer, x):
        return bands.resnet(layer, x)
    if isinstance(layer, Downsample) and by_bands(layer, x):
        return bands.downsample(layer.conv, x)
    if isinstance(layer, wan.Resample) and isinstance(layer.resample[0], nn.ZeroPad2d) and by_bands(layer, x):
        return bands.downsample(layer.resample[1], x)
    if isinstance(layer, Attention):
        return layer(x, norm=exact_group_norm)
    if isinstance(layer, OutputHead):
        return layer(x, norm_silu=norm_silu_in_place)
    return layer(x)


def resnet_in_place(block: ResnetBlock, x: torch.Tensor) -> torch.Tensor:
    """A resnet on whole maps, its second SiLU and the residual add in place (the conv's fresh output: autograd
    allows it): three maps the size of x at most."""
    h = block.conv1(norm_silu(block.norm1, x))  # one statement per step frees each map once the next exists
    h = block.conv2(norm_silu_in_place(block.norm2, h))
    return h.add_(x if block.conv_shortcut is None else block.conv_shortcut(x))


def runner() -> Callable[[Callable[..., torch.Tensor], torch.Tensor], torch.Tensor]:
    """How a network runs its layers here: `run_layer`, or the plain call inside `fast_path(False)`."""
    return run_layer if enabled() else call
