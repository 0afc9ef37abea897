"""Crash safety, tamper detection and determinism: a run killed with SIGKILL resumes and ends identical to
an uninterrupted one; deleted or edited cached outputs are recomputed, never served; locks of dead
processes are reclaimed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import skops.io
import torch

from tests._synth import CLASS_TO_IDX, make_dataset, tree_digest

REPO = Path(__file__).resolve().parents[1]


def slow_identity(mask: np.ndarray) -> np.ndarray:
    """mask_preprocessing that slows generation down so that a kill lands mid-way."""
    time.sleep(0.03)
    return mask


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240.0) -> None:
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before it could be killed")
        if time.time() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("the kill point was never reached")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers; its Prefect server (own session) exits by itself
    proc.wait()


# ------------------------------------------------------------------------------------------ locks


def test_lock_of_a_killed_process_is_reclaimed(tmp_path: Path) -> None:
    from tasks.locks import lock_manager

    code = (
        "import os, signal; from pathlib import Path; from tasks.locks import lock_manager; "
        f"m = lock_manager(Path({str(tmp_path)!r})); assert m.acquire_lock('stage', 'dead-holder'); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False)
    assert list((tmp_path / "locks").glob("*.lock")), "the killed process left its lock file"
    m = lock_manager(tmp_path)
    t0 = time.time()
    assert m.acquire_lock("stage", "next-run", acquire_timeout=30)
    assert time.time() - t0 < 5  # reclaimed at once, not waited out
    assert m.is_lock_holder("stage", "next-run")
    # a live holder is still honoured
    other = lock_manager(tmp_path)
    assert not other.acquire_lock("stage", "third", acquire_timeout=0.3)
    m.release_lock("stage", "next-run")
    assert other.acquire_lock("stage", "third", acquire_timeout=1)


def _foreign_lock(tmp_path: Path, key: str, age_s: float) -> Path:
    """A lock file as a holder on another host writes it, last renewed ``age_s`` ago."""
    from tasks.locks import lock_manager

    m = lock_manager(tmp_path)
    m._ensure_lock_files_directory_exists()
    path = m._lock_path_for_key(key)
    path.write_text(json.dumps({"holder": "h", "expiration": None, "pid": 1, "host": "another-host", "start": "1"}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_lock_of_a_dead_host_is_reclaimed_once_its_lease_lapses(tmp_path: Path) -> None:
    """Another host's holder cannot be checked by pid: its lock counts while renewed, and is reclaimed after the TTL."""
    from tasks.locks import LEASE_TTL_S, lock_manager

    _foreign_lock(tmp_path, "live", age_s=5)
    assert not lock_manager(tmp_path).acquire_lock("live", "me", acquire_timeout=0.3)  # renewed recently: honoured
    _foreign_lock(tmp_path, "dead", age_s=LEASE_TTL_S + 60)
    m = lock_manager(tmp_path)
    assert m.acquire_lock("dead", "me", acquire_timeout=5) and m.is_lock_holder("dead", "me")


def test_held_locks_are_renewed_and_released_locks_are_not(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import os, time; from pathlib import Path; from tasks.locks import lock_manager
        m = lock_manager(Path({str(tmp_path)!r}))
        assert m.acquire_lock('stage', 'holder')
        path = m._lock_path_for_key('stage')
        os.utime(path, (time.time() - 1000, time.time() - 1000))
        time.sleep(1.0)
        renewed = time.time() - path.stat().st_mtime
        m.release_lock('stage', 'holder')
        assert m.acquire_lock('other', 'holder'); m.release_lock('other', 'holder')
        print(renewed < 5, not path.exists())
    """)
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PATCHFLOW_LOCK_REFRESH_S": "0.2"},
    )
    assert out.stdout.split() == ["True", "True"], out.stdout + out.stderr


# --------------------------------------------------------------------------- feature shards resume


class _TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))


def _store_job(tmp_path: Path, out: Path):
    import cv2

    from tasks.features.extractor import FeatureExtractor
    from tasks.features.plans import items_plan
    from tasks.features.store import StoreJob

    rng = np.random.default_rng(1)
    (tmp_path / "patches").mkdir(exist_ok=True)
    items = []
    for i in range(37):
        rel = f"patches/p{i}.png"
        if not (tmp_path / rel).exists():
            cv2.imwrite(str(tmp_path / rel), rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))
        items.append((rel, i % 3))
    ext = FeatureExtractor(_TinyNet(), "cpu", "fp32", 8)
    return StoreJob(
        out,
        "k-" + out.name,
        items_plan(items),
        {"kind": "test", "data_path": str(tmp_path)},
        6,
        lambda: ext,
        (16, 16),
        (0.5, 0.5, 0.5),
        (0.2, 0.2, 0.2),
        8,
        rows_per_shard=8,
        chunk_rows=4,
    )


def test_feature_store_resumes_verified_shards_only(tmp_path: Path) -> None:
    from storage import features as fstore
    from tasks.features import shards

    ref = _store_job(tmp_path, tmp_path / "ref.zarr").build()
    assert ref["shards"] == 5 and ref["shards_reused"] == 0
    out = tmp_path / "resumed.zarr"
    job = _store_job(tmp_path, out)
    assert job.prepare() == 5
    for i in (0, 1, 2):
        job.fill(i)
    part = shards.partial_path(out)
    # shard 1's rows were damaged after it finished; shard 3 was half written when the process died (no marker)
    fstore.write_feature_rows(part, 8, np.zeros((8, 6), np.float32))
    fstore.write_feature_rows(part, 24, np.ones((8, 6), np.float32))
    stats = _store_job(tmp_path, out).build()
    assert stats["shards_reused"] == 2  # shards 0 and 2 kept; 1 (failed verification), 3 and 4 redone
    assert fstore.is_verified(out) and not part.exists()
    assert fstore.store_attrs(out)["content_digest"] == fstore.store_attrs(tmp_path / "ref.zarr")["content_digest"]
    # a finished store edited afterwards is no longer trusted
    chunk = next(p for p in sorted((out / "features" / "c").rglob("*")) if p.is_file())
    chunk.write_bytes(bytes(b ^ 0xFF for b in chunk.read_bytes()))
    assert fstore.is_complete(out) and not fstore.is_verified(out)


def test_stale_partial_stores_are_pruned(tmp_path: Path) -> None:
    from storage import shards

    old, fresh = tmp_path / "a.zarr.partial", tmp_path / "b.zarr.partial"
    for d in (old, fresh):
        (d / "_shards").mkdir(parents=True)
        (d / "_shards" / "000000.json").write_text("{}")
    week_ago = time.time() - 8 * 86400
    for p in [old, *old.rglob("*")]:
        os.utime(p, (week_ago, week_ago))
    assert shards.prune_stale_partials(tmp_path) == [old]
    assert not old.exists() and fresh.exists()
    nested = tmp_path / "bundles" / "k" / "deployment_model.123.partial"  # an export killed midway
    nested.mkdir(parents=True)
    os.utime(nested, (week_ago, week_ago))
    (tmp_path / "bundles" / "k" / "deployment_model").mkdir()  # finished outputs are never touched
    assert shards.prune_stale_partials(tmp_path / "bundles", patterns=("*.partial", "*/*.partial")) == [nested]
    assert (tmp_path / "bundles" / "k" / "deployment_model").is_dir()


# ------------------------------------------------------------------------- dataset generation resume


def test_dataset_generation_killed_midway_resumes_to_identical_output(tmp_path: Path) -> None:
    from tasks import generate_patch_dataset

    assoc = make_dataset(tmp_path / "raw", n=30, h=64, w=80, seed=2)
    kw = dict(val_size=0.3, test_size=0.2, patch_size=[32, 32], shard_images=3, fingerprint="f" * 64)
    generate_patch_dataset(
        assoc, CLASS_TO_IDX, output_folder=str(tmp_path / "ref"), mask_preprocessing=slow_identity, **kw
    )

    out = tmp_path / "ds"
    code = (
        "import json, sys; from tasks import generate_patch_dataset; "
        "from tests.test_crash_resume import slow_identity; "
        f"a = json.loads({json.dumps(json.dumps(assoc))}); "
        f"generate_patch_dataset(a, {CLASS_TO_IDX!r}, output_folder={str(out)!r}, mask_preprocessing=slow_identity, "
        f"**json.loads({json.dumps(json.dumps(kw))}))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, start_new_session=True)
    partial = tmp_path / f".ds.partial-{'f' * 16}"
    _kill_when(proc, lambda: len(list((partial / ".shards").glob("process-*.json"))) >= 3)
    assert not out.exists()  # nothing complete-looking
    kept = {}  # files of the shards that had finished before the kill, and their mtimes
    for marker in sorted((partial / ".shards").glob("process-*.json")):  # plain JSON state (never pickle)
        for res in json.loads(marker.read_text())["results"]:
            kept.update({rel: (partial / rel).stat().st_mtime_ns for rel in res["files"]})
    assert len(kept) > 10

    generate_patch_dataset(assoc, CLASS_TO_IDX, output_folder=str(out), mask_preprocessing=slow_identity, **kw)
    assert not partial.exists()
    assert tree_digest(out) == tree_digest(tmp_path / "ref")  # byte-identical to the uninterrupted build
    assert {rel: (out / rel).stat().st_mtime_ns for rel in kept} == kept  # finished shards were kept, not redone


# ----------------------------------------------------------------------- training: kill, resume, tamper


def _train_cfg(data: Path, tmp: Path, root: Path) -> dict:
    return {
        "datamodule": {"data_path": str(data), "batch_size": 16},
        "backbone": {"name": "mobilenet_v2", "weights": "imagenet"},
        "transforms": {"input_height": 96, "input_width": 96},
        "trainer": {"iteration_over_training": 6},
        "task": {"shard_patches": 16},
        "core": {"runs_folder": str(tmp / "runs")},
        "storage_root": str(root),
    }


def _stores(root: Path) -> dict[str, str]:
    from storage import features as fstore

    return {p.name: fstore.store_attrs(p)["content_digest"] for p in sorted((root / "features").glob("*.zarr"))}


def _runs_by_name(state) -> dict[str, list[str]]:
    from tests.conftest import task_runs

    out: dict[str, list[str]] = {}
    for r in task_runs(state):
        out.setdefault(r.name.rsplit("-", 1)[0], []).append(r.state.name)
    return out


def test_train_killed_in_feature_stage_resumes_identical_and_tampering_is_recomputed(
    demo_patch_dataset: Path, tmp_path: Path, prefect_harness
) -> None:
    import yaml

    from flows.train import train_flow
    from storage import features as fstore
    from storage.fingerprint import file_digest

    ref = train_flow(_train_cfg(demo_patch_dataset, tmp_path / "a", tmp_path / "ref_root"))

    root = tmp_path / "root"
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(yaml.safe_dump(_train_cfg(demo_patch_dataset, tmp_path / "b", root)))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "killed-home")  # its own ephemeral API, like a separate machine run
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.train", "--config", str(cfg_file)],
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def mid_features() -> bool:  # two passes finished and the next one has finished shards of its own
        feats = root / "features"
        done = [p for p in feats.glob("*.zarr") if (p / "_manifest.json").exists()] if feats.is_dir() else []
        partial = (
            [m for p in feats.glob("*.zarr.partial") for m in (p / "_shards").glob("shard-*.json")]
            if feats.is_dir()
            else []
        )
        return len(done) >= 2 and len(partial) >= 1

    _kill_when(proc, mid_features)
    finished_before = {p.name for p in (root / "features").glob("*.zarr")}
    assert not (root / "bundles").exists() or not any((root / "bundles").iterdir())

    state = train_flow(_train_cfg(demo_patch_dataset, tmp_path / "c", root), return_state=True)
    assert state.is_completed()
    res = state.result()
    runs = _runs_by_name(state)
    assert runs["train-pass-features"].count("Cached") >= len(finished_before) - 1  # finished passes reused
    assert _stores(root) == _stores(tmp_path / "ref_root")  # identical features to the uninterrupted run
    assert not list((root / "features").glob("*.partial"))
    # identical model, predictions, metrics and report
    X = fstore.load_features(
        next(p for p in (root / "features").glob("*.zarr") if fstore.store_attrs(p)["kind"] == "val")
    )[0]
    a = skops.io.load(Path(ref["bundle"]) / "classifier.skops")
    b = skops.io.load(Path(res["bundle"]) / "classifier.skops")
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    assert res["metrics"] == ref["metrics"]
    for name in ("report.html", "test_results.csv", "reconstruction_results.json"):
        assert file_digest(Path(res["output"]) / name) == file_digest(Path(ref["output"]) / name)

    # tampering: one feature chunk edited, the fitted classifier truncated, a validation file deleted
    pass_store = next(p for p in sorted((root / "features").glob("*.zarr")) if fstore.store_attrs(p)["kind"] == "train")
    chunk = next(p for p in sorted((pass_store / "features" / "c").rglob("*")) if p.is_file())
    chunk.write_bytes(bytes(x ^ 0x55 for x in chunk.read_bytes()))
    model = next((root / "models").glob("*.skops"))
    model.write_bytes(model.read_bytes()[:100])
    (next((root / "validation").iterdir()) / "test_results.csv").unlink()
    state = train_flow(_train_cfg(demo_patch_dataset, tmp_path / "d", root), return_state=True)
    runs = _runs_by_name(state)
    assert sorted(runs["train-pass-features"]).count("Completed") == 1  # only the edited pass is recomputed
    assert runs["fit-classifier"] == ["Completed"] and runs["validate-patches"] == ["Completed"]
    assert _stores(root) == _stores(tmp_path / "ref_root")
    assert state.result()["metrics"] == ref["metrics"]
