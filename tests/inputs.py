"""Input collections the encode tests build: image folders, WebDataset tars and Parquet files, with broken entries."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(seed: int, size: tuple[int, int] = (90, 70), fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]], mtime: int = 1_700_000_000) -> Path:
    """A tar with `members` (name, data) in order, as img2dataset writes them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            tar.addfile(info, io.BytesIO(data))
    return path


def webdataset_shard(path: Path, first: int, count: int, broken: int | None = None) -> Path:
    """`count` samples keyed 000NNN: a PNG or JPEG, a caption (not for every third one), a JSON; `broken`: garbage."""
    members = []
    for n in range(first, first + count):
        key = f"{n:06d}"
        fmt = "PNG" if n % 2 else "JPEG"
        data = b"not an image at all" if n == broken else image_bytes(n, fmt=fmt)
        members.append((f"{key}.{'png' if fmt == 'PNG' else 'jpg'}", data))
        if n % 3:
            members.append((f"{key}.txt", f"caption of sample {n}".encode()))
        members.append((f"{key}.json", b'{"url": "https://example.invalid/%d"}' % n))
    return write_tar(path, members)


def write_parquet(path: Path, images: list[bytes | None], captions: list[str | None] | None = None,
                  struct: bool = True, image_column: str = "image", caption_column: str = "caption",
                  row_group_size: int = 3) -> Path:
    """A Parquet file whose image column is the Hugging Face {bytes, path} struct, or raw binary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cells = [{"bytes": b, "path": f"img{i}.png"} if struct else b for i, b in enumerate(images)]
    columns = {image_column: cells}
    if captions is not None:
        columns[caption_column] = captions
    columns["width"] = list(range(len(images)))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def mixed_inputs(root: Path) -> list[str]:
    """A folder of files (with a caption sidecar and a broken file), two tars (a broken member) and a Parquet file
    (a broken row and a row without bytes): what the engine comparisons encode."""
    folder = root / "folder"
    folder.mkdir(parents=True)
    for n in range(4):
        (folder / f"img{n}.png").write_bytes(image_bytes(100 + n, size=(60 + 10 * n, 80)))
    (folder / "img1.txt").write_text("a sidecar caption")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    webdataset_shard(root / "wds" / "00000.tar", 0, 4, broken=2)
    webdataset_shard(root / "wds" / "00001.tar", 4, 3)
    images = [image_bytes(200 + n, fmt="JPEG") for n in range(5)]
    images[1], images[3] = b"garbage bytes", None
    write_parquet(root / "table.parquet", images, [f"row {n}" for n in range(4)] + [None])
    return [str(folder), str(root / "wds" / "{00000..00001}.tar"), str(root / "table.parquet")]
