"""Memory budgets kept: the plan each budget gets, its estimate, and the measured peak against the budget.

Each row runs in a fresh process on the same random SD 1.5 weights and image, float32, batch 1: untiled, a tile
size alone (tile_size=128, 256; no max_memory), and max_memory of 300 and 400 MiB with scratch files allowed
(`$SDVAE_SCRATCH`, else the temporary folder) and forbidden (`SDVAE_SCRATCH=none`).
Usage: python bench/budget.py [--sizes 512 768 1024] [--threads 2]
  plan: untiled, or tile px / where each stage keeps its activations (m memory, f scratch files, r recomputed);
  estimate: the planner's estimate of that plan (`sdvae.tiled.budget`); peak: rise of resident memory (VmHWM) during
  the encode, model loaded; peak / budget: against max_memory (1.05 allowed for the allocator); err: relative L2
  error of the mean against the untiled row. A budget the planner cannot promise is refused before encoding.
"""

from __future__ import annotations

import ctypes
import json
import os
import tempfile
from pathlib import Path

import torch
from common import cpu_line, parse_args, random_sd15_weights, rel_err, run_worker, timed

HERE = Path(__file__).resolve()
MiB = 2**20
# (name, tile_size, max_memory in MiB, scratch files allowed)
CASES = (("untiled", None, None, True), ("tile 128", 128, None, True), ("tile 256", 256, None, True),
         ("300 MiB", None, 300, True), ("300 MiB, no scratch", None, 300, False),
         ("400 MiB", None, 400, True), ("400 MiB, no scratch", None, 400, False))


def worker(case: str, size: int, weights: Path, out: Path) -> None:
    from sdvae import load_encoder
    from sdvae.tiled.budget import plan_tiling, tiled_peak, untiled_peak

    _, tile_size, budget, scratch = next(c for c in CASES if c[0] == case)
    if not scratch:
        os.environ["SDVAE_SCRATCH"] = "none"
    max_memory = 2**62 if tile_size is None and budget is None else budget and budget * MiB
    enc = load_encoder(weights, family="sd15")
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    shape, cpu = tuple(x.shape), torch.device("cpu")
    try:
        plan = plan_tiling(enc.encoder, enc.config, shape, x.dtype, cpu, tile_size, max_memory)
    except MemoryError as e:
        out.write_text(json.dumps({"refused": str(e)}))
        return
    need = (untiled_peak(enc.config, shape, x.dtype, cpu) if plan is None
            else tiled_peak(enc.encoder, shape, x.dtype, plan, cpu)[0])
    ctypes.CDLL(None).malloc_trim(0)  # from a base without the loading's freed memory: the encode's whole rise
    with torch.no_grad():
        seconds, peak, mean = timed(lambda: enc.encode(x, tile_size=tile_size, max_memory=max_memory).mean, 1)
    torch.save(mean, out.with_suffix(".pt"))
    where = "untiled" if plan is None else f"{plan.tile} px {''.join(s[0] for s in plan.stores)}"
    out.write_text(json.dumps({"seconds": seconds, "peak_mib": peak, "plan": where, "estimate_mib": need / MiB}))


def main() -> None:
    args = parse_args([768], worker_fields=3)
    if args.worker:
        case, size, weights, out = args.worker
        return worker(case, int(size), Path(weights), Path(out))

    tmp = Path(tempfile.mkdtemp(prefix="sdvae-bench-"))
    weights = random_sd15_weights(tmp)
    print(f"{cpu_line(args.threads)}, torch {torch.__version__}, SD 1.5 encoder, random weights, float32, batch 1")
    print("| size | case | plan | estimate MiB | peak MiB | peak / budget | time s | err vs untiled |\n"
          "|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        reference = None
        for case, _, budget, _ in CASES:
            r = run_worker(HERE, [case, str(size), str(weights)], tmp / f"{case}-{size}.json", args.threads)
            if isinstance(r, str):
                print(f"| {size} | {case} | failed: {r} | | | | | |", flush=True)
                continue
            if "refused" in r:
                print(f"| {size} | {case} | refused: {r['refused']} | | | | | |", flush=True)
                continue
            reference = r["mean"] if reference is None else reference
            ratio = f"{r['peak_mib'] / budget:.2f}" if budget else ""
            print(f"| {size} | {case} | {r['plan']} | {r['estimate_mib']:.0f} | {r['peak_mib']:.0f} | {ratio} | "
                  f"{r['seconds']:.1f} | {rel_err(r['mean'], reference):.1e} |", flush=True)


if __name__ == "__main__":
    main()
