"""The one place the encode engines touch the output directory: whole-file writes, reads, listings, removals.

Names are `/`-separated paths relative to the dataset root. `LocalStore` serves a local or shared (mounted)
filesystem; an object store would be another class with these methods and a `location`, chosen in `open_store`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("sdvae")

LOCK = ".sdvae-writer.lock"
_TEMPORARY = re.compile(r"\..+\.\d+\.tmp")  # `.NAME.HOST.PID.tmp`, what `write_file` writes before renaming


def is_temporary(name: str) -> bool:
    """Whether a file name is one of the temporaries `write_file` renames into place once written."""
    return _TEMPORARY.fullmatch(name) is not None


def write_file(path: Path, data: bytes) -> None:
    """Write `data` through a temporary name in the same folder, then rename: never half a file.

    A failed write removes its temporary and raises an OSError that names the file (a full disk fails in a write or
    fsync, whose own errors name none); an interrupt mid-write (Ctrl-C, SIGTERM) removes it too."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, f"cannot write it: {e.strerror or e}", str(path)) from e
        raise


class OutputInUse(ValueError):
    """Another run holds the output's writer lock."""


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
        """Write `data` through a temporary name in the same folder, then rename: never half a file (`write_file`)."""
        write_file(self.root / name, data)

    def read(self, name: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        try:
            return (self.root / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError):  # (the latter where a file stands in for a folder)
            return None

    def read_range(self, name: str, start: int, length: int) -> bytes:
        """Up to `length` bytes of the file from `start` (fewer at its end); FileNotFoundError if it is absent."""
        with open(self.root / name, "rb") as f:
            f.seek(start)
            return f.read(length)

    def size(self, name: str) -> int | None:
        """The file's size in bytes, or None when it does not exist."""
        try:
            return (self.root / name).stat().st_size
        except FileNotFoundError:
            return None

    def list(self, folder: str) -> list[str]:
        """The names of the files in `folder` (temporary files too: they start with a dot), sorted."""
        path = self.root / folder
        return sorted(p.name for p in path.iterdir() if p.is_file()) if path.is_dir() else []

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def remove_temporaries(self) -> None:
        """Remove the temporaries that writes cut short (a kill, a crash) left anywhere in the store; only the
        output's one writer calls this, when no write of its own is under way."""
        for folder, _, names in os.walk(self.root):
            for name in filter(is_temporary, names):
                Path(folder, name).unlink(missing_ok=True)

    def is_empty(self) -> bool:
        """Whether the folder is absent or holds nothing (a writer lock left unlocked, or a temporary left by a
        write cut short, counts as nothing)."""
        return not self.root.exists() or all(p.name == LOCK or is_temporary(p.name) for p in self.root.iterdir())

    @contextlib.contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Hold the output's one-writer lock for the block; a second writer gets `OutputInUse` at once.

        The lock is the kernel's `flock` on `LOCK`: a killed run's lock goes with its process, so none is ever
        left stale. The file names its holder (host, pid, start) for the message; the holder removes it on exit,
        and the folder too where the lock made it and nothing else was written.
        """
        created = not self.root.exists()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(e.errno, f"cannot create the output folder: {e.strerror}", str(self.root)) from e
        path = self.root / LOCK
        fd = _lock(path)
        if fd is None:
            log.warning("%s: this filesystem cannot lock files: make sure no other run writes here", self)
            yield
            return
        try:
            with contextlib.suppress(OSError):  # (a full disk: the holder goes unnamed; the run's writes fail)
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                         "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
            yield
        finally:
            os.unlink(path)
            os.close(fd)
            if created and not any(self.root.iterdir()):
                self.root.rmdir()  # a run that wrote nothing leaves no folder behind


def _lock(path: Path) -> int | None:
    """An open descriptor of `path` holding its exclusive flock, or None where the filesystem has no locks."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise OutputInUse(f"{path.parent}: another run is writing this output ({_holder(path)}); wait for "
                                  "it to finish or stop it, or choose another --output") from None
            return None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file as it finished: lock the new one


def _holder(path: Path) -> str:
    """Who holds the lock at `path`, as its file says."""
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its lock file names no holder"


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
