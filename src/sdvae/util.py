"""Small pieces every layer uses (this module imports nothing of sdvae)."""

from __future__ import annotations

import torch

# compute and storage dtypes by name, and the safetensors names of the stored ones
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def spans(length: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most `size` covering `length`, in order."""
    return [(start, min(start + size, length)) for start in range(0, length, size)]
