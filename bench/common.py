"""Helpers the benchmark scripts share: the CPU's name and flags, and resident-memory peaks of this process."""

from __future__ import annotations

import subprocess
from pathlib import Path


def cpu() -> tuple[str, set[str]]:
    """lscpu's model name and the CPU flags."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return fields.get("Model name", "?").strip(), set(fields.get("Flags", "").split())


def cpu_line(threads: int) -> str:
    name, flags = cpu()
    shown = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
    return f"CPU: {name} ({', '.join(shown)}), {threads} threads"


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS) or its peak since the last reset (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def reset_peak() -> None:
    """Start a new VmHWM peak from the current resident memory."""
    Path("/proc/self/clear_refs").write_text("5")


def random_sd15_weights(folder: Path) -> Path:
    """A random SD 1.5 encoder state dict (diffusers names) in `folder`, the same for every run."""
    import torch
    from safetensors.torch import save_file

    from sdvae import VaeConfig, VaeEncoder

    path = folder / "sd15-vae.safetensors"
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in VaeEncoder(VaeConfig.preset("sd15")).state_dict().items()}, path)
    return path


def timed(run, reps: int) -> tuple[float, float, object]:
    """(best seconds, rise of resident memory in MiB, last result) of `reps` calls of `run`."""
    import time

    reset_peak()
    base = rss_mib()
    best, result = float("inf"), None
    for _ in range(reps):
        start = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - start)
    return best, rss_mib("VmHWM") - base, result


def run_worker(script: Path, args: list[str], out: Path, threads: int) -> dict | str:
    """Run `script --worker ARGS OUT` in a fresh process; its JSON result (with "mean" if it saved one), or the
    end of its error output."""
    import json
    import os
    import sys

    import torch

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, str(script), "--worker", *args, str(out)], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        return done.stderr.strip()[-200:]
    result = json.loads(out.read_text())
    if out.with_suffix(".pt").exists():
        result["mean"] = torch.load(out.with_suffix(".pt"))
    return result


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def parse_args(sizes: list[int], worker_fields: int, flags: tuple[str, ...] = ()):
    """The benchmark scripts' command line: --sizes, --threads, on/off `flags`, and the internal --worker call
    (which also sets the worker's thread count)."""
    import argparse
    import os

    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=sizes)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=worker_fields + 1, help=argparse.SUPPRESS)
    for flag in flags:
        parser.add_argument(flag, action="store_true")
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    return args
