"""Winograd's F(4x4, 3x3) (sdvae.fast.winograd) against the float64 convolution: its matrices, bands, pieces, sizes
that are not multiples of the tile, sums."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import rel_err
from torch import nn

from sdvae.fast import winograd
from sdvae.fast.bands import conv_into


def band(channels: int, rows: int, width: int, seed: int) -> torch.Tensor:
    """`[1, C, rows + 2, width]` channels-last: a band with its halo rows, as resnets pass them."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, channels, rows + 2, width, generator=g) + 0.5).contiguous(memory_format=torch.channels_last)


def conv64(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The float64 reference: padding 1 on the columns only (the band holds its rows)."""
    bias = None if conv.bias is None else conv.bias.double()
    return F.conv2d(x.double(), conv.weight.double(), bias, padding=(0, 1))


def test_the_transforms_compute_a_correlation_of_4_outputs():
    """A^T [(G g) * (B^T d)] = the 3-tap correlation of 6 inputs, for any g and d (the Cook-Toom identity)."""
    bt, g, at = (torch.tensor(m, dtype=torch.float64) for m in (winograd._BT, winograd._G, winograd._AT))
    taps, inputs = torch.randn(3, 100, dtype=torch.float64), torch.randn(6, 100, dtype=torch.float64)
    want = torch.stack([sum(taps[j] * inputs[k + j] for j in range(3)) for k in range(4)])
    assert torch.allclose(at @ ((g @ taps) * (bt @ inputs)), want, rtol=0, atol=1e-13)
    assert (at[:, winograd._BIAS_TERM // 6] == 1).all()  # the product the bias enters reaches each output once


def test_kernel_transform_is_g_w_g_transposed():
    g = torch.tensor(winograd._G, dtype=torch.float64)
    w = torch.randn(5, 7, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = torch.stack([g @ w[o, i] @ g.T for o in range(5) for i in range(7)]).view(5, 7, 36).permute(2, 1, 0)
    for weight in (w, w.contiguous(memory_format=torch.channels_last)):
        assert torch.allclose(winograd.transform_kernel(weight), want, rtol=0, atol=1e-14)  # a few float64 ulps


@pytest.mark.parametrize("rows,width", [(8, 16), (7, 13), (1, 1), (33, 6), (6, 5), (10, 18)])  # any remainder
@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("piece_bytes", [1, 1 << 20])  # pieces of four output rows; the band in one piece
def test_conv3x3_equals_the_float64_convolution(rows, width, add, piece_bytes, monkeypatch):
    monkeypatch.setattr(winograd, "WORKSPACE_BYTES", piece_bytes)
    conv = nn.Conv2d(48, 40, 3, padding=1).requires_grad_(False)
    x = band(48, rows, width, seed=rows * width)
    out = torch.randn(1, 40, rows, width).contiguous(memory_format=torch.channels_last)
    want = conv64(x, conv) + (out.double() if add else 0)
    direct = out.clone()
    winograd.Conv3x3(conv, winograd.Workspace())(x, out, add)
    conv_into(conv, x, direct, add)
    assert rel_err(out, want) <= 1.5e-6  # float32 rounding: 2-9e-7 measured, oneDNN's direct conv 0.6-4e-7


def test_a_wide_conv_stays_within_a_few_times_the_rounding_of_the_direct_one():
    """At the encoder's widths F(4x4, 3x3) rounds about twice as much as oneDNN's direct conv (1.5e-6 against 8.6e-7
    measured at 256 channels): still float32 parity."""
    conv = nn.Conv2d(256, 256, 3, padding=1).requires_grad_(False)
    x = band(256, 20, 28, seed=5)
    out, direct = (torch.empty(1, 256, 20, 28).contiguous(memory_format=torch.channels_last) for _ in range(2))
    winograd.Conv3x3(conv, winograd.Workspace())(x, out, add=False)
    conv_into(conv, x, direct, add=False)
    want = conv64(x, conv)
    assert rel_err(out, want) <= min(3e-6, 3 * rel_err(direct, want))


def test_conv3x3_without_bias_writes_only_its_rows():
    conv = nn.Conv2d(16, 24, 3, padding=1, bias=False).requires_grad_(False)
    x = band(16, 5, 9, seed=3)
    out = torch.full((1, 24, 9, 9), 7.0).contiguous(memory_format=torch.channels_last)
    winograd.Conv3x3(conv, winograd.Workspace())(x, out[:, :, 2:7], add=False)
    assert rel_err(out[:, :, 2:7], conv64(x, conv)) <= 1.5e-6
    assert (out[:, :, :2] == 7).all() and (out[:, :, 7:] == 7).all()


@pytest.mark.parametrize("reserve", [0, winograd.Workspace.RESERVE])  # grown for the larger conv; reserved
def test_convs_sharing_a_workspace_do_not_disturb_each_other(reserve, monkeypatch):
    """Each conv's kernel is transformed again when another ran since, or when the workspace had to grow."""
    monkeypatch.setattr(winograd.Workspace, "RESERVE", reserve)
    workspace = winograd.Workspace()
    small, large = nn.Conv2d(8, 8, 3, padding=1).requires_grad_(False), nn.Conv2d(32, 16, 3, padding=1).requires_grad_(False)
    runs = [winograd.Conv3x3(small, workspace), winograd.Conv3x3(large, workspace)]
    for conv, run, rows in ((small, runs[0], 4), (large, runs[1], 10), (small, runs[0], 6)):
        x = band(conv.in_channels, rows, 12, seed=rows)
        out = torch.empty(1, conv.out_channels, rows, 12).contiguous(memory_format=torch.channels_last)
        run(x, out, add=False)
        assert rel_err(out, conv64(x, conv)) <= 1.5e-6


def test_winograd_takes_the_wide_float32_cpu_convs_only():
    cpu, f32, many = torch.device("cpu"), torch.float32, 128 * 128  # output pixels
    wide = nn.Conv2d(256, 256, 3, padding=1)
    assert winograd.suits(wide, many, f32, cpu) and winograd.suits(nn.Conv2d(128, 128, 3), many, f32, cpu)
    assert not winograd.suits(wide, many, torch.float64, cpu) and not winograd.suits(wide, many, torch.bfloat16, cpu)
    assert not winograd.suits(wide, many, f32, torch.device("meta"))
    assert not winograd.suits(nn.Conv2d(64, 128, 3), many, f32, cpu)  # GEMMs too small: oneDNN's direct conv
    assert not winograd.suits(nn.Conv2d(256, 256, 3, stride=2), many, f32, cpu)
    assert not winograd.suits(nn.Conv2d(256, 256, 1), many, f32, cpu)


def test_small_maps_keep_the_direct_conv():
    """The transformed kernel (4x the weights) must be made and read once per map, or per tile: on too few pixels
    the direct conv is faster."""
    cpu, f32 = torch.device("cpu"), torch.float32
    narrow, wide = nn.Conv2d(128, 128, 3, padding=1), nn.Conv2d(512, 512, 3, padding=1)
    assert winograd.suits(narrow, 128 * 128, f32, cpu) and winograd.suits(wide, 32 * 32, f32, cpu)
    assert not winograd.suits(narrow, 64 * 64, f32, cpu) and not winograd.suits(wide, 16 * 16, f32, cpu)
    assert winograd.suits(wide, 4 * 16 * 16, f32, cpu)  # a batch of 4 maps shares one transform


def test_a_scope_shares_one_workspace_and_frees_it():
    assert winograd.shared() is not winograd.shared()  # outside a scope: a new one each time
    with winograd.scope():
        inner = winograd.shared()
        assert winograd.shared() is inner
    assert winograd.shared() is not inner


def test_a_tile_that_holds_its_zero_border_takes_no_more_padding():
    """`[1, C, R + 2, W + 2]` in, `[1, C_out, R, W]` out: the tiled encoder's form (every side padded already)."""
    conv = nn.Conv2d(24, 16, 3, padding=1).requires_grad_(False)
    for rows, width in ((9, 7), (8, 12)):
        x = band(24, rows, width + 2, seed=rows)
        out = torch.empty(1, 16, rows, width).contiguous(memory_format=torch.channels_last)
        winograd.Conv3x3(conv, winograd.Workspace())(x, out, add=False)
        want = F.conv2d(x.double(), conv.weight.double(), conv.bias.double())
        assert rel_err(out, want) <= 1.5e-6
