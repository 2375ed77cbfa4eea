"""`--engine ray` gives the local engine's dataset: on a local instance, on a two-node cluster, and after kills
(the killed driver's writer lock stops no resume)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from inputs import mixed_inputs
from ray.cluster_utils import Cluster
from reference import rel_err

from sdvae import LatentDataset
from sdvae.data.encode import encode_dataset
from sdvae.data.job import Runtime, Settings
from sdvae.data.ray_engine import RayEngine
from sdvae.data.store import LocalStore, OutputInUse

SETTINGS = Settings(resolution=64, max_pixels=10**6, flip=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    return mixed_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def local(model, inputs, tmp_path_factory) -> Path:
    """The local engine's dataset for the mixed inputs: what every Ray run must equal."""
    out = tmp_path_factory.mktemp("local") / "out"
    encode_dataset(inputs, str(model), out, SETTINGS, shard_size=3)
    return out


def assert_same_dataset(got: Path, want: Path) -> None:
    """Same keys (each once), captions, sources, error records; latents equal within float32 noise."""
    a = {(d["key"], d["flipped"]): d for d in LatentDataset(got, mode=True)}
    b = {(d["key"], d["flipped"]): d for d in LatentDataset(want, mode=True)}
    assert len(a) == len(LatentDataset(got)) and sorted(a) == sorted(b)
    for key, item in a.items():
        for field in ("caption", "source", "crop", "original_size", "bucket"):
            assert item[field] == b[key][field], (key, field)
        assert rel_err(item["mean"], b[key]["mean"]) <= 1e-5, key
        assert rel_err(item["logvar"], b[key]["logvar"]) <= 1e-5, key
    assert (got / "errors.jsonl").read_text() == (want / "errors.jsonl").read_text()
    assert not list(got.rglob(".*.tmp"))


def test_mixed_inputs_hold_what_the_comparisons_need(local):
    items = list(LatentDataset(local))
    errors = [json.loads(line) for line in (local / "errors.jsonl").read_text().splitlines()]
    assert len(items) == 26 and {e.get("member") or e.get("row") or e["key"] for e in errors} == {
        "broken.png", "000002", 1, 3}
    assert sum(item["caption"] is not None for item in items) == 12  # a sidecar, three tar .txt, two rows; flipped


def test_ray_engine_on_a_local_instance_equals_the_local_engine(model, inputs, local, tmp_path):
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        for actors, cpus in ((1, 1.0), (2, 0.5)):
            out = tmp_path / f"ray{actors}"
            engine = RayEngine(Runtime(batch_size=2), actors=actors, actor_cpus=cpus)
            counts = encode_dataset(inputs, str(model), out, SETTINGS, engine=engine, shard_size=3)
            assert counts == {"encoded": 13, "failed": 4, "skipped": 0, "failed_before": 0}
            assert_same_dataset(out, local)
        with pytest.raises(ValueError, match="leave no CPU"):
            encode_dataset(inputs, str(model), tmp_path / "full", SETTINGS, engine=RayEngine(actors=2))
        with pytest.raises(ValueError, match="need as many GPUs"):
            encode_dataset(inputs, str(model), tmp_path / "gpu", SETTINGS, engine=RayEngine(Runtime(device="cuda")))
        tight = RayEngine(Runtime(max_memory="64MiB"), actors=1, actor_cpus=1.0)  # the driver checks the budget
        with pytest.raises(ValueError, match=r"resolution 4096 \(4096x4096 targets, batches of 8\): encoding "
                                             r"\[8, 3, 4096, 4096\] needs about .* more than the 64 MiB allowed"):
            encode_dataset(inputs, str(model), tmp_path / "tight", Settings(resolution=4096, max_pixels=4096**2),
                           engine=tight)
        assert not any((tmp_path / name).exists() for name in ("full", "gpu", "tight"))
        with LocalStore(tmp_path / "held").writer_lock(), pytest.raises(OutputInUse, match="another run is writing"):
            encode_dataset(inputs, str(model), tmp_path / "held", SETTINGS, engine=RayEngine())  # the driver holds it
    finally:
        ray.shutdown()


def test_flux2_and_qwenimage_on_ray_equal_the_local_engine(inputs, tmp_path):
    """The newer families through the Ray engine: FLUX.2's BFL file and Qwen-Image's Wan file, their latents
    scaled as their pipelines do, the same dataset as the local engine writes."""
    from safetensors.torch import save_file
    from test_flux2 import bfl_file, flux2_reference
    from test_qwenimage import qwen_reference, wan_file

    bfl = bfl_file(flux2_reference().state_dict())
    save_file({k: v.contiguous() for k, v in bfl.items()}, tmp_path / "ae.safetensors")
    torch.save(wan_file(qwen_reference().state_dict()), tmp_path / "Wan2.1_VAE.pth")
    settings = Settings(resolution=32, max_pixels=10**6)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        for name, family, shape in (("ae.safetensors", "flux2", (128, 2, 2)), ("Wan2.1_VAE.pth", "qwenimage",
                                                                               (16, 4, 4))):
            local, remote = tmp_path / f"{family}-local", tmp_path / f"{family}-ray"
            encode_dataset(inputs, str(tmp_path / name), local, settings, shard_size=5)
            engine = RayEngine(Runtime(batch_size=2), actors=1, actor_cpus=1.0)
            encode_dataset(inputs, str(tmp_path / name), remote, settings, shard_size=5, engine=engine)
            assert_same_dataset(remote, local)
            dataset = LatentDataset(remote)
            assert dataset.manifest["family"] == family and dataset[0]["latent"].shape == shape
    finally:
        ray.shutdown()


def test_musubi_cache_files_on_ray_equal_the_local_engines(inputs, tmp_path):
    """`--format musubi` through the Ray engine: its actors write the same musubi-tuner cache files."""
    from safetensors.torch import load_file
    from test_qwenimage import qwen_reference, wan_file

    model = tmp_path / "Wan2.1_VAE.pth"
    torch.save(wan_file(qwen_reference().state_dict()), model)
    files = [f for f in inputs if not f.endswith((".tar", ".parquet"))]  # (musubi reads image files)
    settings = Settings(resolution=32, max_pixels=10**6, format="musubi", buckets=True)
    local, remote = tmp_path / "local", tmp_path / "ray"
    encode_dataset(files, str(model), local, settings, shard_size=2)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        encode_dataset(files, str(model), remote, settings, shard_size=2,
                       engine=RayEngine(Runtime(batch_size=2), actors=1, actor_cpus=1.0))
    finally:
        ray.shutdown()
    names = sorted(p.name for p in local.glob("*_qi.safetensors"))
    assert names and names == sorted(p.name for p in remote.glob("*_qi.safetensors"))
    for name in names:
        want, got = load_file(local / name), load_file(remote / name)
        assert want.keys() == got.keys() and all(rel_err(got[k], want[k]) <= 1e-5 for k in want), name


def test_kohya_cache_files_on_ray_equal_the_local_engines(model, tmp_path):
    """`--format kohya` through the Ray engine: its actors write the same sd-scripts caches beside the images."""
    import numpy as np
    from inputs import image_bytes

    folders = tmp_path / "local-images", tmp_path / "ray-images"
    for folder in folders:
        folder.mkdir()
        for n, size in enumerate([(90, 70), (40, 130), (64, 64), (200, 30)]):
            (folder / f"{n}.png").write_bytes(image_bytes(n, size))
    settings = Settings(resolution=64, max_pixels=10**6, format="kohya", buckets=True, flip=True,
                        min_bucket_reso=32, bucket_reso_steps=32)
    encode_dataset([str(folders[0])], str(model), tmp_path / "local", settings, family="sd15", shard_size=2)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        encode_dataset([str(folders[1])], str(model), tmp_path / "ray", settings, family="sd15", shard_size=2,
                       engine=RayEngine(Runtime(batch_size=2), actors=1, actor_cpus=1.0))
    finally:
        ray.shutdown()
    names = sorted(p.name for p in folders[0].glob("*_sd.npz"))
    assert len(names) == 4 and names == sorted(p.name for p in folders[1].glob("*_sd.npz"))
    for name in names:
        with np.load(folders[0] / name) as want, np.load(folders[1] / name) as got:
            assert want.files == got.files
            assert all(rel_err(torch.from_numpy(got[k]), torch.from_numpy(want[k])) <= 1e-5 for k in want.files)


def test_ray_engine_on_a_two_node_cluster_equals_the_local_engine(model, inputs, local, tmp_path):
    # 3 CPUs in all for 2 actors of 1 CPU and decoding tasks of 0.5: whatever the placement, both nodes work
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        out = tmp_path / "cluster"
        engine = RayEngine(address=cluster.address, actors=2, actor_cpus=1.0)
        encode_dataset(inputs, str(model), out, SETTINGS, shard_size=3, engine=engine)
        assert_same_dataset(out, local)
    finally:
        ray.shutdown()
        cluster.shutdown()
        # the cluster recorded itself as the one a bare ray.init() joins (as `ray start` does): forget it
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip() == cluster.address:
            current.unlink()


def _markers(out: Path) -> int:
    folder = out / "metadata"
    return len(list(folder.glob("[0-9]*.parquet"))) if folder.is_dir() else 0


def _wait(condition, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert condition(), f"gave up waiting (driver exit status {proc.poll()})"


def _actor_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "_EncodeShards"], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found if int(pid) != os.getpid()]


def test_killed_worker_and_killed_driver_then_resume_give_the_local_dataset(model, inputs, tmp_path):
    """Relative paths throughout: the workers must read and write where the driver means."""
    (tmp_path / "data").symlink_to(Path(inputs[0]).parent)
    relative = [os.path.join("data", os.path.relpath(spec, Path(inputs[0]).parent)) for spec in inputs]
    common = [*relative, "--model", str(model), "--resolution", "128", "--shard-size", "1", "--max-pixels", "1000000"]
    assert subprocess.run([sys.executable, "-m", "sdvae", "encode", *common, "--output", "local"],
                          capture_output=True, cwd=tmp_path).returncode == 1
    local, out = tmp_path / "local", tmp_path / "ray"
    cmd = [sys.executable, "-m", "sdvae", "encode", *common, "--output", "ray", "--engine", "ray",
           "--ray-address", "local", "--batch-size", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=env, cwd=tmp_path)
    try:
        _wait(lambda: _markers(out) >= 2 and _actor_pids(), proc)
        for pid in _actor_pids():
            os.kill(pid, signal.SIGKILL)  # Ray restarts the actor and retries its shard
        killed_at = _markers(out)
        _wait(lambda: _markers(out) >= killed_at + 3, proc)  # the run goes on after losing its worker
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert _markers(out) < 17, "the driver should have been killed part way"
    kept = {p: p.stat().st_mtime_ns for p in (out / "metadata").glob("[0-9]*.parquet")}
    result = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert_same_dataset(out, local)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept, "complete shards are not encoded again"


def test_without_ray_the_engine_says_how_to_install_it(model, inputs, tmp_path):
    code = ("import sys; sys.modules['ray'] = None; from sdvae.cli import main; "
            f"sys.exit(main(['encode', {inputs[0]!r}, '--model', {str(model)!r}, '--output', "
            f"{str(tmp_path / 'out')!r}, '--engine', 'ray']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2 and "pip install 'sdvae[ray]'" in result.stderr
    assert not (tmp_path / "out").exists()
