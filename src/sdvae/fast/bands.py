"""The inference path of a resnet block: convs over bands of rows, so only two full-size maps are ever held.

Run whole, `x + conv2(silu(norm2(conv1(silu(norm1(x))))))` holds x, its normalized copy, conv1's output and
conv2's output: four maps the size of x. Here each conv runs one band of output rows of one sample at a time,
reading a small buffer that holds its normalized input rows (one halo row above and below, zeros at the image's
edges) and writing straight into its output map; conv2 adds into x in place. So x and conv1's output are the only
full-size maps, and each buffer is still in cache when the conv reads it. In float32 the wide convs run as
Winograd's F(4x4, 3x3) (`sdvae.fast.winograd`), the rest through oneDNN. The GroupNorms use whole-map statistics
(`sdvae.fast.groupnorm`): the result equals the whole-map computation. The Wan network's RMS norms need no
statistics: each band is normalized by the module itself.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..util import spans
from . import winograd
from .cpu import fused_sum
from .groupnorm import Stats, group_stats, merge_all, norm_silu_rows

BAND_PIXELS = 16384  # output pixels per band: large enough for full-speed convs, small enough for the cache


def band_spans(height: int, width: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of about BAND_PIXELS pixels each."""
    return spans(height, max(1, BAND_PIXELS // width))


def conv_into(conv: nn.Conv2d, x: torch.Tensor, out: torch.Tensor, add: bool) -> None:
    """`out = conv(x)`, or `out += conv(x)` with `add`, the conv padding only the columns (x holds any row halo).

    On the CPU the result goes straight into `out` inside oneDNN's convolution (its fused sum): no output to
    allocate and copy, no separate pass for the residual add, and a half-precision sum rounded once, not twice.
    """
    padding = (0, conv.padding[1])
    if x.device.type == "cpu" and fused_sum(x.dtype):
        if not add:
            out.zero_()
        torch.ops.mkldnn._convolution_pointwise_.binary(out, x, conv.weight, conv.bias, padding, conv.stride,
                                                        conv.dilation, conv.groups, "add", 1.0, None, [], None)
    elif add:
        out += F.conv2d(x, conv.weight, conv.bias, conv.stride, padding)
    else:
        out.copy_(F.conv2d(x, conv.weight, conv.bias, conv.stride, padding))


def conv3x3_runners(convs: Iterable[nn.Conv2d], x: torch.Tensor) -> list[Callable[..., None]]:
    """`run(band, out, add)` for each 3x3 conv of a resnet over `x`, as `conv_into` takes them: Winograd's F(4x4, 3x3)
    where it is faster (`sdvae.fast.winograd`: float32, wide convs, large maps), in the forward pass's workspace; else
    oneDNN's."""
    workspace, pixels = winograd.shared(), x.shape[0] * x.shape[2] * x.shape[3]
    return [winograd.Conv3x3(conv, workspace) if winograd.suits(conv, pixels, x.dtype, x.device)
            else (lambda band, out, add, conv=conv: conv_into(conv, band, out, add)) for conv in convs]


def band_stats(bands: Iterable[tuple[int, torch.Tensor]], groups: int) -> Stats:
    """Whole-map GroupNorm statistics from (sample, band of rows) pairs, sample by sample in order."""
    by_sample = itertools.groupby(bands, key=lambda pair: pair[0])
    per_sample = [merge_all(group_stats(band, groups) for _, band in pairs) for _, pairs in by_sample]
    return tuple(torch.cat(parts) for parts in zip(*per_sample))


NormSiluRows = Callable[[int, torch.Tensor, torch.Tensor], None]  # (sample, rows, out): out = silu(norm(rows))


def group_norm_silu(norm: nn.GroupNorm, bands: Iterable[tuple[int, torch.Tensor]], dtype: torch.dtype
                    ) -> NormSiluRows:
    """SiLU(GroupNorm) of row bands, with the statistics of the whole map that `bands` sweeps."""
    return norm_silu_rows(norm, band_stats(bands, norm.num_groups), dtype)


def per_pixel_norm_silu(norm: nn.Module, bands: Iterable[tuple[int, torch.Tensor]], dtype: torch.dtype
                        ) -> NormSiluRows:
    """SiLU(norm) of row bands for a norm of each pixel alone (the Wan network's RMS norm): the module itself on each
    band. (`bands` is swept all the same: it runs the conv that makes them.)"""
    for _ in bands:
        pass
    return lambda i, rows, out: per_pixel_norm_silu_into(norm, rows, out)


def per_pixel_norm_silu_into(norm: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
    """`out = silu(norm(x))` for a norm of each pixel alone, by the module itself (its own precision rules)."""
    F.silu(out.copy_(norm(x)), inplace=True)


def resnet(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`block(x)` for a resnet (`ResnetBlock`, or the Wan network's `ResidualBlock`) in inference; the result
    overwrites `x` when the block keeps the width."""
    b, c, h, w = x.shape
    sample_bands = [(i, r0, r1) for i in range(b) for r0, r1 in band_spans(h, w)]
    rows = sample_bands[0][2] - sample_bands[0][1]
    new = dict(dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    scratch = torch.empty((rows + 2) * w * max(c, block.conv2.in_channels), dtype=x.dtype, device=x.device)
    run1, run2 = conv3x3_runners((block.conv1, block.conv2), x)

    def norm_conv(run: Callable, source: torch.Tensor, norm: Callable, out: torch.Tensor, i: int, r0: int,
                  r1: int, add: bool) -> None:
        """Rows [r0, r1) of sample i of `conv(norm(source))` into `out` (a 3x3 conv, padding 1)."""
        top, bottom = max(r0 - 1, 0), min(r1 + 1, h)
        channels, length = source.shape[1], r1 - r0 + 2
        band = scratch[:length * w * channels].view(1, length, w, channels).permute(0, 3, 1, 2)  # channels-last
        band[:, :, :top - (r0 - 1)].zero_()
        norm(i, source[i:i + 1, :, top:bottom], band[:, :, top - (r0 - 1):bottom - (r0 - 1)])
        band[:, :, bottom - (r0 - 1):].zero_()
        run(band, out[i:i + 1, :, r0:r1], add)

    def conv1_bands(norm1: Callable) -> Iterator[tuple[int, torch.Tensor]]:
        for i, r0, r1 in sample_bands:
            norm_conv(run1, x, norm1, mid, i, r0, r1, add=False)
            yield i, mid[i:i + 1, :, r0:r1]  # its statistics are taken while it is in cache

    norm_silu = group_norm_silu if isinstance(block.norm1, nn.GroupNorm) else per_pixel_norm_silu
    x_bands = ((i, x[i:i + 1, :, r0:r1]) for i, r0, r1 in sample_bands)
    norm1 = norm_silu(block.norm1, x_bands, x.dtype)
    mid = torch.empty(b, block.conv1.out_channels, h, w, **new)
    norm2 = norm_silu(block.norm2, conv1_bands(norm1), x.dtype)
    out = x if block.conv_shortcut is None else torch.empty(b, block.conv2.out_channels, h, w, **new)
    for i, r0, r1 in sample_bands:
        if block.conv_shortcut is not None:
            conv_into(block.conv_shortcut, x[i:i + 1, :, r0:r1], out[i:i + 1, :, r0:r1], add=False)
        norm_conv(run2, mid, norm2, out, i, r0, r1, add=True)
    return out


def downsample(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(pad(x, right 1, bottom 1))` for the stride-2 3x3 Downsample conv, by bands of output rows: each band's
    input rows are copied into one reused buffer with the zero column (and row), not the whole map into a padded
    copy."""
    b, c, h, w = x.shape
    ho, wo = h // 2, w // 2
    out = torch.empty(b, conv.out_channels, ho, wo, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    out_bands = band_spans(ho, w)  # each reads about 2 x BAND_PIXELS input pixels
    rows = 2 * (out_bands[0][1] - out_bands[0][0]) + 1
    scratch = x.new_empty(1, c, rows, w + 1).contiguous(memory_format=torch.channels_last)
    scratch[:, :, :, w:].zero_()
    for i in range(b):
        for o0, o1 in out_bands:
            r0, r1 = 2 * o0, min(2 * o1 + 1, h)  # input rows read; row h (when 2 * o1 + 1 > h) is the zero pad
            band = scratch[:, :, :2 * (o1 - o0) + 1]
            band[:, :, :r1 - r0, :w] = x[i:i + 1, :, r0:r1]
            band[:, :, r1 - r0:].zero_()
            conv_into(conv, band, out[i:i + 1, :, o0:o1], add=False)
    return out
