"""The tiled encoder equals the untiled one; an estimate of the GroupNorm statistics would not."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from reference import random_images, reference_vae, rel_err

import sdvae.fast.groupnorm
import sdvae.fast.winograd
import sdvae.tiled.tiling
from sdvae import VaeConfig, VaeEncoder, load_weights

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
# Every architecture variant of the family table; CogView at reduced width to keep float64 quick.
CONFIGS = {
    "sd15": VaeConfig.preset("sd15"),
    "sd3": VaeConfig.preset("sd3"),
    "cogview-narrow": VaeConfig.preset("cogview").replace(block_out_channels=(32, 64, 64, 64), norm_num_groups=16),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def encoder(request):
    config = CONFIGS[request.param]
    enc = VaeEncoder(config).double()
    load_weights(enc, reference_vae(config, seed=8).state_dict())
    return enc


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tile_size", [16, 40])
def test_tiled_equals_untiled(encoder, dtype, tile_size):
    enc = encoder.to(dtype)
    x = random_images(2, 75, 53, dtype=dtype)  # not a multiple of the tile size, of 64 or of 8
    with torch.no_grad():
        want = enc.encode(x)
        got = enc.encode(x, tile_size=tile_size)
    assert got.mean.shape == want.mean.shape
    assert rel_err(got.mean, want.mean) <= TOLERANCE[dtype]
    assert rel_err(got.logvar, want.logvar) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tile, stores", [(16, "rrrrr"), (40, "rrrrr"), (24, "rfmmr"), (24, "ffffm")])
def test_recomputed_and_scratch_file_stages_equal_untiled(encoder, dtype, tile, stores, tmp_path, monkeypatch):
    """Stages recomputed tile by tile from their kept inputs, or kept in scratch files, change nothing."""
    monkeypatch.setenv("SDVAE_SCRATCH", str(tmp_path))
    enc = encoder.to(dtype)
    x = random_images(2, 75, 53, dtype=dtype)
    where = {"m": "memory", "f": "files", "r": "recompute"}
    plan = sdvae.tiled.tiling.TilePlan(tile, tuple(where[s] for s in stores[:len(enc.config.block_out_channels) + 1]))
    with torch.no_grad():
        want = enc(x)
        got = sdvae.tiled.tiling.tiled_params(enc.encoder, enc.quant_conv, x, plan)
    assert rel_err(got, want) <= TOLERANCE[dtype]
    assert not list(tmp_path.iterdir())  # scratch files are unlinked at once


@pytest.mark.parametrize("stores", ["memory", "files", "recompute"])
def test_schedule_reads_only_live_maps_and_frees_each_after_its_last_reader(encoder, stores):
    from sdvae.tiled.tiling import encoder_nodes, inputs, schedule

    nodes = encoder_nodes(encoder.encoder)
    live, most = set(), 0
    for p in schedule(nodes, (stores,) * (len(encoder.config.block_out_channels) + 1)):
        reads = {j for k in p.computed for j in inputs(nodes, k) if j not in p.computed}
        assert reads <= live | {-1}
        live = (live - {p.into}) | ({p.target} if p.store else set())
        live -= set(p.free)
        most = max(most, len(live))
    assert live == {len(nodes) - 1}  # only the result is left
    assert most <= 3  # a resnet's input and middle map, and its output when the width changes


def test_tiles_run_without_autograd_and_refuse_a_call_it_would_record(encoder):
    enc = encoder.to(torch.float64)
    x = random_images(1, 40, 24, dtype=torch.float64)
    with torch.no_grad():
        want = enc(x)
    frozen = copy.deepcopy(enc).requires_grad_(False)
    assert rel_err(frozen(x, tile_size=16), want) <= 1e-12  # grad mode on, nothing to record
    with pytest.raises(RuntimeError, match="does not record autograd"):
        enc(x, tile_size=16)


@pytest.mark.parametrize("folder", ["/nonexistent/sdvae-scratch", "a-file"])
def test_an_unreadable_scratch_folder_means_no_scratch_files(encoder, monkeypatch, caplog, tmp_path, folder):
    from sdvae.tiled.budget import scratch_room, tiled_peak

    if folder == "a-file":
        folder = str(tmp_path / "a-file")
        Path(folder).write_text("not a folder")
    monkeypatch.setenv("SDVAE_SCRATCH", folder)
    with caplog.at_level("WARNING", logger="sdvae"):
        assert scratch_room() == 0
    assert folder in caplog.text
    enc = encoder.to(torch.float64)
    x = random_images(1, 128, 112, dtype=torch.float64)  # large enough that recomputing saves memory
    stages = len(enc.config.block_out_channels) + 1
    plan = sdvae.tiled.tiling.TilePlan(16, ("recompute",) * stages)
    budget = tiled_peak(enc.encoder, tuple(x.shape), x.dtype, plan)[0]
    with torch.no_grad(), caplog.at_level("INFO", logger="sdvae"):
        assert rel_err(enc(x, tile_size=16, max_memory=budget), enc(x)) <= 1e-12
    assert "recomputed" in caplog.text and "in scratch files" not in caplog.text


def test_scratch_folder_expands_home_and_empty_means_the_temporary_folder(monkeypatch, tmp_path):
    import tempfile

    from sdvae.tiled.maps import FileActivation, scratch_folder

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("SDVAE_SCRATCH", "~")
    assert scratch_folder() == str(tmp_path)
    monkeypatch.setenv("SDVAE_SCRATCH", "")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)
    made = []
    monkeypatch.setattr("sdvae.tiled.maps.os.unlink", made.append)
    FileActivation((1, 2, 3, 4), torch.float32, torch.device("cpu"))
    assert [Path(p).parent for p in made] == [tmp_path]


def test_recomputed_stages_keep_only_what_must_be_whole(encoder):
    """A recomputed stage keeps its last output and the attention's input; a stored one keeps every output."""
    from sdvae.tiled.tiling import encoder_nodes, schedule

    nodes = encoder_nodes(encoder.encoder)
    stages = len(encoder.config.block_out_channels) + 1
    kept = {p.target for p in schedule(nodes, ("recompute",) * stages) if p.store}
    last = {node.stage: k for k, node in enumerate(nodes)}
    attention = {k for k, node in enumerate(nodes) if node.attention is not None}
    assert kept == set(last.values()) | attention | {k - 1 for k in attention}
    stored = schedule(nodes, ("memory",) * stages)
    assert {p.target for p in stored if p.store} == set(range(len(nodes)))


def test_pooled_tile_variances_would_fail_the_same_test(encoder, monkeypatch):
    """Dropping the between-tile term, as pooled-variance tilers do, is caught by the tolerance above."""
    enc = encoder.to(torch.float32)
    x = random_images(1, 75, 53)
    with torch.no_grad():
        want = enc.encode(x)
        monkeypatch.setattr(sdvae.fast.groupnorm, "merge_stats", lambda a, b: (a[0] + b[0], (a[0] * a[1] + b[0] * b[1])
                                                                      / (a[0] + b[0]), a[2] + b[2]))
        pooled = enc.encode(x, tile_size=16)
    assert rel_err(pooled.mean, want.mean) > 100 * TOLERANCE[torch.float32]


def test_tiled_scaling_and_sampling_match_untiled(encoder):
    enc = encoder.to(torch.float64)
    x = random_images(2, 40, 48, dtype=torch.float64)
    with torch.no_grad():
        want = enc.encode_with_scaling(x, seed=3)
        got = enc.encode_with_scaling(x, seed=3, tile_size=24)
    assert rel_err(got, want) <= 1e-12


@pytest.mark.parametrize("bad", [0, -8, 2.5, "64"])
def test_bad_tile_size_is_refused(bad):
    enc = VaeEncoder(VaeConfig(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8))
    with pytest.raises(ValueError, match="tile_size"):
        enc(torch.zeros(1, 3, 8, 8), tile_size=bad)


@pytest.mark.parametrize("block", [1, 7, 64])
def test_blocked_online_softmax_attention_equals_full_attention(block):
    from sdvae.model.network import Attention
    from sdvae.tiled.maps import RamActivation

    torch.manual_seed(0)
    attention = Attention(64, 8).double()
    with torch.no_grad():
        for p in attention.parameters():
            p.normal_(0, 0.3)
        x = torch.randn(2, 64, 5, 9, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        want = attention(x.clone())
        got = RamActivation(x.clone())
        stats = sdvae.tiled.tiling.whole_map_stats(got, 8, tile=2)
        sdvae.tiled.tiling.tiled_attention(attention, got, stats, block=block)
    got = got.tensor
    assert rel_err(got, want) <= 1e-12


def test_memory_sizes_parse_and_bad_ones_are_named():
    from sdvae.tiled.budget import parse_memory

    assert parse_memory("2GiB") == 2 * 2**30 and parse_memory("1.5 GB") == 1_500_000_000
    assert parse_memory(4096) == 4096 and parse_memory("800m") == 800_000_000
    assert parse_memory("4Gi") == 4 * 2**30 and parse_memory("1e9") == 10**9 and parse_memory("3 kib") == 3072
    for bad in ("lots", "2 GiBs", 0, True):
        with pytest.raises(ValueError, match="max_memory must be bytes or a size|max_memory must be at least"):
            parse_memory(bad)
    for small in ("-1GB", "-1", "0.4", 0.4):  # no budget at all, not a zero one
        with pytest.raises(ValueError, match="max_memory must be at least one byte"):
            parse_memory(small)


def test_too_large_for_the_budget_switches_to_tiles_with_a_log_line(encoder, caplog, tmp_path, monkeypatch):
    from sdvae.tiled.budget import tiled_peak, untiled_peak

    monkeypatch.setenv("SDVAE_SCRATCH", str(tmp_path))
    enc = encoder.to(torch.float32)
    x = random_images(1, 96, 80)
    shape, stages = tuple(x.shape), len(enc.config.block_out_channels) + 1
    tiled, _ = tiled_peak(enc.encoder, shape, x.dtype, sdvae.tiled.tiling.TilePlan(32, ("files",) * stages))
    budget = untiled_peak(enc.config, shape, x.dtype) - 1  # just too little for untiled; tiles fit
    assert tiled < budget
    with torch.no_grad():
        want = enc(x)
        with caplog.at_level("INFO", logger="sdvae"):
            got = enc(x, max_memory=budget)
    assert "exact tiles of" in caplog.text
    assert rel_err(got, want) <= 1e-5
    with pytest.raises(MemoryError, match=r"\[1, 3, 96, 80\] needs about .* even in tiles of"):
        enc(x, max_memory="1KiB")


@pytest.mark.parametrize("scratch, want", [("folder", "ffmmm"), ("none", "rrmmm")])
def test_plans_try_large_tiles_with_stages_moved_off_memory_before_small_tiles(scratch, want, monkeypatch, tmp_path):
    """Fake estimates: 50, plus 100 per stage in memory, plus 100 for tiles over 64 px; a 450 budget then takes two
    stages off memory with 256 px tiles (not one with 64 px tiles), to scratch files where allowed, else recomputed."""
    import sdvae.tiled.budget as planning

    def peak(encoder, shape, dtype, plan, device):
        memory = 50 + 100 * plan.stores.count("memory") + (100 if plan.tile > 64 else 0)
        return memory, 10 * plan.stores.count("files")

    monkeypatch.setattr(planning, "tiled_peak", peak)
    monkeypatch.setenv("SDVAE_SCRATCH", str(tmp_path) if scratch == "folder" else "none")
    config = VaeConfig.preset("sd15")
    shape, cpu = (1, 3, 4096, 4096), torch.device("cpu")
    plan = planning.plan_tiling(None, config, shape, torch.float32, cpu, None, 450)
    where = {"m": "memory", "f": "files", "r": "recompute"}
    assert plan == sdvae.tiled.tiling.TilePlan(256, tuple(where[s] for s in want))
    least = "in scratch files" if scratch == "folder" else "recomputed"  # the first plan of the least estimate
    with pytest.raises(MemoryError, match=rf"\[1, 3, 4096, 4096\] needs about 0 MiB even in tiles of 64 px, "
                                          rf"activations of stages 0, 1, 2, 3, 4 {least}, more than the 0 MiB"):
        planning.plan_tiling(None, config, shape, torch.float32, cpu, None, 49)


@pytest.mark.parametrize("scratch", ["folder", "none", "full"])
def test_over_the_budget_stages_go_to_scratch_files_or_are_recomputed_exactly(encoder, scratch, caplog, tmp_path,
                                                                              monkeypatch):
    """Scratch files where the folder has room and they are allowed, else recomputed stages; the same result."""
    from sdvae.tiled.budget import tiled_peak

    enc = encoder.to(torch.float64)
    x = random_images(1, 128, 112, dtype=torch.float64)  # where recomputing saves memory
    shape, stages = tuple(x.shape), len(enc.config.block_out_channels) + 1
    peak = {where: tiled_peak(enc.encoder, shape, x.dtype, sdvae.tiled.tiling.TilePlan(16, (where,) * stages))[0]
            for where in ("memory", "files", "recompute")}
    assert peak["files"] <= peak["recompute"] < peak["memory"]
    monkeypatch.setenv("SDVAE_SCRATCH", "none" if scratch == "none" else str(tmp_path))
    if scratch == "full":
        monkeypatch.setattr("sdvae.tiled.budget.shutil.disk_usage", lambda folder: SimpleNamespace(free=1000))
    with torch.no_grad():
        want = enc(x)
        with caplog.at_level("INFO", logger="sdvae"):
            got = enc(x, tile_size=16, max_memory=peak["recompute"])
    assert ("in scratch files" if scratch == "folder" else "recomputed") in caplog.text
    assert ("in scratch files" in caplog.text) == (scratch == "folder")
    assert rel_err(got, want) <= 1e-12
    assert not list(tmp_path.iterdir())  # scratch files are unlinked at once


def test_scratch_file_activation_reads_back_what_was_written():
    from sdvae.tiled.maps import FileActivation

    t = torch.randn(2, 5, 7, 9, dtype=torch.float64)
    for dtype in (torch.float64, torch.bfloat16):
        store = FileActivation(t.shape, dtype, torch.device("cpu"))
        store.write(slice(None), slice(None), t.to(dtype))
        assert torch.equal(store.read(slice(2, 5), slice(3, 8)), t.to(dtype)[:, :, 2:5, 3:8])
        store.write(slice(1, 3), slice(0, 4), torch.zeros(2, 5, 2, 4, dtype=dtype))
        want = t.to(dtype).clone()
        want[:, :, 1:3, 0:4] = 0
        assert torch.equal(store.read(slice(None), slice(None)), want)


def test_tiles_run_the_wide_float32_convs_through_winograd(monkeypatch):
    """The tiled encoder's resnet convs take Winograd's F(4x4, 3x3) as the untiled ones do (its speed), here on every
    tile, and the result still equals the untiled encoder's."""
    from torch.profiler import profile

    monkeypatch.setattr(sdvae.fast.winograd, "MIN_WORK", 0)
    enc = VaeEncoder(VaeConfig(block_out_channels=(128, 256), layers_per_block=1, norm_num_groups=32)).eval()
    x = random_images(2, 42, 30)
    with torch.no_grad(), profile(record_shapes=True) as prof:
        got = enc(x, tile_size=24)
    kernels = [e.input_shapes[1] for e in prof.events() if e.name == "aten::bmm"]
    assert [36, 128, 128] in kernels and [36, 128, 256] in kernels and [36, 256, 256] in kernels, kernels
    with torch.no_grad():
        assert rel_err(got, enc(x)) <= TOLERANCE[torch.float32]
