"""Where the tiled encoder keeps a full-size activation: in memory, or in a scratch file read and written by region.

Both hold `[B, C, H, W]` maps and hand out regions as channels-last tensors. The file keeps the map in NHWC order
and moves bytes with positioned reads and writes, so only the regions in use occupy memory.
"""

from __future__ import annotations

import ctypes
import functools
import os
import tempfile
from collections.abc import Callable

import torch


def scratch_folder() -> str | None:
    """Where scratch files go: `$SDVAE_SCRATCH` (`~` expanded), where unset or empty the system's temporary folder;
    None where it is `none` (scratch files forbidden)."""
    folder = os.environ.get("SDVAE_SCRATCH") or tempfile.gettempdir()
    return None if folder.lower() == "none" else os.path.expanduser(folder)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Hand the C heap's freed memory back to the system (glibc's `malloc_trim`; elsewhere nothing).

    glibc keeps freed blocks below its mmap threshold, which rises to 32 MiB as large blocks are freed, in its heap:
    without this, the tiles of one pass of the tiled encoder leave their memory resident through the next passes.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class RamActivation:
    """A channels-last tensor; regions are views."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.shape, self.dtype, self.device = tuple(tensor.shape), tensor.dtype, tensor.device

    @classmethod
    def empty(cls, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> RamActivation:
        return cls(torch.empty(shape, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last))

    def read(self, rows: slice, cols: slice) -> torch.Tensor:
        return self.tensor[:, :, rows, cols]

    def write(self, rows: slice, cols: slice, value: torch.Tensor) -> None:
        self.tensor[:, :, rows, cols] = value


class FileActivation:
    """An NHWC map in an unlinked temporary file in the scratch folder (removed when the object goes away)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = tuple(shape), dtype, device
        b, c, h, w = shape
        self._pixel = c * dtype.itemsize
        fd, path = tempfile.mkstemp(prefix="sdvae-activation-", dir=scratch_folder())
        os.unlink(path)
        self._fd = fd
        os.ftruncate(fd, b * h * w * self._pixel)

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def _spans(self, rows: slice, cols: slice):
        """(batch, row, byte offset, row slot) for each stored row segment of a region; whole rows in one go."""
        b, _, h, w = self.shape
        r0, r1, _ = rows.indices(h)
        c0, c1, _ = cols.indices(w)
        if c0 == 0 and c1 == w:
            for i in range(b):
                yield i, slice(None), (i * h + r0) * w * self._pixel
            return
        for i in range(b):
            for j, r in enumerate(range(r0, r1)):
                yield i, j, ((i * h + r) * w + c0) * self._pixel

    def read(self, rows: slice, cols: slice) -> torch.Tensor:
        b, c, h, w = self.shape
        r0, r1, _ = rows.indices(h)
        c0, c1, _ = cols.indices(w)
        out = torch.empty(b, r1 - r0, c1 - c0, c, dtype=self.dtype)
        raw = out.view(torch.uint8).numpy()
        for i, j, offset in self._spans(rows, cols):
            view = memoryview(raw[i, j]).cast("B")
            if os.preadv(self._fd, [view], offset) != view.nbytes:
                raise OSError("short read from the scratch file")
        return out.permute(0, 3, 1, 2).to(self.device)

    def write(self, rows: slice, cols: slice, value: torch.Tensor) -> None:
        raw = value.to("cpu", self.dtype).permute(0, 2, 3, 1).contiguous().view(torch.uint8).numpy()
        for i, j, offset in self._spans(rows, cols):
            view = memoryview(raw[i, j]).cast("B")
            if os.pwritev(self._fd, [view], offset) != view.nbytes:
                raise OSError("short write to the scratch file (disk full?)")
