"""Where predict writes: an output folder apart from the images, names that never collide, verified outputs.

- The output folder may not be the images folder, hold it or lie inside it (:func:`check_output_folder`):
  outputs would overwrite images (``a.png``'s overlay is ``a_overlay.png``) and a rerun would read them
  as images. It must be a folder, not a file.
- Outputs keep the image's subfolder: ``sub1/dup.png`` -> ``<out>/sub1/dup_classmap.png``,
  ``dup_polygons.json`` and ``dup_overlay.png`` (:func:`plan_outputs`). Two images of one folder with the
  same stem (``a.png``, ``a.jpg``) are refused, as the dataset stage refuses them: their outputs would
  share names.
- ``predictions.json`` is written last; it records the run's cache key, each image's relative path and
  every output file's size and sha256, plus a digest of the record itself. :func:`outputs_problem` checks
  all of them, so a deleted, resized or edited output is recomputed, never served from the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from storage.fingerprint import canonical_json, file_digest
from storage.layout import write_atomic, write_json
from storage.paths import OutputFolderError, is_within, user_path
from tasks.imageio import InputDataError

PREDICTIONS_FILE = "predictions.json"
#: output kind -> suffix appended to the image's stem
OUTPUT_SUFFIXES = {"classmap": "_classmap.png", "polygons": "_polygons.json", "overlay": "_overlay.png"}
_RECORD_DIGEST = "record_sha256"
_OUT_FIX = "free disk space or choose another --out folder"


@dataclass(frozen=True)
class ImageOutputs:
    """One image and the output files it writes (paths relative to the output folder, ``/``-separated)."""

    image: Path
    rel: str
    files: dict[str, str]


def check_output_folder(images_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> Path:
    """The output folder (``~`` expanded, resolved); refuses one that is a file, is or holds the images
    folder, or lies inside it. Call before anything is written or deleted."""
    images, out = user_path(images_dir), user_path(out_dir)
    for p in (out, *out.parents):  # the first existing path must be a folder
        if p.exists():
            if not p.is_dir():
                where = "is a file" if p == out else f"is under {p}, which is a file"
                raise OutputFolderError(f"--out {out} {where}, not a folder; choose another --out folder")
            break
    if is_within(out, images) or is_within(images, out):
        how = "is" if out == images else "is inside" if is_within(out, images) else "holds"
        raise OutputFolderError(
            f"--out {out} {how} the --images folder {images}: predict would overwrite images with its outputs "
            f"and read its outputs as images on a rerun; choose an --out folder outside {images} that does not hold it"
        )
    return out


def plan_outputs(images_dir: str | os.PathLike[str], images: list[Path]) -> list[ImageOutputs]:
    """Output names of every image (its subfolder kept); refuses two images whose outputs would share a name."""
    root = Path(images_dir).expanduser()
    owner: dict[str, Path | None] = {PREDICTIONS_FILE: None}
    plan = []
    for path in images:
        rel = path.relative_to(root)
        files = {kind: rel.with_name(rel.stem + suffix).as_posix() for kind, suffix in OUTPUT_SUFFIXES.items()}
        for name in files.values():
            other = owner.setdefault(name, path)
            if other is not path:
                raise InputDataError(_clash(path, other, name))
        plan.append(ImageOutputs(path, rel.as_posix(), files))
    folders = {parent.as_posix(): p for p in plan for name in p.files.values() for parent in Path(name).parents}
    for name, other in owner.items():  # a subfolder named like another image's output (or predictions.json)
        if name in folders:
            raise InputDataError(_clash(folders[name].image, other, name))
    return plan


def _clash(path: Path, other: Path | None, name: str) -> str:
    if other is None:
        return f"{path} would write into --out/{name}, which is predict's own {PREDICTIONS_FILE}; rename its folder"
    if other.parent == path.parent and other.stem == path.stem:
        return (
            f"images {other} and {path} have the same stem {path.stem!r} in one folder, so both would write "
            f"{name}; rename or remove one of them"
        )
    return f"images {other} and {path} would both write {name}; rename or move one of them"


def write_output(out_dir: Path, name: str, data: bytes) -> dict[str, Any]:
    """Write ``out_dir/name`` atomically (creating its subfolder); returns its record: file, size and sha256."""
    path = Path(out_dir) / name
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
    except OSError as exc:
        raise OSError(f"could not write {path} ({exc.strerror or exc}); {_OUT_FIX}") from exc
    return {"file": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _record_digest(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != _RECORD_DIGEST}
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def write_predictions(out_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write ``predictions.json`` (the completion marker: call last) with the digest of its own content."""
    record = {**record, _RECORD_DIGEST: _record_digest(record)}
    write_json(Path(out_dir) / PREDICTIONS_FILE, record)
    return record


def outputs_problem(out_dir: str | os.PathLike[str], key: str | None) -> str | None:
    """``None`` when ``out_dir`` holds a finished prediction of ``key`` whose files are all unchanged, else why not."""
    marker = user_path(out_dir) / PREDICTIONS_FILE
    try:
        record = json.loads(marker.read_text())
        outputs = [f for item in record["images"] for f in item["outputs"].values()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{marker} is missing or unreadable"
    if record.get(_RECORD_DIGEST) != _record_digest(record):
        return f"{marker} was edited"
    if key is not None and record.get("key") != key:
        return f"{marker} is from another run (other images, model or method)"
    for f in outputs:
        path = marker.parent / f["file"]
        if not path.is_file():
            return f"{path} was deleted"
        size = path.stat().st_size
        if size != f["size"]:
            return f"{path} changed size ({f['size']} -> {size} bytes)"
        try:
            if file_digest(path) != f["sha256"]:
                return f"{path} was modified"
        except OSError:
            return f"{path} is unreadable"
    return None
