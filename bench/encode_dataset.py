"""Images/s of `sdvae encode` at 256 px on this machine, with inline and parallel image decoding.

Writes a random-weight SD 1.5 checkpoint and N generated JPEGs (512x384) to a temporary folder, then runs the
encode job with --workers 0 and 2, and times decoding+preprocessing alone and the model alone on the same images.
Usage: python bench/encode_dataset.py [N]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import cpu_line
from PIL import Image

from sdvae import load_encoder
from sdvae.demo import write_random_checkpoint
from sdvae.job import Runtime, Settings, encode_dataset, prepare_shard
from sdvae.sources import list_inputs


def main(n: int = 16) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="sdvae-bench-"))
    ckpt = tmp / "sd15.safetensors"
    write_random_checkpoint(ckpt)
    images = tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        base = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(base).resize((512, 384), Image.Resampling.BICUBIC).save(images / f"{i:04d}.jpg", quality=90)
    settings = Settings(resolution=256)
    rows = []
    for workers in (0, 2):
        start = time.perf_counter()
        encode_dataset([str(images)], str(ckpt), tmp / f"out{workers}", settings, family="sd15",
                       runtime=Runtime(batch_size=8), workers=workers)
        rows.append((f"sdvae encode --workers {workers}", n / (time.perf_counter() - start)))
    items = list_inputs([str(images)])
    start = time.perf_counter()
    prepared = [p for _, p in prepare_shard(items, settings)]
    decode_s = time.perf_counter() - start
    encoder = load_encoder(ckpt, family="sd15")
    x = torch.from_numpy(np.stack([p.pixels for p in prepared])).permute(0, 3, 1, 2).float() / 127.5 - 1
    start = time.perf_counter()
    with torch.no_grad():
        for batch in x.split(8):
            encoder.encode(batch)
    model_s = time.perf_counter() - start
    rows.append(("decode + resize + crop only", n / decode_s))
    rows.append(("model only (batch 8)", n / model_s))
    print(f"{cpu_line(torch.get_num_threads())}, {n} JPEGs 512x384 -> 256x256, SD 1.5 encoder")
    print(f"| {'what':32s} | images/s |")
    print(f"|{'-' * 34}|----------|")
    for name, rate in rows:
        print(f"| {name:32s} | {rate:8.2f} |")
    share = decode_s / (decode_s + model_s)
    print(f"time share with inline decoding: images {share:.1%}, model {1 - share:.1%}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
