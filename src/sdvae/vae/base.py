"""What the encoder and decoder share: their config, input checks, the fast-path switch and the float16 guard."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import fast
from ..fast import winograd
from ..fast.cpu import cpu_has_native_bf16
from ..model.config import VaeConfig
from ..model.network import Runner


@functools.cache
def _warn_slow_bfloat16() -> None:
    """Once per process: bfloat16 on this CPU is emulated, so slower than float32."""
    warnings.warn("this CPU has no native bfloat16 (no AVX512_BF16 or AMX): bfloat16 runs emulated, slower than "
                  "float32; use float32 here", RuntimeWarning, stacklevel=4)


class VaeModule(nn.Module):
    """Base of `VaeEncoder` and `VaeDecoder`: a plain module whose state-dict keys are diffusers'."""

    config: VaeConfig
    _compiled: Callable[[torch.Tensor], torch.Tensor] | None = None

    def _network(self, x: torch.Tensor, run: Runner) -> torch.Tensor:
        """The whole-image network on checked input (the encoder's or the decoder's), each layer run by `run`."""
        raise NotImplementedError

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """The network on the fast path, or the plain one inside `sdvae.fast_path(False)`."""
        with winograd.scope():
            return (self._network if self._compiled is None else self._compiled)(x, fast.runner())

    def compile_network(self, **options: Any) -> VaeModule:
        """Run the network through `torch.compile(**options)` from now on; returns the module.

        Compiled, it runs on whole maps (no row bands): the compiler fuses the GroupNorms, SiLUs and residual adds
        itself, for GPUs above all. Input checks, tiling and the float16 guard stay eager around it (unlike
        `nn.Module.compile`, which would trace them too).
        """
        self._compiled = torch.compile(self._network, **options)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _one_frame(self, x: torch.Tensor, what: str) -> tuple[torch.Tensor, bool]:
        """`x` as `[B, C, H, W]`, and whether it came as diffusers' one-frame video `[B, C, 1, H, W]` (the Wan
        network's form; its results get the frame axis back)."""
        if not isinstance(x, torch.Tensor) or x.ndim != 5 or self.config.network != "wan":
            return x, False  # (the input check names the shape it expects)
        if x.shape[2] != 1:
            raise ValueError(f"expected {what} of one frame [B, C, 1, H, W], got {list(x.shape)} ({x.shape[2]} "
                             "frames): sdvae encodes images; a video's frames after the first need the temporal "
                             "network")
        return x[:, :, 0], True

    def _check_input(self, x: torch.Tensor, channels: int, min_size: int, what: str) -> torch.Tensor:
        """Validate `[B, channels, H, W]` of finite values and cast floating input to the weights' dtype."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor {what} [B, {channels}, H, W], got {type(x).__name__}")
        if x.ndim != 4 or x.shape[1] != channels or x.shape[0] == 0:
            raise ValueError(f"expected {what} of shape [B, {channels}, H, W], B >= 1, got {list(x.shape)}")
        if x.shape[2] < min_size or x.shape[3] < min_size:
            raise ValueError(f"{what} of shape {list(x.shape)} is too small: H and W must be at least {min_size}")
        if not x.is_floating_point():
            raise TypeError(f"expected floating-point {what}, got {x.dtype}")
        finite = torch.isfinite(x).flatten(1).all(1)
        if not finite.all():
            raise ValueError(f"{what} of batch item(s) {(~finite).nonzero().flatten().tolist()} hold NaN or inf: "
                             "they would give NaN results")
        if self.dtype == torch.bfloat16 and self.device.type == "cpu" and cpu_has_native_bf16() is False:
            _warn_slow_bfloat16()
        return x.to(self.dtype).contiguous(memory_format=torch.channels_last)

    def to_channels_last(self) -> None:
        """Store conv weights channels-last: with channels-last activations, the fast layout on CPU and GPU."""
        self.to(memory_format=torch.channels_last)

    def _guarded(self, run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 forward_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
        """`run(x)` in the module's dtype; a float16 result with inf/NaN is recomputed in float32 by
        `forward(x, **forward_kwargs)`.

        The SD/SDXL VAE overflows float16 on some inputs; the float32 copy of the weights lives only for that call.
        """
        out = run(x)
        if out.dtype != torch.float16 or torch.isfinite(out).all():
            return out
        warnings.warn(f"{type(self).__name__}: float16 overflowed (inf/NaN); recomputing this batch in float32",
                      RuntimeWarning, stacklevel=3)
        params = {name: p.float() for name, p in self.named_parameters()}
        return torch.func.functional_call(self, params, (x.float(),), forward_kwargs or {}).to(torch.float16)
