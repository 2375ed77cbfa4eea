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
