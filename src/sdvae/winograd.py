"""Winograd's F(2x2, 3x3): a 3x3 convolution in 2.25x fewer multiplications, for float32 on the CPU.

Each 2x2 output tile is `A^T [(G w G^T) * (B^T d B)] A`, d the 4x4 input tile around it (stride 2). Summed over
input channels, the 16 elementwise products become 16 matrix products `[tiles, C_in] @ [C_in, C_out]`, one batched
GEMM, so the multiplications drop from 9 to 4 per output value. The transforms B and A take sums and differences
only, G halves: the result is as close to the float64 convolution as oneDNN's direct one (closer, measured: 7e-7
against 3e-6 relative for a 512-channel conv). In the encoder, its 512-channel convs take 0.64x and its
256-channel convs 0.77x of oneDNN's direct time (`bench/README.md`); at 128 channels the transforms cost what the
GEMMs save, so those stay direct. A band goes through in pieces of a few rows, so the transformed tiles are still
in cache when the GEMM reads them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

# G of F(2x2, 3x3), the kernel transform: rows of 4 from columns of 3.
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
WORKSPACE_BYTES = 32 << 20  # the transformed tiles and products of one piece of a band
MIN_WORK = 128 * 256  # C_in x C_out below which the GEMMs are too small to gain (128 x 128 is break-even)


def suits(conv: nn.Conv2d, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `conv` runs faster here than directly: a float32 CPU 3x3 conv of stride 1, wide enough."""
    return (device.type == "cpu" and dtype == torch.float32 and conv.kernel_size == (3, 3)
            and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.in_channels * conv.out_channels >= MIN_WORK)


def transform_kernel(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`G w G^T` for each (output, input) channel pair of `weight` `[C_out, C_in, 3, 3]`: `[16, C_in, C_out]`, a
    transposed view of `[16, C_out, C_in]` (the GEMM reads it so at full speed), in `out`'s storage if given."""
    c_out, c_in = weight.shape[:2]
    g = torch.tensor(_G, dtype=weight.dtype, device=weight.device)
    taps = weight.permute(0, 2, 3, 1).reshape(c_out, 9, c_in)  # a view of channels-last weights
    kernel = (weight.new_empty(16 * c_out * c_in) if out is None else out).view(16, c_out, c_in)
    torch.matmul(torch.kron(g, g), taps, out=kernel.permute(1, 0, 2))  # per output channel: [16, 9] @ [9, C_in]
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
        sizes = [16 * weight.shape[0] * weight.shape[1]] + [torch.Size(shape).numel() for shape in shapes]
        if self.buffer is None or self.buffer.numel() < sum(sizes) or self.buffer.dtype != weight.dtype:
            reserve = max(sum(sizes), self.RESERVE // weight.element_size())
            self.buffer, self.kernel_of = weight.new_empty(reserve), None
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        kernel, *views = (self.buffer[s:s + n] for s, n in zip(starts, sizes))
        if self.kernel_of is not conv:
            transform_kernel(weight, out=kernel)
            self.kernel_of = conv
        c_out, c_in = weight.shape[:2]
        return kernel.view(16, c_out, c_in).transpose(1, 2), [v.view(shape) for v, shape in zip(views, shapes)]


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


class Conv3x3:
    """`run(x, out, add)`: one 3x3 conv of stride 1, padding 1, over a band `x` `[1, C_in, R + 2, W]` that holds its
    halo rows (zero rows at the image's edges), into `out` `[1, C_out, R, W]` (`out +=` with `add`), channels-last:
    what `sdvae.bands.conv_into` takes. Convs sharing a workspace should run one after another: each switch
    transforms the kernel again."""

    def __init__(self, conv: nn.Conv2d, workspace: Workspace):
        self.conv = conv
        self.bias = conv.bias.detach() if conv.bias is not None else None
        self.workspace = workspace

    def __call__(self, x: torch.Tensor, out: torch.Tensor, add: bool) -> None:
        c_in, (c_out, rows, width) = x.shape[1], out.shape[1:]
        per_row = 6 * (c_in + c_out) * (width + 3) * x.element_size()  # workspace per output row
        step = max(2, WORKSPACE_BYTES // per_row // 2 * 2)
        for r0 in range(0, rows, step):
            r1 = min(r0 + step, rows)
            self._piece(x[:, :, r0:r1 + 2], out[:, :, r0:r1], add)

    def _piece(self, x: torch.Tensor, out: torch.Tensor, add: bool) -> None:
        """Output rows from their input rows; an odd height or width goes through zero-extended buffers."""
        c_in, (c_out, rows, width) = x.shape[1], out.shape[1:]
        h, w = (rows + 1) // 2, (width + 1) // 2  # tiles down and across
        shapes = [(4, h, 2 * w + 2, c_in), (16, h * w, c_in), (16, h * w, c_out), (4, 2, h, w, c_out)]
        if rows % 2:
            shapes.append((2 * h + 2, width, c_in))
        if rows % 2 or width % 2:
            shapes.append((2 * h, 2 * w, c_out))
        kernel, (across, tiles, products, half, *extended) = self.workspace.take(self.conv, shapes)
        d = x[0].permute(1, 2, 0)  # [rows, columns, C_in]: each pixel's channels contiguous
        if rows % 2:  # the last tile reads one zero row below the band
            d = _extend(d, extended.pop(0))
        # B^T d B: along rows into `across` [4, h, columns with their zero padding, C_in], then along columns.
        across[:, :, 0].zero_()
        across[:, :, width + 1:].zero_()
        _transform_input(d, across[:, :, 1:width + 1], h)
        v = tiles.view(4, 4, h, w, c_in)  # [row term, column term, h, w, C_in]
        _transform_input(across.permute(2, 0, 1, 3), v.permute(1, 3, 0, 2, 4), w)  # all row terms at once
        torch.bmm(tiles, kernel, out=products)
        if self.bias is not None:
            products[5] += self.bias  # m[1][1] reaches each output of its tile once: the bias enters once
        # A^T m A: along columns into `half` [4, 2, h, w, C_out], then along rows into the output.
        m = products.view(4, 4, h, w, c_out)
        _transform_output(m.transpose(0, 1), half.transpose(0, 1), add=False)
        y = extended[0] if extended else out[0].permute(1, 2, 0)
        y = y.view(h, 2, w, 2, c_out).permute(1, 0, 2, 3, 4)  # [row in tile, h, w, column in tile, C_out]
        _transform_output(half.permute(0, 2, 3, 1, 4), y, add=add and not extended)
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


def _transform_input(d: torch.Tensor, out: torch.Tensor, n: int) -> None:
    """`out = B^T d` along d's first axis, for `n` tiles of 4 at stride 2 (B^T's rows: d0 - d2, d1 + d2,
    d2 - d1, d1 - d3)."""
    d0, d1, d2, d3 = (d[k:k + 2 * n:2] for k in range(4))
    torch.sub(d0, d2, out=out[0])
    torch.add(d1, d2, out=out[1])
    torch.sub(d2, d1, out=out[2])
    torch.sub(d1, d3, out=out[3])


def _transform_output(m: torch.Tensor, out: torch.Tensor, add: bool) -> None:
    """`out = A^T m` (`out += A^T m` with `add`) along m's first axis (A^T's rows: m0 + m1 + m2, m1 - m2 - m3)."""
    if add:
        out[0] += m[0]
        out[0] += m[1]
        out[1] += m[1]
        out[1] -= m[2]
    else:
        torch.add(m[0], m[1], out=out[0])
        torch.sub(m[1], m[2], out=out[1])
    out[0] += m[2]
    out[1] -= m[3]
