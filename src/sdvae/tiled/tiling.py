"""Exact tiled encoding: the encoder run tile by tile, equal to the untiled encoder (no seams).

Everything in the encoder is local except its GroupNorms and the mid-block attention (the Wan network's RMS norms
are per pixel: local too). The encoder is seen as a list of nodes, one per conv (a norm+SiLU in front, a residual
added behind) plus the attention, and run as a
schedule of passes: each pass sweeps the tiles of one node's output, keeps that output whole (in memory or in a
scratch file, `sdvae.tiled.maps`) and/or accumulates its per-sample, per-group statistics for the next
GroupNorm, merged exactly across tiles (Chan's parallel formula, in float64). A tile is computed from the kept
outputs it depends on, with the halo each conv needs, the GroupNorm+SiLU applied before the zero padding.

Per stage (a down block, or the mid block with the output conv) the plan either keeps every output, in memory
or in files, or recomputes: it keeps only what must be whole (the stage's last output, the attention's input),
and every pass recomputes the stage's prefix tile by tile from there: more compute, a fraction of the memory.
The attention runs over blocks of rows (queries) and of tokens (keys) with an online softmax, so no N x N
matrix is held. `sdvae.tiled.budget` chooses a plan from a memory budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import fast
from ..fast import winograd
from ..fast.bands import per_pixel_norm_silu_into
from ..fast.groupnorm import Stats, affine, group_stats, merge_all, normalize, recording
from ..model import wan
from ..model.network import Attention, Downsample, Encoder, OutputHead, ResnetBlock
from ..util import spans
from .maps import FileActivation, RamActivation, release_freed_memory

Activation = RamActivation | FileActivation
Region = tuple[int, int, int, int]  # rows [r0, r1), columns [c0, c1)
Shapes = dict[int, tuple[int, ...]]
ATTENTION_BLOCK = 4096  # tokens per query and key block: a 4096 x 4096 float32 score block is 64 MiB


@dataclass(frozen=True)
class TilePlan:
    """Tiles of `tile` input pixels a side (halved at each level); `stores[i]`: where stage i keeps its outputs,
    "memory", "files" (scratch files) or "recompute" (only what must be whole, in memory)."""

    tile: int
    stores: tuple[str, ...]

    def side(self, level: int) -> int:
        """Tile side in pixels at a resolution level."""
        return max(1, self.tile >> level)


@dataclass(frozen=True)
class Node:
    """`conv(SiLU(norm(input)))` (+ `shortcut(input of node skip)`), or the attention (with its norm)."""

    stage: int  # the down block it belongs to; the mid block and the output conv are the last stage
    level: int  # resolution level of its output: tiles of `tile >> level` pixels
    conv: nn.Conv2d | None = None
    pads: tuple[int, int, int, int] = (1, 1, 1, 1)  # top, bottom, left, right
    norm: nn.Module | None = None  # a GroupNorm (whole-map statistics), or the Wan network's per-pixel RMS norm
    skip: int | None = None
    shortcut: nn.Module | None = None
    attention: Attention | wan.AttentionBlock | None = None

    @property
    def grouped(self) -> bool:
        """Whether its norm needs the whole map's statistics (a GroupNorm)."""
        return isinstance(self.norm, nn.GroupNorm)


def encoder_nodes(encoder: Encoder | wan.WanEncoder) -> list[Node]:
    """The encoder's stages (`Encoder.stages`, `WanEncoder.stages`) as a list of nodes, each reading the previous
    one's output."""
    nodes: list[Node] = []
    level = 0
    for stage, layers in enumerate(encoder.stages):
        for layer in layers:
            if isinstance(layer, (ResnetBlock, wan.ResidualBlock)):
                nodes.append(Node(stage, level, layer.conv1, norm=layer.norm1))
                nodes.append(Node(stage, level, layer.conv2, norm=layer.norm2, skip=len(nodes) - 1,
                                  shortcut=layer.conv_shortcut))
            elif isinstance(layer, (Downsample, wan.Resample)):
                level += 1
                conv = layer.conv if isinstance(layer, Downsample) else layer.resample[1]
                nodes.append(Node(stage, level, conv, pads=(0, 1, 0, 1)))
            elif isinstance(layer, Attention):
                nodes.append(Node(stage, level, norm=layer.group_norm, attention=layer))
            elif isinstance(layer, wan.AttentionBlock):
                nodes.append(Node(stage, level, norm=layer.norm, attention=layer))
            elif isinstance(layer, (OutputHead, wan.OutputHead)):
                nodes.append(Node(stage, level, layer.conv, norm=layer.norm))
            elif isinstance(layer, nn.Conv2d):
                nodes.append(Node(stage, level, layer))
            else:
                raise TypeError(f"the tiled encoder has no node for {type(layer).__name__}")
    return nodes


def inputs(nodes: list[Node], k: int) -> list[int]:
    """The outputs node k reads: the previous node's, and the one its residual comes from (-1: the image)."""
    return [k - 1] + ([nodes[k].skip - 1] if nodes[k].skip is not None else [])


def output_shapes(nodes: list[Node], shape: tuple[int, ...]) -> Shapes:
    """Each node's output shape; key -1 is the input's."""
    shapes = {-1: tuple(shape)}
    for k, node in enumerate(nodes):
        b, _, h, w = shapes[k - 1]
        if node.conv is None:
            shapes[k] = shapes[k - 1]
            continue
        (kh, kw), (sh, sw), (pt, pb, pl, pr) = node.conv.kernel_size, node.conv.stride, node.pads
        shapes[k] = (b, node.conv.out_channels, (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1)
    return shapes


def input_region(node: Node, region: Region, shape: tuple[int, ...]) -> tuple[Region, tuple[int, int, int, int]]:
    """The part of the input (of `shape`) that `node`'s conv reads for output `region`, and the zero border
    (top, bottom, left, right) it needs beyond the input's edges."""
    k, s = node.conv.kernel_size[0], node.conv.stride[0]
    pt, _, pl, _ = node.pads
    r0, r1, c0, c1 = region
    h, w = shape[2:]
    top, bottom, left, right = r0 * s - pt, (r1 - 1) * s - pt + k, c0 * s - pl, (c1 - 1) * s - pl + k
    inside = (max(top, 0), min(bottom, h), max(left, 0), min(right, w))
    return inside, (max(-top, 0), max(bottom - h, 0), max(-left, 0), max(right - w, 0))


@dataclass(frozen=True)
class Pass:
    """One sweep over the tiles of node `target`'s output."""

    target: int
    store: str | None  # "memory" or "files": the output is kept whole; None: only its statistics are wanted
    into: int | None  # a kept output it overwrites (a resnet's input, read only at the tile being written)
    stats: bool  # the next node normalizes this output: accumulate its statistics
    computed: tuple[int, ...]  # the nodes evaluated for each tile, ascending; the rest is read from kept outputs
    free: tuple[int, ...]  # kept outputs that no later pass reads


def schedule(nodes: list[Node], stores: tuple[str, ...]) -> list[Pass]:
    """The passes of a tiled encode whose stage i keeps its outputs per `stores[i]` (see the module doc)."""
    n = len(nodes)
    last = {node.stage: k for k, node in enumerate(nodes)}

    def kept(k: int) -> str | None:
        mode = stores[nodes[k].stage]
        if mode != "recompute":
            return "memory" if k == n - 1 else mode
        whole = k == last[nodes[k].stage] or nodes[k].attention is not None or nodes[k + 1].attention is not None
        return "memory" if whole else None

    keep = {k: where for k in range(n) if (where := kept(k))} | {-1: "memory"}
    plans = []
    for t in range(n):
        stats = t + 1 < n and nodes[t + 1].grouped
        if t not in keep and not stats:
            continue
        computed, reads, todo = set(), set(), [t]
        while todo:
            k = todo.pop()
            computed.add(k)
            reads |= {j for j in inputs(nodes, k) if j in keep}
            todo += [j for j in inputs(nodes, k) if j not in keep and j not in computed]
        plans.append((t, stats, tuple(sorted(computed)), reads))
    last_read = {j: t for t, _, _, reads in plans for j in reads}
    passes = []
    for t, stats, computed, reads in plans:
        node, into = nodes[t], None
        if node.attention is not None:
            into = t - 1  # the attention adds its output into its input, block by block
        elif (node.skip is not None and node.shortcut is None and t - 1 in keep
              and keep.get(t) == keep.get(node.skip - 1)):
            # a resnet whose input is kept where its output goes, and read by the residual alone (its conv reads
            # the kept t - 1): each tile reads its own pixels of the input before writing them
            into = node.skip - 1
        free = tuple(j for j in sorted(reads) if last_read[j] == t and j not in (-1, into))
        passes.append(Pass(t, keep.get(t), into, stats, computed, free))
    return passes


def tiled_params(encoder: nn.Module, quant_conv: nn.Module | None, x: torch.Tensor, plan: TilePlan) -> torch.Tensor:
    """The encoder's raw parameters `[B, 2L, H/8, W/8]`, computed by tiles as `plan` says.

    Scratch files go under `$SDVAE_SCRATCH`, else the system's temporary folder; they are unlinked at once.
    Tiles write into kept maps, which autograd cannot follow: a call that autograd would record is refused.
    """
    if recording(encoder, x):
        raise RuntimeError("tiled encoding does not record autograd: run it under torch.no_grad() with frozen "
                           "weights, or encode untiled (no tile_size, a max_memory that fits) to backpropagate")
    with torch.no_grad(), winograd.scope():
        return _tiled_params(encoder, quant_conv, x, plan)


def _tiled_params(encoder: nn.Module, quant_conv: nn.Module | None, x: torch.Tensor, plan: TilePlan
                  ) -> torch.Tensor:
    nodes = encoder_nodes(encoder)
    shapes = output_shapes(nodes, tuple(x.shape))
    maps: dict[int, Activation] = {-1: RamActivation(x)}
    stats: dict[int, Stats] = {}
    for p in schedule(nodes, plan.stores):
        t, node = p.target, nodes[p.target]
        if p.into is not None:
            out = maps[p.into]
        elif p.store == "files":
            out = FileActivation(shapes[t], x.dtype, x.device)
        elif p.store == "memory":
            out = RamActivation.empty(shapes[t], x.dtype, x.device)
        else:
            out = None
        if node.attention is not None:
            tiled_attention(node.attention, out, stats.get(t - 1))
            if p.stats:
                stats[t] = whole_map_stats(out, nodes[t + 1].norm.num_groups, plan.side(node.level))
        else:
            stats[t] = _sweep(nodes, shapes, maps, stats, p, out, plan.side(node.level))
        if p.into is not None:
            del maps[p.into]
        if out is not None:
            maps[t] = out
        for j in p.free:
            del maps[j]
        release_freed_memory()
    params = maps[len(nodes) - 1].tensor
    return params if quant_conv is None else quant_conv(params)


def _sweep(nodes: list[Node], shapes: Shapes, maps: dict[int, Activation], stats: dict[int, Stats], p: Pass,
           out: Activation | None, tile: int) -> Stats | None:
    """Pass `p`: every tile of the target's output, written to `out` (if any); returns its statistics if wanted."""
    dtype = maps[-1].dtype
    prologues = {k: affine(nodes[k].norm, stats[k - 1], dtype) for k in p.computed if nodes[k].grouped}
    _, _, h, w = shapes[p.target]
    parts = []
    for r0, r1 in spans(h, tile):
        for c0, c1 in spans(w, tile):
            y = _tile(nodes, shapes, maps, prologues, p.computed, (r0, r1, c0, c1))
            if p.stats:
                parts.append(group_stats(y, nodes[p.target + 1].norm.num_groups))
            if out is not None:
                out.write(slice(r0, r1), slice(c0, c1), y)
    return merge_all(parts) if p.stats else None


def _tile(nodes: list[Node], shapes: Shapes, maps: dict[int, Activation],
          prologues: dict[int, tuple[torch.Tensor, torch.Tensor]], computed: tuple[int, ...], region: Region
          ) -> torch.Tensor:
    """The last computed node's output on `region`, evaluated from the kept outputs with the halos it needs."""
    needs = {computed[-1]: region}
    for k in reversed(computed):  # every consumer of a node comes after it, so its region is complete here
        inside, _ = input_region(nodes[k], needs[k], shapes[k - 1])
        for j, r in zip(inputs(nodes, k), (inside, needs[k])):
            old = needs.get(j, r)
            needs[j] = (min(r[0], old[0]), max(r[1], old[1]), min(r[2], old[2]), max(r[3], old[3]))
    values = {j: (maps[j].read(slice(r[0], r[1]), slice(r[2], r[3])), r) for j, r in needs.items() if j in maps}

    def crop(j: int, r: Region) -> torch.Tensor:
        value, (v0, _, u0, _) = values[j]
        return value[:, :, r[0] - v0:r[1] - v0, r[2] - u0:r[3] - u0]

    last_use = {j: k for k in computed for j in inputs(nodes, k)}
    for k in computed:
        node = nodes[k]
        inside, border = input_region(node, needs[k], shapes[k - 1])
        piece = crop(k - 1, inside)
        if node.norm is not None:
            buffer, interior = _padded_buffer(piece, border)
            if node.grouped:
                normalize(piece, *prologues[k], silu=True, out=interior)
            else:
                per_pixel_norm_silu_into(node.norm, piece, interior)
            piece = buffer
        elif any(border):
            piece = F.pad(piece, (border[2], border[3], border[0], border[1]))
        y = _conv(node.conv, piece)
        if node.skip is not None:
            residual = crop(node.skip - 1, needs[k])
            y += residual if node.shortcut is None else node.shortcut(residual)
        values[k] = (y, needs[k])
        for j in [j for j, user in last_use.items() if user == k and j in values]:
            del values[j]  # no later node of this tile reads it
    return values[computed[-1]][0]


def _conv(conv: nn.Conv2d, piece: torch.Tensor) -> torch.Tensor:
    """`conv` over `piece`, which holds the zero border: through Winograd's F(4x4, 3x3) on tiles where it gains
    (`sdvae.fast.winograd`, in the pass's workspace), else oneDNN's conv."""
    b, _, h, w = piece.shape
    pixels = b * (h - 2) * (w - 2)  # all that one transform of the kernel serves
    if not (fast.enabled() and winograd.suits(conv, pixels, piece.dtype, piece.device)):
        return F.conv2d(piece, conv.weight, conv.bias, stride=conv.stride)
    y = torch.empty(b, conv.out_channels, h - 2, w - 2, dtype=piece.dtype, device=piece.device,
                    memory_format=torch.channels_last)
    run = winograd.Conv3x3(conv, winograd.shared())
    for i in range(b):
        run(piece[i:i + 1], y[i:i + 1], add=False)
    return y


def _padded_buffer(piece: torch.Tensor, border: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A channels-last buffer the size of `piece` plus a zero border (top, bottom, left, right), and its interior."""
    top, bottom, left, right = border
    b, c, h, w = piece.shape
    buffer = piece.new_empty(b, c, top + h + bottom, left + w + right).contiguous(memory_format=torch.channels_last)
    for strip in (buffer[:, :, :top], buffer[:, :, top + h:], buffer[:, :, :, :left], buffer[:, :, :, left + w:]):
        strip.zero_()
    return buffer, buffer[:, :, top:top + h, left:left + w]


def whole_map_stats(x: Activation, groups: int, tile: int) -> Stats:
    """Per-sample, per-group statistics of the whole map `x`, accumulated over bands of `tile` rows."""
    return merge_all(group_stats(x.read(slice(r0, r1), slice(None)), groups) for r0, r1 in spans(x.shape[2], tile))


def attention_rows(channels: int, height: int, width: int, block: int = ATTENTION_BLOCK) -> int:
    """Rows of queries per block of the tiled attention: up to `block` tokens, and a block of scores (those queries
    by `block` keys) no larger than the keys and values together, which bounds the attention's memory."""
    tokens = height * width
    return max(1, min(block, 2 * tokens * channels // min(block, tokens)) // width)


def _projections(attention: Attention | wan.AttentionBlock) -> tuple[Callable[..., torch.Tensor], ...]:
    """(to_q, to_k, to_v, to_out) as functions of tokens `[B, N, C]`: the Linear layers, or the Wan block's 1x1
    convs (one for queries, keys and values, in that order) as linear maps."""
    if isinstance(attention, Attention):
        return attention.to_q, attention.to_k, attention.to_v, attention.to_out[0]
    c = attention.proj.out_channels
    weight, bias = attention.to_qkv.weight.view(3 * c, c), attention.to_qkv.bias
    parts = [lambda t, i=i: F.linear(t, weight[i * c:(i + 1) * c], bias[i * c:(i + 1) * c]) for i in range(3)]
    return (*parts, lambda t: F.linear(t, attention.proj.weight.view(c, c), attention.proj.bias))


def tiled_attention(attention: Attention | wan.AttentionBlock, x: Activation, stats: Stats | None,
                    block: int = ATTENTION_BLOCK) -> None:
    """Single-head attention over all pixels of `x` (whose GroupNorm statistics are `stats`; the Wan block's RMS
    norm needs none), by blocks of rows (`attention_rows`) with an online softmax; adds its output into `x`. Holds
    the keys, the values and one block of scores, computed in place in a buffer made once."""
    b, c, h, w = x.shape
    to_q, to_k, to_v, to_out = _projections(attention)
    if isinstance(attention, Attention):
        scale, shift = affine(attention.group_norm, stats, x.dtype)
    rows_per_block = attention_rows(c, h, w, block)
    row_blocks = [slice(r0, r1) for r0, r1 in spans(h, rows_per_block)]

    def tokens(piece: torch.Tensor) -> torch.Tensor:
        normed = (normalize(piece, scale, shift, silu=False) if isinstance(attention, Attention)
                  else attention.norm(piece))
        return normed.permute(0, 2, 3, 1).reshape(b, -1, c)

    keys = torch.empty(b, h * w, c, dtype=x.dtype, device=x.device)
    values = torch.empty_like(keys)
    for rows in row_blocks:  # filled block by block: only the keys, the values and one block are held
        normed = tokens(x.read(rows, slice(None)))
        start = rows.start * w
        keys[:, start:start + normed.shape[1]] = to_k(normed)
        values[:, start:start + normed.shape[1]] = to_v(normed)
    release_freed_memory()
    key_blocks = spans(keys.shape[1], block)
    buffer = keys.new_empty(b * min(rows_per_block, h) * w * min(block, h * w))
    for rows in row_blocks:
        piece = x.read(rows, slice(None))
        q = to_q(tokens(piece))
        top = q.new_full((b, q.shape[1], 1), float("-inf"))
        total = q.new_zeros(b, q.shape[1], 1)
        acc = q.new_zeros(b, q.shape[1], c)
        for k0, k1 in key_blocks:
            scores = buffer[:b * q.shape[1] * (k1 - k0)].view(b, q.shape[1], k1 - k0)
            torch.bmm(q, keys[:, k0:k1].transpose(1, 2), out=scores).mul_(c ** -0.5)
            new_top = torch.maximum(top, scores.amax(-1, keepdim=True))
            correction = torch.exp(top - new_top)
            p = scores.sub_(new_top).exp_()
            total.mul_(correction).add_(p.sum(-1, keepdim=True))
            acc.mul_(correction).baddbmm_(p, values[:, k0:k1])
            top = new_top
        out = to_out(acc.div_(total)).reshape(b, piece.shape[2], w, c).permute(0, 3, 1, 2)
        x.write(rows, slice(None), out.add_(piece))
        release_freed_memory()
