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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import VaeConfig
from .distribution import seeded_noise
from .scaling import scale_latents
from .storage import LocalStore

FORMAT = "sdvae-latents/1"
MANIFEST = "manifest.json"
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


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


def write_shard_data(store: LocalStore, index: int, tensors: dict[str, torch.Tensor], errors: list[dict[str, Any]],
                     settings: str) -> None:
    """Write one shard's latents and error records (a worker's part; the shard is not complete yet)."""
    from safetensors.torch import save

    name = shard_name(index)
    store.write(f"shards/{name}.safetensors",
                save({k: v.contiguous() for k, v in tensors.items()}, metadata={"settings_id": settings}))
    write_jsonl(store, f"errors/{name}.jsonl", errors)


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


def read_shard_rows(store: LocalStore, index: int) -> list[dict[str, Any]]:
    """The metadata rows of one complete shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_table(pa.BufferReader(store.read(f"metadata/{shard_name(index)}.parquet"))).to_pylist()


def read_metadata(store: LocalStore) -> list[dict[str, Any]]:
    """Every stored latent's metadata row, in shard order."""
    return [row for index in complete_shards(store) for row in read_shard_rows(store, index)]


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


class LatentDataset(torch.utils.data.Dataset):
    """Reads a directory written by `sdvae encode` as a torch Dataset of dicts.

    Each item: `key`, `source`, `caption`, `original_size` (w, h), `crop` (l, t, r, b in the resized image),
    `bucket` (w, h), `flipped`, `mean`, `logvar` and `latent`: `(sample - shift) * scale` with noise seeded by the
    item's key, `seed` and the epoch (`set_epoch` for fresh noise), or the scaled mean with `mode=True`.
    """

    def __init__(self, root: str | Path, mode: bool = False, seed: int = 0):
        self.root = Path(root)
        store = LocalStore(self.root)
        self.manifest = read_manifest(store)
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise ValueError(f"{self.root}: not an sdvae latent dataset (no {MANIFEST} of format {FORMAT})")
        self.config = VaeConfig.from_diffusers(self.manifest["config"])
        self.rows = read_metadata(store)
        wanted = self.manifest["settings_id"]
        mixed = sorted({r["settings_id"] for r in self.rows} - {wanted})
        if mixed:
            raise ValueError(f"{self.root}: shards written with other settings ({', '.join(mixed)}) than the "
                             f"manifest's ({wanted}); re-encode them or keep them in separate datasets")
        self.mode, self.seed, self.epoch = mode, seed, 0
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
        if self.mode:
            z = mean
        else:
            eps = seeded_noise([item_seed(row["key"], row["flipped"], self.seed, self.epoch)], mean.shape)[0]
            z = mean + torch.exp(0.5 * logvar) * eps
        return {
            "key": row["key"], "source": row["source"], "caption": row["caption"],
            "original_size": tuple(row["original_size"]), "crop": tuple(row["crop"]),
            "bucket": tuple(row["bucket"]), "flipped": row["flipped"],
            "mean": mean, "logvar": logvar, "latent": scale_latents(z[None], self.config)[0],
        }
