"""Manifests of finished outputs: what counts as unchanged, what is caught."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from storage.manifest import (
    MANIFEST_FILE,
    building,
    file_matches,
    manifest_problem,
    matches_manifest,
    write_file_digest,
    write_manifest,
)


def _tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.bin").write_bytes(bytes(range(200)))
    return root


def test_unchanged_and_copied_outputs_match(tmp_path: Path) -> None:
    root = _tree(tmp_path / "out")
    write_manifest(root)
    assert matches_manifest(root)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, copy_function=shutil.copy)  # new mtimes, same bytes: re-hashed and accepted
    assert matches_manifest(copy)
    manifest = (root / MANIFEST_FILE).read_text()
    write_manifest(copy)
    assert (copy / MANIFEST_FILE).read_text() == manifest  # deterministic: no timestamps in the manifest


def test_changes_are_caught(tmp_path: Path) -> None:
    root = _tree(tmp_path / "out")
    write_manifest(root)
    (root / "sub" / "b.bin").write_bytes(bytes(range(1, 201)))  # same size, other bytes
    assert "was modified" in manifest_problem(root)
    write_manifest(root)
    (root / "a.txt").write_text("alph")
    assert "changed size" in manifest_problem(root)
    write_manifest(root)
    (root / "a.txt").unlink()
    assert "was deleted" in manifest_problem(root)
    write_manifest(root)
    (root / "extra.txt").write_text("x")
    assert "was added" in manifest_problem(root)
    (root / "extra.txt").unlink()
    (root / ".hidden").write_text("editor swap file")  # hidden files are not outputs
    assert matches_manifest(root)
    (root / MANIFEST_FILE).unlink()
    assert "missing" in manifest_problem(root)
    assert not matches_manifest(tmp_path / "nowhere")


def test_building_publishes_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "result"
    try:
        with building(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("crash")
    except RuntimeError:
        pass
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    with building(out) as tmp:
        (tmp / "full.txt").write_text("full")
    assert (out / "full.txt").read_text() == "full" and matches_manifest(out)


def test_file_digest(tmp_path: Path) -> None:
    f = tmp_path / "model.joblib"
    f.write_bytes(b"weights")
    assert not file_matches(f)
    write_file_digest(f)
    assert file_matches(f)
    f.write_bytes(b"weightz")
    assert not file_matches(f)
    os.remove(f)
    assert not file_matches(f)
