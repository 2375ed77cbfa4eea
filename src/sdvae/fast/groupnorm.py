"""GroupNorm from exact statistics: per-group (count, mean, M2) that merge across tiles, then a per-channel affine.

Used by the whole-image path and the tiled one alike. It replaces `F.group_norm`, whose channels-last float32
CPU kernel loses precision on large maps with an offset (`bench/README.md`): the statistics here are two-pass per
channel, merged in float64.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

Stats = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # count, mean, M2 per (sample, group), float64
STATS_CHUNK = 16384  # pixels per chunk of the squared-deviation pass (a row band of `sdvae.fast.bands` in one go)
HALF_CHUNK = 1 << 19  # elements of a half-precision map normalized at once in float32 (2 MiB: about an L2 cache)
HALF = (torch.float16, torch.bfloat16)


def recording(*parts: torch.Tensor | nn.Module) -> bool:
    """Whether autograd records ops on these tensors and modules' parameters."""
    return torch.is_grad_enabled() and any(
        p.requires_grad for part in parts for p in (part.parameters() if isinstance(part, nn.Module) else (part,)))


def in_place_ok(*parts: torch.Tensor | nn.Module) -> bool:
    """Whether ops on these may write into existing maps: autograd records none of them (it needs the values it
    saw) and torch.compile is not tracing (`out=` on a channels-last map breaks its graph; it fuses ops itself)."""
    return not torch.compiler.is_compiling() and not recording(*parts)


def group_stats(x: torch.Tensor, groups: int) -> Stats:
    """(count, mean, M2) per sample and group of `x` `[B, C, H, W]`, in float64.

    Per channel first (`channel_stats`), then the channels of each group merged exactly in float64.
    """
    b, c, h, w = x.shape
    mean, m2 = channel_stats(x)
    channel_mean = mean.double().view(b, groups, -1)
    group_mean = channel_mean.mean(-1)
    spread = (channel_mean - group_mean[..., None]).square().sum(-1)
    group_m2 = m2.double().view(b, groups, -1).sum(-1) + h * w * spread
    return torch.full_like(group_mean, h * w * (c // groups)), group_mean, group_m2


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and M2 (sum of squared deviations) per sample and channel of `x` `[B, C, H, W]`: `[B, C]` each.

    float32/float64 maps: two passes, the mean, then the squared deviations from it over cache-sized chunks.
    float16/bfloat16 maps: PyTorch's batch-norm statistics (one read, float32 accumulation, float32 results),
    per sample: several times faster than converting the map to float32 first, and precise far beyond the map's
    own resolution.
    """
    b, c, h, w = x.shape
    if x.dtype in HALF:
        one = torch.ones(c, device=x.device)  # float32 affine parameters select the float32 statistics
        stats = [torch.native_batch_norm(x[i:i + 1], one, one, None, None, True, 0.0, 0.0)[1:] for i in range(b)]
        mean, invstd = (torch.stack(parts) for parts in zip(*stats))
        var = torch.where(invstd > 0, invstd.pow(-2), 0.0)  # a constant channel has invstd 0 here (eps is 0), not inf
        return mean, var * (h * w)
    values = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view for channels-last x (a band of full rows)
    mean = values.mean(1, keepdim=True)
    m2 = torch.stack([(chunk - mean).square_().sum(1) for chunk in values.split(STATS_CHUNK, dim=1)]).sum(0)
    return mean[:, 0], m2


def merge_stats(a: Stats, b: Stats) -> Stats:
    """Chan et al.'s exact merge of two sets' (count, mean, M2): the between-set term included."""
    (na, ma, m2a), (nb, mb, m2b) = a, b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * nb / n, m2a + m2b + delta.square() * na * nb / n


def merge_all(parts: Iterable[Stats]) -> Stats:
    """The statistics of a map from those of its parts (bands, tiles: of the same samples each), merged exactly."""
    return functools.reduce(merge_stats, parts)


def affine(norm: nn.GroupNorm, stats: Stats, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The GroupNorm as `x * scale + shift` per sample and channel (`[B, C, 1, 1]` each), from whole-map stats.

    In the map's dtype, except float32 for half-precision maps: rounded to half precision, `scale` and `shift` would
    put an error of about |mean| / std ulps on every value (see `normalize`).
    """
    count, mean, m2 = stats
    per_group = norm.num_channels // norm.num_groups
    rstd = torch.rsqrt(m2 / count + norm.eps).repeat_interleave(per_group, dim=1)
    scale = rstd * norm.weight.double()
    shift = norm.bias.double() - mean.repeat_interleave(per_group, dim=1) * scale
    dtype = torch.float32 if dtype in HALF else dtype
    return scale.to(dtype)[:, :, None, None], shift.to(dtype)[:, :, None, None]


def norm_silu_rows(norm: nn.GroupNorm, stats: Stats, dtype: torch.dtype
                   ) -> Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]:
    """`apply(i, rows, out)`: SiLU(GroupNorm(rows)) of sample i's `rows` into `out`, with whole-map `stats`."""
    scale, shift = affine(norm, stats, dtype)
    return lambda i, rows, out: normalize(rows, scale[i:i + 1], shift[i:i + 1], silu=True, out=out)


def normalize(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, silu: bool,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """`x * scale + shift`, then SiLU if asked, into `out` (which may be `x` itself) or a new tensor.

    A half-precision `x` with float32 `scale` and `shift` (as `affine` gives them) is computed in float32, a chunk
    of rows at a time (each chunk stays in cache), and rounded once into `out`: rounding the normalized value, then
    its SiLU, makes the bfloat16 encoder's error against float32 larger (`bench/README.md`).
    Under autograd, and while torch.compile traces (where `out=` on a channels-last map breaks the graph, and the
    compiler fuses the ops itself), the result is a new tensor and `out` is left alone.
    """
    if not in_place_ok(x, scale, shift):
        y = torch.addcmul(shift, x, scale)
        return (F.silu(y) if silu else y).to(x.dtype)
    out = torch.empty_like(x) if out is None else out
    if x.dtype == scale.dtype:
        y = torch.addcmul(shift, x, scale, out=out)
        return F.silu(y, inplace=True) if silu else y
    b, c, h, w = x.shape
    rows = h if x.device.type != "cpu" else max(1, HALF_CHUNK // max(1, b * c * w))  # chunks fit a CPU cache
    buffer = torch.empty(b, min(rows, h), w, c, dtype=scale.dtype, device=x.device).permute(0, 3, 1, 2)
    for r0 in range(0, h, rows):
        part = buffer[:, :, :min(rows, h - r0)]
        part.copy_(x[:, :, r0:r0 + rows])
        torch.addcmul(shift, part, scale, out=part)
        if silu:
            F.silu(part, inplace=True)
        out[:, :, r0:r0 + rows].copy_(part)
    return out


def exact_group_norm(norm: nn.GroupNorm, x: torch.Tensor, silu: bool = False, inplace: bool = False) -> torch.Tensor:
    """GroupNorm (then SiLU if asked) of a whole map; `inplace` overwrites `x` unless autograd is recording.

    Half-precision maps on GPUs or under autograd take PyTorch's kernel (then SiLU, rounding twice): one fused
    kernel on a GPU, and gradients through the statistics, which `channel_stats` does not give in half precision.
    """
    if x.dtype in HALF and (x.device.type != "cpu" or recording(norm, x)):
        y = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        return F.silu(y, inplace=not y.requires_grad) if silu else y
    scale, shift = affine(norm, group_stats(x, norm.num_groups), x.dtype)
    return normalize(x, scale, shift, silu, out=x if inplace else None)
