"""Signals and the command line (docs/bad-inputs.md, section J): Ctrl-C and SIGTERM on real CLI runs stop within
seconds with one line, keep what a rerun resumes, and leave no Prefect server behind; run_cli's one-line errors.

Every run here is a real ``python -m flows.<name>`` subprocess in a session of its own (as a terminal's
foreground job) with its own PREFECT_HOME, so its temporary Prefect server can be found in /proc by that
environment variable, whatever command line a Prefect version gives it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tasks.cli import INTERRUPTED, TERMINATED
from tests._synth import CLASS_TO_IDX, make_dataset, tree_digest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SERVER_APP = "prefect.server.api.server:create_app"
STOP_BOUND_S = 15.0  # a signal to exit, on a loaded 2-core machine (4-6 s measured)


def slow_mask(mask: np.ndarray) -> np.ndarray:
    """mask_preprocessing (``tests.test_signals:slow_mask``) that slows generation so a signal lands mid-way."""
    time.sleep(0.05)
    return mask


# ------------------------------------------------------------------------------------------- helpers


def _proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def prefect_servers(home: Path) -> list[int]:
    """Live processes serving Prefect's API whose environment has ``PREFECT_HOME=home``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if SERVER_APP.encode() not in (d / "cmdline").read_bytes():
                continue
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PREFECT_HOME={home}".encode() in env and _proc_state(int(d.name)) not in (None, "Z"):
            found.append(int(d.name))
    return found


def assert_no_server_left(home: Path, wait_s: float = 15.0) -> None:
    t0 = time.time()
    while prefect_servers(home):
        assert time.time() - t0 < wait_s, f"Prefect server(s) {prefect_servers(home)} of {home} still running"
        time.sleep(0.2)


def assert_one_error_line(stderr: str, message: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1] == f"error: {message}", stderr[-3000:]
    assert sum(line.startswith("error:") for line in lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]


class CliRun:
    """``python -m <module> ARGS`` in a session of its own, with its own PREFECT_HOME; output goes to files
    (a leftover server holding a pipe would block a reader)."""

    def __init__(self, tmp: Path, name: str, module: str, *args: str) -> None:
        self.home, self.err, self.out = tmp / f"{name}-home", tmp / f"{name}.stderr", tmp / f"{name}.stdout"
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env["PREFECT_HOME"] = str(self.home)
        with self.err.open("wb") as err, self.out.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, *args], cwd=REPO, env=env, start_new_session=True, stdout=out, stderr=err
            )

    def wait_for(self, ready: Callable[[], bool], timeout: float = 240.0) -> None:
        t0 = time.time()
        while not ready():
            if self.proc.poll() is not None:
                tail = self.stderr()[-3000:]
                raise AssertionError(f"the run ended (rc {self.proc.returncode}) before the signal:\n{tail}")
            if time.time() - t0 > timeout:
                os.killpg(self.proc.pid, signal.SIGKILL)
                raise AssertionError("the point to send the signal at was never reached")
            time.sleep(0.02)

    def send(self, sig: int, group: bool) -> float:
        """Send ``sig`` (to the whole group, as a terminal does, or to the process) and wait; seconds to exit."""
        t0 = time.time()
        (os.killpg if group else os.kill)(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        return time.time() - t0

    def finish(self, timeout: float = 400.0) -> int:
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def assert_server_in_own_session(self) -> None:
        servers = prefect_servers(self.home)
        assert servers, "no temporary Prefect server found for the run"
        for pid in servers:  # a terminal's Ctrl-C reaches the run's group only (storage/prefect_server.py)
            assert os.getsid(pid) != os.getsid(self.proc.pid), "the server shares the run's session"


# ----------------------------------------------------------------------------------- dataset stage


@pytest.fixture(scope="module")
def dataset_case(tmp_path_factory) -> dict:
    """36 synthetic images, a dataset config (slow masks, shards of 3 images) and its uninterrupted build."""
    from tasks.dataset.association import get_image_mask_association
    from tasks.dataset.config import GenerationSection
    from tasks.dataset.stage import dataset_fingerprint, generate_task

    tmp = tmp_path_factory.mktemp("signals-ds")
    make_dataset(tmp / "raw", n=36, h=64, w=80, seed=5)
    gen = {
        "patch_size": [32, 32],
        "val_size": 0.3,
        "test_size": 0.2,
        "shard_images": 3,
        "mask_preprocessing": "tests.test_signals:slow_mask",
    }
    assoc = get_image_mask_association(str(tmp / "raw" / "images"), str(tmp / "raw" / "masks"))
    section = GenerationSection(**gen, output_folder=str(tmp / "ref"))
    generate_task.fn(assoc, CLASS_TO_IDX, section, dataset_fingerprint(assoc, CLASS_TO_IDX, section))
    return {"tmp": tmp, "gen": gen, "ref": tree_digest(tmp / "ref"), "raw": tree_digest(tmp / "raw")}


def _dataset_config(case: dict, tmp: Path, num_workers: int) -> Path:
    import yaml

    raw = case["tmp"] / "raw"
    cfg = {
        "data": {"images": str(raw / "images"), "masks": str(raw / "masks"), "class_to_idx": CLASS_TO_IDX},
        "dataset": {**case["gen"], "output_folder": str(tmp / "ds"), "num_workers": num_workers},
        "storage_root": str(tmp / "store"),
    }
    path = tmp / "dataset.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))  # class_to_idx in its order (the sidecar keeps it)
    return path


def _finished_shards(tmp: Path) -> list[Path]:
    return [m for p in tmp.glob(".ds.partial-*") for m in (p / ".shards").glob("process-*")]


def _interrupt_and_resume_dataset(case: dict, tmp: Path, sig: int, group: bool, num_workers: int) -> None:
    cfg = _dataset_config(case, tmp, num_workers)
    run = CliRun(tmp, "cut", "flows.dataset", "--config", str(cfg))
    run.wait_for(lambda: len(_finished_shards(tmp)) >= 2)
    run.assert_server_in_own_session()
    elapsed = run.send(sig, group)
    code, message = (130, INTERRUPTED) if sig == signal.SIGINT else (143, TERMINATED)
    assert run.proc.returncode == code, run.stderr()[-3000:]
    assert elapsed < STOP_BOUND_S, f"{elapsed:.1f} s from the signal to the exit"
    assert_one_error_line(run.stderr(), message)
    assert_no_server_left(run.home)
    assert not (tmp / "ds").exists()  # nothing complete-looking
    kept = _finished_shards(tmp)
    assert len(kept) >= 2, "the finished shards were not kept"
    (partial,) = tmp.glob(".ds.partial-*")
    before = {p.relative_to(partial).as_posix(): p.stat().st_mtime_ns for p in partial.rglob("*.png")}

    rerun = CliRun(tmp, "rerun", "flows.dataset", "--config", str(cfg))
    assert rerun.finish() == 0, rerun.stderr()[-3000:]
    assert "Traceback" not in rerun.stderr()
    assert tree_digest(tmp / "ds") == case["ref"]  # byte-identical to the uninterrupted build
    assert not list(tmp.glob(".ds.partial-*"))
    unchanged = [rel for rel, ns in before.items() if (tmp / "ds" / rel).stat().st_mtime_ns == ns]
    assert len(unchanged) >= 2, "the finished shards were redone, not resumed"
    assert tree_digest(case["tmp"] / "raw") == case["raw"]  # no input byte changed
    assert_no_server_left(rerun.home)


def test_81_ctrl_c_during_dataset_generation_stops_at_once_and_resumes(dataset_case: dict, tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it; 2 pool workers) mid-generation."""
    _interrupt_and_resume_dataset(dataset_case, tmp_path, signal.SIGINT, group=True, num_workers=2)


def test_83_sigterm_during_dataset_generation_keeps_the_resume_folder(dataset_case: dict, tmp_path: Path) -> None:
    """SIGTERM to the process alone (kill PID, a service manager, a batch scheduler) mid-generation."""
    _interrupt_and_resume_dataset(dataset_case, tmp_path, signal.SIGTERM, group=False, num_workers=1)


# ---------------------------------------------------------------------------------- training stage


def _feature_state(root: Path) -> tuple[set[str], dict[str, set[str]]]:
    """(finished pass stores, {partial store: its shard records})."""
    feats = root / "features"
    if not feats.is_dir():
        return set(), {}
    done = {p.name for p in feats.glob("*.zarr") if (p / "_manifest.json").exists()}
    partial = {p.name: {m.name for m in (p / "_shards").glob("shard-*.json")} for p in feats.glob("*.zarr.partial")}
    return done, partial


def _interrupt_training(demo_patch_dataset: Path, tmp: Path, sig: int, group: bool) -> tuple[Path, set[str]]:
    import yaml

    from storage import features as fstore
    from tests.test_crash_resume import _train_cfg

    root = tmp / "root"
    cfg = tmp / "train.yaml"
    cfg.write_text(yaml.safe_dump(_train_cfg(demo_patch_dataset, tmp / "cut", root)))
    run = CliRun(tmp, "cut", "flows.train", "--config", str(cfg))

    def mid_features() -> bool:  # a pass finished and the next one has finished shards of its own
        done, partial = _feature_state(root)
        return len(done) >= 1 and any(partial.values())

    run.wait_for(mid_features)
    run.assert_server_in_own_session()
    done0, partial0 = _feature_state(root)  # the work done when the signal was sent (a pass may still finish)
    elapsed = run.send(sig, group)
    done, partial = _feature_state(root)
    code, message = (130, INTERRUPTED) if sig == signal.SIGINT else (143, TERMINATED)
    assert run.proc.returncode == code, run.stderr()[-3000:]
    assert elapsed < STOP_BOUND_S, f"{elapsed:.1f} s from the signal to the exit"
    assert_one_error_line(run.stderr(), message)
    assert_no_server_left(run.home)
    assert done0 <= done and all(fstore.is_verified(root / "features" / name) for name in done)  # passes kept
    for name, records in partial0.items():  # partial stores kept with their shard records (or finished since)
        assert records <= partial.get(name, set()) or name.removesuffix(".partial") in done, name
    assert not (root / "bundles").exists() or not any((root / "bundles").iterdir())
    return root, done


def test_82_ctrl_c_during_training_stops_at_once_and_resumes(
    demo_patch_dataset: Path, tmp_path: Path, prefect_harness
) -> None:
    """Ctrl-C (SIGINT to the process group) in the feature stage of ``python -m flows.train``; the rerun reuses the
    finished passes and the finished shards and ends with the features and metrics of an uninterrupted run."""
    from flows.train import train_flow
    from tests.test_crash_resume import _runs_by_name, _stores, _train_cfg

    root, done = _interrupt_training(demo_patch_dataset, tmp_path, signal.SIGINT, group=True)
    state = train_flow(_train_cfg(demo_patch_dataset, tmp_path / "rerun", root), return_state=True)
    assert state.is_completed()
    assert _runs_by_name(state)["train-pass-features"].count("Cached") >= len(done)
    ref = train_flow(_train_cfg(demo_patch_dataset, tmp_path / "ref", tmp_path / "ref_root"))
    assert _stores(root) == _stores(tmp_path / "ref_root")  # identical features
    assert state.result()["metrics"] == ref["metrics"]
    assert not list((root / "features").glob("*.partial"))


def test_84_sigterm_during_training_keeps_finished_passes_and_partial_stores(
    demo_patch_dataset: Path, tmp_path: Path
) -> None:
    """SIGTERM to ``python -m flows.train`` alone in the feature stage: exit 143, one line, everything kept."""
    _interrupt_training(demo_patch_dataset, tmp_path, signal.SIGTERM, group=False)


# ------------------------------------------------------------------------- the server's own guard


def test_85_temporary_server_is_out_of_the_terminal_group_and_dies_with_its_run(tmp_path: Path) -> None:
    """The override of Prefect's server start (storage/prefect_server.py) is in place: the server gets a session of
    its own and shuts down by itself when its run is SIGKILLed (as the OOM killer does). Fails if a Prefect
    upgrade renames the method or starts the server another way."""
    from storage import prefect_server

    assert prefect_server.is_installed()
    code = textwrap.dedent("""
        import os, time
        import storage.settings
        from prefect.server.api.server import SubprocessASGIServer
        server = SubprocessASGIServer()
        server.start()
        print(server.server_process.pid, flush=True)
        time.sleep(600)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    run = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        server = int(run.stdout.readline())
        assert prefect_servers(tmp_path / "home") == [server]
        assert os.getsid(server) != os.getsid(run.pid) == run.pid
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # the run's whole group, with no chance to clean up
        run.wait()
    assert_no_server_left(tmp_path / "home", wait_s=15)


# ----------------------------------------------------------------------------- run_cli's one line


def _run_cli(tmp: Path, body: str) -> subprocess.CompletedProcess:
    """``run_cli(main)`` in a fresh interpreter, ``main`` running ``body`` (one line)."""
    code = "\n".join(
        [
            "import os, signal, sys, time",
            "from pathlib import Path",
            "from tasks.cli import run_cli; from tasks.config import ConfigError",
            f"tmp = Path({str(tmp)!r})",
            "def main():",
            f"    {body}",
            "run_cli(main)",
        ]
    )
    return subprocess.run(
        [sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_86_run_cli_one_line_for_os_errors_signals_and_config_errors_traceback_for_bugs(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    # a plain OSError (here: a folder under a file; disk full, read-only and permission errors alike): exit 1
    res = _run_cli(tmp_path, "(tmp / 'a_file' / 'sub').mkdir()")
    assert res.returncode == 1
    assert_one_error_line(res.stderr, f"[Errno 20] Not a directory: '{tmp_path / 'a_file' / 'sub'}'")
    res = _run_cli(tmp_path, "raise ConfigError(\"unknown key 'x'\")")
    assert res.returncode == 2
    assert_one_error_line(res.stderr, "unknown key 'x'")
    res = _run_cli(tmp_path, "raise KeyboardInterrupt")
    assert res.returncode == 130
    assert_one_error_line(res.stderr, INTERRUPTED)
    res = _run_cli(tmp_path, "os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)")  # outside any flow run
    assert res.returncode == 143
    assert_one_error_line(res.stderr, TERMINATED)
    res = _run_cli(tmp_path, "raise RuntimeError('a bug')")  # unexpected: Python's traceback, no error line
    assert res.returncode == 1 and "Traceback" in res.stderr and "RuntimeError: a bug" in res.stderr
    assert "error:" not in res.stderr


def test_87_input_error_in_a_flow_keeps_the_traceback_off_the_console_and_in_the_run_log(tmp_path: Path) -> None:
    """An empty images folder (a bad input found inside a flow run): Prefect's normal lines, then exactly one
    ``error:`` line, no traceback on the console; the run's API log (the UI) keeps the traceback."""
    import sqlite3

    import yaml

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "data": {"images": str(imgs), "masks": str(imgs), "class_to_idx": {"bg": 0, "a": 1}},
                "dataset": {"output_folder": str(tmp_path / "ds"), "patch_number": [2, 2]},
                "storage_root": str(tmp_path / "store"),
            }
        )
    )
    run = CliRun(tmp_path, "bad", "flows.dataset", "--config", str(cfg))
    assert run.finish() == 1
    err = run.stderr()
    assert "Beginning flow run" in err and "Finished in state Failed" in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: no image files") and str(imgs) in lines[-1], err[-3000:]
    assert_one_error_line(err, lines[-1].removeprefix("error: "))
    with sqlite3.connect(run.home / "prefect.db") as db:  # the ephemeral API's database: what the UI shows
        logged = [m for (m,) in db.execute("SELECT message FROM log")]
    assert any("Traceback" in m and "AssociationError" in m for m in logged)
    assert_no_server_left(run.home)


# ------------------------------------------------------------------- which failures keep the folder


DISK = {"full_after": None, "calls": 0}


def failing_mask(mask: np.ndarray) -> np.ndarray:
    """Identity mask_preprocessing that fails like a full disk once ``DISK["full_after"]`` masks were read."""
    DISK["calls"] += 1
    if DISK["full_after"] is not None and DISK["calls"] > DISK["full_after"]:
        raise OSError(28, "No space left on device")
    return mask


def test_88_dataset_build_keeps_its_resume_folder_unless_the_input_is_bad(tmp_path: Path) -> None:
    """Only a known bad input (a ValueError: InputDataError, ...) removes the build folder; an OSError (disk
    full) keeps it and the rerun resumes to the same bytes."""
    from tasks import generate_patch_dataset

    assoc = make_dataset(tmp_path / "raw", n=18, h=64, w=80, seed=7)
    raw = tree_digest(tmp_path / "raw")
    kw = {
        "val_size": 0.3,
        "patch_size": [32, 32],
        "shard_images": 3,
        "fingerprint": "e" * 64,
        "mask_preprocessing": failing_mask,
    }
    generate_patch_dataset(assoc, CLASS_TO_IDX, output_folder=str(tmp_path / "ref"), **kw)
    partial = tmp_path / f".ds.partial-{'e' * 16}"
    DISK.update(full_after=18 + 9, calls=0)  # every mask scanned, then 3 shards of 3 images written
    with pytest.raises(OSError, match="No space left"):
        generate_patch_dataset(assoc, CLASS_TO_IDX, output_folder=str(tmp_path / "ds"), **kw)
    DISK.update(full_after=None)
    assert len(list((partial / ".shards").glob("process-*"))) == 3, "the resume folder was not kept"
    generate_patch_dataset(assoc, CLASS_TO_IDX, output_folder=str(tmp_path / "ds"), **kw)
    assert tree_digest(tmp_path / "ds") == tree_digest(tmp_path / "ref") and not partial.exists()

    corrupt = tmp_path / "corrupt" / "zz_last.png"  # a bad image among good ones
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"not an image")
    bad = [*assoc, {"base_name": corrupt.name, "path": str(corrupt), "mask": None}]
    with pytest.raises(ValueError, match=corrupt.name):
        generate_patch_dataset(bad, CLASS_TO_IDX, output_folder=str(tmp_path / "ds2"), **kw)
    assert not partial.exists() and not (tmp_path / "ds2").exists()  # nothing worth resuming
    assert tree_digest(tmp_path / "raw") == raw  # no input byte changed
