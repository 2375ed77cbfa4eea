"""`sdvae encode --format kohya`: kohya sd-scripts' latent cache, checked against an independent reading of its rules
(kohya-ss/sd-scripts `library/train_util.py` BucketManager, trim_and_resize_if_required, load_image and
load_images_and_masks_for_caching, `library/model_util.py` make_bucket_resolutions, `library/utils.py` resize_image,
`library/strategy_base.py` save_latents_to_disk, the SD/SDXL, SD3 and FLUX strategies), without sd-scripts
installed."""

from __future__ import annotations

import io
import math
import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from reference import TINY, reference_vae, rel_err

from sdvae.cli import main
from sdvae.data import kohya
from sdvae.data.dataset import item_seed
from sdvae.model.config import VaeConfig
from sdvae.model.distribution import seeded_noise


def sd_scripts_bucket(size, resolution, enable_bucket=True, min_reso=256, max_reso=1024, steps=64, no_upscale=False):
    """(bucket, resized size) of an image of `size` as sd-scripts' make_buckets assigns them."""
    width, height = size
    ar = width / height
    if enable_bucket and no_upscale:
        max_area = resolution[0] * resolution[1]
        if width * height > max_area:
            def rts(x):
                x = int(x + 0.5)
                return x - x % steps
            rw = math.sqrt(max_area * ar)
            rh = max_area / rw
            bw = rts(rw)
            ar_w = bw / rts(bw / ar)
            bh = rts(rh)
            ar_h = rts(bh * ar) / bh
            resized = (bw, int(bw / ar + 0.5)) if abs(ar_w - ar) < abs(ar_h - ar) else (int(bh * ar + 0.5), bh)
        else:
            resized = (width, height)
        return (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps), resized
    if enable_bucket:
        min_reso = min_reso - min_reso % steps
        max_reso = max_reso if max_reso % steps == 0 else max_reso + steps - max_reso % steps
        max_area = resolution[0] * resolution[1]
        resos = {(int(math.sqrt(max_area) // steps) * steps,) * 2}
        w = min_reso
        while w <= max_reso:
            h = min(max_reso, int((max_area // w) // steps) * steps)
            if h >= min_reso:
                resos.add((w, h))
                resos.add((h, w))
            w += steps
        resos = sorted(resos)
    else:
        resos = [tuple(resolution)]
    if (width, height) in resos:
        reso = (width, height)
    else:
        reso = resos[np.abs(np.array([w / h for w, h in resos]) - ar).argmin()]
    scale = reso[1] / height if ar > reso[0] / reso[1] else reso[0] / width
    return reso, (int(width * scale + 0.5), int(height * scale + 0.5))


def sd_scripts_crop_ltrb(bucket, size):
    bucket_ar, image_ar = bucket[0] / bucket[1], size[0] / size[1]
    if bucket_ar > image_ar:
        rw, rh = bucket[1] * image_ar, bucket[1]
    else:
        rw, rh = bucket[0], bucket[0] / image_ar
    left, top = (bucket[0] - rw) // 2, (bucket[1] - rh) // 2
    return np.array((left, top, left + rw, top + rh))


def sd_scripts_pixels(path, bucket, resized, alpha=False, rng=None):
    """load_image, trim_and_resize_if_required: the `[H, W, C]` uint8 array sd-scripts encodes (and masks)."""
    with Image.open(path) as im:
        mode = "RGBA" if alpha else "RGB"
        image = np.array(im if im.mode == mode else im.convert(mode), np.uint8)
    h, w = image.shape[:2]
    if (w, h) != tuple(resized):
        if w >= resized[0] and h >= resized[1]:
            image = cv2.resize(image, tuple(resized), interpolation=cv2.INTER_AREA)
        else:  # (its pil_resize swaps the channels to BGR and back around Pillow's Lanczos)
            image = np.array(Image.fromarray(image).resize(tuple(resized), Image.Resampling.LANCZOS))
    h, w = image.shape[:2]
    if w > bucket[0]:
        p = (w - bucket[0]) // 2 if rng is None else rng.randint(0, w - bucket[0])
        image = image[:, p:p + bucket[0]]
    if h > bucket[1]:
        p = (h - bucket[1]) // 2 if rng is None else rng.randint(0, h - bucket[1])
        image = image[p:p + bucket[1]]
    assert image.shape[:2] == (bucket[1], bucket[0])
    return image


def to_vae_input(pixels: np.ndarray) -> torch.Tensor:
    """torchvision's ToTensor and Normalize([0.5], [0.5]), as sd-scripts' IMAGE_TRANSFORMS."""
    x = torch.from_numpy(pixels[..., :3].transpose(2, 0, 1).copy()).float().div(255)
    return ((x - 0.5) / 0.5)[None]


@pytest.mark.parametrize("size, options, bucket, resized", [
    ((1200, 800), {}, (1216, 832), (1248, 832)),
    ((1920, 1080), {}, (1344, 768), (1365, 768)),
    ((512, 512), {}, (1024, 1024), (1024, 1024)),
    ((1200, 800), {"no_upscale": True}, (1152, 768), (1200, 800)),
])
def test_buckets_are_sd_scripts_worked_examples(size, options, bucket, resized):
    """SDXL at 1024 with buckets of 256..2048 px in steps of 64 (its docs' settings)."""
    predefined = None if options else kohya.bucket_resolutions((1024, 1024), 256, 2048, 64)
    assert kohya.select_bucket(size, (1024, 1024), predefined, 64) == (bucket, resized)
    assert sd_scripts_bucket(size, (1024, 1024), max_reso=2048, **options) == (bucket, resized)


def test_crop_ltrb_is_sd_scripts_worked_example():
    want = (0, 10.0, 1216, 10.0 + 1216 / 1.5)  # the image fitted inside the bucket, not the trim
    assert kohya.crop_ltrb((1216, 832), (1200, 800)) == want
    assert np.array_equal(sd_scripts_crop_ltrb((1216, 832), (1200, 800)), np.array(want))
    with pytest.raises(ValueError, match="SD 1.x/2.x, SDXL, SD3 and FLUX.1; this VAE is flux2"):
        kohya.architecture("flux2", None)


def test_buckets_agree_with_sd_scripts_on_many_sizes():
    rng = np.random.default_rng(0)
    configs = [((512, 512), 256, 1024, 64), ((1024, 1024), 256, 2048, 64), ((768, 512), 128, 1000, 32),
               ((640, 960), 320, 1536, 32)]
    sizes = [(int(rng.integers(8, 6000)), int(rng.integers(8, 6000))) for _ in range(200)]
    sizes += [(1, 5000), (5000, 1), (1024, 1024), (1216, 832), (13, 7)]
    for resolution, low, high, steps in configs:
        predefined = kohya.bucket_resolutions(resolution, *kohya.check_bucket_range(resolution, low, high, steps),
                                              steps)
        for size in sizes:
            for no_upscale in (False, True):
                want = sd_scripts_bucket(size, resolution, True, low, high, steps, no_upscale)
                assert kohya.select_bucket(size, resolution, None if no_upscale else predefined, steps) == want
            assert kohya.select_bucket(size, resolution, [resolution], steps) == sd_scripts_bucket(
                size, resolution, enable_bucket=False)
            bucket = want[0]
            if 0 in bucket:  # (no upscale of an image under one step: sd-scripts' trim fails; sdvae records it)
                continue
            assert np.array_equal(np.array(kohya.crop_ltrb(bucket, size)), sd_scripts_crop_ltrb(bucket, size))


def images(folder: Path) -> dict[str, tuple[int, int]]:
    """Images of many sizes and kinds: name -> stored size. A JPEG whose EXIF says rotate (sd-scripts ignores it), a
    palette image, an RGBA one, a strip, one smaller than any bucket, one of exactly a bucket's size."""
    folder.mkdir()
    rng = np.random.default_rng(2)
    sizes = {"wide.png": (150, 100), "tall.png": (40, 64), "strip.png": (400, 20), "alpha.png": (70, 70),
             "tiny.png": (9, 11), "exact.png": (128, 128), "odd.bmp": (97, 131)}
    for name, (w, h) in sizes.items():
        mode = "RGBA" if name == "alpha.png" else "RGB"
        Image.fromarray(rng.integers(0, 255, (h, w, len(mode)), dtype=np.uint8), mode).save(folder / name)
    huge = np.add.outer(np.arange(2400) % 251, np.arange(3200) % 241).astype(np.uint8)  # (compresses well)
    Image.fromarray(np.stack([huge, huge.T[:2400, :2400].repeat(2, 1)[:, :3200], 255 - huge], -1)).save(
        folder / "huge.png")
    sizes["huge.png"] = (3200, 2400)
    Image.fromarray(rng.integers(0, 255, (30, 50), dtype=np.uint8), "L").convert("P").save(folder / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(folder / "turned.jpg", exif=exif)
    return sizes | {"palette.png": (50, 30), "turned.jpg": (80, 48)}


def encode(*args: object) -> int:
    return main(["encode", *map(str, args), "--workers", "0"])


def read(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {key: npz[key] for key in npz.files}


def sample(ref, x: torch.Tensor, key: str, flipped: bool, seed: int) -> torch.Tensor:
    """diffusers' posterior of `x`, sampled with the noise sdvae documents for the key (LatentDataset's)."""
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
    eps = seeded_noise([item_seed(key, flipped, seed, 0)], dist.mean.shape[1:])[0]
    return dist.mean[0] + dist.std[0] * eps


SDXL = VaeConfig(**{**TINY.__dict__, "family": "sdxl", "scaling_factor": 0.13025, "norm_num_groups": 32})
# (32 groups: what the family presets hold, and `--family` tells the encoder)


@pytest.mark.parametrize("flip", [False, True])
def test_sdxl_files_hold_diffusers_samples_of_sd_scripts_pixels(tmp_path, flip):
    ref = reference_vae(SDXL, seed=3)
    ref.save_pretrained(tmp_path / "vae")
    sizes = images(tmp_path / "imgs")
    out = tmp_path / "out"
    options = ["--resolution", "64,96", "--buckets", "--min-bucket-reso", "32", "--max-bucket-reso", "256",
               "--bucket-reso-steps", "32", "--seed", "7", "--shard-size", "3"] + (["--flip"] if flip else [])
    assert encode(tmp_path / "imgs", "--model", tmp_path / "vae", "--family", "sdxl", "--output", out,
                  "--format", "kohya", *options) == 0
    written = sorted(p.name for p in (tmp_path / "imgs").glob("*.npz"))
    assert written == sorted(f"{Path(n).stem}_{w:04d}x{h:04d}_sdxl.npz" for n, (w, h) in sizes.items())
    for name, (w, h) in sizes.items():
        arrays = read(tmp_path / "imgs" / f"{Path(name).stem}_{w:04d}x{h:04d}_sdxl.npz")
        bucket, resized = sd_scripts_bucket((w, h), (64, 96), min_reso=32, max_reso=256, steps=32)
        tag = f"_{bucket[1] // 8}x{bucket[0] // 8}"
        names = ["latents", "original_size", "crop_ltrb"] + (["latents_flipped"] if flip else [])
        assert sorted(arrays) == sorted(names + [n + tag for n in names]), name
        for key in names:  # SD/SDXL: the plain keys (sd-scripts until #2269) and the resolution-keyed ones, equal
            assert np.array_equal(arrays[key], arrays[key + tag])
        assert arrays["latents"].dtype == np.float32 and arrays["latents"].shape == (4, bucket[1] // 8, bucket[0] // 8)
        assert arrays["original_size"].dtype == np.int64 and arrays["original_size"].tolist() == [w, h]
        assert arrays["crop_ltrb"].dtype == np.float64
        assert np.array_equal(arrays["crop_ltrb"], sd_scripts_crop_ltrb(bucket, (w, h)))
        x = to_vae_input(sd_scripts_pixels(tmp_path / "imgs" / name, bucket, resized))
        assert rel_err(torch.from_numpy(arrays["latents"]), sample(ref, x, name, False, 7)) <= 1e-5, name
        if flip:
            assert rel_err(torch.from_numpy(arrays["latents_flipped"]),
                           sample(ref, x.flip(3), name, True, 7)) <= 1e-5, name


def test_flux_files_are_scaled_samples_under_resolution_keys_and_alpha_masks(tmp_path):
    config = VaeConfig.preset("flux").__class__(**{**VaeConfig.preset("flux").__dict__, "block_out_channels":
                                                   (32, 32, 64, 64), "norm_num_groups": 32, "layers_per_block": 1})
    ref = reference_vae(config, seed=4)
    ref.save_pretrained(tmp_path / "vae")
    sizes = images(tmp_path / "imgs")
    assert encode(tmp_path / "imgs", "--model", tmp_path / "vae", "--family", "flux", "--output", tmp_path / "out",
                  "--format", "kohya", "--resolution", "64", "--alpha-mask", "--crop", "random") == 0
    for name, (w, h) in sizes.items():
        arrays = read(tmp_path / "imgs" / f"{Path(name).stem}_{w:04d}x{h:04d}_flux.npz")
        bucket, resized = sd_scripts_bucket((w, h), (64, 64), enable_bucket=False)
        tag = f"_{bucket[1] // 8}x{bucket[0] // 8}"
        assert sorted(arrays) == sorted(k + tag for k in ("latents", "original_size", "crop_ltrb", "alpha_mask"))
        pixels = sd_scripts_pixels(tmp_path / "imgs" / name, bucket, resized, alpha=True,
                                   rng=random.Random(f"0|{name}"))
        mask = arrays["alpha_mask" + tag]
        assert mask.dtype == np.float32 and np.array_equal(mask, pixels[..., 3].astype(np.float32) / 255)
        z = sample(ref, to_vae_input(pixels), name, False, 0)
        assert rel_err(torch.from_numpy(arrays["latents" + tag]), 0.3611 * (z - 0.1159)) <= 1e-5, name
    assert read(tmp_path / "imgs" / "alpha_0070x0070_flux.npz")["alpha_mask_8x8"].min() < 1  # (a real mask)


def test_sd3_files_use_resolution_keys_only(tmp_path):
    config = VaeConfig.preset("sd3").__class__(**{**VaeConfig.preset("sd3").__dict__, "block_out_channels":
                                                  (32, 32, 64, 64), "norm_num_groups": 32, "layers_per_block": 1})
    reference_vae(config, seed=5).save_pretrained(tmp_path / "vae")
    Image.fromarray(np.zeros((50, 70, 3), np.uint8)).save(tmp_path / "one.png")
    assert encode(tmp_path / "one.png", "--model", tmp_path / "vae", "--family", "sd3", "--output", tmp_path / "out",
                  "--format", "kohya", "--resolution", "64") == 0
    assert sorted(read(tmp_path / "one_0070x0050_sd3.npz")) == ["crop_ltrb_8x8", "latents_8x8", "original_size_8x8"]
    assert read(tmp_path / "one_0070x0050_sd3.npz")["latents_8x8"].shape == (16, 8, 8)


def test_reruns_keep_edit_and_respect_the_users_files(model, tmp_path, capsys):
    folder = tmp_path / "imgs"
    images(folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    args = [folder, "--model", model, "--family", "sd15", "--output", tmp_path / "out", "--format", "kohya",
            "--resolution", "64", "--shard-size", "2"]
    assert encode(*args) == 1  # the broken image is recorded, the others written
    assert "broken.png" in (tmp_path / "out" / "errors.jsonl").read_text()
    files = {p: p.read_bytes() for p in folder.glob("*_sd.npz")}
    assert len(files) == 10
    assert encode(*args, "--resume") == 1 and {p: p.read_bytes() for p in folder.glob("*_sd.npz")} == files
    # an image edited since (another size): its old cache goes, the new one is written; the others are kept
    Image.fromarray(np.zeros((60, 90, 3), np.uint8)).save(folder / "wide.png")
    assert encode(*args, "--resume") == 1
    assert not (folder / "wide_0150x0100_sd.npz").exists() and (folder / "wide_0090x0060_sd.npz").is_file()
    assert (folder / "tall_0040x0064_sd.npz").read_bytes() == files[folder / "tall_0040x0064_sd.npz"]
    # the caches of a shard a kill left incomplete (written, not yet marked) are known as ours, and written again
    (tmp_path / "out" / "metadata" / "00000.parquet").unlink()
    assert encode(*args, "--resume") == 1
    # a cache deleted since is written again
    (folder / "tiny_0009x0011_sd.npz").unlink()
    assert encode(*args, "--resume") == 1 and (folder / "tiny_0009x0011_sd.npz").is_file()
    # other settings: refused, nothing touched
    capsys.readouterr()
    assert encode(*args[:-4], "--resolution", "128", "--shard-size", "2", "--resume") == 2
    assert "other settings (resolution)" in capsys.readouterr().err
    assert (folder / "tall_0040x0064_sd.npz").read_bytes() == files[folder / "tall_0040x0064_sd.npz"]
    # another run's caches beside the images: refused, named, untouched; replaced with --overwrite
    (folder / "tall_0041x0064_sd.npz").write_bytes(b"theirs")
    (folder / "exact.npz").write_bytes(b"old name")  # (sd-scripts reads {stem}.npz first for SD/SDXL)
    (folder / "tall_0040x0064_sdxl.npz").write_bytes(b"another model's")
    capsys.readouterr()
    assert encode(*args, "--resume") == 2
    said = capsys.readouterr().err
    assert "tall_0041x0064_sd.npz" in said and "exact.npz" in said and "--overwrite" in said
    assert (folder / "tall_0041x0064_sd.npz").read_bytes() == b"theirs"
    assert encode(*args, "--overwrite") == 1
    assert not (folder / "tall_0041x0064_sd.npz").exists() and not (folder / "exact.npz").exists()
    assert (folder / "tall_0040x0064_sdxl.npz").read_bytes() == b"another model's"  # another suffix: never touched
    assert not list(folder.glob(".*"))  # (no temporaries left)


def test_a_killed_run_resumes_without_encoding_again(model, tmp_path):
    """SIGKILL part way, then --resume: the complete shards' caches are kept as they are, the rest written, no
    temporary left beside the images or in the record."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(16):
        Image.fromarray(rng.integers(0, 255, (50 + i, 70, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sdvae", "encode", str(folder), "--model", str(model), "--family", "sd15", "--output",
           str(out), "--format", "kohya", "--resolution", "64", "--shard-size", "2", "--batch-size", "1",
           "--workers", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "metadata" / "00002.parquet").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    complete = len(list((out / "metadata").glob("*.parquet")))
    assert 3 <= complete < 8, "the run should have been killed part way"
    kept = {p: (p.stat().st_mtime_ns, p.read_bytes()) for i in range(2 * complete)
            for p in folder.glob(f"{i:02d}_*_sd.npz")}
    assert len(kept) == 2 * complete
    result = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"already stored {2 * complete}" in result.stdout
    assert len(list(folder.glob("*_sd.npz"))) == 16
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in kept} == kept
    assert not list(folder.glob(".*")) and not list(out.rglob(".*.tmp"))


def test_images_sd_scripts_has_no_bucket_for_are_recorded(model, tmp_path):
    """Without upscaling, a side under one step, or a strip whose side shrinks to none, has no bucket in sd-scripts
    (its trim fails, its rounding divides by zero): each is recorded, the others are written."""
    for name, size in (("tiny.png", (9, 11)), ("strip.png", (3000, 40)), ("fine.png", (100, 70))):
        Image.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(tmp_path / name)
    assert encode(tmp_path / "tiny.png", tmp_path / "strip.png", tmp_path / "fine.png", "--model", model, "--family",
                  "sd15", "--output", tmp_path / "out", "--format", "kohya", "--resolution", "128", "--buckets",
                  "--bucket-no-upscale", "--bucket-reso-steps", "32", "--min-bucket-reso", "64") == 1
    errors = (tmp_path / "out" / "errors.jsonl").read_text()
    assert "tiny.png" in errors and "strip.png" in errors and "under the 32-px step" in errors
    assert [p.name for p in tmp_path.glob("*.npz")] == ["fine_0100x0070_sd.npz"]
    assert read(tmp_path / "fine_0100x0070_sd.npz")["latents"].shape == (4, 8, 12)  # (96x64: rounded down, no resize)


def test_what_sd_scripts_cannot_read_is_refused_before_writing(model, tmp_path, capsys):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "cat.png")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "cat.jpg")
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        data = io.BytesIO()
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(data, "PNG")
        info = tarfile.TarInfo("x.png")
        info.size = len(data.getvalue())
        tar.addfile(info, io.BytesIO(data.getvalue()))
    common = ["--model", model, "--family", "sd15", "--output", tmp_path / "out", "--resolution", "64"]
    cases = [
        ([tmp_path / "shard.tar", "--format", "kohya"], "sd-scripts reads a latent cache beside each image file"),
        ([tmp_path / "cat.png", tmp_path / "cat.jpg", "--format", "kohya"], "share sd-scripts' cache file name"),
        ([tmp_path / "cat.png", "--format", "kohya", "--arch", "sdxl"], "--arch sdxl"),
        ([tmp_path / "cat.png", "--format", "kohya", "--buckets", "--min-bucket-reso", "128"],
         "outside the bucket sizes 128..1024"),
        ([tmp_path / "cat.png", "--alpha-mask"], "--alpha-mask: sd-scripts' options, for --format kohya"),
        ([tmp_path / "cat.png", "--bucket-no-upscale"], "--bucket-no-upscale: a trainer's options"),
    ]
    for extra, message in cases:
        assert encode(*extra, *common) == 2, message
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*.npz"))


def test_an_output_inside_the_image_folder_is_not_read_as_input(model, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((50, 70, 3), np.uint8)).save(folder / "one.png")
    args = [folder, "--model", model, "--family", "sd15", "--output", folder / "record", "--format", "kohya",
            "--resolution", "64"]
    assert encode(*args) == 0
    assert encode(*args, "--resume") == 0  # (its Parquet metadata would otherwise be inputs sd-scripts cannot read)
    assert [p.name for p in folder.glob("*.npz")] == ["one_0070x0050_sd.npz"]
