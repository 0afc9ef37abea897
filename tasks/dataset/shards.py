"""Shards of per-image work: :class:`Workers` (in-process or a process pool) and the two phases shard by shard.

Phase 1 scans images (:func:`scan_shard`), :func:`assign_splits` records the seeded split of every image in
the plan, phase 2 writes each image's files (:func:`process_shards`) and records every finished shard with
its results (``tasks/dataset/state.py``), so a killed build resumes shard by shard. In-process builds run
every shard in one pass over one pool; the flow's Dask runner sends each shard to a worker as a task.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from storage import layout
from tasks.dataset.images import Job, init_pool_worker, init_worker, process_image, scan_image
from tasks.dataset.params import DatasetParams
from tasks.dataset.split import split_images
from tasks.dataset.state import DatasetPlan, load_marker, load_plan, write_marker, write_plan


class Workers:
    """Runs per-image functions in order, in-process or on one process pool reused by both phases."""

    def __init__(self, params: DatasetParams, root: Path, num_workers: int, n_jobs: int) -> None:
        self.pool: ProcessPoolExecutor | None = None
        self.chunk = max(1, min(16, math.ceil(n_jobs / (num_workers * 8))))  # small chunks: no long tail on one worker
        if num_workers > 1 and n_jobs > 1:
            # fork is cheapest but unsafe in a multi-threaded process (Prefect's engine runs threads)
            method = "fork" if threading.active_count() == 1 and os.name == "posix" else "forkserver"
            ctx = multiprocessing.get_context(method)
            self.pool = ProcessPoolExecutor(
                num_workers, mp_context=ctx, initializer=init_pool_worker, initargs=(params, Path(root))
            )
        else:
            init_worker(params, root)

    def map(self, fn: Callable[[Job], Any], jobs: Sequence[Job]) -> list[Any]:
        """Results in job order."""
        return list(self.imap(fn, jobs))

    def imap(self, fn: Callable[[Job], Any], jobs: Sequence[Job]) -> Iterator[Any]:
        """Results in job order, each as soon as it and those before it are done."""
        if self.pool is None:
            return (fn(j) for j in jobs)
        return self.pool.map(fn, jobs, chunksize=self.chunk)

    def close(self) -> None:
        """Stop the pool (waits for running jobs; pending ones are cancelled)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


def shard_counts(tmp: str | Path) -> tuple[int, int | None]:
    """``(scan shards, process shards or None while splits are not assigned)`` of a build folder."""
    plan = load_plan(tmp)
    return len(plan.shards(ordered=False)), (len(plan.shards(ordered=True)) if plan.order is not None else None)


def scan_shard(tmp: str | Path, shard: int) -> list[tuple]:
    """Phase 1 of shard ``shard`` (on this process): sizes and mask values of its images (validated)."""
    plan = load_plan(tmp)
    jobs = [plan.jobs[i] for i in plan.shards(ordered=False)[shard]]
    workers = Workers(plan.params, Path(tmp), 1, len(jobs))
    return workers.map(scan_image, jobs)


def assign_splits(tmp: str | Path, scans: Sequence[tuple], plan: DatasetPlan | None = None) -> int:
    """Record every image's size, mask values and split (seeded split) in the saved plan (and in ``plan``, when
    given already loaded); returns the number of process shards."""
    plan = plan or load_plan(tmp)
    if len(scans) != len(plan.jobs):
        raise ValueError(f"{len(scans)} scan results for {len(plan.jobs)} images")
    for job, (size, values, plain) in zip(plan.jobs, scans):
        job.size, job.plain_mask = tuple(size), plain
        job.values = tuple(values) if values is not None else None
    label_sets = [set(v) if v is not None else None for _, v, _ in scans]
    n_classes = max(plan.params.class_to_idx.values()) + 1
    p = plan.params
    assignment, order = split_images(label_sets, p.val_size, p.test_size, p.seed, n_classes)
    for job, split in zip(plan.jobs, assignment):
        job.split = split
        if job.values is None and split != "train":  # mask-less images land in <split>/None
            (Path(tmp) / split / layout.NONE_CLASS).mkdir(exist_ok=True)
    plan.order = [int(i) for i in order]
    write_plan(Path(tmp), plan)
    return len(plan.shards(ordered=True))


def process_shard(tmp: str | Path, shard: int) -> int:
    """Phase 2 of shard ``shard`` on this process (skipped when already done); returns its image count."""
    plan = load_plan(tmp)
    workers = Workers(plan.params, Path(tmp), 1, len(plan.shards(ordered=True)[shard]))
    return process_shards(plan, [shard], workers)


def process_shards(plan: DatasetPlan, shards: Sequence[int], workers: Workers) -> int:
    """Phase 2 of several shards in one pass over ``workers`` (no barrier between shards); each finished
    shard is recorded on its own, so a killed run resumes shard by shard. Returns the image count."""
    if plan.order is None:
        raise ValueError(f"{plan.tmp}: splits are not assigned yet; run assign_splits first")
    all_idx = plan.shards(ordered=True)
    todo = [s for s in shards if load_marker(plan.tmp, s, all_idx[s]) is None]
    results = workers.imap(process_image, [plan.jobs[i] for s in todo for i in all_idx[s]])
    for s in todo:  # each shard is recorded as soon as its images are done
        write_marker(plan.tmp, s, all_idx[s], [next(results) for _ in all_idx[s]])
    return sum(len(all_idx[s]) for s in shards)
