"""Latent scaling between the VAE's space and a diffusion model's, one rule for every family.

Each pipeline feeds its transformer `(patchify(z) - mean) * factor / std`: `patchify` is FLUX.2's 2x2 (channel
`c*4 + i*2 + j`; no patches elsewhere), `mean` and `std` are numbers (SD and FLUX.1: `shift_factor` and 1) or
per-channel vectors (Playground's and Qwen-Image's `latents_mean`/`latents_std`, rounded to float32 as the pipelines
hold them; FLUX.2's BatchNorm statistics, `std = sqrt(running_var + batch_norm_eps)`, with factor 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import VaeConfig


class LatentStats(nn.Module):
    """FLUX.2's `bn`: the running mean and variance of its patchified latents. Buffers named as diffusers'
    BatchNorm2d's, so the weights load as they are; the network never calls it (its training counter is not kept)."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    @classmethod
    def of(cls, config: VaeConfig) -> LatentStats | None:
        """The statistics a config's VAE holds: FLUX.2's, of its patchified latents; None for the others."""
        return cls(config.latent_channels * config.patch_size[0] ** 2) if config.patch_size else None


def patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """`[B, C, H, W]` to `[B, C*p*p, H/p, W/p]`, channel `c*p*p + i*p + j` holding pixel `(i, j)` of each patch."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4).reshape(b, c * p * p, h // p, w // p)


def unpatchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """The inverse of `patchify`."""
    b, c, h, w = z.shape
    return z.reshape(b, c // (p * p), p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // (p * p), h * p, w * p)


@dataclass(frozen=True)
class LatentScaling:
    """`(patchify(z) - mean) * factor / std`, and its inverse; `mean`/`std` one number or one per scaled channel."""

    factor: float = 1.0
    mean: float | tuple[float, ...] = 0.0
    std: float | tuple[float, ...] = 1.0
    patch: int = 1

    @classmethod
    def of(cls, config: VaeConfig, stats: LatentStats | None = None) -> LatentScaling:
        """A config's scaling; FLUX.2's needs its `bn` statistics (from the weights)."""
        if config.patch_size is not None:
            if stats is None:
                raise ValueError("FLUX.2 latents are normalized by the bn statistics of its weights: none given")
            var = stats.running_var.detach().double().cpu()
            return cls(1.0, tuple(stats.running_mean.detach().double().cpu().tolist()),
                       tuple((var + config.batch_norm_eps).sqrt().tolist()), config.patch_size[0])
        if config.latents_mean is not None:  # (rounded to float32, as the pipelines' torch.tensor(list) holds them)
            return cls(config.scaling_factor, *(tuple(torch.tensor(v, dtype=torch.float32).double().tolist())
                                                for v in (config.latents_mean, config.latents_std)))
        return cls(config.scaling_factor, config.shift_factor or 0.0)

    def _stats(self, z: torch.Tensor) -> tuple[Any, Any]:
        def vector(v: float | Sequence[float]) -> Any:
            if isinstance(v, (int, float)):
                return v
            return torch.tensor(v, dtype=torch.float64).to(z.device, z.dtype).view(1, -1, 1, 1)
        return vector(self.mean), vector(self.std)

    def scaled_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The scaled latents' `[..., C, H, W]` for VAE latents of `shape`; ValueError where patches do not fit."""
        *lead, c, h, w = shape
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"latents {list(shape)}: sides must be multiples of {p} for {p}x{p} patches (images "
                             f"whose sides are multiples of {8 * p} px)")
        channels = c * p * p
        if not isinstance(self.mean, (int, float)) and len(self.mean) != channels:
            raise ValueError(f"latents {list(shape)}: {channels} scaled channels, but the statistics have "
                             f"{len(self.mean)}")
        return (*lead, channels, h // p, w // p)

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents `[B, C, H, W]` to the diffusion model's."""
        self.scaled_shape(z.shape)
        z = patchify(z, self.patch) if self.patch > 1 else z
        mean, std = self._stats(z)
        return (z - mean) * self.factor if self.std == 1.0 else (z - mean) * self.factor / std

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        """The inverse of `scale`."""
        mean, std = self._stats(z)
        z = (z if self.std == 1.0 else z * std) / self.factor + mean
        return unpatchify(z, self.patch) if self.patch > 1 else z

    def to_json(self) -> dict[str, Any]:
        """For a dataset's manifest: what turns its stored latents into the model's."""
        return {"rule": "(patchify(z, patch) - mean) * factor / std", "factor": self.factor, "mean": self.mean,
                "std": self.std, "patch": self.patch}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LatentScaling:
        def as_value(v: Any) -> float | tuple[float, ...]:
            return float(v) if isinstance(v, (int, float)) else tuple(float(x) for x in v)

        scaling = cls(float(data["factor"]), as_value(data["mean"]), as_value(data["std"]), int(data["patch"]))
        if scaling.factor == 0 or scaling.patch < 1 or not all(math.isfinite(s) and s != 0 for s in (
                [scaling.std] if isinstance(scaling.std, float) else scaling.std)):
            raise ValueError(f"latent scaling {data!r}: needs a non-zero factor and std, and patch >= 1")
        return scaling
