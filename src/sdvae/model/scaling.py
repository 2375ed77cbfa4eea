"""Latent scaling between the VAE's space and a diffusion model's: `(z - shift) * scale`, or per channel."""

from __future__ import annotations

import torch

from .config import VaeConfig


def _channel_stats(config: VaeConfig, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, -1, 1, 1)
    mean = torch.tensor(config.latents_mean, dtype=z.dtype, device=z.device).view(shape)
    std = torch.tensor(config.latents_std, dtype=z.dtype, device=z.device).view(shape)
    return mean, std


def scale_latents(z: torch.Tensor, config: VaeConfig) -> torch.Tensor:
    """VAE latents to diffusion latents: `(z - shift_factor) * scaling_factor`.

    A config with per-channel `latents_mean`/`latents_std` (Playground v2.5) gives
    `(z - latents_mean) * scaling_factor / latents_std` instead.
    """
    if config.latents_mean is not None:
        mean, std = _channel_stats(config, z)
        return (z - mean) * config.scaling_factor / std
    return (z - (config.shift_factor or 0.0)) * config.scaling_factor


def unscale_latents(z: torch.Tensor, config: VaeConfig) -> torch.Tensor:
    """The inverse of `scale_latents`: diffusion latents back to the VAE's space."""
    if config.latents_mean is not None:
        mean, std = _channel_stats(config, z)
        return z * std / config.scaling_factor + mean
    return z / config.scaling_factor + (config.shift_factor or 0.0)
