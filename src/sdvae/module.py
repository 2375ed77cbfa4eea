"""What the encoder and decoder share: their config, input checks, weight loading and the float16 guard."""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import fast, winograd
from .config import VaeConfig
from .layers import Runner
from .weights import DropReport, convert_state_dict


@functools.cache
def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU computes bfloat16 natively (AVX512_BF16, AMX-BF16, Arm BF16); None where it cannot tell."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return re.search(r"\b(avx512_bf16|amx_bf16|bf16)\b", info) is not None


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

    def _channels_last(self) -> None:
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

    def load_hf_state_dict(self, state_dict: Mapping[str, torch.Tensor], strict: bool = False,
                           source: str = "state dict") -> DropReport:
        """Load weights from any supported layout (see `sdvae.keys`); returns what was dropped.

        Raises ValueError naming the keys when a tensor of this half is missing or mis-shaped; `strict` also
        refuses keys that belong to no part of the VAE. The other half's keys are expected and only reported.
        """
        expected = {k: v.shape for k, v in self.state_dict().items()}
        tensors, report = convert_state_dict(state_dict, expected, whole_vae_keys(self.config), strict=strict,
                                             source=source)
        on_meta = any(p.is_meta for p in self.parameters())
        if on_meta:  # the tensors become the parameters: copies, never views of a memory-mapped checkpoint file
            layout = {4: torch.channels_last}
            tensors = {k: v.to(dtype=self.dtype, memory_format=layout.get(v.ndim, torch.contiguous_format), copy=True)
                       for k, v in tensors.items()}
        self.load_state_dict(tensors, strict=True, assign=on_meta)
        self._channels_last()
        return report


def whole_vae_keys(config: VaeConfig) -> set[str]:
    """Every state-dict key of a whole AutoencoderKL with this config (built on the meta device: no memory)."""
    from .decoder import VaeDecoder
    from .encoder import VaeEncoder

    with torch.device("meta"):
        return set(VaeEncoder(config).state_dict()) | set(VaeDecoder(config).state_dict())
