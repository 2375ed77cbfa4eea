"""What this machine's CPU computes natively: the probes the fast path asks before it picks a kernel."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch


@functools.cache
def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU computes bfloat16 natively (AVX512_BF16, AMX-BF16, Arm BF16); None where it cannot tell."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return re.search(r"\b(avx512_bf16|amx_bf16|bf16)\b", info) is not None


@functools.cache
def fused_sum(dtype: torch.dtype) -> bool:
    """Whether oneDNN's convolution with a fused sum runs in `dtype` on this CPU: float32 wherever oneDNN is; half
    precision needs AVX-512 (BW/VL/DQ, or FP16) or AVX-NE-CONVERT, and raises on an AVX2-only CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    return {torch.float32: True, torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported(),
            torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported()}.get(dtype, False)
