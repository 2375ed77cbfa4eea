"""Small pieces every layer uses (this module imports nothing of sdvae, nor torch: the CLI reads it at start)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

# dtype names (torch's): what the VAE computes in and latents are stored in; and safetensors' names for them
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def spans(length: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most `size` covering `length`, in order."""
    return [(start, min(start + size, length)) for start in range(0, length, size)]


def why_missing(path: Path) -> str:
    """Why a path that `Path.exists` finds missing cannot be read: a symbolic link loop, a link to nothing, or no
    such file or folder."""
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop (too many levels of symbolic links)"
    if path.is_symlink():
        return f"a symbolic link to {os.readlink(path)}, which does not exist"
    return "no such file or folder"
