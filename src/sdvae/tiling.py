"""Exact tiled encoding: the encoder run tile by tile, equal to the untiled encoder (no seams).

Everything in the encoder is local except its GroupNorms and the mid-block attention. Each conv is computed one
output tile at a time from its input with the halo it needs; each GroupNorm gets per-sample, per-group
statistics over the whole image, merged exactly across tiles (Chan's parallel formula, in float64), and is
applied, with its SiLU, to each conv input tile before the zero padding; the attention runs over blocks of rows
(queries) and of tokens (keys) with an online softmax, so no N x N matrix is held. A resnet block keeps two
full-size activations (its input, which receives the output in place, and the middle one), in memory or in
scratch files (`sdvae.activations`), as the untiled path does (`sdvae.bands`): tiles in memory bound the
temporaries of very wide images, tiles on disk bound everything. `plan_tiling` chooses between untiled, tiled in
memory and tiled on disk from a memory budget. See ../shared/TILING.md for the background.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .activations import FileActivation, RamActivation
from .config import VaeConfig
from .groupnorm import Stats, affine, group_stats, merge_stats, normalize
from .layers import Attention, ResnetBlock

log = logging.getLogger("sdvae")

Activation = RamActivation | FileActivation
NewActivation = Callable[[tuple[int, ...]], Activation]
Prologue = Callable[..., torch.Tensor]
ATTENTION_BLOCK = 4096  # tokens per query and key block: a 4096 x 4096 float32 score block is 64 MiB


def spans(length: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most `size` covering `length`."""
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def global_stats(x: Activation, groups: int, tile: int) -> Stats:
    """Per-sample, per-group statistics of the whole map `x`, accumulated over bands of `tile` rows."""
    total = None
    for r0, r1 in spans(x.shape[2], tile):
        stats = group_stats(x.read(slice(r0, r1), slice(None)), groups)
        total = stats if total is None else merge_stats(total, stats)
    return total


def norm_prologue(norm: nn.GroupNorm, x: Activation, tile: int, silu: bool) -> Prologue:
    """GroupNorm of `x` (whole-map statistics) as a per-channel affine map on any tile, SiLU after if asked."""
    scale, shift = affine(norm, global_stats(x, norm.num_groups, tile), x.dtype)
    return lambda t, out=None: normalize(t, scale, shift, silu, out=out)


def tiled_conv(conv: nn.Conv2d, x: Activation, tile: int, new: NewActivation, *,
               pads: tuple[int, int, int, int] | None = None, prologue: Prologue | None = None,
               residual: Callable[[slice, slice], torch.Tensor] | None = None,
               out: Activation | None = None) -> Activation:
    """`conv(prologue(x))` (+ `residual(rows, cols)`) one output tile at a time, zero padding after the prologue.

    `pads` (top, bottom, left, right) default to the conv's own padding. The output goes to `out`, else to a new
    activation; `out` may be `x` itself when the residual is the only reader of `x` tiles still to come (each
    tile reads its own rows before writing them).
    """
    k, s = conv.kernel_size[0], conv.stride[0]
    pt, pb, pl, pr = pads if pads is not None else (conv.padding[0],) * 2 + (conv.padding[1],) * 2
    b, _, h, w = x.shape
    ho, wo = (h + pt + pb - k) // s + 1, (w + pl + pr - k) // s + 1
    if out is None:
        out = new((b, conv.out_channels, ho, wo))
    for o0, o1 in spans(ho, tile):
        for q0, q1 in spans(wo, tile):
            r0, r1 = o0 * s - pt, (o1 - 1) * s - pt + k
            c0, c1 = q0 * s - pl, (q1 - 1) * s - pl + k
            piece = x.read(slice(max(r0, 0), min(r1, h)), slice(max(c0, 0), min(c1, w)))
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
            out.write(slice(o0, o1), slice(q0, q1), y)
    return out


def _padded_buffer(piece: torch.Tensor, border: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A channels-last buffer the size of `piece` plus a zero border (top, bottom, left, right), and its interior."""
    top, bottom, left, right = border
    b, c, h, w = piece.shape
    buffer = piece.new_empty(b, c, top + h + bottom, left + w + right).contiguous(memory_format=torch.channels_last)
    for strip in (buffer[:, :, :top], buffer[:, :, top + h:], buffer[:, :, :, :left], buffer[:, :, :, left + w:]):
        strip.zero_()
    return buffer, buffer[:, :, top:top + h, left:left + w]


def tiled_resnet(block: ResnetBlock, x: Activation, tile: int, new: NewActivation) -> Activation:
    """A resnet block by tiles; its output overwrites `x` when the widths match (the shortcut is the identity)."""
    h = tiled_conv(block.conv1, x, tile, new, prologue=norm_prologue(block.norm1, x, tile, silu=True))
    shortcut = nn.Identity() if block.conv_shortcut is None else block.conv_shortcut
    return tiled_conv(block.conv2, h, tile, new, prologue=norm_prologue(block.norm2, h, tile, silu=True),
                      residual=lambda rows, cols: shortcut(x.read(rows, cols)),
                      out=x if block.conv_shortcut is None else None)


def tiled_attention(attention: Attention, x: Activation, tile: int, block: int = ATTENTION_BLOCK) -> Activation:
    """Single-head attention over all pixels, by blocks of rows with an online softmax; adds its output into `x`."""
    b, c, h, w = x.shape
    norm = norm_prologue(attention.group_norm, x, tile, silu=False)
    row_blocks = [slice(r0, r1) for r0, r1 in spans(h, max(1, block // w))]

    def tokens(piece: torch.Tensor) -> torch.Tensor:
        return piece.permute(0, 2, 3, 1).reshape(b, -1, c)

    keys = torch.empty(b, h * w, c, dtype=x.dtype, device=x.device)
    values = torch.empty_like(keys)
    for rows in row_blocks:  # filled block by block: only the keys, the values and one block are held
        normed = tokens(norm(x.read(rows, slice(None))))
        start = rows.start * w
        keys[:, start:start + normed.shape[1]] = attention.to_k(normed)
        values[:, start:start + normed.shape[1]] = attention.to_v(normed)
    key_blocks = spans(keys.shape[1], block)
    scale = c ** -0.5
    for rows in row_blocks:
        piece = x.read(rows, slice(None))
        q = attention.to_q(tokens(norm(piece)))
        top = q.new_full((b, q.shape[1], 1), float("-inf"))
        total = q.new_zeros(b, q.shape[1], 1)
        acc = q.new_zeros(b, q.shape[1], c)
        for k0, k1 in key_blocks:
            scores = torch.bmm(q, keys[:, k0:k1].transpose(1, 2)).mul_(scale)
            new_top = torch.maximum(top, scores.amax(-1, keepdim=True))
            correction = torch.exp(top - new_top)
            p = torch.exp(scores.sub_(new_top))
            total = total * correction + p.sum(-1, keepdim=True)
            acc = acc * correction + torch.bmm(p, values[:, k0:k1])
            top = new_top
        out = attention.to_out[0](acc / total).reshape(b, piece.shape[2], w, c).permute(0, 3, 1, 2)
        x.write(rows, slice(None), piece + out)
    return x


def tiled_params(encoder: nn.Module, quant_conv: nn.Module | None, x: torch.Tensor, tile_size: int,
                 on_disk: bool = False) -> torch.Tensor:
    """The encoder's raw parameters `[B, 2L, H/8, W/8]`, computed with tiles of `tile_size` input pixels.

    Full-size activations live in memory, or with `on_disk` in scratch files (under `$SDVAE_SCRATCH`, else the
    system's temporary folder), so that only tiles, the attention's keys and values, and the output are held.
    """

    def new(shape: tuple[int, ...]) -> Activation:
        if on_disk:
            return FileActivation(shape, x.dtype, x.device, os.environ.get("SDVAE_SCRATCH"))
        return RamActivation.empty(shape, x.dtype, x.device)

    def tile(level: int) -> int:
        return max(1, tile_size >> level)

    h = tiled_conv(encoder.conv_in, RamActivation(x), tile(0), new)
    for level, down in enumerate(encoder.down_blocks):
        for resnet in down.resnets:
            h = tiled_resnet(resnet, h, tile(level), new)
        for sampler in down.downsamplers:
            h = tiled_conv(sampler.conv, h, tile(level + 1), new, pads=(0, 1, 0, 1))
    deepest = tile(len(encoder.down_blocks) - 1)
    mid = encoder.mid_block
    h = tiled_resnet(mid.resnets[0], h, deepest, new)
    for attention in mid.attentions:
        h = tiled_attention(attention, h, deepest)
    h = tiled_resnet(mid.resnets[1], h, deepest, new)
    h = tiled_conv(encoder.conv_out, h, deepest, lambda shape: RamActivation.empty(shape, x.dtype, x.device),
                   prologue=norm_prologue(encoder.conv_norm_out, h, deepest, silu=True))
    params = h.read(slice(None), slice(None))
    return params if quant_conv is None else quant_conv(params)


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


def untiled_peak(config: VaeConfig, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device = torch.device("cpu")) -> int:
    """Estimated activation memory of the untiled encoder: on the CPU two and a half first-block activations (a
    resnet by row bands holds two, `sdvae.bands`; measured 2.3-2.4), elsewhere four (whole maps); plus the
    attention's queries, keys, values and output."""
    b, _, h, w = shape
    tokens = b * (h // config.downsample_factor) * (w // config.downsample_factor)
    maps = 2.5 if device.type == "cpu" else 4
    attention = 4 * tokens * config.block_out_channels[-1] * dtype.itemsize
    return int(maps * activation_bytes(config, shape, dtype)) + attention


def tiled_peak(config: VaeConfig, shape: tuple[int, ...], dtype: torch.dtype, tile: int, on_disk: bool) -> int:
    """Estimated activation memory of the tiled encoder: two and a half activations unless they are on disk, a few
    tile buffers, and the attention's keys, values and score block."""
    b, _, h, w = shape
    resident = 0 if on_disk else int(2.5 * activation_bytes(config, shape, dtype))
    # a few tile buffers at full resolution (deeper levels have wider but quarter-size tiles)
    tile_buffers = 6 * b * config.block_out_channels[0] * (tile + 2) ** 2 * dtype.itemsize
    tokens = b * (h // config.downsample_factor) * (w // config.downsample_factor)
    attention = (2 * tokens * config.block_out_channels[-1] + min(tokens, ATTENTION_BLOCK) ** 2) * dtype.itemsize
    return resident + tile_buffers + attention


def plan_tiling(config: VaeConfig, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                tile_size: int | None, max_memory: int | str | None) -> tuple[int, bool] | None:
    """How to encode `shape` within `max_memory` (default: what is free): None for untiled, else (tile, on_disk).

    Untiled when it fits and no tile size was asked for; else the largest tile (the one asked for, or 256 down to
    32 px) whose estimate fits with activations in memory, then with them in scratch files. Raises MemoryError
    when nothing fits.
    """
    budget = parse_memory(max_memory) if max_memory is not None else available_memory(device)
    need = untiled_peak(config, shape, dtype, device)
    if tile_size is None and need <= budget:
        return None
    tiles = [tile_size] if tile_size is not None else [t for t in (256, 128, 64, 32) if t <= max(256, *shape[2:])]
    for on_disk in (False, True):
        for tile in tiles:
            tiled = tiled_peak(config, shape, dtype, tile, on_disk)
            if tiled <= budget:
                if tile_size is None or on_disk:
                    where = "activations in scratch files" if on_disk else "activations in memory"
                    log.info("sdvae: %s needs about %s untiled, over the %s budget: encoding in exact tiles of %d px, "
                             "%s (about %s)", list(shape), _size(need), _size(budget), tile, where, _size(tiled))
                return tile, on_disk
    raise MemoryError(f"encoding {list(shape)} needs about {_size(tiled)} even in tiles with scratch files, more "
                      f"than the {_size(budget)} allowed; raise max_memory or encode a smaller image")
