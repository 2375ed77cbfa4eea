"""Memory budgets are promises: the encode keeps the peak rise of resident memory within `max_memory` or refuses
before it starts, a tile size alone saves memory, and `sdvae encode` refuses targets over its limits up front."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sdvae
from sdvae import VaeConfig
from sdvae.cli import main
from sdvae.data.job import Settings
from sdvae.tiled.tiling import TilePlan

MiB = 2**20
# The peak rise of resident memory (VmHWM) of one encode, model loaded, in a fresh process; or the refusal.
CHILD = """
import json, sys
from pathlib import Path
import torch
from sdvae import VaeConfig, VaeEncoder

torch.set_num_threads(2)
size, tile_size, budget, network = json.loads(sys.argv[1])
torch.manual_seed(0)
config = VaeConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=8)
if network == "wan":
    config = VaeConfig.preset("qwenimage").replace(block_out_channels=(32, 64, 64, 64), layers_per_block=1)
enc = VaeEncoder(config).eval().requires_grad_(False)
x = torch.rand(1, 3, size, size) * 2 - 1


def kib(field):
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith(field + ":"))


Path("/proc/self/clear_refs").write_text("5")
base = kib("VmRSS")
try:
    with torch.no_grad():
        enc(x, tile_size=tile_size, max_memory=budget)
    refused = None
except MemoryError as e:
    refused = str(e)
print(json.dumps({"peak": (kib("VmHWM") - base) * 1024, "refused": refused}))
"""


def peak_rise(size: int, tile_size: int | None, budget: int | None, scratch: str, network: str = "kl") -> dict:
    """The child's peak rise in bytes and its refusal (or None), run with `SDVAE_SCRATCH=scratch`."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak of resident memory")
    env = dict(os.environ, SDVAE_SCRATCH=scratch, OMP_NUM_THREADS="2",
               PYTHONPATH=os.pathsep.join([str(Path(sdvae.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps([size, tile_size, budget, network])], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("tile_size, budget_mib, scratch, network", [
    (None, 20, "folder", "kl"), (64, 50, "folder", "kl"), (64, 50, "none", "kl"),
    (None, 52, "folder", "wan"), (None, 42, "folder", "wan"), (None, 42, "none", "wan")])
def test_the_peak_rise_of_resident_memory_keeps_to_max_memory_or_the_encode_is_refused_before_it_starts(
        tile_size, budget_mib, scratch, network, tmp_path):
    """Within the budget (5% for the allocator) with scratch files and without; where no plan can promise that,
    a MemoryError naming the shape, the estimate and the budget before any activation is made."""
    result = peak_rise(256, tile_size, budget_mib * MiB, str(tmp_path) if scratch == "folder" else "none", network)
    if result["refused"]:
        said = result["refused"]
        assert "[1, 3, 256, 256] needs about" in said and f"the {budget_mib} MiB allowed" in said
        assert result["peak"] < 0.25 * budget_mib * MiB  # refused before the encode made its maps
    else:
        assert result["peak"] <= 1.05 * budget_mib * MiB, f"{result['peak'] / MiB:.0f} MiB"


def test_a_tile_size_alone_encodes_in_less_memory_than_untiled(tmp_path):
    untiled = peak_rise(384, None, None, str(tmp_path))
    tiled = peak_rise(384, 128, None, str(tmp_path))
    assert tiled["peak"] < 0.75 * untiled["peak"], (tiled["peak"] / MiB, untiled["peak"] / MiB)


def test_a_tile_size_alone_takes_its_least_memory_plan_and_with_a_budget_the_first_that_fits(monkeypatch):
    """Fake estimates: 500 with every stage in memory, 80 less per stage moved off it; recomputed 20 above files."""
    from sdvae.tiled import budget as planning

    def peak(encoder, shape, dtype, plan, device):
        off = len(plan.stores) - plan.stores.count("memory")
        return 500 - 80 * off + 20 * plan.stores.count("recompute"), 10 * plan.stores.count("files")

    monkeypatch.setattr(planning, "tiled_peak", peak)
    monkeypatch.setattr(planning, "scratch_room", lambda: 10**9)
    config, cpu = VaeConfig.preset("sd15"), torch.device("cpu")
    shape = (1, 3, 512, 512)
    least = planning.plan_tiling(None, config, shape, torch.float32, cpu, 128, None)
    assert least == TilePlan(128, ("files",) * 5)
    assert planning.plan_tiling(None, config, shape, torch.float32, cpu, 128, 350) == TilePlan(128, ("files",) * 2
                                                                                             + ("memory",) * 3)
    with pytest.raises(MemoryError, match=r"\[1, 3, 512, 512\] needs about 0 MiB even in tiles of 128 px"):
        planning.plan_tiling(None, config, shape, torch.float32, cpu, 128, 1)


def test_a_resolution_over_max_pixels_is_refused_by_the_settings():
    with pytest.raises(ValueError, match="resolution 20000 makes targets of 400000000 pixels, over max_pixels"):
        Settings(resolution=20000)
    with pytest.raises(ValueError, match="resolution 1000 makes targets of 10.* pixels, over max_pixels 1000000"):
        Settings(resolution=1000, buckets=True, max_pixels=10**6)  # buckets a little larger than 1000^2
    assert Settings(resolution=1000, max_pixels=10**6).resolution == 1000


@pytest.mark.parametrize("flags, message", [
    (["--resolution", "400", "--max-pixels", "100000"],
     "resolution 400 makes targets of 160000 pixels, over max_pixels 100000"),
    (["--resolution", "4096", "--max-pixels", str(4096**2), "--max-memory", "64MiB"],
     "resolution 4096 (4096x4096 targets, batches of 1): encoding [1, 3, 4096, 4096] needs about"),
])
def test_a_resolution_that_cannot_be_encoded_is_refused_before_anything_is_written(model, tmp_path, capsys, flags,
                                                                                   message):
    from PIL import Image

    Image.new("RGB", (90, 70), "white").save(tmp_path / "a.png")
    out = tmp_path / "out"
    assert main(["encode", str(tmp_path / "a.png"), "--model", str(model), "--output", str(out), "--workers", "0",
                 *flags]) == 2
    said = capsys.readouterr().err
    assert message in said, said
    assert "64 MiB" in said or "--max-memory" not in flags
    assert not out.exists()
