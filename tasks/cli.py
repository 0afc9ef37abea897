"""Command-line entry points: ``python -m flows.<name> --config FILE [dotted.key=value ...]``.

Every expected failure ends the output with one ``error: ...`` line and an exit code (:func:`cli_error`):
configuration errors 2, bad inputs and OS errors 1, Ctrl-C 130, SIGTERM 143; a bug keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel

from tasks.config import ConfigError, load_config

M = TypeVar("M", bound=BaseModel)


def parse_cli(model_cls: type[M], argv: Sequence[str] | None, description: str) -> M:
    """``[--config FILE] [--config-dir DIR] [experiment=NAME] [group=option] [dotted.key=value ...]`` -> validated
    config. A plain file is read as it is; an experiment, a file with a ``defaults:`` list, ``--config-dir``, a group
    selection or ``+key``/``~key`` is composed with Hydra the way Quadra's configs are (:mod:`tasks.compose`)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--config", help="YAML config file (plain, or a Quadra-style experiment with a defaults: list)")
    ap.add_argument(
        "--config-dir",
        action="append",
        help="folder holding experiment/ (Quadra-style configs; default ./configs when it has experiment/)",
    )
    ap.add_argument(
        "overrides", nargs="*", help="experiment=NAME, group=option, dotted.key=value (YAML values), +key=value, ~key"
    )
    args = ap.parse_args(argv)
    from tasks.compose import wants_composition

    if not wants_composition(args.config, args.config_dir, args.overrides):
        return load_config(model_cls, args.config, args.overrides)
    from tasks.compose import compose_config
    from tasks.config import validate_config
    from tasks.experiment import to_flow_data

    data, source = compose_config(args.config, args.config_dir, args.overrides)
    return validate_config(model_cls, to_flow_data(model_cls.__name__, data), source)


INTERRUPTED = "interrupted; rerun the same command to resume (finished shards and passes are kept)"
TERMINATED = "terminated (SIGTERM); rerun the same command to resume (finished shards and passes are kept)"


class Terminated(BaseException):
    """SIGTERM reached a command-line run (raised by the handler that :func:`run_cli` installs)."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def cli_error(exc: BaseException) -> tuple[int, str] | None:
    """``(exit code, message)`` of a failure the CLI reports in one line; None for a bug (its traceback is kept).

    ConfigError: 2. Input errors (InputDataError, AssociationError, DatasetFormatError, FeatureStoreError,
    BackboneError) and OSError (disk full, read-only, permission, refused output folder): 1.
    Ctrl-C: 130. SIGTERM: 143 (as a shell reports a process killed by the signal).
    """
    import sys

    from storage.features import FeatureStoreError
    from storage.layout import DatasetFormatError
    from tasks.dataset.association import AssociationError
    from tasks.imageio import InputDataError

    if isinstance(exc, ConfigError):
        return 2, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return 130, INTERRUPTED
    prefect_term = getattr(sys.modules.get("prefect.exceptions"), "TerminationSignal", Terminated)
    if isinstance(exc, (Terminated, prefect_term)):
        return 143, TERMINATED
    weights = sys.modules.get("tasks.features.weights")  # imported by then if it raised (and it imports no torch)
    known = (InputDataError, AssociationError, DatasetFormatError, FeatureStoreError, OSError)
    if isinstance(exc, known) or (weights is not None and isinstance(exc, weights.BackboneError)):
        return 1, str(exc)
    return None


class _NoTracebackForKnownErrors(logging.Formatter):
    """Wraps a console handler's formatter: a record carrying a failure that the CLI reports in one line is
    shown without its traceback (the run's API log, i.e. the UI, and log files keep it)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or cli_error(exc) is None:
            return self.inner.format(record)
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = saved


def _quiet_console_tracebacks() -> None:
    """Install :class:`_NoTracebackForKnownErrors` on the root logger's console handlers (Prefect's included)."""
    import prefect.logging  # noqa: F401  (configures Prefect's console handler on the root logger)

    for handler in logging.getLogger().handlers:
        console = type(handler) is not logging.FileHandler and isinstance(handler, logging.StreamHandler)
        if console and not isinstance(handler.formatter, _NoTracebackForKnownErrors):
            handler.setFormatter(_NoTracebackForKnownErrors(handler.formatter))


def run_cli(main_fn: Callable[[], Any]) -> None:
    """Run a CLI entry point; every expected failure ends the output with one ``error: ...`` line.

    Exit codes as :func:`cli_error` says; a bug keeps its traceback. SIGTERM is turned into
    :class:`Terminated` so the run unwinds like Ctrl-C (resume folders kept, Prefect's temporary server
    stopped by its exit hook) instead of dying at once. The ``error:`` line is printed at exit, after
    Prefect's own exit lines (its server stop), so it is the last line; a second Ctrl-C or SIGTERM while
    the run winds down ends it at once (the server then stops on its own, see storage/prefect_server.py).
    """
    import atexit
    import signal
    import sys

    last_line: list[str] = []
    atexit.register(lambda: last_line and print(f"error: {last_line[0]}", file=sys.stderr, flush=True))
    _quiet_console_tracebacks()
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        main_fn()
    except BaseException as exc:  # KeyboardInterrupt, Terminated and Prefect's TerminationSignal included
        known = None if isinstance(exc, SystemExit) else cli_error(exc)
        if known is None:
            raise
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        last_line.append(known[1])
        raise SystemExit(known[0]) from None


def cli_main(
    model_cls: type[M],
    flow_fn: Callable[[M], Any],
    report: Callable[[Any], None],
    argv: Sequence[str] | None,
    description: str | None,
) -> None:
    """The shared ``main`` of the config-file flows: parse ``--config`` and overrides, run ``flow_fn``, ``report`` its
    result (run it through :func:`run_cli`)."""
    report(flow_fn(parse_cli(model_cls, argv, description or "")))
