"""The local engine: the job's shards in order on this machine, images decoded inline or in worker processes
while the model runs."""

from __future__ import annotations

import contextlib
import multiprocessing
from collections import deque
from collections.abc import Iterator

import torch

from ..model.config import VaeConfig
from .dataset import write_shard_data, write_shard_marker
from .job import Job, Runtime, Settings, check_device, check_memory
from .prepare import Prepared
from .progress import Tally
from .shard import ShardEncoder, prepare_shard
from .sources import Item


class LocalEngine:
    """Runs here: `runtime` says how the encoder runs, `workers` how many processes decode (0: inline)."""

    def __init__(self, runtime: Runtime = Runtime(), workers: int = 0):
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
            raise ValueError(f"workers must be 0 (decode in this process) or more, got {workers!r}")
        self.runtime, self.workers = runtime, workers

    def check(self) -> None:
        """Refuse a device this machine lacks, before anything is written."""
        check_device(self.runtime.device)

    def check_memory(self, config: VaeConfig, settings: Settings, images: int) -> None:
        """Refuse targets the encoder cannot encode within `runtime.max_memory`, else the memory free here."""
        device = self.runtime.device or ("cuda" if torch.cuda.is_available() else "cpu")
        check_memory(config, settings, self.runtime, images, device)

    def run(self, job: Job) -> dict[str, int]:
        """Prepare, encode and write the to-do shards in order; returns the run's counts."""
        shard_encoder = ShardEncoder(job.model_file, job.manifest["config"], job.settings, self.runtime)
        prepared = _prepared_shards(job, self.workers)
        with Tally(job) as tally, contextlib.closing(prepared):
            for index, shard in zip(job.todo, prepared):
                tensors, rows, errors = shard_encoder(shard, tally.progress.update)
                tally.progress.update(len(errors), failed=len(errors))
                write_shard_data(job.store, index, tensors, rows, errors, job.settings_id,
                                 shard_encoder.format_files(shard, tensors, rows, job.store.root))
                write_shard_marker(job.store, index, rows, job.settings_id)
                tally.done(index, len(errors))
        return tally.counts


def _prepared_shards(job: Job, workers: int) -> Iterator[list[tuple[Item, Prepared | str]]]:
    """The to-do shards prepared in order, by `workers` processes (at most one shard ahead each) or inline."""
    shards = (job.shards[index] for index in job.todo)
    if workers <= 0:
        yield from (prepare_shard(items, job.settings) for items in shards)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pending: deque = deque()
        for items in shards:
            pending.append(pool.apply_async(prepare_shard, (items, job.settings)))
            if len(pending) > workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
