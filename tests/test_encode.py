"""`sdvae encode` end to end: folders of generated images (broken ones too), the stored latents, resume, reader."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from reference import TINY, rel_err

from sdvae import LatentDataset, load_encoder
from sdvae.cli import main
from sdvae.data.images import image_to_tensor
from sdvae.data.prepare import ImageError, load_rgb, make_buckets, nearest_bucket, prepare

GOOD = ["a.png", "b.jpg", "nested/c.webp", "cmyk.jpg", "grey.png", "grey16.png", "palette.png", "rgba.png", "la.png",
        "rotated.jpg", "tiny.png"]
BROKEN = ["empty.png", "truncated.png", "text.jpg", "bomb.png"]


def noise(h, w, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "nested").mkdir()
    Image.fromarray(noise(90, 130)).save(root / "a.png")
    (root / "a.txt").write_text("a caption")
    Image.fromarray(noise(200, 70, seed=1)).save(root / "b.jpg", quality=95)
    Image.fromarray(noise(64, 64, seed=2)).save(root / "nested/c.webp")
    Image.frombytes("CMYK", (80, 80), noise(80, 80, 4, seed=3).tobytes()).save(root / "cmyk.jpg")
    Image.fromarray(noise(70, 90, 1, seed=4)[..., 0].astype(np.uint16) * 257).save(root / "grey16.png")
    Image.fromarray(noise(70, 90, 1, seed=4)[..., 0]).save(root / "grey.png")
    Image.fromarray(noise(66, 66, seed=5)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        root / "palette.png", transparency=0)
    Image.fromarray(noise(72, 100, 4, seed=6)).save(root / "rgba.png")
    Image.fromarray(noise(50, 60, 2, seed=7)).save(root / "la.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(noise(60, 100, seed=8)).save(root / "rotated.jpg", exif=exif)
    Image.fromarray(noise(7, 10, seed=9)).save(root / "tiny.png")
    (root / "empty.png").write_bytes(b"")
    buffer = io.BytesIO()
    Image.fromarray(noise(64, 64, seed=10)).save(buffer, "PNG")
    (root / "truncated.png").write_bytes(buffer.getvalue()[:200])
    (root / "text.jpg").write_text("not an image")
    Image.fromarray(noise(300, 400, seed=11)).save(root / "bomb.png")
    (root / "notes.md").write_text("ignored: not an image suffix")
    return root


def encode(*args: str) -> int:
    return main(["encode", *map(str, args), "--workers", "0", "--max-pixels", "100000"])


def test_folder_to_dataset_records_broken_files_and_goes_on(model, images, tmp_path):
    out = tmp_path / "out"
    assert encode(images, "--model", model, "--output", out, "--resolution", "64", "--shard-size", "4") == 1
    dataset = LatentDataset(out)
    assert sorted(d["key"] for d in dataset) == sorted(GOOD)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["key"] for e in errors) == sorted(BROKEN)
    assert all(e["error"] and e["path"].endswith(e["key"]) for e in errors)
    assert "100000-pixel limit" in next(e["error"] for e in errors if e["key"] == "bomb.png")
    item = next(d for d in dataset if d["key"] == "a.png")
    assert item["caption"] == "a caption" and item["original_size"] == (130, 90) and item["bucket"] == (64, 64)
    assert item["latent"].shape == (4, 8, 8) and not item["flipped"]
    assert next(d for d in dataset if d["key"] == "rotated.jpg")["original_size"] == (60, 100)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["scaling_factor"] == TINY.scaling_factor and len(manifest["model"]["sha256"]) == 64
    assert not list(out.rglob(".*.tmp"))


def test_stored_latents_equal_the_library_on_the_same_pixels(model, images, tmp_path):
    out = tmp_path / "out"
    encode(images, "--model", model, "--output", out, "--buckets", "--resolution", "128", "--flip", "--crop", "random")
    encoder = load_encoder(model)
    dataset = LatentDataset(out, mode=True)
    assert len(dataset) == 2 * len(GOOD)
    for item in dataset:
        im = load_rgb(item["source"])
        pixels = np.asarray(im.resize(_resized_size(im.size, item["bucket"]), Image.Resampling.LANCZOS)
                            .crop(item["crop"]))
        if item["flipped"]:
            pixels = pixels[:, ::-1]
        assert item["bucket"] == nearest_bucket(*im.size, make_buckets(128))
        x = image_to_tensor(Image.fromarray(np.ascontiguousarray(pixels)))[None]
        with torch.no_grad():
            want = encoder.encode(x)
        assert rel_err(item["mean"], want.mean[0]) <= 1e-5, item["key"]
        assert rel_err(item["logvar"], want.logvar[0]) <= 1e-5, item["key"]
        assert torch.allclose(item["latent"], (want.mean[0] - 0) * TINY.scaling_factor, rtol=1e-5, atol=1e-6)


def _resized_size(size, bucket):
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    return max(bucket[0], round(size[0] * scale)), max(bucket[1], round(size[1] * scale))


def test_modes_convert_as_users_expect(images):
    rgba = np.asarray(Image.open(images / "rgba.png")).astype(float)
    alpha = rgba[..., 3:] / 255
    want = rgba[..., :3] * alpha + 255 * (1 - alpha)
    assert np.abs(np.asarray(load_rgb(images / "rgba.png")).astype(float) - want).max() <= 1
    grey = np.asarray(Image.open(images / "grey16.png")).astype(float) / 257
    assert np.abs(np.asarray(load_rgb(images / "grey16.png"))[..., 0] - grey).max() <= 0.5
    assert np.array_equal(np.asarray(load_rgb(images / "grey.png")), np.asarray(load_rgb(images / "grey16.png")))
    assert load_rgb(images / "rotated.jpg").size == (60, 100)
    assert load_rgb(images / "cmyk.jpg").mode == "RGB"


def test_random_crops_follow_the_seed():
    im = Image.fromarray(noise(100, 300))
    crops = [prepare(im, (64, 64), "random", __import__("random").Random(f"{s}|k")).crop for s in (0, 0, 1, 2)]
    assert crops[0] == crops[1] and len(set(crops)) > 1
    assert prepare(im, (64, 64)).crop == (64, 0, 128, 64)


def test_rerun_is_refused_unless_resume_or_overwrite_and_settings_must_match(model, images, tmp_path, capsys):
    out = tmp_path / "out"
    args = [images / "a.png", "--model", model, "--output", out, "--resolution", "64"]
    assert encode(*args) == 0
    assert encode(*args) == 2 and "--resume" in capsys.readouterr().err
    assert encode(*args, "--resume") == 0
    assert encode(*args, "--flip", "--resume") == 2 and "flip" in capsys.readouterr().err
    assert encode(*args, "--flip", "--overwrite") == 0
    assert len(LatentDataset(out)) == 2
    user_folder = tmp_path / "mine"
    user_folder.mkdir()
    (user_folder / "thesis.tex").write_text("precious")
    assert encode(images / "a.png", "--model", model, "--output", user_folder) == 2
    assert (user_folder / "thesis.tex").read_text() == "precious"


def test_reader_noise_is_per_item_and_per_epoch(model, images, tmp_path):
    out = tmp_path / "out"
    encode(images / "a.png", images / "b.jpg", "--model", model, "--output", out, "--resolution", "64")
    first, again, mean = LatentDataset(out), LatentDataset(out), LatentDataset(out, mode=True)
    assert torch.equal(first[0]["latent"], again[0]["latent"])
    assert not torch.equal(first[0]["latent"], mean[0]["latent"])
    again.set_epoch(1)
    assert not torch.equal(first[0]["latent"], again[0]["latent"])
    eps = (first[1]["latent"] / TINY.scaling_factor - first[1]["mean"]) / torch.exp(0.5 * first[1]["logvar"])
    assert abs(eps.mean()) < 0.5 and 0.6 < eps.std() < 1.4


def test_reader_refuses_shards_with_other_settings(model, images, tmp_path):
    out, other = tmp_path / "out", tmp_path / "other"
    encode(images / "a.png", "--model", model, "--output", out, "--resolution", "64", "--shard-size", "1")
    encode(images / "b.jpg", "--model", model, "--output", other, "--resolution", "64", "--flip")
    (other / "metadata" / "00000.parquet").rename(out / "metadata" / "00001.parquet")
    with pytest.raises(ValueError, match="other settings"):
        LatentDataset(out)


def start_encode(model: Path, tmp_path: Path, images: int, workers: int, shards_first: int
                 ) -> tuple[list[str], Path, subprocess.Popen]:
    """`sdvae encode` of `images` PNGs (two per shard) in a child process, once `shards_first` shards are stored;
    its error output goes to `tmp_path / "stderr.txt"`."""
    inputs = tmp_path / "many"
    inputs.mkdir()
    for i in range(images):
        Image.fromarray(noise(64 + i, 80, seed=100 + i)).save(inputs / f"{i:02d}.png")
    (inputs / "zz-broken.png").write_bytes(b"broken")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sdvae", "encode", str(inputs), "--model", str(model), "--output", str(out),
           "--resolution", "64", "--shard-size", "2", "--batch-size", "1", "--workers", str(workers)]
    with open(tmp_path / "stderr.txt", "w") as said:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=said, start_new_session=True)
    marker = out / "metadata" / f"{shards_first - 1:05d}.parquet"
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    return cmd, out, proc


def test_sigkill_then_resume_stores_every_image_once(model, tmp_path):
    cmd, out, proc = start_encode(model, tmp_path, images=24, workers=0, shards_first=3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stored = len(list((out / "metadata").glob("*.parquet")))
    assert 3 <= stored < 13, "the run should have been killed part way"
    result = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    keys = [d["key"] for d in LatentDataset(out)]
    assert sorted(keys) == [f"{i:02d}.png" for i in range(24)]
    errors = (out / "errors.jsonl").read_text().splitlines()
    assert [json.loads(e)["key"] for e in errors] == ["zz-broken.png"]
    assert not list(out.rglob(".*.tmp"))


def test_sigterm_unwinds_like_ctrl_c_exits_143_and_resume_finishes(model, tmp_path):
    """A scheduler's SIGTERM: the temporary files are removed, the complete shards kept, the message says --resume."""
    cmd, out, proc = start_encode(model, tmp_path, images=16, workers=2, shards_first=2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    said = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 143, said
    assert "sdvae: terminated (complete shards are kept: the same command with --resume goes on)" in said
    assert "Traceback" not in said
    assert not list(out.rglob(".*.tmp"))
    result = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr  # (the broken file)
    assert sorted(d["key"] for d in LatentDataset(out)) == [f"{i:02d}.png" for i in range(16)]


def test_negative_workers_are_refused(model, images, tmp_path, capsys):
    assert main(["encode", str(images / "a.png"), "--model", str(model), "--output", str(tmp_path / "out"),
                 "--workers", "-1"]) == 2
    assert "workers must be 0 (decode in this process) or more, got -1" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_worker_processes_give_the_same_dataset_as_inline_decoding(model, images, tmp_path):
    runs = {}
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}"
        main(["encode", str(images), "--model", str(model), "--output", str(out), "--resolution", "64",
              "--workers", workers, "--max-pixels", "100000"])
        runs[workers] = {d["key"]: d for d in LatentDataset(out, mode=True)}
    assert runs["0"].keys() == runs["2"].keys()
    for key, item in runs["0"].items():
        assert item["crop"] == runs["2"][key]["crop"]
        assert torch.equal(item["mean"], runs["2"][key]["mean"]), key


def test_decode_writes_a_row_of_previews(model, images, tmp_path, capsys):
    out = tmp_path / "out"
    encode(images / "a.png", images / "b.jpg", "--model", model, "--output", out, "--buckets", "--resolution", "128")
    buckets = [d["bucket"] for d in LatentDataset(out)]
    assert main(["decode", str(out), "--index", "0", "1", "--out", str(tmp_path / "grid.png")]) == 0
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (sum(w for w, _ in buckets), max(h for _, h in buckets))
    assert main(["decode", str(out), "--index", "5", "--out", str(tmp_path / "x.png")]) == 2
    assert "out of range" in capsys.readouterr().err


def test_tile_size_and_max_memory_change_memory_not_latents(model, images, tmp_path):
    plain, tiled, budget = tmp_path / "plain", tmp_path / "tiled", tmp_path / "budget"
    common = [images / "a.png", images / "b.jpg", "--model", model, "--resolution", "128"]
    encode(*common, "--output", plain)
    encode(*common, "--output", tiled, "--tile-size", "16")
    encode(*common, "--output", budget, "--max-memory", "40MiB")  # untiled needs ~41, 64 px tiles with files ~39
    want = {d["key"]: d for d in LatentDataset(plain, mode=True)}
    for out in (tiled, budget):
        for item in LatentDataset(out, mode=True):
            assert rel_err(item["mean"], want[item["key"]]["mean"]) <= 1e-5
            assert rel_err(item["logvar"], want[item["key"]]["logvar"]) <= 1e-5


def test_compile_flag_reaches_the_encoder(model, images, tmp_path, monkeypatch):
    """`--compile` asks the loaded encoder to compile (the compiled path itself: tests/test_fast_path.py)."""
    from sdvae.vae.base import VaeModule

    compiled = []
    monkeypatch.setattr(VaeModule, "compile_network",
                        lambda self, **options: compiled.append(type(self).__name__) or self)
    encode(images / "a.png", "--model", model, "--output", tmp_path / "out", "--resolution", "64", "--compile")
    assert compiled == ["VaeEncoder"]


def test_max_pixels_is_the_only_size_limit(images, monkeypatch):
    """Pillow's own bomb limit (89 MP, an error from twice that) must not cap --max-pixels, nor stay changed."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert load_rgb(images / "a.png", max_pixels=100_000).size == (130, 90)  # 11700 pixels: over 2 x 1000
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(ImageError, match="over the 10000-pixel limit"):
        load_rgb(images / "a.png", max_pixels=10_000)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_a_file_name_that_is_not_utf8_is_encoded_under_an_escaped_key(model, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(noise(64, 64)).save(folder / os.fsdecode(b"caf\xe9.png"))  # a Latin-1 name, legal on Linux
    Image.fromarray(noise(64, 64, seed=1)).save(folder / "ok.png")
    out = tmp_path / "out"
    assert encode(folder, "--model", model, "--output", out, "--resolution", "64") == 0
    assert sorted(d["key"] for d in LatentDataset(out)) == ["caf\\xe9.png", "ok.png"]
    assert encode(folder, "--model", model, "--output", out, "--resolution", "64", "--resume") == 0
    assert "encoded 0, failed 0, already stored 2" in capsys.readouterr().out


@pytest.mark.parametrize("manifest", ['{"name": "my project"}', "[1, 2]", "not json"])
def test_a_folder_with_a_foreign_manifest_is_left_alone(model, images, tmp_path, capsys, manifest):
    mine = tmp_path / "mine"
    (mine / "shards").mkdir(parents=True)
    (mine / "manifest.json").write_text(manifest)
    (mine / "shards" / "part1.bin").write_bytes(b"precious")
    for flags in ([], ["--resume"], ["--overwrite"]):
        assert encode(images / "a.png", "--model", model, "--output", mine, *flags) == 2
        err = capsys.readouterr().err
        assert "manifest.json" in err and ("not one sdvae wrote" in err or "not a readable manifest" in err)
    assert (mine / "manifest.json").read_text() == manifest
    assert (mine / "shards" / "part1.bin").read_bytes() == b"precious"


def test_decode_finds_the_model_from_any_folder_or_asks_for_it(model, images, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(model.parent)
    out = tmp_path / "out"
    assert encode(images / "a.png", "--model", model.name, "--output", out, "--resolution", "64") == 0
    monkeypatch.chdir(tmp_path)
    assert main(["decode", str(out), "--out", "x.png"]) == 0 and (tmp_path / "x.png").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["model"]["file"] = str(tmp_path / "moved.safetensors")
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["decode", str(out), "--out", "y.png"]) == 2
    assert "moved.safetensors, is not there; name it with --model" in capsys.readouterr().err
    assert main(["decode", str(out), "--out", "y.png", "--model", str(model)]) == 0


@pytest.mark.parametrize("flags,message", [
    (["--batch-size", "0"], "batch_size must be a whole number of at least 1, got 0"),
    (["--resolution", "0"], "resolution must be a whole number of at least 1, got 0"),
    (["--resolution", "4"], "resolution must be at least 8 pixels"),
    (["--shard-size", "-1"], "shard_size must be a whole number of at least 1, got -1"),
    (["--tile-size", "0"], "tile_size must be a whole number of at least 1, got 0"),
    (["--device", "gpu0"], "--device gpu0:"),
    (["--device", "cuda:7"], "--device cuda:7:"),
    (["--device", "meta"], "--device meta: a meta device holds no data"),
    (["--device", "xla"], "--device xla: torch cannot make a tensor there"),
])
def test_bad_arguments_are_refused_before_anything_is_written(model, images, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert encode(images / "a.png", "--model", model, "--output", out, *flags) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert encode(images / "a.png", "--model", model, "--output", afile) == 2
    assert "afile: is a file" in capsys.readouterr().err and afile.read_text() == "mine"


def test_a_run_that_stored_nothing_can_start_over_with_other_settings(model, images, tmp_path, monkeypatch):
    out = tmp_path / "out"

    def fail(*args, **kwargs):
        raise ValueError("the model could not be set up")

    with monkeypatch.context() as patch:
        patch.setattr("sdvae.data.local.ShardEncoder", fail)
        assert encode(images / "a.png", "--model", model, "--output", out, "--resolution", "64") == 2
    assert (out / "manifest.json").exists()
    assert encode(images / "a.png", "--model", model, "--output", out, "--resolution", "64", "--flip") == 0
    assert len(LatentDataset(out)) == 2


def test_resume_reports_the_failures_of_earlier_runs(model, images, tmp_path, capsys):
    out = tmp_path / "out"
    args = [images, "--model", model, "--output", out, "--resolution", "64", "--shard-size", "4"]
    assert encode(*args) == 1
    capsys.readouterr()
    assert encode(*args, "--resume") == 1
    said = capsys.readouterr().out
    assert f"already stored {len(GOOD)}, failed in an earlier run {len(BROKEN)}" in said and "errors.jsonl" in said


def test_no_images_is_an_error_that_says_what_was_passed_over(model, tmp_path, capsys, caplog):
    empty, other = tmp_path / "empty", tmp_path / "other"
    empty.mkdir()
    other.mkdir()
    (other / "photo.heic").write_bytes(b"x")
    (other / "photo.txt").write_text("a caption, not reported")
    for folder in (empty, other):
        with caplog.at_level("INFO", logger="sdvae"):
            assert encode(folder, "--model", model, "--output", tmp_path / "out") == 2
        assert f"no images in {folder}" in capsys.readouterr().err
    assert "passed over 1 file(s) that are not images by their suffix (.heic x1)" in caplog.text
    assert not (tmp_path / "out").exists()


def test_an_interrupt_exits_130_and_points_to_resume(model, images, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("sdvae.data.encode.encode_dataset", interrupted)
    assert encode(images / "a.png", "--model", model, "--output", tmp_path / "out") == 130
    assert "--resume" in capsys.readouterr().err


def test_a_long_strip_is_resized_only_where_it_is_cropped(monkeypatch):
    strip = Image.fromarray(noise(6, 3000))  # covers a 64 px square at 32000 x 64: 500 targets
    sizes = []
    resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize",
                        lambda im, size, *args, **kwargs: sizes.append(size) or resize(im, size, *args, **kwargs))
    for crop, rng in (("center", None), ("random", __import__("random").Random(3))):
        got = prepare(strip, (64, 64), crop, rng)
        whole = resize(strip, (32000, 64), Image.Resampling.LANCZOS).crop(got.crop)
        assert got.pixels.shape == (64, 64, 3)
        assert np.abs(got.pixels.astype(int) - np.asarray(whole).astype(int)).max() <= 1
    assert max(w * h for w, h in sizes) == 64 * 64


def test_a_width_and_height_resolution_crops_to_that_rectangle(model, photos, tmp_path):
    from sdvae.data.job import Settings

    assert Settings(resolution=(64, 64)).resolution == 64  # (a square is one side: the same settings, the same id)
    with pytest.raises(ValueError, match="sdvae's buckets are made around a square"):
        Settings(resolution=(64, 32), buckets=True)
    assert main(["encode", str(photos / "0.png"), "--model", str(model), "--output", str(tmp_path / "out"),
                 "--resolution", "64,32", "--workers", "0"]) == 0
    item = LatentDataset(tmp_path / "out")[0]
    assert item["bucket"] == (64, 32) and item["mean"].shape == (4, 4, 8)


def test_options_added_later_leave_the_ids_of_earlier_datasets_alone():
    """A dataset written before the kohya and control options existed (its manifest records these settings and
    no others) keeps its settings id, so --resume goes on with it."""
    from sdvae.data.job import Settings

    assert set(Settings().recorded()) == {"resolution", "buckets", "crop", "flip", "seed", "dtype", "store_dtype",
                                          "max_pixels", "format", "arch", "bucket_no_upscale"}
    assert Settings(format="kohya", alpha_mask=True).recorded()["alpha_mask"] is True
