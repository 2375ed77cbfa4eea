"""Large images: untiled sdvae, exact tiled sdvae and diffusers' enable_tiling.

Tiled sdvae runs three ways: `tiled` keeps every stage's activations in memory, `tiled-disk` is given the memory
its plan with scratch files needs, `tiled-recompute` the memory its plan with recomputed stages needs (scratch
files forbidden); the planner then keeps in memory what fits.

Each row runs in a fresh process (clean peak readings) on the same random SD 1.5 weights and image, float32.
Usage: python bench/tiling.py [--sizes 1024 2048 4096] [--threads 2] [--narrow]
  --narrow: a narrow config (channels 32-64, random weights from a fixed seed) whose untiled encode fits in memory
  at 4096 px, so tiled-vs-untiled error is measured at that size too (sdvae rows only).
  peak: rise of resident memory during the encode, model loaded; err: relative L2 error of the mean against the
  untiled sdvae result, or against tiled sdvae where untiled does not fit in memory (tiled equals untiled to
  1e-5, tests/test_tiling.py). Rows whose estimated memory exceeds what is free are skipped.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from common import cpu_line, parse_args, random_sd15_weights, rel_err, run_worker, timed

HERE = Path(__file__).resolve()
TILE = 256
KINDS = ("untiled", "tiled", "tiled-disk", "tiled-recompute", "diffusers-tiling")


def narrow_config():
    from sdvae import VaeConfig

    return VaeConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=8)


def worker(kind: str, size: int, weights: Path, out: Path) -> None:
    from safetensors.torch import load_file

    from sdvae import VaeConfig, VaeEncoder, load_encoder

    narrow = str(weights) == "narrow"
    config = narrow_config() if narrow else VaeConfig.preset("sd15")
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    if kind == "diffusers-tiling":
        from diffusers import AutoencoderKL

        vae = AutoencoderKL(**{k: v for k, v in config.to_diffusers().items() if not k.startswith("_")})
        vae.load_state_dict(load_file(weights), strict=False)
        vae.eval().enable_tiling()
        run = lambda: vae.encode(x).latent_dist.mean  # noqa: E731
    else:
        if narrow:
            torch.manual_seed(0)
            enc = VaeEncoder(config).eval()
        else:
            enc = load_encoder(weights, family="sd15")
        if kind == "tiled-recompute":
            os.environ["SDVAE_SCRATCH"] = "none"
        options = {"max_memory": 2**62} if kind == "untiled" else {"tile_size": TILE, "max_memory": need(kind, size,
                                                                                                        narrow)}
        run = lambda: enc.encode(x, **options).mean  # noqa: E731
    with torch.no_grad():
        seconds, peak, mean = timed(run, 1)
    torch.save(mean, out.with_suffix(".pt"))
    out.write_text(json.dumps({"seconds": seconds, "peak_mib": peak}))


def need(kind: str, size: int, narrow: bool) -> int:
    """Estimated peak of `kind`; diffusers' tiling is counted as the plan with scratch files (tiles and output)."""
    from sdvae import VaeConfig
    from sdvae.model.network import Encoder
    from sdvae.tiled.budget import tiled_peak, untiled_peak
    from sdvae.tiled.tiling import TilePlan

    config, shape = narrow_config() if narrow else VaeConfig.preset("sd15"), (1, 3, size, size)
    if kind == "untiled":
        return untiled_peak(config, shape, torch.float32)
    with torch.device("meta"):
        encoder = Encoder(config)
    where = {"tiled": "memory", "tiled-recompute": "recompute"}.get(kind, "files")
    return tiled_peak(encoder, shape, torch.float32, TilePlan(TILE, (where,) * (len(config.block_out_channels) + 1)))[0]


def fits(kind: str, size: int, narrow: bool) -> bool:
    from sdvae.tiled.budget import available_memory

    return need(kind, size, narrow) < 0.8 * available_memory(torch.device("cpu"))


def main() -> None:
    args = parse_args([1024, 2048, 4096], worker_fields=3, flags=("--narrow",))
    if args.worker:
        kind, size, weights, out = args.worker
        return worker(kind, int(size), Path(weights), Path(out))

    tmp = Path(tempfile.mkdtemp(prefix="sdvae-bench-"))
    narrow = args.narrow
    weights = "narrow" if narrow else random_sd15_weights(tmp)
    kinds = KINDS[:4] if narrow else KINDS
    model = "narrow encoder (channels 32-64)" if narrow else "SD 1.5 encoder"
    print(f"{cpu_line(args.threads)}, torch {torch.__version__}, {model}, random weights, float32, "
          f"tiles of {TILE} px")
    print("| size | impl | time s | peak MiB | err vs reference |\n|---|---|---|---|---|")
    for size in args.sizes:
        results = {}
        for kind in kinds:
            if not fits(kind, size, narrow):
                print(f"| {size} | {kind} | skipped: does not fit in memory | | |")
                continue
            result = run_worker(HERE, [kind, str(size), str(weights)], tmp / f"{kind}-{size}.json", args.threads)
            if isinstance(result, str):
                print(f"| {size} | {kind} | failed: {result} | | |")
                continue
            results[kind] = result
        reference = next(results[k] for k in KINDS if k in results)
        for kind, r in results.items():
            err = rel_err(r["mean"], reference["mean"])
            print(f"| {size} | {kind} | {r['seconds']:.1f} | {r['peak_mib']:.0f} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    main()
