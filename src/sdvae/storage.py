"""The one place the encode engines touch the output directory: whole-file writes, reads, listings, removals.

Names are `/`-separated paths relative to the dataset root. `LocalStore` serves a local or shared (mounted)
filesystem; an object store would be another class with these methods and a `location`, chosen in `open_store`.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


class LocalStore:
    """A dataset directory on a filesystem every worker mounts at the same path."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return str(self.root)

    @property
    def location(self) -> str:
        """Where other processes and nodes open this store (`open_store(location)`): the absolute path."""
        return str(self.root.resolve())

    def write(self, name: str, data: bytes) -> None:
        """Write `data` through a temporary name in the same folder, then rename: never half a file."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def read(self, name: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:
            return None

    def list(self, folder: str) -> list[str]:
        """The names of the files in `folder` (temporary files too: they start with a dot), sorted."""
        path = self.root / folder
        return sorted(p.name for p in path.iterdir() if p.is_file()) if path.is_dir() else []

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def is_empty(self) -> bool:
        return not self.root.exists() or not any(self.root.iterdir())


def open_store(location: str | Path) -> LocalStore:
    """The store for an --output location; a URI scheme other than file:// is refused with a clear message."""
    text = str(location)
    if "://" in text and not text.startswith("file://"):
        raise ValueError(f"{text}: only filesystem paths are supported as --output (mount the bucket, or write "
                         "locally and copy)")
    store = LocalStore(text.removeprefix("file://"))
    if store.root.exists() and not store.root.is_dir():
        raise ValueError(f"{store.root}: is a file; --output names the dataset's folder")
    return store
