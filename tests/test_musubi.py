"""`sdvae encode --format musubi`: musubi-tuner's latent cache files, checked against an independent reading of its
rules (kohya-ss/musubi-tuner `dataset/bucket.py` BucketSelector, `dataset/media_utils.py` resize_image_to_bucket,
`dataset/cache_io.py`, the FLUX.2 / Qwen-Image / Z-Image caching scripts), without musubi-tuner installed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline
from PIL import Image
from reference import rel_err
from safetensors import safe_open
from safetensors.torch import save_file
from test_flux2 import bfl_file, flux2_reference, pipeline
from test_qwenimage import qwen_reference, wan_file

from sdvae.cli import main
from sdvae.data import musubi


def selector_bucket(size: tuple[int, int], resolution: int | tuple[int, int], no_upscale: bool) -> tuple[int, int]:
    """musubi's BucketSelector for a resolution (a side, or width and height), step 16, as its source reads."""
    width, height = resolution if isinstance(resolution, tuple) else (resolution, resolution)
    area = width * height
    if no_upscale and size[0] * size[1] <= area:
        return size[0] - size[0] % 16, size[1] - size[1] % 16
    sqrt_size = int(math.sqrt(area))
    min_size = sqrt_size // 2 - (sqrt_size // 2) % 16
    options = set()
    for w in range(min_size, sqrt_size + 16, 16):
        h = area // w - (area // w) % 16
        options.add((w, h))
        options.add((h, w))
    options = sorted(options)
    ratios = np.array([w / h for w, h in options])
    return options[int(np.abs(ratios - size[0] / size[1]).argmin())]


def musubi_pixels(image: Image.Image, bucket: tuple[int, int]) -> np.ndarray:
    """musubi's resize_image_to_bucket, then its alpha slice."""
    if image.size != bucket:
        scale = max(bucket[0] / image.width, bucket[1] / image.height)
        w, h = int(image.width * scale + 0.5), int(image.height * scale + 0.5)
        if scale > 1:
            image = np.array(image.resize((w, h), Image.LANCZOS))
        else:
            image = cv2.resize(np.array(image), (w, h), interpolation=cv2.INTER_AREA)
        left, top = (w - bucket[0]) // 2, (h - bucket[1]) // 2
        image = image[top:top + bucket[1], left:left + bucket[0]]
    return np.array(image)[..., :3]


@pytest.mark.parametrize("size, no_upscale, want", [((1500, 1000), False, (1248, 832)),
                                                    ((800, 600), False, (1184, 880)), ((800, 600), True, (800, 592)),
                                                    ((1920, 1080), False, (1360, 768))])
def test_buckets_are_musubis_worked_examples(size, no_upscale, want):
    assert musubi.bucket_for(size, (1024, 1024), True, no_upscale) == want == selector_bucket(size, 1024, no_upscale)


def test_buckets_agree_with_the_selector_on_many_sizes():
    rng = np.random.default_rng(0)
    for _ in range(300):
        size = (int(rng.integers(8, 5000)), int(rng.integers(8, 5000)))
        for resolution in ((256, 256), (512, 512), (960, 544)):
            for no_upscale in (False, True):
                assert musubi.bucket_for(size, resolution, True, no_upscale) == selector_bucket(size, resolution,
                                                                                                no_upscale)
    assert musubi.bucket_for((3000, 10), (512, 512), False, False) == (512, 512)  # no buckets: the resolution as it is
    assert musubi.bucket_for((3000, 10), (960, 544), False, False) == (960, 544)
    assert selector_bucket((1500, 1000), (960, 544), False) == (880, 592)  # (the worked example of its docs)


@pytest.mark.parametrize("size, mode", [((300, 200), "RGB"), ((60, 45), "RGB"), ((200, 200), "RGBA"),
                                        ((33, 500), "RGBA"), ((64, 64), "RGB")])
def test_resize_is_musubis(size, mode):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8), mode)
    bucket = musubi.bucket_for(size, (64, 64), True, False)
    pixels, crop = musubi.resize_to_bucket(image, bucket)
    assert np.array_equal(pixels[..., :3], musubi_pixels(image, bucket))
    assert (crop[2] - crop[0], crop[3] - crop[1]) == bucket


def images(folder: Path) -> dict[str, tuple[int, int]]:
    """PNGs of many sizes and a JPEG whose EXIF says rotate (musubi ignores it): name -> stored size."""
    folder.mkdir()
    rng = np.random.default_rng(2)
    sizes = {"wide.png": (150, 100), "tall.png": (40, 64), "strip.png": (300, 24), "alpha.png": (70, 70)}
    for name, (w, h) in sizes.items():
        mode = "RGBA" if name == "alpha.png" else "RGB"
        Image.fromarray(rng.integers(0, 255, (h, w, len(mode)), dtype=np.uint8), mode).save(folder / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(folder / "turned.jpg", exif=exif)
    return sizes | {"turned.jpg": (80, 48)}


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def encode(*args: object) -> int:
    return main(["encode", *map(str, args), "--workers", "0", "--resolution", "64", "--buckets"])


def test_flux2_files_hold_the_pipelines_latents_of_musubis_pixels(tmp_path):
    ref = flux2_reference()
    model = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in bfl_file(ref.state_dict()).items()}, model)
    sizes = images(tmp_path / "imgs")
    out = tmp_path / "cache"
    assert encode(tmp_path / "imgs", "--model", model, "--output", out, "--format", "musubi") == 0
    assert json.loads((out / "manifest.json").read_text())["settings"]["arch"] == "f2d"
    for name, (w, h) in sizes.items():
        path = out / f"{Path(name).stem}_{w:04d}x{h:04d}_f2d.safetensors"
        tensors, metadata = read(path)
        assert metadata == {"architecture": "flux_2_dev", "width": str(w), "height": str(h), "format_version": "1.0.1"}
        bucket = selector_bucket((w, h), 64, False)
        image = Image.open(tmp_path / "imgs" / name)
        image = image if image.mode in ("RGB", "RGBA") else image.convert("RGB")
        x = torch.from_numpy(musubi_pixels(image, bucket)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        with torch.no_grad():
            want = Flux2Pipeline._encode_vae_image(pipeline(ref), x, generator=None)[0]
        assert list(tensors) == [f"latents_{bucket[1] // 16}x{bucket[0] // 16}_float32"], name
        assert rel_err(tensors[list(tensors)[0]], want) <= 1e-5, name
    # a rerun finds them all; an image edited since is encoded again
    before = (out / "wide_0150x0100_f2d.safetensors").read_bytes()
    Image.fromarray(np.zeros((100, 150, 3), np.uint8)).save(tmp_path / "imgs" / "wide.png")
    assert encode(tmp_path / "imgs", "--model", model, "--output", out, "--format", "musubi", "--resume") == 0
    assert (out / "wide_0150x0100_f2d.safetensors").read_bytes() != before
    assert not list(out.rglob(".*.tmp"))
    # a cache file deleted since (musubi's own latent caching deletes files it did not write) is written again
    (out / "tall_0040x0064_f2d.safetensors").unlink()
    assert encode(tmp_path / "imgs", "--model", model, "--output", out, "--format", "musubi", "--resume") == 0
    assert (out / "tall_0040x0064_f2d.safetensors").is_file()


def test_qwen_image_files_are_the_normalized_mode_with_a_frame_axis(tmp_path):
    ref = qwen_reference()
    model = tmp_path / "Wan2.1_VAE.pth"
    torch.save(wan_file(ref.state_dict()), model)
    sizes = images(tmp_path / "imgs")
    out = tmp_path / "cache"
    assert encode(tmp_path / "imgs", "--model", model, "--output", out, "--format", "musubi", "--arch", "qie",
                  "--store-dtype", "bfloat16") == 0
    mean = torch.tensor(ref.config.latents_mean).view(1, 16, 1, 1, 1)
    inverse_std = 1.0 / torch.tensor(ref.config.latents_std).view(1, 16, 1, 1, 1)
    for name, (w, h) in sizes.items():
        tensors, metadata = read(out / f"{Path(name).stem}_{w:04d}x{h:04d}_qie.safetensors")
        assert metadata["architecture"] == "qwen_image"
        bucket = selector_bucket((w, h), 64, False)
        (key, latent), = tensors.items()
        assert latent.shape == (16, 1, bucket[1] // 8, bucket[0] // 8)
        image = Image.open(tmp_path / "imgs" / name)
        image = image if image.mode in ("RGB", "RGBA") else image.convert("RGB")
        x = torch.from_numpy(musubi_pixels(image, bucket)).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1.0
        with torch.no_grad():
            want = ((ref.encode(x).latent_dist.mode() - mean) * inverse_std)[0]
        assert key == f"latents_1x{bucket[1] // 8}x{bucket[0] // 8}_bfloat16"
        assert rel_err(latent, want) <= 1e-2, name  # (stored as bfloat16)


def test_z_image_files_are_the_raw_mean_in_float32(tmp_path):
    from test_flux2 import AutoencoderKL_like_flux1

    model = tmp_path / "flux1-ae.safetensors"
    save_file(AutoencoderKL_like_flux1({}), model)
    Image.fromarray(np.full((40, 56, 3), 90, np.uint8)).save(tmp_path / "one.png")
    out = tmp_path / "cache"
    assert encode(tmp_path / "one.png", "--model", model, "--output", out, "--format", "musubi", "--family", "flux",
                  "--store-dtype", "bfloat16") == 0
    tensors, metadata = read(out / "one_0056x0040_zi.safetensors")
    bucket = selector_bucket((56, 40), 64, False)
    assert metadata["architecture"] == "z_image"
    assert list(tensors) == [f"latents_1x{bucket[1] // 8}x{bucket[0] // 8}_float32"]
    assert tensors[list(tensors)[0]].shape == (16, bucket[1] // 8, bucket[0] // 8)


@pytest.mark.parametrize("extra, message", [
    (["--arch", "f2d"], "--arch: a trainer's options, for --format kohya or musubi"),
    (["--format", "musubi", "--flip"], "caches no flipped latents"),
    (["--format", "musubi"], "musubi-tuner caches the latents of FLUX.2, Qwen-Image and Z-Image"),
])
def test_what_musubi_cannot_read_is_refused_before_writing(model, tmp_path, capsys, extra, message):
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "a.png")
    assert encode(tmp_path / "a.png", "--model", model, "--output", tmp_path / "out", *extra) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_two_inputs_of_one_stem_are_refused_naming_both(tmp_path, capsys):
    model = tmp_path / "Wan2.1_VAE.pth"
    torch.save(wan_file(qwen_reference().state_dict()), model)
    for name in ("cat.png", "cat.jpg"):
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / name)
    assert encode(tmp_path / "cat.png", tmp_path / "cat.jpg", "--model", model, "--output", tmp_path / "out",
                  "--format", "musubi") == 2
    said = capsys.readouterr().err
    assert "cat.png" in said and "cat.jpg" in said and "same file stem" in said
    assert encode(tmp_path / "cat.png", "--model", model, "--output", tmp_path / "out", "--format", "musubi",
                  "--arch", "f2d") == 2
    assert "--arch f2d: it takes a flux2 VAE, and this one is qwenimage" in capsys.readouterr().err


def test_an_image_under_one_step_without_upscaling_is_recorded(tmp_path):
    model = tmp_path / "Wan2.1_VAE.pth"
    torch.save(wan_file(qwen_reference().state_dict()), model)
    Image.fromarray(np.zeros((11, 9, 3), np.uint8)).save(tmp_path / "tiny.png")
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "fine.png")
    assert encode(tmp_path / "tiny.png", tmp_path / "fine.png", "--model", model, "--output", tmp_path / "out",
                  "--format", "musubi", "--bucket-no-upscale") == 1
    assert "under the 16-px step" in (tmp_path / "out" / "errors.jsonl").read_text()
    assert [p.name for p in (tmp_path / "out").glob("*_qi.safetensors")] == ["fine_0050x0040_qi.safetensors"]


def test_a_width_and_height_resolution_is_musubis_resolution_list(tmp_path, capsys):
    """`--resolution W,H` as musubi's `resolution = [W, H]`: the target without buckets, the area with them."""
    from test_flux2 import AutoencoderKL_like_flux1

    model = tmp_path / "flux1-ae.safetensors"
    save_file(AutoencoderKL_like_flux1({}), model)
    Image.fromarray(np.full((100, 150, 3), 90, np.uint8)).save(tmp_path / "one.png")
    common = [tmp_path / "one.png", "--model", model, "--family", "flux", "--format", "musubi", "--workers", "0"]
    assert main(["encode", *map(str, common), "--output", str(tmp_path / "a"), "--resolution", "96,48"]) == 0
    assert read(tmp_path / "a" / "one_0150x0100_zi.safetensors")[0]["latents_1x6x12_float32"].shape == (16, 6, 12)
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["settings"]["resolution"] == [96, 48]
    assert main(["encode", *map(str, common), "--output", str(tmp_path / "b"), "--resolution", "96,48",
                 "--buckets"]) == 0
    bucket = selector_bucket((150, 100), (96, 48), False)
    assert (tmp_path / "b" / "one_0150x0100_zi.safetensors").is_file()
    assert list(read(tmp_path / "b" / "one_0150x0100_zi.safetensors")[0]) == [
        f"latents_1x{bucket[1] // 8}x{bucket[0] // 8}_float32"]
    with pytest.raises(SystemExit):
        main(["encode", *map(str, common), "--output", str(tmp_path / "c"), "--resolution", "96,48,2"])
    assert "width,height" in capsys.readouterr().err


def control_images(tmp_path: Path) -> tuple[Path, Path]:
    """Images and control images named as musubi's control_directory matching reads them."""
    imgs, ctrl = tmp_path / "imgs", tmp_path / "ctrl"
    imgs.mkdir()
    ctrl.mkdir()
    rng = np.random.default_rng(5)

    def save(path: Path, size: tuple[int, int]) -> None:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)

    for name, size in (("cat.png", (60, 40)), ("cat_1.png", (50, 50)), ("dog.png", (70, 30))):
        save(imgs / name, size)
    # cat: its own stem first, then by number (cat_1.png goes to the image cat_1, whose name is longer)
    for name, size in (("cat_10.jpg", (40, 40)), ("cat_2.png", (64, 48)), ("cat.png", (30, 90)),
                       ("cat_1.png", (45, 45)), ("dog_0.webp", (90, 45))):
        save(ctrl / name, size)
    return imgs, ctrl


def test_control_images_are_matched_sized_and_encoded_as_musubis(tmp_path):
    ref = flux2_reference()
    model = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in bfl_file(ref.state_dict()).items()}, model)
    imgs, ctrl = control_images(tmp_path)
    want_controls = {"cat": ["cat.png", "cat_2.png", "cat_10.jpg"], "cat_1": ["cat_1.png"], "dog": ["dog_0.webp"]}
    for no_resize in (False, True):
        out = tmp_path / f"cache{no_resize}"
        assert encode(imgs, "--model", model, "--output", out, "--format", "musubi", "--control-dir", ctrl,
                      *(["--no-resize-control"] if no_resize else [])) == 0
        for path in imgs.iterdir():
            image = Image.open(path)
            bucket = selector_bucket(image.size, 64, False)
            tensors, _ = read(out / f"{path.stem}_{image.width:04d}x{image.height:04d}_f2d.safetensors")
            assert len(tensors) == 1 + len(want_controls[path.stem])
            for i, name in enumerate(want_controls[path.stem]):
                control = Image.open(ctrl / name).convert("RGB")
                size = (control.width - control.width % 16, control.height - control.height % 16) if no_resize \
                    else bucket
                x = torch.from_numpy(musubi_pixels(control, size)).permute(2, 0, 1)[None].float() / 127.5 - 1.0
                with torch.no_grad():
                    want = Flux2Pipeline._encode_vae_image(pipeline(ref), x, generator=None)[0]
                key = f"latents_control_{i}_{size[1] // 16}x{size[0] // 16}_float32"
                assert rel_err(tensors[key], want) <= 1e-5, (path.name, name)
    # an edited control is encoded again
    before = (out / "dog_0070x0030_f2d.safetensors").read_bytes()
    Image.fromarray(np.zeros((45, 90, 3), np.uint8)).save(ctrl / "dog_0.webp")
    assert encode(imgs, "--model", model, "--output", out, "--format", "musubi", "--control-dir", ctrl,
                  "--no-resize-control", "--resume") == 0
    assert (out / "dog_0070x0030_f2d.safetensors").read_bytes() != before


def test_qwen_image_takes_one_control_and_what_musubi_refuses_is_refused(tmp_path, capsys):
    model = tmp_path / "Wan2.1_VAE.pth"
    torch.save(wan_file(qwen_reference().state_dict()), model)
    imgs, ctrl = control_images(tmp_path)
    assert encode(imgs, "--model", model, "--output", tmp_path / "qi", "--format", "musubi", "--control-dir",
                  ctrl) == 0
    tensors, _ = read(tmp_path / "qi" / "cat_0060x0040_qi.safetensors")
    bucket = selector_bucket((60, 40), 64, False)
    assert sorted(tensors) == [f"latents_1x{bucket[1] // 8}x{bucket[0] // 8}_float32",
                               f"latents_control_0_1x{bucket[1] // 8}x{bucket[0] // 8}_float32"]
    (ctrl / "dog_0.webp").unlink()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(ctrl / "cat_x.png")
    common = [imgs, "--model", model, "--format", "musubi"]
    for extra, message in ((["--control-dir", ctrl], "cat_x.png matches cat but its suffix 'x' is not a number"),
                           (["--control-dir", tmp_path / "none"], "not a folder"),
                           (["--no-resize-control"], "give the control images with --control-dir")):
        assert encode(*common, "--output", tmp_path / "out", *extra) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "out").exists()
    (ctrl / "cat_x.png").unlink()
    assert encode(*common, "--output", tmp_path / "out", "--control-dir", ctrl) == 2
    assert "no control image for 1 image(s) (dog.png)" in capsys.readouterr().err
    assert encode(*common, "--output", tmp_path / "out", "--arch", "qil") == 2
    assert "Qwen-Image-Layered" in capsys.readouterr().err
