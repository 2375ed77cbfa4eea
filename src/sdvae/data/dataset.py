"""The latent dataset on disk, and `LatentDataset`, its torch reader.

    DIR/manifest.json           model identity, config, scaling, preprocessing settings, format, sdvae version
    DIR/shards/NNNNN.safetensors `mean_WxH`, `logvar_WxH`: [n, L, H/8, W/8] per bucket present in the shard
    DIR/metadata/NNNNN.parquet  one row per stored latent (key, source, caption, input_id, sizes, crop, flip,
                                shard, tensor, row)
    DIR/errors/NNNNN.jsonl      inputs of that shard that failed; DIR/errors.jsonl gathers them all
A shard counts as written once its metadata part exists: every file is written under a temporary name and
renamed, the metadata part last. Readers see only whole shards. All writes go through `storage.LocalStore`.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..model.config import VaeConfig
from ..model.distribution import seeded_noise
from ..model.scaling import LatentScaling
from ..util import SAFETENSORS_DTYPES
from .store import LocalStore, write_file

FORMAT = "sdvae-latents/1"
MANIFEST = "manifest.json"
_TORCH_DTYPES = {short: getattr(torch, name) for short, name in SAFETENSORS_DTYPES.items()}


def settings_id(settings: dict[str, Any]) -> str:
    """A short stable hash of the settings that shape the latents (model, config, preprocessing, storage)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(store: LocalStore) -> Any:
    """The parsed manifest.json (which a foreign file may make any JSON value), or None where there is none."""
    data = store.read(MANIFEST)
    try:
        return None if data is None else json.loads(data)
    except ValueError as e:  # not JSON, or not UTF-8
        raise ValueError(f"{store}/{MANIFEST}: not a readable manifest ({e})") from None


def write_json(store: LocalStore, name: str, value: Any) -> None:
    store.write(name, (json.dumps(value, indent=2) + "\n").encode())


def write_jsonl(store: LocalStore, name: str, records: list[dict[str, Any]]) -> None:
    store.write(name, "".join(json.dumps(r) + "\n" for r in records).encode())


def shard_name(index: int) -> str:
    return f"{index:05d}"


def rows_digest(rows: list[dict[str, Any]]) -> str:
    """A short hash of which latent each row names: binds a latents file to its own metadata part."""
    names = sorted((r["tensor"], r["row"], r["key"], r["flipped"]) for r in rows)
    return hashlib.sha256(json.dumps(names).encode()).hexdigest()[:16]


def write_shard_data(store: LocalStore, index: int, tensors: dict[str, torch.Tensor], rows: list[dict[str, Any]],
                     errors: list[dict[str, Any]], settings: str, files: dict[Path, bytes] | None = None) -> None:
    """Write one shard's latents and error records, and the trainer cache files made of them (`files`, by path),
    each under a temporary name then renamed (a worker's part; the shard is not complete yet). The latents file,
    written first, lists the cache files: a run killed while writing them leaves them known as this output's."""
    from safetensors.torch import save

    name = shard_name(index)
    metadata = {"settings_id": settings, "rows": rows_digest(rows)}
    if files:
        metadata["files"] = json.dumps(sorted(map(str, files)))
    store.write(f"shards/{name}.safetensors", save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))
    for path, data in (files or {}).items():
        write_file(path, data)
    write_jsonl(store, f"errors/{name}.jsonl", errors)


def shard_files(store: LocalStore, index: int) -> list[Path] | None:
    """The trainer cache files shard `index`'s latents file lists (complete or not), or None where it lists none
    (written by an sdvae before it listed them) or cannot be read."""
    try:
        listed = (_safetensors_header(store, f"shards/{shard_name(index)}.safetensors").get("__metadata__")
                  or {}).get("files")
        return None if listed is None else [Path(path) for path in json.loads(listed)]
    except (ShardError, ValueError, TypeError):
        return None


def write_shard_marker(store: LocalStore, index: int, rows: list[dict[str, Any]], settings: str) -> None:
    """Write one shard's metadata part, the marker that its latents and errors are all on disk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{**r, "shard": index, "settings_id": settings} for r in rows], schema=_schema(pa))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    store.write(f"metadata/{shard_name(index)}.parquet", sink.getvalue().to_pybytes())


def _schema(pa):
    pair = pa.list_(pa.int32(), 2)
    return pa.schema([("key", pa.string()), ("source", pa.string()), ("caption", pa.string()),
                      ("input_id", pa.string()), ("original_size", pair), ("crop", pa.list_(pa.int32(), 4)),
                      ("bucket", pair), ("flipped", pa.bool_()), ("shard", pa.int32()), ("tensor", pa.string()),
                      ("row", pa.int32()), ("settings_id", pa.string())])


def complete_shards(store: LocalStore) -> list[int]:
    """Indices of the shards whose metadata part exists (and so are complete)."""
    return [int(n[:-8]) for n in store.list("metadata") if n.endswith(".parquet") and n[:-8].isdigit()]


class ShardError(ValueError):
    """A stored shard that cannot be served: its metadata part or latents file is missing, cut short or foreign."""


def read_shard_rows(store: LocalStore, index: int) -> list[dict[str, Any]]:
    """The metadata rows of one complete shard; ShardError naming the file when it is not a whole metadata part."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = f"metadata/{shard_name(index)}.parquet"
    data = store.read(name) or b""
    # (read from memory Arrow owns: a reader over Python bytes may be dropped on one of Arrow's threads, which then
    # needs the GIL, and at interpreter exit that aborts the process: "terminate called", exit 134)
    buffer = pa.allocate_buffer(len(data))
    pa.FixedSizeBufferWriter(buffer).write(data)
    try:
        table = pq.read_table(pa.BufferReader(buffer))
    except (pa.ArrowException, OSError) as e:
        raise ShardError(f"{store}/{name}: not a readable metadata part ({e})") from None
    missing = [n for n in _schema(pa).names if n not in table.column_names]
    if missing:
        raise ShardError(f"{store}/{name}: not an sdvae metadata part (no column {', '.join(missing)})")
    return table.to_pylist()


def _safetensors_header(store: LocalStore, name: str) -> dict[str, Any]:
    """The header of a safetensors file, checked to describe the whole file: ShardError saying what is wrong."""
    size = store.size(name)
    if size is None:
        raise ShardError(f"{store}/{name}: is missing")
    head = store.read_range(name, 0, 8)
    header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else size
    if 8 + header_len > size:
        raise ShardError(f"{store}/{name}: cut short ({size} bytes, not even its header)")
    try:
        header = json.loads(store.read_range(name, 8, header_len))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        for info in tensors.values():
            begin, end = info["data_offsets"]
            if (end - begin) != int(np.prod(info["shape"])) * _TORCH_DTYPES[info["dtype"]].itemsize:
                raise ValueError(f"tensor of shape {info['shape']} in {end - begin} bytes")
    except (ValueError, KeyError, TypeError) as e:
        raise ShardError(f"{store}/{name}: not a safetensors file ({e})") from None
    data_end = 8 + header_len + max((info["data_offsets"][1] for info in tensors.values()), default=0)
    if data_end != size:
        cut = "cut short" if size < data_end else "longer than its header says"
        raise ShardError(f"{store}/{name}: {cut} ({size} bytes, its header describes {data_end})")
    return header


def check_shard(store: LocalStore, index: int, rows: list[dict[str, Any]], settings: str) -> None:
    """Check that shard `index` holds what its metadata rows say, written with `settings`: its latents file is
    present and whole, holds a mean and a logvar for every row (and nothing else), and was written for these rows
    (not another shard's file put in its place). ShardError otherwise."""
    name = f"shards/{shard_name(index)}.safetensors"
    other = sorted({r["settings_id"] for r in rows} - {settings})
    if other:
        raise ShardError(f"{store}/metadata/{shard_name(index)}.parquet: written with other settings "
                         f"({', '.join(other)}) than the manifest's ({settings})")
    header = _safetensors_header(store, name)
    metadata = header.get("__metadata__") or {}
    if metadata.get("settings_id") != settings:
        raise ShardError(f"{store}/{name}: written with other settings ({metadata.get('settings_id')}) than the "
                         f"manifest's ({settings})")
    if metadata.get("rows", rows_digest(rows)) != rows_digest(rows):  # (files of sdvae 0.1.0 carry no digest)
        raise ShardError(f"{store}/{name}: holds other images' latents than its metadata part lists")
    counts = Counter(r["tensor"] for r in rows)
    listed = {f"{part}_{tag}" for tag in counts for part in ("mean", "logvar")}
    for tag, n in counts.items():
        shapes = [header.get(f"{part}_{tag}", {}).get("shape") for part in ("mean", "logvar")]
        if shapes[0] is None or shapes[0] != shapes[1] or shapes[0][0] != n:
            raise ShardError(f"{store}/{name}: its metadata lists {n} latent(s) {tag}, the file holds mean "
                             f"{shapes[0]} and logvar {shapes[1]}")
        if sorted(r["row"] for r in rows if r["tensor"] == tag) != list(range(n)):
            raise ShardError(f"{store}/metadata/{shard_name(index)}.parquet: its rows do not number the {n} "
                             f"latent(s) {tag}")
    extra = sorted(set(header) - listed - {"__metadata__"})
    if extra:
        raise ShardError(f"{store}/{name}: holds tensors its metadata does not list ({', '.join(extra)})")


def read_errors(store: LocalStore, shards: Iterable[int]) -> list[dict[str, Any]]:
    """The error records of `shards`, in shard order."""
    out = []
    for index in shards:
        data = store.read(f"errors/{shard_name(index)}.jsonl") or b""
        out.extend(json.loads(line) for line in data.decode().splitlines() if line.strip())
    return out


def mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file as zero-copy views of the memory-mapped file."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    data = np.memmap(path, dtype=np.uint8, mode="c")  # copy-on-write: nothing written ever reaches the file
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        flat = torch.frombuffer(memoryview(data[base + begin: base + end]), dtype=_TORCH_DTYPES[info["dtype"]])
        out[name] = flat.view(info["shape"])
    return out


def item_seed(key: str, flipped: bool, seed: int, epoch: int) -> int:
    """A per-item noise seed that depends only on the item's identity, the dataset seed and the epoch."""
    return (zlib.crc32(f"{key}|{int(flipped)}".encode()) + 1_000_003 * seed + 7_919 * epoch) % (2**63)


def seeded_sample(mean: torch.Tensor, logvar: torch.Tensor, key: str, flipped: bool, seed: int, epoch: int = 0
                  ) -> torch.Tensor:
    """A stored latent's sample in float32, with the noise of `item_seed`: the one LatentDataset gives (and
    `--format kohya` stores, at epoch 0)."""
    mean, logvar = mean.float(), logvar.float()
    eps = seeded_noise([item_seed(key, flipped, seed, epoch)], mean.shape)[0]
    return mean + torch.exp(0.5 * logvar) * eps


class LatentDataset(torch.utils.data.Dataset):
    """Reads a directory written by `sdvae encode` as a torch Dataset of dicts.

    Each item: `key`, `source`, `caption`, `original_size` (w, h), `crop` (l, t, r, b in the resized image),
    `bucket` (w, h), `flipped`, `mean`, `logvar` and `latent`: the sample, scaled as the family's pipeline does
    (`sdvae.model.scaling`, as the manifest's `latent_scaling` says; FLUX.2's `[128, h/16, w/16]`), with noise seeded
    by the item's key, `seed` and the epoch (`set_epoch` for fresh noise), or the scaled mean with `mode=True`;
    by default (`mode=None`) what the family's training scripts use: the mean for FLUX.2, else a sample.
    """

    def __init__(self, root: str | Path, mode: bool | None = None, seed: int = 0):
        self.root = Path(root)
        store = LocalStore(self.root)
        self.manifest = read_manifest(store)
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise ValueError(f"{self.root}: not an sdvae latent dataset (no {MANIFEST} of format {FORMAT})")
        self.config = VaeConfig.from_diffusers(self.manifest["config"])
        stored = self.manifest.get("latent_scaling")  # (manifests before FLUX.2 have none: the config says it)
        self.scaling = LatentScaling.from_json(stored) if stored else LatentScaling.of(self.config)
        self.rows = []
        try:
            for index in complete_shards(store):
                rows = read_shard_rows(store, index)
                check_shard(store, index, rows, self.manifest["settings_id"])
                self.rows += rows
        except ShardError as e:
            raise ShardError(f"{e}. To repair the dataset, run the `sdvae encode` command that wrote it again with "
                             "--resume: it encodes that shard's images again") from None
        self.mode = self.config.uses_mean if mode is None else mode
        self.seed, self.epoch = seed, 0
        self._shards: dict[int, dict[str, torch.Tensor]] = {}

    def set_epoch(self, epoch: int) -> None:
        """Draw different (still reproducible) noise in each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def _tensors(self, shard: int) -> dict[str, torch.Tensor]:
        if shard not in self._shards:
            self._shards[shard] = mmap_safetensors(self.root / "shards" / f"{shard_name(shard)}.safetensors")
        return self._shards[shard]

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        tensors = self._tensors(row["shard"])
        mean = tensors[f"mean_{row['tensor']}"][row["row"]].float()
        logvar = tensors[f"logvar_{row['tensor']}"][row["row"]].float()
        z = mean if self.mode else seeded_sample(mean, logvar, row["key"], row["flipped"], self.seed, self.epoch)
        return {
            "key": row["key"], "source": row["source"], "caption": row["caption"],
            "original_size": tuple(row["original_size"]), "crop": tuple(row["crop"]),
            "bucket": tuple(row["bucket"]), "flipped": row["flipped"],
            "mean": mean, "logvar": logvar, "latent": self.scaling.scale(z[None])[0],
        }
