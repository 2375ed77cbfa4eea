"""Exact tiled encoding: the encoder run tile by tile, equal to the untiled encoder (no seams).

Everything in the encoder is local except its GroupNorms and the mid-block attention. Each conv is computed one
output tile at a time from its input with the halo it needs; each GroupNorm gets per-sample, per-group
statistics over the whole image, merged exactly across tiles (Chan's parallel formula, in float64), and is
applied, with its SiLU, to each conv input tile before the zero padding; the attention runs over query and key
blocks with an online softmax, so no N x N matrix is held. A resnet block keeps two full-size activations (its
input, which receives the output in place, and the middle one) instead of the untiled path's three or more.
See ../shared/TILING.md for the background.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import VaeConfig
from .layers import Attention, ResnetBlock

log = logging.getLogger("sdvae")

Stats = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # count, mean, M2 per (sample, group), float64
STATS_CHUNK = 1024  # pixels per chunk of the squared-deviation pass
ATTENTION_BLOCK = 4096  # tokens per query and key block: a 4096 x 4096 float32 score block is 64 MiB


def spans(length: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most `size` covering `length`."""
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def tile_stats(x: torch.Tensor, groups: int) -> Stats:
    """(count, mean, M2) per sample and group of one tile, returned in float64.

    Per channel first, in the tile's dtype and in two passes (mean, then squared deviations over cache-sized
    chunks); the channels of a group are then merged exactly in float64.
    """
    b, c, h, w = x.shape
    values = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view for a channels-last band of full rows
    mean = values.mean(1, keepdim=True)
    m2 = sum((chunk - mean).square_().sum(1) for chunk in values.split(STATS_CHUNK, dim=1))
    channel_mean = mean[:, 0].double().view(b, groups, -1)
    group_mean = channel_mean.mean(-1)
    spread = (channel_mean - group_mean[..., None]).square().sum(-1)
    group_m2 = m2.double().view(b, groups, -1).sum(-1) + h * w * spread
    return torch.full_like(group_mean, h * w * (c // groups)), group_mean, group_m2


def merge_stats(a: Stats, b: Stats) -> Stats:
    """Chan et al.'s exact merge of two sets' (count, mean, M2): the between-set term included."""
    (na, ma, m2a), (nb, mb, m2b) = a, b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * nb / n, m2a + m2b + delta.square() * na * nb / n


def global_stats(x: torch.Tensor, groups: int, tile: int) -> Stats:
    """Per-sample, per-group statistics of the whole map `x`, accumulated over bands of `tile` rows."""
    total = None
    for r0, r1 in spans(x.shape[2], tile):
        stats = tile_stats(x[:, :, r0:r1], groups)
        total = stats if total is None else merge_stats(total, stats)
    return total


def norm_prologue(norm: nn.GroupNorm, x: torch.Tensor, tile: int, silu: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """GroupNorm of `x` (whole-map statistics) as a per-channel affine map on any tile, SiLU after if asked."""
    count, mean, m2 = global_stats(x, norm.num_groups, tile)
    per_group = x.shape[1] // norm.num_groups
    rstd = torch.rsqrt(m2 / count + norm.eps).repeat_interleave(per_group, dim=1)
    mean = mean.repeat_interleave(per_group, dim=1)
    scale = rstd * norm.weight.double()
    shift = norm.bias.double() - mean * scale
    scale, shift = (v.to(x.dtype)[:, :, None, None] for v in (scale, shift))

    def apply(t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.addcmul(shift, t, scale, out=out)
        return F.silu(y, inplace=True) if silu else y

    return apply


def tiled_conv(conv: nn.Conv2d, x: torch.Tensor, tile: int, *, pads: tuple[int, int, int, int] | None = None,
               prologue: Callable[[torch.Tensor], torch.Tensor] | None = None,
               residual: Callable[[slice, slice], torch.Tensor] | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """`conv(prologue(x))` (+ `residual(rows, cols)`) one output tile at a time, zero padding after the prologue.

    `pads` (top, bottom, left, right) default to the conv's own padding; `out` may be `x` itself when the
    residual is the only reader of `x` tiles still to come (each tile reads its own rows before writing them).
    """
    k, s = conv.kernel_size[0], conv.stride[0]
    pt, pb, pl, pr = pads if pads is not None else (conv.padding[0],) * 2 + (conv.padding[1],) * 2
    b, _, h, w = x.shape
    ho, wo = (h + pt + pb - k) // s + 1, (w + pl + pr - k) // s + 1
    if out is None:
        out = x.new_empty(b, conv.out_channels, ho, wo).contiguous(memory_format=torch.channels_last)
    for o0, o1 in spans(ho, tile):
        for q0, q1 in spans(wo, tile):
            r0, r1 = o0 * s - pt, (o1 - 1) * s - pt + k
            c0, c1 = q0 * s - pl, (q1 - 1) * s - pl + k
            piece = x[:, :, max(r0, 0):min(r1, h), max(c0, 0):min(c1, w)]
            border = (max(-r0, 0), max(r1 - h, 0), max(-c0, 0), max(c1 - w, 0))
            if prologue is not None:
                buffer, interior = _padded_buffer(piece, border)
                prologue(piece, out=interior)
                piece = buffer
            elif any(border):
                piece = F.pad(piece, (border[2], border[3], border[0], border[1]))
            y = F.conv2d(piece, conv.weight, conv.bias, stride=s)
            if residual is not None:
                y += residual(slice(o0, o1), slice(q0, q1))
            out[:, :, o0:o1, q0:q1] = y
    return out


def _padded_buffer(piece: torch.Tensor, border: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A channels-last buffer the size of `piece` plus a zero border (top, bottom, left, right), and its interior."""
    top, bottom, left, right = border
    b, c, h, w = piece.shape
    buffer = piece.new_empty(b, c, top + h + bottom, left + w + right).contiguous(memory_format=torch.channels_last)
    for strip in (buffer[:, :, :top], buffer[:, :, top + h:], buffer[:, :, :, :left], buffer[:, :, :, left + w:]):
        strip.zero_()
    return buffer, buffer[:, :, top:top + h, left:left + w]


def tiled_resnet(block: ResnetBlock, x: torch.Tensor, tile: int) -> torch.Tensor:
    """A resnet block by tiles; its output overwrites `x` when the widths match (the shortcut is the identity)."""
    h = tiled_conv(block.conv1, x, tile, prologue=norm_prologue(block.norm1, x, tile, silu=True))
    shortcut = nn.Identity() if block.conv_shortcut is None else block.conv_shortcut
    return tiled_conv(block.conv2, h, tile, prologue=norm_prologue(block.norm2, h, tile, silu=True),
                      residual=lambda rows, cols: shortcut(x[:, :, rows, cols]),
                      out=x if block.conv_shortcut is None else None)


def tiled_attention(attention: Attention, x: torch.Tensor, tile: int, block: int = ATTENTION_BLOCK) -> torch.Tensor:
    """Single-head attention over all pixels, by query and key blocks with an online softmax; adds into `x`."""
    b, c, h, w = x.shape
    assert x.is_contiguous(memory_format=torch.channels_last), "tiled_attention adds into channels-last x"
    norm = norm_prologue(attention.group_norm, x, tile, silu=False)
    tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view of channels-last x

    def normed(start: int, stop: int) -> torch.Tensor:
        # the per-channel affine of the GroupNorm, on token rows
        piece = tokens[:, start:stop].transpose(1, 2)[..., None]
        return norm(piece)[..., 0].transpose(1, 2)

    blocks = spans(h * w, block)
    keys = torch.cat([attention.to_k(normed(*span)) for span in blocks], 1)
    values = torch.cat([attention.to_v(normed(*span)) for span in blocks], 1)
    scale = c ** -0.5
    for q0, q1 in blocks:
        q = attention.to_q(normed(q0, q1))
        top = q.new_full((b, q1 - q0, 1), float("-inf"))
        total = q.new_zeros(b, q1 - q0, 1)
        acc = q.new_zeros(b, q1 - q0, c)
        for k0, k1 in blocks:
            scores = torch.bmm(q, keys[:, k0:k1].transpose(1, 2)).mul_(scale)
            new_top = torch.maximum(top, scores.amax(-1, keepdim=True))
            correction = torch.exp(top - new_top)
            p = torch.exp(scores.sub_(new_top))
            total = total * correction + p.sum(-1, keepdim=True)
            acc = acc * correction + torch.bmm(p, values[:, k0:k1])
            top = new_top
        tokens[:, q0:q1] += attention.to_out[0](acc / total)
    return x


def tiled_params(encoder: nn.Module, quant_conv: nn.Module | None, x: torch.Tensor, tile_size: int) -> torch.Tensor:
    """The encoder's raw parameters `[B, 2L, H/8, W/8]`, computed with tiles of `tile_size` input pixels."""

    def tile(level: int) -> int:
        return max(1, tile_size >> level)

    h = tiled_conv(encoder.conv_in, x, tile(0))
    for level, down in enumerate(encoder.down_blocks):
        for resnet in down.resnets:
            h = tiled_resnet(resnet, h, tile(level))
        for sampler in down.downsamplers:
            h = tiled_conv(sampler.conv, h, tile(level + 1), pads=(0, 1, 0, 1))
    deepest = tile(len(encoder.down_blocks) - 1)
    mid = encoder.mid_block
    h = tiled_resnet(mid.resnets[0], h, deepest)
    for attention in mid.attentions:
        h = tiled_attention(attention, h, deepest)
    h = tiled_resnet(mid.resnets[1], h, deepest)
    h = tiled_conv(encoder.conv_out, h, deepest,
                   prologue=norm_prologue(encoder.conv_norm_out, h, deepest, silu=True))
    return h if quant_conv is None else quant_conv(h)


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
AUTO_TILE = 256  # pixels: large enough that convs run at full speed, small enough for tile temporaries
MIN_AUTO_TILE = 32


def parse_memory(value: int | str) -> int:
    """Bytes from an int or a string such as "2GiB", "1.5 GB" or "800M"."""
    if isinstance(value, int) and not isinstance(value, bool):
        number, unit = value, ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not match or match[2].lower() not in _UNITS:
            raise ValueError(f"max_memory must be bytes or a size like '2GiB', got {value!r}")
        number, unit = float(match[1]), match[2].lower()
    if number <= 0:
        raise ValueError(f"max_memory must be positive, got {value!r}")
    return int(number * _UNITS[unit])


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def available_memory(device: torch.device) -> int:
    """Bytes free for activations on `device`: CUDA's free memory, else the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines() if Path("/proc/meminfo").exists() else []:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2**62  # unknown: do not switch on a guess


def activation_bytes(config: VaeConfig, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of one full-resolution activation of the first block: the unit both estimates count in."""
    b, _, h, w = shape
    return b * config.block_out_channels[0] * h * w * dtype.itemsize


def untiled_peak(config: VaeConfig, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Estimated activation memory of the untiled encoder (about four first-block activations, measured)."""
    return 4 * activation_bytes(config, shape, dtype)


def tiled_peak(config: VaeConfig, shape: tuple[int, ...], dtype: torch.dtype, tile: int) -> int:
    """Estimated activation memory of the tiled encoder: two and a half activations, tile buffers, attention K/V."""
    b, _, h, w = shape
    # a few tile buffers at full resolution (deeper levels have wider but quarter-size tiles)
    tile_buffers = 6 * b * config.block_out_channels[0] * (tile + 2) ** 2 * dtype.itemsize
    tokens = b * (h // config.downsample_factor) * (w // config.downsample_factor)
    attention = (2 * tokens * config.block_out_channels[-1] + min(tokens, ATTENTION_BLOCK) ** 2) * dtype.itemsize
    return int(2.5 * activation_bytes(config, shape, dtype)) + tile_buffers + attention


def choose_tile(config: VaeConfig, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                max_memory: int | str | None) -> int | None:
    """None when the untiled encoder fits the budget (`max_memory`, else what is free); else a tile size.

    Raises MemoryError when even the tiled encoder would not fit.
    """
    budget = parse_memory(max_memory) if max_memory is not None else available_memory(device)
    need = untiled_peak(config, shape, dtype)
    if need <= budget:
        return None
    tile = min(AUTO_TILE, max(shape[2:]))
    while tiled_peak(config, shape, dtype, tile) > budget and tile > MIN_AUTO_TILE:
        tile //= 2
    tiled = tiled_peak(config, shape, dtype, tile)
    if tiled > budget:
        raise MemoryError(f"encoding {list(shape)} needs about {_size(tiled)} even in tiles, more than the "
                          f"{_size(budget)} allowed; raise max_memory or encode a smaller image")
    log.info("sdvae: %s needs about %s untiled, over the %s budget: encoding in exact tiles of %d px (about %s)",
             list(shape), _size(need), _size(budget), tile, _size(tiled))
    return tile
