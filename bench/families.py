"""sdvae vs diffusers on the newer VAEs: FLUX.2 (AutoencoderKLFlux2) and Qwen-Image (AutoencoderKLQwenImage, run
by diffusers on a one-frame video). Prints one markdown table.

Every measurement runs in a fresh process on the same random full-size weights (written once, diffusers layout)
and input, float32, batch 1. Usage: python bench/families.py [--sizes 512 1024] [--threads 2]
  time: best of a few runs after a warm-up at 64 px; peak: rise of resident memory (VmHWM) during the timed runs,
  model loaded; err: relative L2 error of the mean against diffusers.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from common import cpu_line, parse_args, rel_err, run_worker, timed

HERE = Path(__file__).resolve()
FAMILIES = ("flux2", "qwenimage")


def diffusers_class(family: str):
    from diffusers import AutoencoderKLFlux2, AutoencoderKLQwenImage

    return {"flux2": AutoencoderKLFlux2, "qwenimage": AutoencoderKLQwenImage}[family]


def random_weights(folder: Path, family: str) -> Path:
    """diffusers' default (full-size) model of the family with random weights, saved as a diffusers folder."""
    path = folder / family
    torch.manual_seed(0)
    diffusers_class(family)().save_pretrained(path)
    return path


def build(kind: str, family: str, weights: Path):
    """A callable images [1, 3, H, W] -> mean [1, L, H/8, W/8] for one implementation."""
    if kind == "sdvae":
        from sdvae import load_encoder

        enc = load_encoder(weights)
        assert enc.config.family == family, enc.config.family
        return lambda x: enc.encode(x).mean
    ref = diffusers_class(family).from_pretrained(weights).eval()
    if family == "qwenimage":
        return lambda x: ref.encode(x[:, :, None]).latent_dist.mean[:, :, 0]
    return lambda x: ref.encode(x).latent_dist.mean


def worker(kind: str, family: str, size: int, weights: Path, out: Path) -> None:
    reps = 2 if size <= 512 else 1
    run = build(kind, family, weights)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        run(torch.zeros(1, 3, 64, 64))
        best, peak, mean = timed(lambda: run(x), reps)
    torch.save(mean.float(), out.with_suffix(".pt"))
    out.write_text(json.dumps({"seconds": best, "peak_mib": peak}))


def table(sizes: list[int], threads: int) -> None:
    """Print the table (`bench/encode.py --families` prints it after its own)."""
    tmp = Path(tempfile.mkdtemp(prefix="sdvae-bench-"))
    print(f"{cpu_line(threads)}, torch {torch.__version__}, random full-size weights, float32, batch 1")
    print("| family | size | impl | time s | peak MiB | time / diffusers | peak / diffusers | err vs diffusers |")
    print("|---|---|---|---|---|---|---|---|")
    for family in FAMILIES:
        weights = random_weights(tmp, family)
        for size in sizes:
            results = {kind: run_worker(HERE, [kind, family, str(size), str(weights)],
                                        tmp / f"{family}-{kind}-{size}.json", threads)
                       for kind in ("diffusers", "sdvae")}
            base = results["diffusers"]
            for kind, r in results.items():
                if isinstance(r, str) or isinstance(base, str):
                    print(f"| {family} | {size} | {kind} | failed: {(r if isinstance(r, str) else base)[-120:]} "
                          "| | | | |", flush=True)
                    continue
                print(f"| {family} | {size} | {kind} | {r['seconds']:.2f} | {r['peak_mib']:.0f} | "
                      f"{r['seconds'] / base['seconds']:.2f} | {r['peak_mib'] / max(base['peak_mib'], 1):.2f} | "
                      f"{rel_err(r['mean'], base['mean']):.1e} |", flush=True)


def main() -> None:
    args = parse_args([512, 1024], worker_fields=4)
    if args.worker:
        kind, family, size, weights, out = args.worker
        return worker(kind, family, int(size), Path(weights), Path(out))
    table(args.sizes, args.threads)


if __name__ == "__main__":
    main()
