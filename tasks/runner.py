"""Where shard tasks run: in the flow's process (``thread``, the default) or on a Dask cluster through
Prefect's ``DaskTaskRunner`` (prefect-dask): a local cluster of ``n_workers`` processes, or an
existing scheduler at ``address``. Results, locks and stores live under the storage root, which
every worker must see at the same path (a shared mount).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from pydantic import Field, StrictInt

from tasks.config import ConfigError, StrictModel


class RunnerSection(StrictModel):
    """Task runner for per-shard work (dataset generation, feature passes)."""

    kind: Literal["thread", "dask"] = Field(
        "thread", description="thread: shards run one after another in the flow's process; dask: on a Dask cluster"
    )
    address: str | None = Field(
        None, description="dask: address of an existing scheduler (tcp://host:8786); None = start a local cluster"
    )
    n_workers: StrictInt = Field(2, ge=1, description="dask, local cluster: worker processes")
    threads_per_worker: StrictInt = Field(1, ge=1, description="dask, local cluster: threads per worker process")


def check_runner(runner: RunnerSection) -> None:
    """Refuse a process-based runner on Prefect's ephemeral API (every worker would start its own server)."""
    if runner.kind != "dask":
        return
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise ConfigError(
            "runner.kind=dask needs a real Prefect server: on the ephemeral API each Dask worker would start its own "
            "temporary server on the same SQLite file. Start one (`prefect server start`) and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api in the environment, or use runner.kind=thread"
        )


@contextlib.contextmanager
def dask_runner(runner: RunnerSection) -> Iterator[Any]:
    """An entered ``DaskTaskRunner`` for ``runner`` (a local cluster is shut down on exit)."""
    check_runner(runner)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:  # pragma: no cover - a declared dependency
        raise ConfigError("runner.kind=dask needs prefect-dask: pip install prefect-dask 'dask[distributed]'") from None
    if runner.address:
        tr = DaskTaskRunner(address=runner.address)
    else:
        tr = DaskTaskRunner(
            cluster_kwargs={
                "n_workers": runner.n_workers,
                "threads_per_worker": runner.threads_per_worker,
                "processes": True,
                "dashboard_address": None,
                "silence_logs": logging.WARNING,
            }
        )
    quiet = logging.getLogger("distributed")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # no INFO line per worker, comm and nanny in the flow's log
    try:
        with tr:
            yield tr
    finally:
        quiet.setLevel(level)


def run_all(
    tr: Any, calls: Sequence[tuple[Any, dict[str, Any]]], on_done: Callable[[], None] | None = None
) -> list[Any]:
    """Submit every ``(task, parameters)`` to the entered runner ``tr`` and return their results in order.

    Each task retries on its own (its ``retries``); the first that still fails is raised after all finished.
    ``on_done`` is called as each task finishes (e.g. to advance a progress artifact).
    """
    from prefect.futures import as_completed

    futures = [tr.submit(task, parameters=params) for task, params in calls]
    for _ in as_completed(futures):
        if on_done is not None:
            on_done()
    return [f.result() for f in futures]  # a failed task raises its exception here
