"""Nothing lost, nothing silently wrong: resume verifies what is on disk, one writer per output, no NaN stored."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from reference import diffusers_to_ldm, random_images, reference_vae
from safetensors.torch import load_file, save_file

import sdvae
from sdvae import LatentDataset
from sdvae.cli import main
from sdvae.data.store import LOCK, LocalStore


def encode(*args) -> int:
    return main(["encode", *map(str, args), "--workers", "0"])


def run(photos, model, out, *flags) -> int:
    return encode(photos, "--model", model, "--output", out, "--resolution", "64", "--shard-size", "2", *flags)


def latents(out) -> dict[str, torch.Tensor]:
    return {d["key"]: d["mean"].clone() for d in LatentDataset(out, mode=True)}


def encoded_count(capsys) -> int:
    said = capsys.readouterr().out
    return int(said.split("encoded ")[1].split(",")[0])


def _set_safetensors_settings(path, value: str) -> None:
    tensors = load_file(path)
    save_file(tensors, path, metadata={"settings_id": value})


def _set_marker_settings(path, value: str) -> None:
    table = pq.read_table(path)
    column = table.schema.get_field_index("settings_id")
    pq.write_table(table.set_column(column, "settings_id", pa.array([value] * table.num_rows, pa.string())), path)


DAMAGE = {
    "deleted": lambda out: (out / "shards/00001.safetensors").unlink(),
    "truncated": lambda out: os.truncate(out / "shards/00001.safetensors",
                                         (out / "shards/00001.safetensors").stat().st_size - 100),
    "cut in its header": lambda out: os.truncate(out / "shards/00001.safetensors", 20),
    "other settings in the latents": lambda out: _set_safetensors_settings(out / "shards/00001.safetensors", "x"),
    "other settings in the metadata": lambda out: _set_marker_settings(out / "metadata/00001.parquet", "x"),
    "swapped with another shard": lambda out: os.replace(out / "shards/00002.safetensors",
                                                          out / "shards/00001.safetensors"),
    "metadata not Parquet": lambda out: (out / "metadata/00001.parquet").write_bytes(b"junk"),
    "metadata of a foreign schema": lambda out: pq.write_table(pa.table({"a": [1]}), out / "metadata/00001.parquet"),
}
NAMED = {"metadata not Parquet": "00001.parquet", "metadata of a foreign schema": "00001.parquet",
         "other settings in the metadata": "00001.parquet"}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_verifies_each_kept_shard_and_encodes_a_damaged_one_again(photos, model, tmp_path, capsys, damage):
    out = tmp_path / "out"
    assert run(photos, model, out) == 0
    want = latents(out)
    DAMAGE[damage](out)
    with pytest.raises(ValueError, match=rf"{NAMED.get(damage, '00001.safetensors')}.*--resume"):
        LatentDataset(out)
    capsys.readouterr()
    assert run(photos, model, out, "--resume") == 0
    assert encoded_count(capsys) == 2 + 2 * (damage == "swapped with another shard")
    got = latents(out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_a_second_writer_is_refused_while_the_first_holds_the_output(photos, model, tmp_path, capsys):
    out = tmp_path / "out"
    with LocalStore(out).writer_lock():
        assert run(photos, model, out) == 2
        err = capsys.readouterr().err
        assert "another run is writing this output" in err and f"pid {os.getpid()}" in err
        assert not (out / "manifest.json").exists()
        assert run(photos, model, out, "--resume") == 2 and run(photos, model, out, "--overwrite") == 2
    assert run(photos, model, out) == 0
    assert not (out / LOCK).exists()


def test_the_lock_of_a_killed_run_does_not_stop_the_next(photos, model, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, sys\nfrom sdvae.data.store import LocalStore\n"
        f"with LocalStore({str(out)!r}).writer_lock():\n"
        "    print('locked', flush=True); os.kill(os.getpid(), signal.SIGKILL)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    assert holder.wait(timeout=60) == -signal.SIGKILL
    assert (out / LOCK).exists()  # left behind by the killed run, but nobody holds it
    assert run(photos, model, out) == 0 and len(LatentDataset(out)) == 8


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_tensor(tmp_path, capsys, photos):
    from reference import TINY

    ref = reference_vae(TINY, seed=4)
    state = diffusers_to_ldm({k: v.contiguous() for k, v in ref.state_dict().items()}, 4)
    state["encoder.mid.attn_1.q.weight"][0, 0] = float("nan")
    state["encoder.conv_in.bias"][1] = float("inf")
    save_file(state, tmp_path / "vae.safetensors")
    with pytest.raises(ValueError, match=r"2 tensor\(s\) hold NaN or inf.*encoder\.conv_in\.bias \(1 of 32\)"
                                         r".*encoder\.mid\.attn_1\.q\.weight \(1 of 4096\)"):
        sdvae.load_encoder(tmp_path / "vae.safetensors")
    sdvae.load_decoder(tmp_path / "vae.safetensors")  # the decoder's own tensors are finite
    assert run(photos, tmp_path / "vae.safetensors", tmp_path / "out") == 2
    assert "encoder.conv_in.bias" in capsys.readouterr().err


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input_is_refused_naming_the_batch_items(model, value):
    enc, dec = sdvae.load_encoder(model), sdvae.load_decoder(model)
    x = random_images(3, 16, 16)
    x[2, 1, 5, 5] = value
    with pytest.raises(ValueError, match=r"images of batch item\(s\) \[2\] hold NaN or inf"):
        enc.encode(x)
    z = torch.zeros(2, 4, 2, 2)
    z[0, 0, 0, 0] = value
    with pytest.raises(ValueError, match=r"latents of batch item\(s\) \[0\] hold NaN or inf"):
        dec.decode(z)


def test_a_non_finite_latent_is_recorded_as_that_inputs_error_never_stored(photos, model, tmp_path, monkeypatch):
    from sdvae.data.shard import ShardEncoder

    original = ShardEncoder._encode
    calls = []

    def second_call_gives_nan(self, pixels):
        dist = original(self, pixels)
        calls.append(1)
        if len(calls) == 2:  # the flipped twin of the first image
            dist.mean[0, 0, 0, 0] = float("nan")
        return dist

    monkeypatch.setattr(ShardEncoder, "_encode", second_call_gives_nan)
    out = tmp_path / "out"
    assert run(photos, model, out, "--flip", "--batch-size", "1") == 1
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["key"], "not finite (NaN or inf)" in e["error"]) for e in errors] == [("0.png", True)]
    stored = LatentDataset(out, mode=True)
    assert sorted({d["key"] for d in stored}) == [f"{i}.png" for i in range(1, 8)] and len(stored) == 14
    assert all(torch.isfinite(d["mean"]).all() for d in stored)


def test_latents_past_the_store_dtype_are_errors_not_infinities(photos, tmp_path):
    from reference import TINY

    ref = reference_vae(TINY, seed=5)
    with torch.no_grad():
        ref.quant_conv.bias[0] = 1e6  # finite in float32, inf in float16
    ref.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    assert run(photos, tmp_path / "model", out, "--store-dtype", "float16") == 1
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 8 and all("overflows float16 storage" in e["error"] for e in errors)
    assert len(LatentDataset(out)) == 0


def test_fifos_given_directly_or_listed_are_recorded_not_waited_on(photos, model, tmp_path):
    fifo, tar_fifo, listed_fifo = tmp_path / "pipe.png", tmp_path / "pipe.tar", tmp_path / "listed.jpg"
    for path in (fifo, tar_fifo, listed_fifo):
        os.mkfifo(path)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{photos / '1.png'}\n{listed_fifo}\n")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sdvae", "encode", str(photos / "0.png"), str(fifo), str(tar_fifo), str(listing),
           "--model", str(model), "--output", str(out), "--resolution", "64", "--workers", "0"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["key"] for e in errors) == sorted([str(fifo), str(tar_fifo), str(listed_fifo)])
    assert all("not a regular file" in e["error"] for e in errors)
    assert len(LatentDataset(out)) == 2


def test_the_header_check_reads_the_real_file_layout(tmp_path):
    """The shard check's reading of the safetensors header agrees with safetensors on a file it wrote."""
    from sdvae.data.dataset import _safetensors_header

    save_file({"mean_8x8": torch.zeros(3, 4, 1, 1), "logvar_8x8": torch.ones(3, 4, 1, 1, dtype=torch.float16)},
              tmp_path / "s.safetensors", metadata={"settings_id": "abc"})
    header = _safetensors_header(LocalStore(tmp_path), "s.safetensors")
    assert header["mean_8x8"]["shape"] == [3, 4, 1, 1] and header["__metadata__"] == {"settings_id": "abc"}
    data = (tmp_path / "s.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    (tmp_path / "t.safetensors").write_bytes(data + b"\0")
    with pytest.raises(ValueError, match="longer than its header says"):
        _safetensors_header(LocalStore(tmp_path), "t.safetensors")
    assert n < len(data)
