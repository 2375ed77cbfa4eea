"""`sdvae encode`: the job on an engine, under the output's writer lock.

    inputs -> sources (list, identify) -> job (shards, resume) -> engine: prepare (decode, crop), encode, write -> store
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..model.config import VaeConfig
from .job import Job, Settings, check_counts, open_job, refuse_foreign
from .local import LocalEngine
from .ray_engine import RayEngine
from .store import open_store


class Engine(Protocol):
    def check(self) -> None:
        """Refuse what cannot run (devices, a cluster too small) before anything is written."""

    def check_memory(self, config: VaeConfig, settings: Settings, images: int) -> None:
        """Refuse targets the engine's encoders cannot encode within their memory budget (after `check`)."""

    def run(self, job: Job) -> dict[str, int]:
        """Encode the job's to-do shards; returns the counts."""


ENGINES: dict[str, type[Engine]] = {"local": LocalEngine, "ray": RayEngine}


def encode_dataset(inputs: list[str], model: str, output: str | Path, settings: Settings, *,
                   engine: Engine | None = None, family: str | None = None, shard_size: int | None = None,
                   resume: bool = False, overwrite: bool = False, image_column: str | None = None,
                   caption_column: str | None = None) -> dict[str, int]:
    """Encode every input image into the dataset at `output` on `engine` (default `LocalEngine()`); returns the
    counts: encoded and failed in this run, and of the inputs kept from earlier runs, stored (skipped) and failed
    (failed_before)."""
    engine = LocalEngine() if engine is None else engine
    check_counts(shard_size=shard_size)
    engine.check()
    store = open_store(output)
    refuse_foreign(store)  # before the lock creates anything there
    with store.writer_lock():
        job = open_job(inputs, model, store, settings, family=family, shard_size=shard_size, resume=resume,
                       overwrite=overwrite, image_column=image_column, caption_column=caption_column,
                       check_memory=engine.check_memory)
        return engine.run(job)
