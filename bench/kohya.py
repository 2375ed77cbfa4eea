"""Images/s of `sdvae encode --format kohya` against a plain loop that caches as sd-scripts does.

The loop is what sd-scripts' latent caching runs (library/train_util.py `BaseDataset.new_cache_latents` with
`--cache_latents_to_disk`), in one process: read each image's size, assign buckets, then per bucket, in batches of
`--vae_batch_size` (sd-scripts' default 1; also run at 8): load, resize and trim, ToTensor + Normalize, diffusers'
AutoencoderKL `encode(...).latent_dist.sample()`, one `np.savez` per image. Both use the same random-weight SD 1.5
VAE (full widths), the same generated JPEGs of mixed sizes, float32, the same threads.
Usage: python bench/kohya.py [N] [RESOLUTION]   (default 24 images at 256 px, buckets in steps of 64)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from common import cpu_line
from PIL import Image

from sdvae.data import kohya
from sdvae.data.encode import encode_dataset
from sdvae.data.job import Settings
from sdvae.model.config import VaeConfig

SIZES = [(512, 384), (384, 512), (640, 360), (500, 500), (300, 700), (800, 450)]


def write_images(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        base = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)


def sd_scripts_like(folder: Path, model: Path, resolution: int, batch: int) -> None:
    """sd-scripts' caching loop, as plain code: sizes, buckets, then per bucket load, resize, encode, save."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model).eval()
    size = (resolution, resolution)
    buckets = kohya.bucket_resolutions(size, *kohya.check_bucket_range(size, 256 if resolution >= 256 else 64,
                                                                        1024, 64), 64)
    groups = defaultdict(list)
    for path in sorted(folder.glob("*.jpg")):
        with Image.open(path) as im:
            image_size = im.size
        bucket, resized = kohya.select_bucket(image_size, size, buckets, 64)
        groups[bucket].append((path, image_size, resized))
    for bucket, infos in groups.items():
        for start in range(0, len(infos), batch):
            part = infos[start:start + batch]
            pixels = []
            for path, _, resized in part:
                with Image.open(path) as im:
                    array = np.array(im.convert("RGB"), np.uint8)
                pixels.append(kohya.resize_and_trim(array, bucket, resized)[0])
            x = kohya.to_tensor(np.stack(pixels))
            with torch.no_grad():
                latents = vae.encode(x).latent_dist.sample()
            for (path, image_size, _), latent in zip(part, latents):
                np.savez(kohya.cache_path(path, image_size, "sd"), latents=latent.numpy(),
                         original_size=np.array(image_size), crop_ltrb=np.array(kohya.crop_ltrb(bucket, image_size)))


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 24
    resolution = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    threads = torch.get_num_threads()
    print(cpu_line(threads))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        config = VaeConfig.preset("sd15").to_diffusers()
        AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")}).save_pretrained(tmp / "vae")
        rows = []
        for name, run in [
            ("sd-scripts-like loop, batch 1", lambda folder: sd_scripts_like(folder, tmp / "vae", resolution, 1)),
            ("sd-scripts-like loop, batch 8", lambda folder: sd_scripts_like(folder, tmp / "vae", resolution, 8)),
            ("sdvae encode --format kohya", lambda folder: encode_dataset(
                [str(folder)], str(tmp / "vae"), tmp / "record", Settings(
                    resolution=resolution, buckets=True, format="kohya",
                    min_bucket_reso=256 if resolution >= 256 else 64), family="sd15")),
        ]:
            folder = tmp / "images"
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(tmp / "record", ignore_errors=True)
            write_images(folder, n)
            start = time.perf_counter()
            run(folder)
            seconds = time.perf_counter() - start
            files = sorted(folder.glob("*_sd.npz"))
            shape = np.load(files[0])["latents"].shape
            assert len(files) == n and shape[0] == 4 and 64 * shape[1] * shape[2] <= resolution ** 2, shape
            rows.append((name, seconds))
    base = rows[0][1]
    print(f"{n} JPEGs of {len(SIZES)} sizes, SD 1.5 VAE (random weights), buckets of {resolution}^2, float32")
    print(f"| {'run':32} | {'s':>7} | {'images/s':>8} | {'vs loop b1':>10} |")
    print(f"|{'-' * 34}|{'-' * 9}|{'-' * 10}|{'-' * 12}|")
    for name, seconds in rows:
        print(f"| {name:32} | {seconds:7.1f} | {n / seconds:8.2f} | {base / seconds:9.2f}x |")


if __name__ == "__main__":
    main()
