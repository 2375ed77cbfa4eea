"""`sdvae encode --engine ray`: the planned shards as one Ray Data pipeline across a cluster.

    shards to do (driver) -> read, decode, crop (CPU tasks) -> encode, write latents (actors) -> metadata (driver)

A row of the pipeline is one shard. Actors load the encoder once and write the shard's latents and error records
under temporary names; the driver writes the shard's metadata part (its completion marker) when the actor's result
arrives, and the manifest last. A retried task rewrites the same shard name, so nothing is ever stored twice.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..model.config import VaeConfig
from .dataset import write_shard_data, write_shard_marker
from .job import Job, Runtime, Settings, check_counts, check_device, check_memory
from .progress import Tally
from .shard import ShardEncoder, prepare_shard
from .store import open_store

log = logging.getLogger("sdvae")

# CPUs a read-decode-crop task reserves: decoding takes ~1% of an image's encode time on a CPU, and on GPU
# clusters two tasks a core keep the cores busy while one waits on storage.
DECODE_CPUS = 0.5


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (the Data library comes with the ray[data] extra only)
    except ImportError:
        raise ImportError("--engine ray needs Ray Data: pip install 'sdvae[ray]'") from None
    return ray


def _prepare_row(row: dict[str, Any], settings: Settings, base: str) -> dict[str, Any]:
    """CPU task: read, decode and crop one shard's images (relative paths are the driver's)."""
    prepared = prepare_shard(pickle.loads(row["items"]), settings, base)
    return {"shard": row["shard"], "prepared": pickle.dumps(prepared, protocol=5)}


class _EncodeShards:
    """Actor: holds one encoder; encodes each shard it is given and writes its latents and errors."""

    def __init__(self, root: str, model_file: str, config: dict[str, Any], settings: Settings, runtime: Runtime,
                 settings_id: str, threads: int):
        torch.set_num_threads(threads)
        self.store = open_store(root)
        self.encoder = ShardEncoder(model_file, config, settings, runtime)
        self.settings_id = settings_id

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"shard": [], "rows": [], "failed": []}
        for index, data in zip(batch["shard"], batch["prepared"]):
            prepared = pickle.loads(data)
            tensors, rows, errors = self.encoder(prepared)
            write_shard_data(self.store, int(index), tensors, rows, errors, self.settings_id,
                             self.encoder.format_files(prepared, tensors, rows, self.store.root))
            out["shard"].append(int(index))
            out["rows"].append(json.dumps(rows))
            out["failed"].append(len(errors))
        return out


def _decode_task_bytes(job: Job) -> int:
    """A decoding worker (Python with torch imported, ~250 MB) and its shard's pixels, twice (arrays and pickle)."""
    return 256 * 2**20 + 2 * max(map(len, job.shards), default=1) * job.settings.size[0] * job.settings.size[1] * 3


class RayEngine:
    """Runs on a Ray cluster: `address` (else RAY_ADDRESS, else the cluster `ray start` made here, else a new local
    instance), `actors` encoders (default: one per GPU, else 1) of `actor_cpus` CPUs each (also their torch
    threads, rounded up); `runtime` says how each encoder runs."""

    def __init__(self, runtime: Runtime = Runtime(), address: str | None = None, actors: int | None = None,
                 actor_cpus: float = 1.0):
        check_counts(ray_actors=actors)
        if not actor_cpus > 0:
            raise ValueError(f"ray_actor_cpus must be above 0, got {actor_cpus!r}")
        self.runtime, self.address, self.actors, self.actor_cpus = runtime, address, actors, actor_cpus
        self.device = runtime.device

    def check(self) -> None:
        """Join the cluster and check that the pool fits in it: before anything is written, since a pool that
        cannot be placed would wait forever. (Its devices are its nodes': only the name is checked here.)"""
        check_device(self.runtime.device, here=False)
        ray = import_ray()
        if not ray.is_initialized():
            ray.init(address=self.address, logging_level=logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts images across the cluster
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 0)
        self.device = self.runtime.device or ("cuda" if gpus else "cpu")
        self.actors = self.actors or max(1, gpus)
        if self.device.startswith("cuda") and self.actors > gpus:
            raise ValueError(f"{self.actors} actor(s) on {self.device} need as many GPUs; the cluster has {gpus} "
                             "(use --device cpu, or fewer --ray-actors)")
        if self.actors * self.actor_cpus + DECODE_CPUS > cpus:
            raise ValueError(f"{self.actors} actor(s) of {self.actor_cpus:g} CPU leave no CPU of the cluster's "
                             f"{cpus:g} for reading and decoding images; lower --ray-actors or --ray-actor-cpus")
        log.info("ray: %d actor(s) on %s; the cluster has %g CPU(s), %d GPU(s)", self.actors, self.device, cpus,
                 gpus)

    def check_memory(self, config: VaeConfig, settings: Settings, images: int) -> None:
        """Refuse targets an actor cannot encode within a given `runtime.max_memory` (after `check`; the memory
        free on the nodes is not known here)."""
        check_memory(config, settings, self.runtime, images, self.device, free_memory=False)

    def run(self, job: Job) -> dict[str, int]:
        """Run the job's to-do shards on the cluster (after `check`); paths go to the workers absolute."""
        ray = import_ray()
        shards = [{"shard": index, "items": pickle.dumps(job.shards[index])} for index in job.todo]
        on_gpu = self.device.startswith("cuda")
        actor_runtime = replace(self.runtime, device="cuda" if on_gpu else self.device)  # an actor sees its GPU only
        with Tally(job) as tally:
            if shards:
                pipeline = (
                    ray.data.from_items(shards, override_num_blocks=len(shards))
                    # reserving the task's memory also keeps Ray from fusing this stage into the actors
                    .map(_prepare_row, fn_kwargs={"settings": job.settings, "base": os.getcwd()},
                         num_cpus=DECODE_CPUS, memory=_decode_task_bytes(job))
                    .map_batches(_EncodeShards, batch_size=1, compute=ray.data.ActorPoolStrategy(size=self.actors),
                                 num_gpus=1 if on_gpu else 0, num_cpus=self.actor_cpus,
                                 fn_constructor_args=(job.store.location,
                                                      str(Path(job.model_file).resolve()), job.manifest["config"],
                                                      job.settings, actor_runtime, job.settings_id,
                                                      max(1, math.ceil(self.actor_cpus))))
                )
                for result in pipeline.iter_rows():
                    index, rows, failed = int(result["shard"]), json.loads(result["rows"]), int(result["failed"])
                    write_shard_marker(job.store, index, rows, job.settings_id)
                    tally.progress.update(len(job.shards[index]), failed=failed)
                    tally.done(index, failed)
        return tally.counts
