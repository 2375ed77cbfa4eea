"""Where input images come from: files, folders, path lists, WebDataset tars and Parquet files.

`list_inputs` turns the command line's INPUTs into `Item`s in a stable order (cheap: headers and captions only);
`read_images` fetches the encoded bytes of a group of items, opening each tar or Parquet file once.
Every item carries `input_id`, what identifies its content without reading it (size and mtime for a file, the
member header for a tar member, the file's size and mtime for a Parquet row), so a resume can tell stale latents.
"""

from __future__ import annotations

import functools
import itertools
import logging
import multiprocessing
import os
import re
import stat
import tarfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..util import why_missing

log = logging.getLogger("sdvae")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".avif"}
FOLDER_SUFFIXES = IMAGE_SUFFIXES | {".tar", ".parquet"}  # what a folder's listing takes
LIST_SUFFIXES = {".txt", ".lst"}
SIDECAR_SUFFIXES = {".txt", ".caption", ".json", ".jsonl", ".csv", ".npz"}  # captions, metadata, trainer caches
CAPTION_SUFFIXES = (".txt", ".caption")
IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "jpeg")
CAPTION_COLUMNS = ("caption", "text", "txt")
PARALLEL_LISTING = 64  # tars or Parquet files from which listing them takes a process pool
INPUT_IDS = {
    "file": "file size and mtime_ns, and the caption",
    "tar": "member size and mtime from its tar header, and the caption",
    "parquet": "the Parquet file's size and mtime_ns, and the caption",
}


@dataclass(frozen=True)
class Item:
    """One input image. `kind` is file, tar or parquet; `source` the file holding it; `member` the tar member's
    data offset and size, or the Parquet row; `entry` the tar member's key; `error` is set when listing already
    found it unreadable."""

    key: str
    source: str
    caption: str | None = None
    kind: str = "file"
    input_id: str = ""
    member: tuple[int, int] | int | None = None
    column: str | None = None
    entry: str | None = None
    error: str | None = None
    controls: tuple[str, ...] = ()  # (musubi) control images' paths, encoded with it

    def record(self, error: str) -> dict[str, Any]:
        """This item's line in errors.jsonl."""
        where = {"member": self.entry} if self.entry is not None else {}
        if self.kind == "parquet" and self.member is not None:
            where = {"row": self.member}
        return {"key": self.key, "path": printable(self.source), **where, "input_id": self.input_id, "error": error}


def printable(name: str) -> str:
    """A file name as text that any file format stores: bytes that are not UTF-8 (Linux allows them in names,
    Python keeps them as lone surrogates) become backslash escapes, `caf\\xe9.png`."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _identity(stat_part: str, caption: str | None) -> str:
    return f"{stat_part}:{zlib.crc32((caption or '').encode()):08x}"


def file_id(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


NOT_REGULAR = "not a regular file (a FIFO, device or socket): not read"


def _open_regular(path: str):
    """`open(path, "rb")`, refusing anything but a regular file before a read could block on it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{printable(path)}: {NOT_REGULAR}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def expand_braces(spec: str) -> list[str]:
    """`data/{00000..00003}.tar` and `{a,b}.tar` expanded as a shell would (zero padding kept), in order."""
    match = re.search(r"\{([^{}]*)\}", spec)
    if match is None:
        return [spec]
    body, head, tail = match.group(1), spec[:match.start()], spec[match.end():]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") else 0
        options = [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        return [spec]
    return [out for option in options for out in expand_braces(head + option + tail)]


def _list_file(path: Path) -> list[str]:
    """The paths a text file lists, one a line (blank lines and `#` comments skipped); ValueError naming the file
    where it is not UTF-8 text (a binary file given as a list, say)."""
    data = path.read_bytes()
    if b"\0" in data:
        raise ValueError(f"{path}: not a text file listing paths (it holds NUL bytes: binary, or UTF-16 text?)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}: not a text file listing paths: line {line} is not UTF-8 (byte "
                         f"0x{data[e.start]:02x}); a list holds one path a line, in UTF-8") from None
    return [entry for line in text.splitlines() if (entry := line.strip()) and not entry.startswith("#")]


def _caption_beside(path: Path) -> str | None:
    for suffix in CAPTION_SUFFIXES:
        sidecar = path.with_suffix(suffix)
        if sidecar.is_file():
            return sidecar.read_text(errors="replace").strip()
    return None


def _file_item(key: str, path: Path) -> Item:
    caption = _caption_beside(path)
    try:
        input_id = _identity(file_id(path), caption)
    except OSError as e:
        return Item(key, str(path), caption, error=f"{type(e).__name__}: {e}")
    return Item(key, str(path), caption, input_id=input_id)


def _member_key(name: str) -> tuple[str, str]:
    """WebDataset grouping: `dir/0001.seg.png` is key `dir/0001`, extension `seg.png`."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _tar_items(name: str, path: Path) -> list[Item]:
    """A WebDataset shard's images (in member order), each with the `.txt` caption of its key."""
    images: dict[str, tarfile.TarInfo] = {}
    captions: dict[str, bytes] = {}
    broken = None
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = _member_key(info.name)
                if "." + ext.rsplit(".", 1)[-1] in IMAGE_SUFFIXES:
                    images.setdefault(key, info)
                elif ext in ("txt", "caption"):
                    captions[key] = tar.extractfile(info).read()
            broken = _damage_after(path, tar.offset)
    except (tarfile.TarError, OSError, EOFError) as e:
        broken = f"cannot read the tar: {e}"
    # a truncated or damaged tar: the members before the damage still count; one cut short fails when read
    items = []
    size = path.stat().st_size
    for key, info in images.items():
        caption = captions[key].decode("utf-8", "replace").strip() if key in captions else None
        cut = info.offset_data + info.size > size
        items.append(Item(f"{name}/{key}", str(path), caption, "tar",
                          _identity(f"{info.size}:{info.mtime}", caption), member=(info.offset_data, info.size),
                          entry=key, error=f"member {info.name} is cut short (truncated tar)" if cut else None))
    if broken is not None and not any(item.error for item in items):  # (a member cut short already says it)
        items.append(Item(f"{name}/<unreadable after {len(images)} images>", str(path), kind="tar", error=broken))
    return items


def _damage_after(path: Path, offset: int) -> str | None:
    """Why the tar stops at `offset` before its end (tarfile stops quietly at a damaged header), or None."""
    with open(path, "rb") as f:
        f.seek(offset)
        rest = f.read()
    if rest.strip(b"\0"):
        return f"damaged tar header at byte {offset}: the {len(rest)} bytes after it cannot be read"
    return None


def _holds_bytes(schema) -> Callable[[str], bool]:
    """Whether a column of `schema` holds encoded images: binary, or a struct with a binary `bytes` field."""
    import pyarrow as pa

    def binary(kind) -> bool:
        return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)

    def holds(name: str) -> bool:
        kind = schema.field(name).type
        return binary(kind) or pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0 and binary(
            kind.field("bytes").type)

    return holds


def parquet_columns(schema, path: Path, image_column: str | None,
                    caption_column: str | None) -> tuple[str, str | None]:
    """The image and caption columns: the ones asked for, else the first conventional name in the schema."""
    names = schema.names
    holds_bytes = _holds_bytes(schema)
    for wanted, what in ((image_column, "image"), (caption_column, "caption")):
        if wanted is not None and wanted not in names:
            raise ValueError(f"{path}: no {what} column {wanted!r}; its columns are {', '.join(names)}")
    if image_column is not None and not holds_bytes(image_column):
        raise ValueError(f"{path}: column {image_column!r} holds {schema.field(image_column).type}, not encoded "
                         "images (binary, or the Hugging Face {bytes, path} struct)")
    image = image_column or next((n for n in IMAGE_COLUMNS if n in names and holds_bytes(n)), None)
    if image is None:
        binary = [n for n in names if holds_bytes(n)]
        if len(binary) != 1:
            columns = ", ".join(f"{n} ({schema.field(n).type})" for n in names)
            raise ValueError(f"{path}: cannot tell which column holds the images, binary or the Hugging Face "
                             f"{{bytes, path}} struct (columns: {columns}); name it with --image-column")
        image = binary[0]
    caption = caption_column or next((n for n in CAPTION_COLUMNS if n in names), None)
    return image, caption


def _parquet_items(name: str, path: Path, image_column: str | None, caption_column: str | None,
                   in_folder: bool) -> list[Item]:
    """A Parquet file's rows, each with the caption column's text; a file that cannot be read is one error.

    In a folder, a Parquet file without a column of bytes is not an image table (img2dataset writes one of
    metadata beside each tar) and is passed over; named on the command line, it is an error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        return [Item(name, str(path), kind="parquet", error=f"cannot read the Parquet file: {e}")]
    schema = handle.schema_arrow
    if in_folder and image_column is None and not any(map(_holds_bytes(schema), schema.names)):
        return []
    image, caption_col = parquet_columns(handle.schema_arrow, path, image_column, caption_column)
    texts: list[Any] = [None] * handle.metadata.num_rows
    if caption_col:
        try:
            texts = handle.read(columns=[caption_col]).column(0).to_pylist()
        except (pa.ArrowException, OSError) as e:
            return [Item(name, str(path), kind="parquet", error=f"cannot read the caption column: {e}")]
    stat = file_id(path)
    captions = [None if text is None else str(text).strip() for text in texts]
    return [Item(f"{name}/{row}", str(path), caption, "parquet", _identity(stat, caption), member=row, column=image)
            for row, caption in enumerate(captions)]


def _from_path(file: tuple[str, Path, bool], image_column: str | None, caption_column: str | None) -> list[Item]:
    key, path, in_folder = file
    try:
        mode = path.stat().st_mode
    except OSError:
        mode = stat.S_IFREG  # (what fails to stat fails again below, with its reason)
    if stat.S_ISDIR(mode):  # (listed in a list file: folders on the command line are walked)
        return [Item(key, str(path), error="a folder: a list names files (give the folder itself as an INPUT)")]
    if not stat.S_ISREG(mode):
        return [Item(key, str(path), error=NOT_REGULAR)]
    suffix = path.suffix.lower()
    if suffix == ".tar":
        return _tar_items(key, path)
    if suffix == ".parquet":
        return _parquet_items(key, path, image_column, caption_column, in_folder)
    return [_file_item(key, path)]


def _log_passed_over(folder: Path, files: list[Path]) -> None:
    """Say which files of a folder are not read (by suffix), leaving out captions and metadata sidecars."""
    skipped = Counter(p.suffix.lower() or p.name for p in files if p.suffix.lower() not in SIDECAR_SUFFIXES)
    if skipped:
        kinds = ", ".join(f"{suffix} x{n}" for suffix, n in skipped.most_common())
        log.info("%s: passed over %d file(s) that are not images by their suffix (%s)", folder,
                 sum(skipped.values()), kinds)


def list_inputs(inputs: list[str], image_column: str | None = None,
                caption_column: str | None = None) -> list[Item]:
    """Every image of `inputs`, in a stable order, with keys unique across them.

    An input is an image file, a folder (recursive: images, tars and Parquet files), a text file listing paths, a
    WebDataset `.tar`, a `.parquet` file, or a brace pattern of those. Keys: a folder's entries by their path
    relative to it, other files by the path as written; a tar member is `TAR/KEY`, a Parquet row `FILE/ROW`.
    Many tars or Parquet files are read (headers and captions) in parallel processes.
    """
    files: list[tuple[str, Path, bool]] = []
    for spec in itertools.chain.from_iterable(map(expand_braces, inputs)):
        path = Path(spec)
        if path.is_dir():
            # (a link to nothing or a link loop is taken too: it fails as an input, recorded, never passed over)
            found = sorted(p for p in path.rglob("*") if p.is_file() or p.is_symlink() and not p.exists())
            taken = [p for p in found if p.suffix.lower() in FOLDER_SUFFIXES]
            files += [(p.relative_to(path).as_posix(), p, True) for p in taken]
            _log_passed_over(path, [p for p in found if p.suffix.lower() not in FOLDER_SUFFIXES])
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            files += [(entry, Path(entry) if Path(entry).is_absolute() else path.parent / entry, False)
                      for entry in _list_file(path)]
        elif path.exists():
            files.append((spec, path, False))
        else:
            raise FileNotFoundError(f"{spec}: {why_missing(path)}")
    read = functools.partial(_from_path, image_column=image_column, caption_column=caption_column)
    containers = sum(p.suffix.lower() in (".tar", ".parquet") for _, p, _ in files)
    processes = min(32, os.cpu_count() or 1)
    if containers >= PARALLEL_LISTING and processes > 1:
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            listed = list(pool.map(read, files, chunksize=max(1, len(files) // (8 * processes))))
    else:
        listed = list(map(read, files))
    items = [item if printable(item.key) == item.key else replace(item, key=printable(item.key))
             for item in itertools.chain.from_iterable(listed)]
    seen: dict[str, str] = {}
    for item in items:
        if item.key in seen:
            raise ValueError(f"two inputs have the key {item.key!r}: {seen[item.key]} and {item.source}; "
                             "give them from one common folder")
        seen[item.key] = item.source
    _warn_repeats(items)
    return items


def _warn_repeats(items: list[Item]) -> None:
    """Warn when one image comes in twice under two keys (a folder and its subfolder both given, say)."""
    keys: dict[tuple[str, Any], list[str]] = {}
    for item in items:
        keys.setdefault((os.path.abspath(item.source), item.member), []).append(item.key)
    repeats = [names for names in keys.values() if len(names) > 1]
    if repeats:
        log.warning("%d image(s) are given more than once, each stored under every key it came with (e.g. %s)",
                    len(repeats), " and ".join(map(repr, repeats[0])))


def read_images(items: list[Item], base: str | None = None) -> Iterator[tuple[Item, bytes | str]]:
    """Each item with its encoded image bytes, or (a str) the reason they cannot be read; in the order given.

    Relative sources are taken from `base` (a Ray worker reads from the driver's working directory)."""
    parquet_cells: dict[str, dict[int, bytes | str]] = {}
    for item in items:
        path = os.path.join(base, item.source) if base else item.source
        if item.error is not None:
            yield item, item.error
        elif item.kind == "parquet":
            if item.source not in parquet_cells:
                rows = [i.member for i in items if i.source == item.source and i.kind == "parquet"]
                parquet_cells[item.source] = _parquet_cells(path, item.column, rows)
            yield item, parquet_cells[item.source][item.member]
        else:
            try:
                yield item, _read_file_part(path, item)
            except OSError as e:
                yield item, f"{type(e).__name__}: {e}"


def _read_file_part(path: str, item: Item) -> bytes | str:
    with _open_regular(path) as f:
        if item.kind == "file":
            return f.read()
        offset, size = item.member
        f.seek(offset)
        data = f.read(size)
    return data if len(data) == size else f"member cut short: {len(data)} of {size} bytes"


def _parquet_cells(path: str, column: str, rows: list[int]) -> dict[int, bytes | str]:
    """The image bytes in `column` of `rows` (or why not), reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    wanted = sorted(set(rows))
    cells: dict[int, bytes | str] = {}
    try:
        handle = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's own error types for a damaged file: its rows fail, the run goes on
        return {r: f"cannot read row {r}: {e}" for r in wanted}
    start = 0
    for group in range(handle.metadata.num_row_groups):
        stop = start + handle.metadata.row_group(group).num_rows
        inside = [r for r in wanted if start <= r < stop]
        if inside:
            try:
                values = handle.read_row_group(group, columns=[column]).column(0).to_pylist()
            except Exception as e:  # a damaged row group fails its own rows only
                cells.update((r, f"cannot read row {r}: {e}") for r in inside)
            else:
                for r in inside:
                    cell = values[r - start]
                    cell = cell.get("bytes") if isinstance(cell, dict) else cell
                    empty = not isinstance(cell, bytes) or not cell  # (anything else, a str, reads as an error)
                    cells[r] = f"row {r}: no image bytes in column {column!r}" if empty else cell
        start = stop
    return cells
