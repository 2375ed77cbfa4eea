"""How to encode an image within a memory budget: untiled, or exact tiles keeping each stage's activations in
memory, in scratch files, or recomputing them (`sdvae.tiled.tiling`).

The tiled estimates walk the same schedule the tiled encoder runs, so they follow its kept outputs pass by pass.
Scratch files go under `$SDVAE_SCRATCH` (else the system's temporary folder); `SDVAE_SCRATCH=none` forbids them,
and a folder without room for them is not used either.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from pathlib import Path

import torch
from torch import nn

from ..fast import winograd
from ..fast.bands import band_spans
from ..fast.groupnorm import STATS_CHUNK
from ..model.config import VaeConfig
from .maps import scratch_folder
from .tiling import ATTENTION_BLOCK, TilePlan, attention_rows, encoder_nodes, inputs, output_shapes, schedule

log = logging.getLogger("sdvae")

# "", "b"; k, kb, ki, kib (1000 and 1024) and the same for m, g and t, in any case
_UNITS = {"": 1, "b": 1} | {f"{p}{b}": 1000 ** (i + 1) for i, p in enumerate("kmgt") for b in ("", "b")} | {
    f"{p}i{b}": 1024 ** (i + 1) for i, p in enumerate("kmgt") for b in ("", "b")}
AUTO_TILES = (256, 128, 64, 32)  # pixels: the largest run convs at full speed, the smallest bound temporaries
LIBRARY_BYTES = 32 << 20  # what the conv and GEMM libraries hold besides tensors (see tiled_peak)
SLACK = 0.5  # of a pass's temporaries, for the allocator's fragments (see tiled_peak)
HEAP_SLACK = 0.15  # of all a pass holds: what the C heap keeps of freed tiles until the pass ends (see tiled_peak)


def parse_memory(value: int | str) -> int:
    """Bytes from an int or a string such as "2GiB", "1.5 GB" or "800M"."""
    if isinstance(value, int) and not isinstance(value, bool):
        number, unit = value, ""
    else:
        match = re.fullmatch(r"\s*(-?[0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value), re.IGNORECASE)
        if not match or match[2].lower() not in _UNITS:
            raise ValueError(f"max_memory must be bytes or a size like '2GiB', got {value!r}")
        number, unit = float(match[1]), match[2].lower()
    if int(number * _UNITS[unit]) < 1:
        raise ValueError(f"max_memory must be at least one byte, got {value!r}")
    return int(number * _UNITS[unit])


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def available_memory(device: torch.device) -> int:
    """Bytes free for activations on `device`: CUDA's free memory, else the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines() if Path("/proc/meminfo").exists() else []:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 2**62  # unknown: do not switch on a guess


def scratch_room() -> int:
    """Bytes free for scratch files: 90% of the scratch folder's free space; 0 when `SDVAE_SCRATCH=none` or the
    folder cannot be read."""
    folder = scratch_folder()
    if folder is None:
        return 0
    try:
        if os.path.isdir(folder):
            return int(0.9 * shutil.disk_usage(folder).free)
    except OSError:
        pass
    log.warning("sdvae: scratch folder %s is not a folder that can be read: no scratch files", folder)
    return 0


def activation_bytes(config: VaeConfig, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of one full-resolution activation of the first block."""
    b, _, h, w = shape
    return b * config.block_out_channels[0] * h * w * dtype.itemsize


def untiled_peak(config: VaeConfig, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device = torch.device("cpu")) -> int:
    """Estimated activation memory of the untiled encoder: on the CPU 2.1 first-block activations (a resnet by row
    bands holds two, `sdvae.fast.bands`; the margin is measured in bench/README.md) and the Winograd workspace (the
    widest kernel and largest piece of a band), elsewhere four (whole maps); plus the attention's queries, keys,
    values and output, and LIBRARY_BYTES."""
    b, _, h, w = shape
    tokens = b * (h // config.downsample_factor) * (w // config.downsample_factor)
    maps = 2.1 if device.type == "cpu" else 4
    attention = 4 * tokens * config.block_out_channels[-1] * dtype.itemsize
    levels = [(c, h >> i, w >> i) for i, c in enumerate(config.block_out_channels)]
    workspace = max([0] + [winograd.workspace_bytes(c, c, band_spans(rows, width)[0][1], width, dtype.itemsize)
                           for c, rows, width in levels if winograd.gains(c, c, b * rows * width, dtype, device)])
    return int(maps * activation_bytes(config, shape, dtype)) + attention + workspace + LIBRARY_BYTES


def tiled_peak(encoder: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, plan: TilePlan,
               device: torch.device = torch.device("cpu")) -> tuple[int, int]:
    """Estimated (memory, scratch file) bytes of the tiled encoder at its fullest, pass by pass.

    Memory: the channels-last copy of the input and LIBRARY_BYTES; the kept outputs alive at the pass; the
    Winograd workspace (the largest transformed kernel and piece so far: it only grows), or the attention's keys
    and values; and the pass's temporaries, made again for every tile or block, plus SLACK of them for the
    allocator's fragments: for a sweep, each computed node's output tile with its halo (and its shortcut's), the
    largest padded input piece, the pieces read from scratch files and a chunk of statistics; for the attention, a
    block of scores and four of queries.
    LIBRARY_BYTES, SLACK and HEAP_SLACK cover what measured peaks held beyond the rest (`bench/budget.py`,
    bench/README.md): buffers that the GEMM and conv libraries keep, and the C heap's fragments, which vary from run
    to run (the same plan's peak spread over a fifth of its estimate).
    """
    nodes = encoder_nodes(encoder)
    shapes = output_shapes(nodes, shape)
    fixed = math.prod(shape) * dtype.itemsize + LIBRARY_BYTES
    live: dict[int, tuple[str, int]] = {}
    memory = files = workspace = 0
    for p in schedule(nodes, plan.stores):
        b, c, h, w = shapes[p.target]
        in_files = {j for j, (where, _) in live.items() if where == "files"}  # read tile by tile into new tensors
        if p.into is not None:
            live[p.target] = live.pop(p.into)
        elif p.store is not None:
            live[p.target] = (p.store, math.prod(shapes[p.target]) * dtype.itemsize)
        once = 0  # bytes of the keys and values, made once in the pass
        if nodes[p.target].attention is not None:
            n, block = h * w, min(h * w, ATTENTION_BLOCK)
            queries = min(n, attention_rows(c, h, w) * w)
            once = 2 * b * n * c * dtype.itemsize
            temporaries = b * (queries * block + 4 * queries * c)
        else:  # a tile of each computed node, grown by the halos of the nodes after it (two pixels a conv, at most)
            halo = 2 * len(p.computed)
            sides = {k: (min(plan.side(nodes[k].level), shapes[k][2]) + halo,
                         min(plan.side(nodes[k].level), shapes[k][3]) + halo) for k in p.computed}
            pixels = {k: rows * columns for k, (rows, columns) in sides.items()}
            outputs = sum(b * nodes[k].conv.out_channels * pixels[k] * (2 if nodes[k].shortcut else 1)
                          for k in p.computed)  # (and the shortcut's)
            padded = max(b * nodes[k].conv.in_channels * pixels[k] for k in p.computed)
            reads = sum(b * shapes[j][1] * pixels[k] for k in p.computed for j in inputs(nodes, k) if j in in_files)
            stats = b * c * min(pixels[p.target], STATS_CHUNK) if p.stats else 0
            temporaries = outputs + padded + reads + stats
            workspace = max([workspace] + [winograd.workspace_bytes(nodes[k].conv.in_channels,
                                                                    nodes[k].conv.out_channels, *sides[k],
                                                                    dtype.itemsize)
                                           for k in p.computed
                                           if winograd.suits(nodes[k].conv, b * pixels[k], dtype, device)])
        resident = sum(size for where, size in live.values() if where == "memory")
        held = resident + once + workspace + (1 + SLACK) * temporaries * dtype.itemsize
        memory = max(memory, fixed + int((1 + HEAP_SLACK) * held))
        files = max(files, sum(size for where, size in live.values() if where == "files"))
        for j in p.free:
            live.pop(j, None)
    return memory, files


def plan_tiling(encoder: nn.Module, config: VaeConfig, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device, tile_size: int | None, max_memory: int | str | None) -> TilePlan | None:
    """How to encode `shape` within `max_memory` (default: what is free): None for untiled, else a `TilePlan`.

    Plans are tried stages from the largest (the first) on: every stage in memory, then the first k stages in
    scratch files (where the scratch folder has room) or recomputed. Without a tile size: untiled when it fits,
    else the first plan that fits, in tiles of 256 and 128 px, and only if none of those fits 64 and 32 px (small
    tiles are slow). With a tile size and `max_memory`: the first plan of that tile size that fits. With a tile size
    alone: the plan of that tile size that needs the least memory. Raises MemoryError, naming the shape, the
    estimate and the budget, when nothing fits: the encode would not keep to the budget.
    """
    budget = parse_memory(max_memory) if max_memory is not None else available_memory(device)
    need = untiled_peak(config, shape, dtype, device)
    if tile_size is None and need <= budget:
        return None
    rounds = [(tile_size,)] if tile_size is not None else [AUTO_TILES[:2], AUTO_TILES[2:]]
    stages, room = len(config.block_out_channels) + 1, scratch_room()
    least_memory, least = tile_size is not None and max_memory is None, None
    for tiles in rounds:
        for k in range(stages + 1):
            for where in ("files", "recompute") if k else ("memory",):
                stores = (where,) * k + ("memory",) * (stages - k)
                for tile in tiles:
                    plan = TilePlan(tile, stores)
                    memory, files = tiled_peak(encoder, shape, dtype, plan, device)
                    if files > room:
                        continue
                    if least is None or memory < least[0]:
                        least = memory, files, plan
                    if memory <= budget and not least_memory:
                        _log_plan(shape, plan, need, budget, memory, files, tile_size)
                        return plan
    memory, files, plan = least
    if memory <= budget:  # (the least memory was asked for: the user chose the plan, so no log line)
        return plan
    raise MemoryError(f"encoding {list(shape)} needs about {_size(memory)} even in tiles of {plan.tile} px, "
                      f"{describe(plan.stores)}, more than the {_size(budget)} allowed; raise max_memory or encode "
                      "a smaller image")


def _log_plan(shape: tuple[int, ...], plan: TilePlan, untiled: int, budget: int, memory: int, files: int,
              tile_size: int | None) -> None:
    """Say why and how a budget tiles the image, unless it is just the tile size asked for, all in memory."""
    where = f"{describe(plan.stores)} (about {_size(memory)} in memory{f', {_size(files)} on disk' if files else ''})"
    if tile_size is None:
        log.info("sdvae: %s needs about %s untiled, over the %s budget: encoding in exact tiles of %d px, %s",
                 list(shape), _size(untiled), _size(budget), plan.tile, where)
    elif set(plan.stores) != {"memory"}:
        log.info("sdvae: %s in tiles of %d px does not fit the %s budget with every stage in memory: %s",
                 list(shape), plan.tile, _size(budget), where)


def describe(stores: tuple[str, ...]) -> str:
    """Where each stage's activations go, in words."""
    words = {"memory": "in memory", "files": "in scratch files", "recompute": "recomputed"}
    parts = []
    for where in dict.fromkeys(stores):
        stages = [str(i) for i, s in enumerate(stores) if s == where]
        parts.append(f"stage{'s' if len(stages) > 1 else ''} {', '.join(stages)} {words[where]}")
    return "activations of " + "; ".join(parts)
