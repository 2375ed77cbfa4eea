"""Winograd's F(4x4, 3x3): a 3x3 convolution in 4x fewer multiplications, for float32 on the CPU.

Each 4x4 output tile is `A^T [(G w G^T) * (B^T d B)] A`, d the 6x6 input tile around it (stride 4). Summed over input
channels, the 36 elementwise products become 36 matrix products `[tiles, C_in] @ [C_in, C_out]`, one batched GEMM, so
the multiplications drop from 9 to 2.25 per output value. The transforms are small matrices applied along the rows of
each row of tiles (a batched GEMM with 6 terms: one read and one write of each value), and along the columns (one
elementwise pass per nonzero entry: there a GEMM would be one tiny product per tile). The matrices come from the
Cook-Toom construction at the points 0, -1, 1, 1/2, -2 and infinity: of the point sets tried, the most accurate in
float32 (within float32 parity for the whole encoder; the errors and times per conv are in `bench/README.md`). B^T and
A^T hold dyadic fractions, exact in float32. A band goes through in pieces of a few rows, so the transformed tiles are
still in cache when the GEMM reads them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

# F(4x4, 3x3): B^T takes an input tile's 6 rows to 6 terms, G a kernel's 3 rows to 6, A^T 6 products to 4 outputs.
_BT = ((1, -3 / 2, -2, 3 / 2, 1, 0), (0, 1, -5 / 2, 1 / 2, 1, 0), (0, -1, 1 / 2, 5 / 2, 1, 0),
       (0, -2, -1, 2, 1, 0), (0, 1 / 2, -1, -1 / 2, 1, 0), (0, 1, -3 / 2, -2, 3 / 2, 1))
_G = ((1, 0, 0), (-1 / 3, 1 / 3, -1 / 3), (1 / 3, 1 / 3, 1 / 3), (-16 / 15, -8 / 15, -4 / 15),
      (1 / 15, -2 / 15, 4 / 15), (0, 0, 1))
_AT = ((1, 1, 1, 1, 1, 0), (0, -1, 1, 1 / 2, -2, 0), (0, 1, 1, 1 / 4, 4, 0), (0, -1, 1, 1 / 8, -8, 1))
_BIAS_TERM = 2 * 6 + 2  # A^T's column 2 (the point 1) is all ones: product (2, 2) reaches each output once
WORKSPACE_BYTES = 32 << 20  # the transformed tiles and products of one piece of a band
MIN_CHANNELS = 128 * 128  # C_in x C_out below which the GEMMs are too small to gain
MIN_WORK = 1 << 28  # output pixels x C_in x C_out that one transform of the kernel must serve to repay it: twice the
# break-even measured (bench/winograd.py)


def suits(conv: nn.Conv2d, pixels: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `conv` over `pixels` output pixels (all that one transform of its kernel serves: a batch of whole
    maps, or one tile) runs faster here than directly: a float32 CPU 3x3 conv of stride 1, wide enough."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and gains(conv.in_channels, conv.out_channels, pixels, dtype, device))


def gains(c_in: int, c_out: int, pixels: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a 3x3 conv of stride 1 with these widths over `pixels` output pixels runs faster here than directly:
    float32 on the CPU, GEMMs large enough (MIN_CHANNELS), and enough pixels to repay the kernel's transform (MIN_WORK;
    on small maps the transformed kernel, 4x the weights, costs more to make and read than the direct conv)."""
    return (device.type == "cpu" and dtype == torch.float32 and c_in * c_out >= MIN_CHANNELS
            and pixels * c_in * c_out >= MIN_WORK)


def transform_kernel(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`G w G^T` for each (output, input) channel pair of `weight` `[C_out, C_in, 3, 3]`: `[36, C_in, C_out]`, a
    transposed view of `[36, C_out, C_in]` (the GEMM reads it so at full speed), in `out`'s storage if given."""
    c_out, c_in = weight.shape[:2]
    g = torch.tensor(_G, dtype=weight.dtype, device=weight.device)
    taps = weight.permute(0, 2, 3, 1).reshape(c_out, 9, c_in)  # a view of channels-last weights
    kernel = (weight.new_empty(36 * c_out * c_in) if out is None else out).view(36, c_out, c_in)
    torch.matmul(torch.kron(g, g), taps, out=kernel.permute(1, 0, 2))  # per output channel: [36, 9] @ [9, C_in]
    return kernel.transpose(1, 2)


class Workspace:
    """The memory of Winograd convs that run one after another: the transformed kernel of the conv that ran last
    (transformed again when another ran since), then the buffers of one piece, in one allocation that only grows.

    One workspace serves a whole forward pass (`scope`): no large buffer is allocated and freed per block. It
    reserves at least RESERVE bytes, of which only the pages used become resident: glibc serves so large a block
    from mmap and returns it at once, rather than raising its mmap threshold and keeping freed heap memory.
    """

    RESERVE = 64 << 20

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.kernel_of: nn.Conv2d | None = None

    def take(self, conv: nn.Conv2d, shapes: list[tuple[int, ...]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """`conv`'s transformed kernel and views of the given shapes, all in this workspace."""
        weight = conv.weight.detach()
        sizes = _sizes(weight.shape[1], weight.shape[0], shapes)
        if self.buffer is None or self.buffer.numel() < sum(sizes) or self.buffer.dtype != weight.dtype:
            reserve = max(sum(sizes), self.RESERVE // weight.element_size())
            self.buffer, self.kernel_of = weight.new_empty(reserve), None
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        kernel, *views = (self.buffer[s:s + n] for s, n in zip(starts, sizes))
        if self.kernel_of is not conv:
            transform_kernel(weight, out=kernel)
            self.kernel_of = conv
        c_out, c_in = weight.shape[:2]
        return kernel.view(36, c_out, c_in).transpose(1, 2), [v.view(shape) for v, shape in zip(views, shapes)]


_SCOPED: ContextVar[Workspace | None] = ContextVar("sdvae_winograd_workspace", default=None)


@contextmanager
def scope() -> Iterator[None]:
    """One workspace for the Winograd convs run inside (one forward pass), freed at the end."""
    token = _SCOPED.set(Workspace())
    try:
        yield
    finally:
        _SCOPED.reset(token)


def shared() -> Workspace:
    """The workspace of the enclosing `scope`, else a new one."""
    return _SCOPED.get() or Workspace()


def _step(c_in: int, c_out: int, width: int, element_size: int) -> int:
    """Output rows per piece of a band `width` wide: about WORKSPACE_BYTES of buffers, at least one row of tiles."""
    per_row = 15 * (c_in + c_out) * (width + 6) * element_size // 4  # 3.75 maps of buffers per output row
    return max(4, WORKSPACE_BYTES // per_row // 4 * 4)


def _piece_shapes(rows: int, width: int, columns: int, c_in: int, c_out: int) -> list[tuple[int, ...]]:
    """The buffers of a piece of `rows` x `width` outputs from `columns` input columns: rows-transformed input,
    tiles, products, columns-transformed products, then the zero-extended input and output when a side is not a
    multiple of 4."""
    h, w = -(-rows // 4), -(-width // 4)  # tiles down and across
    shapes = [(h, 6, 4 * w + 2, c_in), (36, h * w, c_in), (36, h * w, c_out), (h, 6, w, 4, c_out)]
    if rows % 4:
        shapes.append((4 * h + 2, columns, c_in))
    if rows % 4 or width % 4:
        shapes.append((4 * h, 4 * w, c_out))
    return shapes


def workspace_bytes(c_in: int, c_out: int, rows: int, width: int, element_size: int) -> int:
    """What a workspace holds for a conv run on `rows` x `width` outputs at a time: its kernel and largest piece
    (the RESERVE aside, of which only the pages used become resident)."""
    shapes = _piece_shapes(min(rows, _step(c_in, c_out, width, element_size)), width, width + 2, c_in, c_out)
    return sum(_sizes(c_in, c_out, shapes)) * element_size


def _sizes(c_in: int, c_out: int, shapes: list[tuple[int, ...]]) -> list[int]:
    """Elements of a workspace's parts, in its order: the transformed kernel, then the piece buffers."""
    return [36 * c_in * c_out] + [torch.Size(shape).numel() for shape in shapes]


class Conv3x3:
    """`run(x, out, add)`: one 3x3 conv of stride 1 into `out` `[1, C_out, R, W]` (`out +=` with `add`), channels-
    last, over `x` `[1, C_in, R + 2, W]`, a band that holds its halo rows (zero rows at the image's edges: what
    `sdvae.fast.bands.conv_into` takes, padded with zero columns here), or `[1, C_in, R + 2, W + 2]`, a tile that holds
    its zero border too. Convs sharing a workspace should run one after another: each switch transforms the kernel
    again."""

    def __init__(self, conv: nn.Conv2d, workspace: Workspace):
        self.conv = conv
        self.bias = conv.bias.detach() if conv.bias is not None else None
        self.workspace = workspace

    def __call__(self, x: torch.Tensor, out: torch.Tensor, add: bool) -> None:
        c_in, (c_out, rows, width) = x.shape[1], out.shape[1:]
        step = _step(c_in, c_out, width, x.element_size())
        for r0 in range(0, rows, step):
            r1 = min(r0 + step, rows)
            self._piece(x[:, :, r0:r1 + 2], out[:, :, r0:r1], add)

    def _piece(self, x: torch.Tensor, out: torch.Tensor, add: bool) -> None:
        """Output rows from their input rows; a height or width not a multiple of 4 goes through zero-extended
        buffers."""
        c_in, (c_out, rows, width) = x.shape[1], out.shape[1:]
        h, w = -(-rows // 4), -(-width // 4)  # tiles down and across
        pad = (width + 2 - x.shape[3]) // 2  # zero columns to add on each side: 1 for a band, 0 for a tile
        kernel, (across, tiles, products, half, *extended) = self.workspace.take(
            self.conv, _piece_shapes(rows, width, x.shape[3], c_in, c_out))
        d = x[0].permute(1, 2, 0)  # [rows, columns, C_in]: each pixel's channels contiguous
        if rows % 4:  # the last tiles read zero rows below the band
            d = _extend(d, extended.pop(0))
        # B^T d B: along rows into `across` [h, 6, columns with their zero padding, C_in], then along columns.
        across[:, :, :pad].zero_()
        across[:, :, pad + x.shape[3]:].zero_()
        rows_of_tiles = d.unfold(0, 6, 4).permute(0, 3, 1, 2)  # [h, 6, columns, C_in]: a view, rows overlapping
        _tile_rows(_matrix(_BT, x.dtype, x.device), rows_of_tiles, across[:, :, pad:pad + x.shape[3]])
        v = tiles.view(6, 6, h, w, c_in)  # [row term, column term, h, w, C_in]
        columns = across.permute(2, 1, 0, 3)
        _apply(_BT, [columns[k:k + 4 * w:4] for k in range(6)], v.permute(1, 3, 0, 2, 4))  # all row terms at once
        torch.bmm(tiles, kernel, out=products)
        if self.bias is not None:
            products[_BIAS_TERM] += self.bias
        # A^T m A: along columns into `half` [h, 6, w, 4, C_out], then along rows into the output.
        m = products.view(6, 6, h, w, c_out)
        _apply(_AT, m.transpose(0, 1), half.permute(3, 1, 0, 2, 4))
        y = extended[0] if extended else out[0].permute(1, 2, 0)
        _tile_rows(_matrix(_AT, x.dtype, x.device), half, y.view(h, 4, 4 * w, c_out), add=add and not extended)
        if extended:
            target, result = out[0].permute(1, 2, 0), extended[0][:rows, :width]
            if add:
                target.add_(result)
            else:
                target.copy_(result)


def _extend(d: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
    """`d` in the top-left corner of `into`, zeros elsewhere."""
    into.zero_()[:d.shape[0], :d.shape[1]] = d
    return into


@functools.cache
def _matrix(entries: tuple[tuple[float, ...], ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A transform matrix as a tensor, made once per dtype and device (tiles make a `Conv3x3` per tile)."""
    return torch.tensor(entries, dtype=dtype, device=device)


def _tile_rows(matrix: torch.Tensor, src: torch.Tensor, out: torch.Tensor, add: bool = False) -> None:
    """`out[i] = matrix @ src[i]` (`+=` with `add`) for each row of tiles i: `src` `[h, K, ...]`, `out` `[h, M, ...]`,
    each `[...]` a run of contiguous memory; one batched GEMM, which reads and writes each value once."""
    src, out = (t.view(t.shape[0], t.shape[1], -1) for t in (src, out))
    batch = matrix.expand(src.shape[0], -1, -1)
    if add:
        out.baddbmm_(batch, src)
    else:
        torch.bmm(batch, src, out=out)


def _apply(matrix: Sequence[Sequence[float]], src: Sequence[torch.Tensor], out: torch.Tensor) -> None:
    """`out[k] = sum_l matrix[k][l] src[l]`, zero entries skipped: one elementwise pass per term. Each row of the
    transforms holds a 1, with which its sum starts."""
    for row, target in zip(matrix, out):
        terms = [(c, s) for c, s in zip(row, src) if c]
        _, first = terms.pop(next(i for i, (c, _) in enumerate(terms) if c == 1))
        c, s = terms.pop(0)
        torch.add(first, s, alpha=c, out=target)
        for c, s in terms:
            target.add_(s, alpha=c)
