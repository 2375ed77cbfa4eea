"""Winograd F(4x4, 3x3) against oneDNN's direct conv, per conv, by row bands as the resnets run them.

One 3x3 conv of each encoder width at its level's size (128 channels at the image size, 256 at half, 512 at a
quarter), float32, channels-last, best of 3 sweeps over the map's bands. Prints one markdown table.
Usage: python bench/winograd.py [--size 512] [--threads 2] [--workspace-mib 32 4]
  --workspace-mib: Winograd piece sizes to compare (`sdvae.fast.winograd.WORKSPACE_BYTES`), one column each.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import cpu_line
from torch import nn

from sdvae.fast import bands, winograd


def sweep(run, x: torch.Tensor, out: torch.Tensor) -> float:
    """Seconds for one pass of `run(band, out_rows, add=False)` over the map's row bands, best of 3."""
    spans = bands.band_spans(out.shape[2], out.shape[3])
    best = float("inf")
    for _ in range(4):  # the first is a warm-up
        start = time.perf_counter()
        for r0, r1 in spans:
            run(x[:, :, r0:r1 + 2], out[:, :, r0:r1], False)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workspace-mib", type=int, nargs="+", default=[32])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_line(args.threads)}, torch {torch.__version__}, float32, {args.size} px image")
    pieces = " | ".join(f"winograd {m} MiB | / direct" for m in args.workspace_mib)
    print(f"| channels | map | direct ms | GFLOP/s | {pieces} |")
    print("|---" * (4 + 2 * len(args.workspace_mib)) + "|")
    for channels, side in ((128, args.size), (256, args.size // 2), (512, args.size // 4)):
        conv = nn.Conv2d(channels, channels, 3, padding=1).requires_grad_(False)
        conv = conv.to(memory_format=torch.channels_last)
        x = torch.randn(1, channels, side + 2, side).contiguous(memory_format=torch.channels_last)  # halo rows
        out = torch.empty(1, channels, side, side).contiguous(memory_format=torch.channels_last)
        direct = sweep(lambda band, rows, add: bands.conv_into(conv, band, rows, add), x, out)
        cells = []
        for mib in args.workspace_mib:
            winograd.WORKSPACE_BYTES = mib << 20
            t = sweep(winograd.Conv3x3(conv, winograd.Workspace()), x, out)
            cells += [f"{t * 1e3:.1f}", f"{t / direct:.2f}"]
        gflops = 2 * 9 * channels * channels * side * side / direct / 1e9
        print(f"| {channels} | {side}x{side} | {direct * 1e3:.1f} | {gflops:.0f} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
