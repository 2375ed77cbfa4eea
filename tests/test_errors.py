"""Every failure is an error a user can act on: exit 2 with a message naming the file, column or device at fault
(no traceback), or the input's record in errors.jsonl (exit 1); nothing left behind that a rerun trips on."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdvae.cli import Terminated, main
from sdvae.data.sources import _parquet_cells


def encode(*args) -> int:
    return main(["encode", *map(str, args), "--workers", "0", "--resolution", "64"])


def run(photos, model, out, *flags) -> int:
    return encode(photos, "--model", model, "--output", out, "--shard-size", "2", *flags)


def test_a_full_disk_stops_the_run_naming_the_file_and_resume_goes_on(photos, model, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    temporary = out / "shards" / f".00001.safetensors.{socket.gethostname()}.{os.getpid()}.tmp"
    fsync = os.fsync

    def disk_full_at_the_second_shard(fd: int) -> None:
        if temporary.exists() and os.path.samestat(os.fstat(fd), temporary.stat()):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", disk_full_at_the_second_shard)
        assert run(photos, model, out) == 2
    err = capsys.readouterr().err
    assert f"sdvae: error: {out}/shards/00001.safetensors: cannot write it: No space left on device" in err
    assert (out / "metadata" / "00000.parquet").exists() and not list(out.rglob(".*.tmp"))
    assert run(photos, model, out, "--resume") == 0
    assert "encoded 6, failed 0, already stored 2" in capsys.readouterr().out


def test_temporaries_left_by_a_killed_write_are_removed_by_the_next_run(photos, model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".manifest.json.otherhost.41.tmp").write_text("half a manifest: the first run was killed writing it")
    assert run(photos, model, out) == 0
    left = [".manifest.json.h.7.tmp", ".errors.jsonl.h.7.tmp", "shards/.00001.safetensors.h.7.tmp",
            "metadata/.00002.parquet.h.7.tmp", "errors/.00003.jsonl.h.7.tmp"]
    for name in left:
        (out / name).write_bytes(b"cut short")
    assert run(photos, model, out, "--resume") == 0
    assert not list(out.rglob(".*.tmp"))


@pytest.mark.parametrize("buffered", [True, False])
def test_output_into_a_closed_pipe_ends_quietly(model, buffered):
    """`sdvae info X | head -1`: the reader goes away; no traceback, no "Exception ignored", the status of a
    process that SIGPIPE ends (141), whether stdout is buffered or not."""
    env = {**os.environ, "PYTHONUNBUFFERED": "" if buffered else "1"}
    read, write = os.pipe()
    os.close(read)  # the reader left before anything was written
    result = subprocess.run([sys.executable, "-m", "sdvae", "info", str(model)], stdout=write,
                            stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    os.close(write)
    assert result.returncode == 141 and result.stderr.strip() == "", result.stderr


def test_a_device_that_holds_no_data_is_refused_before_a_ray_cluster_is_joined(photos, model, tmp_path, capsys):
    out = tmp_path / "out"
    assert encode(photos, "--model", model, "--output", out, "--engine", "ray", "--device", "meta") == 2
    assert "--device meta: a meta device holds no data" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("cells,kind", [([1, 2], "int64"), (["photo.png", "hello"], "string"),
                                        ([[1, 2], [3]], "list<element: int64>"),
                                        ([{"bytes": "x", "path": "p"}] * 2, "struct<bytes: string")])
def test_an_image_column_that_holds_no_image_bytes_stops_the_run_naming_file_column_and_type(
        model, tmp_path, capsys, cells, kind):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": cells}), path)
    out = tmp_path / "out"
    assert encode(path, "--model", model, "--output", out, "--image-column", "image") == 2
    assert f"{path}: column 'image' holds {kind}" in capsys.readouterr().err and not out.exists()
    assert encode(path, "--model", model, "--output", out) == 2
    assert "cannot tell which column holds the images" in capsys.readouterr().err and not out.exists()


def test_a_cell_that_is_not_bytes_is_that_rows_error_never_taken_for_one(tmp_path):
    """A string cell's value must not be reported as if it were the reason the row failed."""
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"image": ["photo.png", None]}), path)
    assert _parquet_cells(str(path), "image", [0, 1]) == {r: f"row {r}: no image bytes in column 'image'"
                                                          for r in (0, 1)}


@pytest.mark.parametrize("content,says", [
    (bytes(range(256)) * 2, "not a text file listing paths (it holds NUL bytes"),
    (b"0.png\n1.png\ncaf\xe9.png\n", "not a text file listing paths: line 3 is not UTF-8 (byte 0xe9)"),
])
def test_a_list_file_that_is_not_text_is_named(model, tmp_path, capsys, content, says):
    listing = tmp_path / "paths.txt"
    listing.write_bytes(content)
    assert encode(listing, "--model", model, "--output", tmp_path / "out") == 2
    assert f"sdvae: error: {listing}: {says}" in capsys.readouterr().err


def test_a_list_file_with_a_byte_order_mark_reads_its_first_path(photos, tmp_path):
    from sdvae.data.sources import list_inputs

    listing = tmp_path / "paths.txt"
    listing.write_bytes(f"\ufeff{photos / '0.png'}\n".encode())
    assert [item.error for item in list_inputs([str(listing)])] == [None]


def test_symbolic_link_loops_and_links_to_nothing_say_so(photos, model, tmp_path, capsys):
    (tmp_path / "a.png").symlink_to("b.png")
    (tmp_path / "b.png").symlink_to("a.png")
    (tmp_path / "gone.png").symlink_to("deleted.png")
    for name, says in (("a.png", "a symbolic link loop"), ("gone.png", "a symbolic link to deleted.png, which does "
                                                                       "not exist")):
        assert encode(tmp_path / name, "--model", model, "--output", tmp_path / "out") == 2
        assert f"{tmp_path / name}: {says}" in capsys.readouterr().err
        assert main(["info", str(tmp_path / name)]) == 2
        assert f"{tmp_path / name}: {says}" in capsys.readouterr().err
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "0.png").symlink_to(photos / "0.png")
    (folder / "loop.png").symlink_to("loop.png")
    (folder / "gone.png").symlink_to("deleted.png")
    out = tmp_path / "out"
    assert encode(folder, "--model", model, "--output", out) == 1  # recorded, not silently passed over
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["key"], "symbolic links" in e["error"]) for e in errors] == [("gone.png", False), ("loop.png", True)]


def test_a_process_that_read_a_latent_dataset_exits_cleanly(photos, model, tmp_path):
    """pyarrow dropped its reader over Python bytes on one of its threads at interpreter exit, which aborted the
    process ("terminate called without an active exception", exit 134) about every other run."""
    out = tmp_path / "out"
    assert encode(photos, "--model", model, "--output", out) == 0  # (one shard: its reader is dropped at exit)
    code = f"from sdvae import LatentDataset; LatentDataset({str(out)!r})"
    for _ in range(6):  # (one after another: a busy machine hides the race)
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert (result.returncode, result.stderr) == (0, "")


def test_an_output_folder_that_cannot_be_made_is_named(photos, model, tmp_path, capsys):
    (tmp_path / "afile").write_text("mine")
    assert encode(photos, "--model", model, "--output", tmp_path / "afile" / "out") == 2
    assert f"{tmp_path / 'afile' / 'out'}: cannot create the output folder: Not a directory" in capsys.readouterr().err


def test_decode_refuses_an_out_name_no_image_format_writes_before_decoding(photos, model, tmp_path, capsys):
    out = tmp_path / "out"
    assert encode(photos / "0.png", "--model", model, "--output", out) == 0
    for name in ("preview.xyz", "folder"):
        assert main(["decode", str(out), "--out", str(tmp_path / name)]) == 2
        assert f"{tmp_path / name}: not the name of an image file Pillow writes" in capsys.readouterr().err


def test_a_folder_in_a_list_file_is_recorded_as_such(photos, model, tmp_path):
    listing = tmp_path / "paths.txt"
    listing.write_text(f"{photos / '0.png'}\n{photos}\n")
    out = tmp_path / "out"
    assert encode(listing, "--model", model, "--output", out) == 1
    [error] = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert error["key"] == str(photos) and error["error"].startswith("a folder: a list names files")


@pytest.mark.parametrize("source", ["fifo", "/dev/zero"])
def test_a_checkpoint_that_is_not_a_regular_file_is_refused_not_read_forever(tmp_path, source):
    if source == "fifo":
        source = str(tmp_path / "vae.safetensors")
        os.mkfifo(source)
    result = subprocess.run([sys.executable, "-m", "sdvae", "info", source], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert f"sdvae: error: {source}: not a regular file (a FIFO, device or socket)" in result.stderr


def test_the_readme_and_encode_help_give_the_same_exit_statuses(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    with pytest.raises(SystemExit):
        main(["encode", "--help"])
    epilog = " ".join(capsys.readouterr().out.split("exit status:")[1].split())
    assert re.findall(r"^\| (\d+) \| ", readme, re.M) == re.findall(r"(\d+) when", epilog) == \
        ["0", "1", "2", "130", "143", "141"]


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, Terminated])
def test_an_interrupt_mid_write_leaves_no_temporary_file(tmp_path, monkeypatch, interrupt):
    """Ctrl-C or SIGTERM while a file is being written: the interrupt goes on, the temporary is gone, the file is
    not there (no half file)."""
    from sdvae.data.store import LocalStore

    def interrupted(fd):
        raise interrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(interrupt):
        LocalStore(tmp_path).write("errors/00002.jsonl", b"{}\n")
    assert not list(tmp_path.rglob("*00002*"))
