"""Prediction on raw images of any size with a deployment bundle: no dataset step.

Each image is tiled with the bundle's grid (the same as training), patches of several images are batched
together through the backbone and the classifier, and each image's probabilities are merged back into a class
map and polygons by the in-process :class:`~tasks.predict.predictor.Predictor` (two-part runtime, the
evaluation's), on the one inferer (:mod:`tasks.evaluation.inferer`, shared with scoring). Per image it
writes ``<sub>/<stem>_classmap.png`` (class index per pixel), ``<sub>/<stem>_polygons.json`` and
``<sub>/<stem>_overlay.png`` (``<sub>``: the image's subfolder under the images folder), then
``predictions.json`` last. Output folder rules and naming: :mod:`tasks.predict.outputs`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from storage.bundle import Bundle, open_bundle, reopen_bundle
from storage.fingerprint import combine, files_digest, params_digest
from storage.layout import IMAGE_EXTENSIONS
from storage.paths import user_path
from tasks.evaluation.figures import colourise
from tasks.evaluation.inferer import ImagePrediction
from tasks.imageio import bundle_decoding, encode_png, read_image
from tasks.predict.config import PredictFlowConfig
from tasks.predict.outputs import (
    PREDICTIONS_FILE,
    ImageOutputs,
    check_output_folder,
    outputs_problem,
    plan_outputs,
    write_output,
    write_predictions,
)
from tasks.predict.predictor import Predictor

logger = logging.getLogger("patchflow.predict")


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted); a clear error when there are none."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"images folder {folder} {what}; point --images at a folder of images")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return files


def predict_images(
    model: str | Path | Bundle,
    images_dir: Path,
    out_dir: Path,
    method: str | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    key: str | None = None,
    max_image_pixels: int | None = None,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Predict every image of ``images_dir`` and write its class map, polygons and overlay into ``out_dir``.

    ``model``: an opened :class:`~storage.bundle.Bundle`, or its path (then opened here: every file checked
    against the manifest first). ``key`` (the flow's cache key) is recorded in ``predictions.json`` so the
    flow can tell its own outputs. ``max_image_pixels``: larger images are refused from their header (None:
    ``$PATCHFLOW_MAX_IMAGE_PIXELS``, else 200 MP). ``trust_pickle``: load a bundle without a manifest or with a
    pickled classifier (runs the code it holds).
    """
    bundle = model if isinstance(model, Bundle) else open_bundle(model, trust_pickle)
    decoding = bundle_decoding(
        bundle.meta, bundle.root, max_image_pixels, "--max-image-pixels" if max_image_pixels else None
    )
    images = list_images(images_dir)
    out_dir = check_output_folder(images_dir, out_dir)  # before anything is written or deleted
    plan = {p.image: p for p in plan_outputs(images_dir, images)}
    # a predictions.json left by an earlier run would make a failed run look complete (it is written last)
    (out_dir / PREDICTIONS_FILE).unlink(missing_ok=True)
    # the Predictor's two-part runtime: the evaluation's backbone and classifier (checked to fit, before any image
    # is read), so predict's maps are the evaluation's
    predictor = Predictor.load(bundle, device, "two-part", method, batch_size, max_image_pixels=max_image_pixels)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    read = ((path, read_image(path, decoding)) for path in images)  # pixel limit from the header first
    summary = [_write_image(out_dir, plan[path], image, pred) for path, image, pred in predictor.infer(read)]
    timing = {"extract_s": predictor.model.extract_s, "wall_s": time.perf_counter() - t0}
    result = {
        "model": str(bundle.root),
        "method": predictor.method,
        "key": key,
        "out": str(out_dir),
        "images": summary,
        "timing": timing,
    }
    return write_predictions(out_dir, result)


def _write_image(out_dir: Path, names: ImageOutputs, image: np.ndarray, pred: ImagePrediction) -> dict[str, Any]:
    """Write one image's class map, polygons and overlay; its entry of ``predictions.json``."""
    files = names.files
    data = {
        "classmap": encode_png(pred.class_map.astype(np.uint8), files["classmap"]),
        "polygons": (json.dumps({"image": str(names.image), "prediction": pred.polygons}, indent=1) + "\n").encode(),
        "overlay": encode_png(colourise(image, pred.class_map), files["overlay"]),
    }
    outputs = {kind: write_output(out_dir, files[kind], data[kind]) for kind in ("classmap", "polygons", "overlay")}
    return {
        "image": str(names.image),
        "relative_path": names.rel,
        "defect_regions": len(pred.polygons),
        "defect_pixels": pred.defect_pixels,
        "classes": pred.defect_classes,
        "outputs": outputs,
    }


def prediction_key(bundle: Bundle, images_dir: str | Path, out_dir: str | Path, method: str | None) -> str:
    """Content key: bundle files, image bytes and names, method and the output folder."""
    images_dir = Path(images_dir).expanduser()
    files = list_images(images_dir)
    return combine(
        "predict",
        bundle.digest,
        files_digest(files),
        params_digest(
            {
                "names": [p.relative_to(images_dir).as_posix() for p in files],
                "method": method,
                "out": str(user_path(out_dir)),
            }
        ),
    )


def predictions_verified(key: str) -> Callable[[Path], bool]:
    """The predict stage's check: ``out`` holds this run's ``predictions.json`` and every output it lists is
    unchanged (deleted, resized or edited outputs are recomputed, never served); logs why when not."""

    def verify(out: Path) -> bool:
        problem = outputs_problem(out, key)
        if problem is not None:
            logger.info("computing predictions (%s)", problem)
        return problem is None

    return verify


@task(name="predict-images", persist_result=True)
def predict_task(cfg: PredictFlowConfig, bundle_root: str, bundle_digest: str, key: str, out: str) -> dict[str, Any]:
    """Predict a folder of images (cached on ``key``) with the bundle the flow opened."""
    bundle = reopen_bundle(bundle_root, bundle_digest, cfg.trust_pickle)
    return predict_images(
        bundle,
        Path(cfg.images),
        Path(out),
        cfg.method,
        cfg.batch_size,
        cfg.device,
        key=key,
        max_image_pixels=cfg.max_image_pixels,
    )
