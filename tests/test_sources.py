"""Inputs beyond image files: WebDataset tars, Parquet files, brace patterns, captions; stale inputs on resume."""

from __future__ import annotations

import json
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch
from inputs import image_bytes, mixed_inputs, webdataset_shard, write_parquet, write_tar
from reference import rel_err

from sdvae import LatentDataset
from sdvae.cli import main
from sdvae.data.sources import expand_braces, list_inputs


def encode(*args) -> int:
    return main(["encode", *map(str, args), "--workers", "0", "--resolution", "64"])


def by_key(out) -> dict:
    return {d["key"]: d for d in LatentDataset(out, mode=True)}


def errors(out) -> list[dict]:
    return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]


def test_brace_patterns_expand_like_a_shell():
    assert expand_braces("d/{00008..00011}.tar") == ["d/00008.tar", "d/00009.tar", "d/00010.tar", "d/00011.tar"]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_webdataset_tars_give_member_keys_captions_and_record_broken_members(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    webdataset_shard(tmp_path / "data" / "00000.tar", 0, 4, broken=1)
    webdataset_shard(tmp_path / "data" / "00001.tar", 4, 3)
    assert encode("data/{00000..00001}.tar", "--model", model, "--output", "out") == 1
    stored = by_key(tmp_path / "out")
    assert sorted(stored) == [f"data/0000{n // 4}.tar/{n:06d}" for n in (0, 2, 3, 4, 5, 6)]
    assert stored["data/00000.tar/000002"]["caption"] == "caption of sample 2"
    assert stored["data/00000.tar/000003"]["caption"] is None  # every third sample has no .txt
    [error] = errors(tmp_path / "out")
    assert error["key"] == "data/00000.tar/000001" and error["path"] == "data/00000.tar"
    assert error["member"] == "000001" and "not an image" in error["error"]
    # a member's latent is the one of the same bytes given as a file
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "000002.jpg").write_bytes(image_bytes(2, fmt="JPEG"))
    encode("files", "--model", model, "--output", "plain")
    want = by_key(tmp_path / "plain")["000002.jpg"]["mean"]
    assert rel_err(stored["data/00000.tar/000002"]["mean"], want) <= 1e-5  # batched with others: float noise


def test_a_truncated_tar_keeps_its_whole_members_and_records_the_cut_one(model, tmp_path):
    tar = webdataset_shard(tmp_path / "cut.tar", 0, 3)
    with tarfile.open(tar) as whole:
        last = whole.getmember("000002.jpg")
    tar.write_bytes(tar.read_bytes()[:last.offset_data + last.size // 2])  # cut inside the last image
    items = list_inputs([str(tar)])
    assert [i.key.rsplit("/", 1)[1] for i in items if i.error is None] == ["000000", "000001"]
    assert encode(tar, "--model", model, "--output", tmp_path / "out") == 1
    assert sorted(by_key(tmp_path / "out")) == [f"{tar}/000000", f"{tar}/000001"]
    assert [e["member"] for e in errors(tmp_path / "out")] == ["000002"]
    (tmp_path / "junk.tar").write_bytes(b"not a tar")
    assert encode(tmp_path / "junk.tar", "--model", model, "--output", tmp_path / "junk") == 1
    assert "cannot read the tar" in errors(tmp_path / "junk")[0]["error"]


@pytest.mark.parametrize("struct", [True, False], ids=["hf-struct", "binary"])
def test_parquet_rows_are_encoded_with_their_captions_and_broken_rows_recorded(model, tmp_path, struct):
    images = [image_bytes(n, fmt="JPEG") for n in range(7)]
    images[2], images[5] = b"garbage", None
    path = write_parquet(tmp_path / "t.parquet", images, [f"text {n}" for n in range(6)] + [None], struct=struct,
                         caption_column="text", image_column="jpg")
    assert encode(path, "--model", model, "--output", tmp_path / "out") == 1
    stored = by_key(tmp_path / "out")
    assert sorted(stored) == sorted(f"{path}/{n}" for n in (0, 1, 3, 4, 6))
    assert stored[f"{path}/4"]["caption"] == "text 4" and stored[f"{path}/6"]["caption"] is None
    assert [(e["row"], e["path"]) for e in errors(tmp_path / "out")] == [(2, str(path)), (5, str(path))]
    assert "no image bytes" in errors(tmp_path / "out")[1]["error"]
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "x.jpg").write_bytes(images[4])
    encode(tmp_path / "f", "--model", model, "--output", tmp_path / "plain")
    assert rel_err(stored[f"{path}/4"]["mean"], by_key(tmp_path / "plain")["x.jpg"]["mean"]) <= 1e-5


def test_parquet_columns_are_named_or_found_and_errors_name_the_file(model, tmp_path, capsys):
    odd = write_parquet(tmp_path / "odd.parquet", [image_bytes(1)], image_column="pixels_png",
                        captions=["hello"], caption_column="alt")
    items = list_inputs([str(odd)])  # the only binary column is the image column; no conventional caption name
    assert items[0].column == "pixels_png" and items[0].caption is None
    assert list_inputs([str(odd)], caption_column="alt")[0].caption == "hello"
    assert encode(odd, "--model", model, "--output", tmp_path / "a", "--image-column", "nope") == 2
    assert "odd.parquet: no image column 'nope'" in capsys.readouterr().err
    two = tmp_path / "two.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": [b"x"], "b": [b"y"]}), two)
    assert encode(two, "--model", model, "--output", tmp_path / "b") == 2
    assert "cannot tell which column" in capsys.readouterr().err
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 nonsense")
    assert encode(tmp_path / "bad.parquet", "--model", model, "--output", tmp_path / "c") == 1
    assert "cannot read the Parquet file" in errors(tmp_path / "c")[0]["error"]


def test_folders_take_tars_and_parquet_files_with_keys_relative_to_the_folder(model, tmp_path):
    inputs = mixed_inputs(tmp_path)
    items = list_inputs([str(tmp_path)])
    keys = [i.key for i in items]
    assert "wds/00000.tar/000000" in keys and "table.parquet/0" in keys and "folder/img0.png" in keys
    assert len(keys) == len(set(keys)) == len([i for spec in inputs for i in list_inputs([spec])])
    assert next(i for i in items if i.key == "folder/img1.png").caption == "a sidecar caption"
    (tmp_path / "folder" / "img0.caption").write_text("the other sidecar name")
    assert next(i for i in list_inputs([str(tmp_path)]) if i.key == "folder/img0.png").caption == \
        "the other sidecar name"


def test_resume_encodes_changed_added_and_removed_inputs_again_and_keeps_the_rest(model, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for n in range(6):
        (folder / f"{n}.png").write_bytes(image_bytes(n))
    out = tmp_path / "out"
    args = [folder, "--model", model, "--output", out, "--shard-size", "2"]
    assert encode(*args) == 0
    shard = {n: (out / "shards" / f"0000{n}.safetensors") for n in range(3)}
    before = {n: shard[n].stat().st_mtime_ns for n in range(3)}
    (folder / "3.png").write_bytes(image_bytes(33))  # new content: shard 1 is stale
    os.utime(folder / "3.png", ns=(1, 1))
    (folder / "4.txt").write_text("a caption added later")  # shard 2's caption changed
    assert encode(*args, "--resume") == 0
    assert shard[0].stat().st_mtime_ns == before[0]
    assert shard[1].stat().st_mtime_ns != before[1] and shard[2].stat().st_mtime_ns != before[2]
    fresh = tmp_path / "fresh"
    assert encode(*[fresh if a == out else a for a in args]) == 0
    stored, want = by_key(out), by_key(fresh)
    assert stored.keys() == want.keys() and stored["4.png"]["caption"] == "a caption added later"
    assert all(torch.equal(stored[k]["mean"], want[k]["mean"]) for k in want)
    (folder / "0.png").unlink()
    (folder / "9.png").write_bytes(image_bytes(9))
    assert encode(*args, "--resume") == 0
    assert sorted(by_key(out)) == ["1.png", "2.png", "3.png", "4.png", "5.png", "9.png"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["identified_by"]["file"].startswith("file size and mtime")
    assert manifest["totals"]["stored"] == 6 and manifest["totals"]["failed"] == 0


def test_a_changed_tar_member_is_encoded_again_on_resume(model, tmp_path):
    tar = write_tar(tmp_path / "d.tar", [("a.png", image_bytes(1)), ("b.png", image_bytes(2))])
    out = tmp_path / "out"
    assert encode(tar, "--model", model, "--output", out, "--shard-size", "1") == 0
    old = by_key(out)[f"{tar}/b"]["mean"]
    write_tar(tar, [("a.png", image_bytes(1)), ("b.png", image_bytes(3))], mtime=1_800_000_000)
    assert encode(tar, "--model", model, "--output", out, "--shard-size", "1", "--resume") == 0
    new = by_key(out)[f"{tar}/b"]["mean"]
    assert rel_err(new, old) > 1e-2


def test_many_tars_are_listed_in_parallel_processes_with_the_serial_result(tmp_path, monkeypatch):
    from sdvae.data import sources

    for n in range(sources.PARALLEL_LISTING + 2):
        write_tar(tmp_path / "wds" / f"{n:05d}.tar", [(f"{n}.png", b"x"), (f"{n}.txt", b"caption %d" % n)])
    pools = []
    monkeypatch.setattr(sources, "ProcessPoolExecutor", lambda *a, **k: pools.append(1) or ProcessPoolExecutor(*a, **k))
    parallel = list_inputs([str(tmp_path / "wds")])
    assert pools == [1]
    monkeypatch.setattr(sources, "PARALLEL_LISTING", 10**9)
    serial = list_inputs([str(tmp_path / "wds")])
    assert parallel == serial and len(serial) == len(set(i.key for i in serial)) == 66
    assert serial[65].caption == "caption 65"


def test_a_damaged_header_inside_a_tar_is_recorded_not_silently_dropped(model, tmp_path):
    tar = write_tar(tmp_path / "d.tar", [(f"{n}.png", image_bytes(n)) for n in range(4)])
    with tarfile.open(tar) as whole:
        third = whole.getmember("2.png")
    data = bytearray(tar.read_bytes())
    data[third.offset:third.offset + 100] = b"\xff" * 100  # the third member's header
    tar.write_bytes(bytes(data))
    assert encode(tar, "--model", model, "--output", tmp_path / "out") == 1
    assert sorted(by_key(tmp_path / "out")) == [f"{tar}/0", f"{tar}/1"]
    [error] = errors(tmp_path / "out")
    assert error["path"] == str(tar) and f"damaged tar header at byte {third.offset}" in error["error"]


def test_img2dataset_folders_pass_over_metadata_parquet_and_name_nested_members(model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_tar(tmp_path / "out0" / "00000.tar", [("a/0001.png", image_bytes(1)), ("b/0001.png", b"broken"),
                                                 ("b/0001.txt", b"nested caption")])
    pq.write_table(pa.table({"key": ["0001"], "url": ["https://example.invalid"], "status": ["success"]}),
                   tmp_path / "out0" / "00000.parquet")
    assert encode(tmp_path / "out0", "--model", model, "--output", tmp_path / "ds") == 1
    assert sorted(by_key(tmp_path / "ds")) == ["00000.tar/a/0001"]
    [error] = errors(tmp_path / "ds")
    assert (error["key"], error["member"]) == ("00000.tar/b/0001", "b/0001")
    with pytest.raises(ValueError, match="cannot tell which column"):  # named on its own it is an error
        list_inputs([str(tmp_path / "out0" / "00000.parquet")])


def test_an_image_given_twice_is_named_in_a_warning(tmp_path, caplog):
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    for name in ("photos/a.png", "photos/sub/b.png"):
        (tmp_path / name).write_bytes(image_bytes(0, (8, 8)))
    with caplog.at_level("WARNING", logger="sdvae"):
        items = list_inputs([str(tmp_path / "photos"), str(tmp_path / "photos" / "sub")])
    assert sorted(item.key for item in items) == ["a.png", "b.png", "sub/b.png"]
    assert "1 image(s) are given more than once" in caplog.text and "'sub/b.png' and 'b.png'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="sdvae"):
        list_inputs([str(tmp_path / "photos")])
    assert "more than once" not in caplog.text
