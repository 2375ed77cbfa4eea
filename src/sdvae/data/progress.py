"""A run's progress and counts: what the user watches while shards land, and the totals at the end."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any

from .job import Job, finish_job

log = logging.getLogger("sdvae")


class Progress:
    """A tqdm bar on a terminal; otherwise a log line every few seconds. Counts images and reports images/s."""

    def __init__(self, total: int, interval: float = 10.0):
        self.total, self.interval = total, interval
        self.done = self.failed = 0
        self.start, self.last = time.time(), 0.0
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="img", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int, failed: int = 0) -> None:
        self.done += n
        self.failed += failed
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.time()
        if n and (now - self.last >= self.interval or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate else float("inf")
            log.info("%d/%d images, %d failed, %.1f img/s, ETA %.0fs", self.done, self.total, self.failed, rate, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Tally:
    """A run's counts and progress bar: `done` as each shard's marker lands, `finish` at the end, which gathers
    errors.jsonl and the manifest's totals (`job.finish_job`) and splits the kept shards' inputs into stored and
    failed.

    As a context manager it finishes however the run ends; where an error stopped the run, that error is the one
    reported, not an I/O error of the gathering (on a full disk both fail)."""

    def __init__(self, job: Job):
        self.job = job
        self.progress = Progress(sum(len(job.shards[index]) for index in job.todo))
        self.counts = {"encoded": 0, "failed": 0, "skipped": sum(map(len, job.shards)) - self.progress.total,
                       "failed_before": 0}

    def done(self, index: int, failed: int) -> None:
        self.counts["encoded"] += len(self.job.shards[index]) - failed
        self.counts["failed"] += failed

    def finish(self) -> None:
        self.progress.close()
        earlier = finish_job(self.job)["failed"] - self.counts["failed"]
        self.counts["failed_before"], self.counts["skipped"] = earlier, self.counts["skipped"] - earlier

    def __enter__(self) -> Tally:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> None:
        if error is None:
            self.finish()
            return
        with contextlib.suppress(OSError):
            self.finish()
