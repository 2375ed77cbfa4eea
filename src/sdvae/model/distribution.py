"""The encoder's output distribution: a diagonal Gaussian over the latents, and its seeded sampling."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def seeded_noise(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise `[len(seeds), *shape]` where row i depends only on `seeds[i]` and `shape`.

    Each row is drawn in float32 by its own CPU generator, then moved and cast, so it is the same on every device,
    in every dtype, batch size and batch position.
    """
    for s in seeds:
        if not -(2**63) <= s < 2**64:
            raise ValueError(f"seed {s} does not fit in 64 bits")
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32)
            for s in seeds]
    return torch.stack(rows).to(device=device, dtype=dtype)


def generator_noise(shape: Sequence[int], generator: torch.Generator | list[torch.Generator] | None,
                    device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Noise drawn exactly as diffusers' `randn_tensor` draws it, so `sample(generator=g)` matches diffusers.

    The draw happens on the generator's device and is then moved; a list gives one generator per sample.
    """
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        rows = [generator_noise((1, *shape[1:]), g, device, dtype) for g in generator]
        return torch.cat(rows)
    draw_device = generator.device if generator is not None else device
    if draw_device.type != torch.device(device).type and draw_device.type != "cpu":
        raise ValueError(f"cannot draw noise for {device} with a generator on {draw_device}")
    return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)


class DiagonalGaussian:
    """`N(mean, exp(logvar))` per latent element, from the encoder's `[B, 2L, h, w]` parameters (or one frame's,
    `[B, 2L, 1, h, w]`, as the Wan network gives them for one-frame input).

    `logvar` is clamped to [-30, 20] as in diffusers; `std = exp(logvar / 2)`, `var = exp(logvar)`.
    """

    def __init__(self, parameters: torch.Tensor):
        one_frame = parameters.ndim == 5 and parameters.shape[2] == 1
        if not (parameters.ndim == 4 or one_frame) or parameters.shape[1] % 2:
            raise ValueError(f"expected parameters [B, 2L, h, w] or [B, 2L, 1, h, w], got {list(parameters.shape)}")
        self.parameters = parameters
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        """The most likely latent: the mean."""
        return self.mean

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None, *,
               seed: int | Sequence[int] | None = None) -> torch.Tensor:
        """`mean + std * eps`.

        `generator=g` draws eps as diffusers does (same generator, same result). `seed=s` gives sample i the seed
        `s + i`, and a list gives one seed per sample: each sample's noise then depends only on its own seed.
        With neither, eps comes from torch's global generator.
        """
        if generator is not None and seed is not None:
            raise ValueError("pass either generator or seed, not both")
        if seed is None:
            eps = generator_noise(self.mean.shape, generator, self.mean.device, self.mean.dtype)
        else:
            eps = seeded_noise(per_sample_seeds(seed, self.mean.shape[0]), self.mean.shape[1:],
                               self.mean.device, self.mean.dtype)
        return self.mean + self.std * eps


def per_sample_seeds(seed: int | Sequence[int], batch: int) -> list[int]:
    """An int `s` becomes `[s, s+1, ...]`; a sequence must hold exactly one seed per sample."""
    if isinstance(seed, bool):
        raise TypeError("seed must be an int or a sequence of ints, got a bool")
    try:
        return [operator.index(seed) + i for i in range(batch)]  # an int, or an integer numpy/torch scalar
    except TypeError:
        pass
    try:
        seeds = [operator.index(s) for s in seed]
    except TypeError:
        raise TypeError(f"seed must be an int or a sequence of ints (one per sample), got {seed!r}") from None
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}")
    return seeds
