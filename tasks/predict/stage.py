"""Prediction on raw images of any size with a deployment bundle: no dataset step.

Each image is tiled with the bundle's geometry (the same grid as training), patches of several
images are batched together through the backbone, the classifier's probabilities are merged back
into a class map, and per image the flow writes ``<sub>/<stem>_classmap.png`` (class index per pixel),
``<sub>/<stem>_polygons.json`` and ``<sub>/<stem>_overlay.png`` (``<sub>``: the image's subfolder under
the images folder), then ``predictions.json`` last. Output folder rules and naming: :mod:`tasks.predict.outputs`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from prefect import task

from storage import bundle as bdl
from storage.fingerprint import combine, files_digest, params_digest
from storage.geometry import PatchGrid, compute_grid
from storage.layout import IMAGE_EXTENSIONS
from storage.paths import user_path
from tasks.features.export import load_export
from tasks.features.extractor import FeatureExtractor
from tasks.evaluation.scoring import full_probabilities
from tasks.features.store import feature_dim_of
from tasks.imageio import Decoding, bundle_decoding, encode_png, read_image
from tasks.predict.outputs import (
    PREDICTIONS_FILE,
    ImageOutputs,
    check_output_folder,
    plan_outputs,
    write_output,
    write_predictions,
)
from tasks.evaluation.reconstruction import make_merger, mean_probabilities
from tasks.evaluation.region_metrics import prediction_polygons
from tasks.evaluation.report import colourise

logger = logging.getLogger("patchflow.predict")

def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted); a clear error when there are none."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"images folder {folder} {what}; point --images at a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return files


@dataclass
class _Image:
    path: Path
    image: np.ndarray
    grid: PatchGrid


def _tiles(images: list[Path], geometry: dict[str, Any],
           decoding: Decoding) -> Iterator[tuple[_Image, list[np.ndarray]]]:
    for path in images:
        img = read_image(path, decoding)  # pixel limit from the header first; 16-bit images by the bundle's rule
        grid = compute_grid(img.shape[0], img.shape[1], geometry["patch_number"], geometry["patch_size"], geometry["overlap"])
        padded = grid.pad(img)
        yield _Image(path, img, grid), [padded[y0:y1, x0:x1] for y0, x0, y1, x1 in grid.boxes().tolist()]


def predict_images(
    model_path: Path, images_dir: Path, out_dir: Path, method: str | None = None, batch_size: int = 32, device: str = "cpu",
    key: str | None = None,
    max_image_pixels: int | None = None,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Predict every image of ``images_dir`` and write its class map, polygons and overlay into ``out_dir``.

    ``key`` (the flow's cache key) is recorded in ``predictions.json`` so the flow can tell its own outputs.
    ``max_image_pixels``: larger images are refused from their header (None: ``$PATCHFLOW_MAX_IMAGE_PIXELS``,
    else 200 MP).
    ``trust_pickle``: load a bundle without a manifest or with a pickled classifier (runs the code it holds).
    """
    root, meta = bdl.open_bundle(model_path, trust_pickle)  # every file checked against the manifest first
    classes = bdl.class_to_idx(meta)
    idx_to_class = {v: k for k, v in classes.items()}
    num_classes = max(classes.values()) + 1
    method = method or meta.get("reconstruction_method") or "major_voting"
    geometry = bdl.geometry(meta)
    size = bdl.input_size(meta)
    decoding = bundle_decoding(meta, root, max_image_pixels, "--max-image-pixels" if max_image_pixels else None)
    images = list_images(images_dir)
    out_dir = check_output_folder(images_dir, out_dir)  # before anything is written or deleted
    plan = {p.image: p for p in plan_outputs(images_dir, images)}
    # a predictions.json left by an earlier run would make a failed run look complete (it is written last)
    (out_dir / PREDICTIONS_FILE).unlink(missing_ok=True)
    est = bdl.load_classifier(root, meta, trust_pickle)
    backbone_path = bdl.backbone_file(root, meta)
    extractor = FeatureExtractor(load_export(backbone_path, meta.get("backbone")),
                                 "cpu" if backbone_path.suffix == ".onnx" else device, batch_size=batch_size)
    bdl.check_width(root, est, feature_dim_of(extractor, size))  # before any image is read
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = []
    timing = {"extract_s": 0.0}
    t0 = time.perf_counter()
    pending: list[tuple[_Image, int]] = []  # images whose patches are in the current batch, with their count
    patches: list[np.ndarray] = []

    def flush() -> None:
        if not patches:
            return
        t = time.perf_counter()
        feats = extractor.extract(patches, size, meta["mean"], meta["std"])
        timing["extract_s"] += time.perf_counter() - t
        proba = full_probabilities(est.predict_proba(feats), est.classes_, num_classes)
        start = 0
        for item, n in pending:
            part = proba[start : start + n]
            summary.append(_finish(item, plan[item.path], part, method, num_classes, idx_to_class, out_dir))
            start += n
        pending.clear()
        patches.clear()

    for item, tiles in _tiles(images, geometry, decoding):
        pending.append((item, len(tiles)))
        patches.extend(tiles)
        if len(patches) >= batch_size:
            flush()
    flush()
    timing["wall_s"] = time.perf_counter() - t0
    result = {"model": str(root), "method": method, "key": key, "out": str(out_dir), "images": summary,
              "timing": timing}
    return write_predictions(out_dir, result)


def _finish(
    item: _Image, names: ImageOutputs, proba: np.ndarray, method: str, num_classes: int,
    idx_to_class: dict[int, str], out_dir: Path,
) -> dict[str, Any]:
    idx = np.arange(item.grid.num_patches)
    labels = proba.argmax(axis=1)
    merger = make_merger(method, item.grid, num_classes)
    merger.add(idx, labels, proba)
    class_map = merger.finalize()
    mean_prob = mean_probabilities(merger, idx, labels, proba) if class_map.any() else None  # only polygons use it
    polygons = prediction_polygons(class_map, idx_to_class, mean_prob, item.grid.boxes(), labels)
    files = names.files
    data = {
        "classmap": encode_png(class_map.astype(np.uint8), files["classmap"]),
        "polygons": (json.dumps({"image": str(item.path), "prediction": polygons}, indent=1) + "\n").encode(),
        "overlay": encode_png(colourise(item.image, class_map), files["overlay"]),
    }
    outputs = {kind: write_output(out_dir, files[kind], data[kind]) for kind in ("classmap", "polygons", "overlay")}
    return {"image": str(item.path), "relative_path": names.rel, "defect_regions": len(polygons),
            "defect_pixels": int((class_map > 0).sum()), "classes": sorted({p["label"] for p in polygons}),
            "outputs": outputs}


def prediction_key(model_path: Path, images_dir: Path, out_dir: Path, method: str | None) -> str:
    """Content key: bundle files, image bytes and names, method and the output folder."""
    root = bdl.resolve_bundle(model_path)
    images_dir = Path(images_dir).expanduser()
    files = list_images(images_dir)
    return combine("predict", bdl.bundle_digest(root), files_digest(files), params_digest({
        "names": [p.relative_to(images_dir).as_posix() for p in files], "method": method,
        "out": str(user_path(out_dir)),
    }))


@task(name="predict-images", persist_result=True)
def predict_task(model_path: str, images_dir: str, out_dir: str, method: str | None, batch_size: int, device: str,
                 key: str, max_image_pixels: int | None = None, trust_pickle: bool = False) -> dict[str, Any]:
    """Predict a folder of images (cached on ``key``)."""
    return predict_images(Path(model_path), Path(images_dir), Path(out_dir), method, batch_size, device, key=key,
                          max_image_pixels=max_image_pixels, trust_pickle=trust_pickle)
