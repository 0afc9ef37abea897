"""In-process prediction with a deployment bundle: no Prefect, no server, no files written.

    from tasks import Predictor
    p = Predictor.load("runs/.../deployment_model", device="cpu")
    r = p.predict("image.png")            # or an HxW / HxWxC numpy array (BGR, grayscale, 16-bit), or file bytes
    r.class_map, r.polygons, r.summary    # r.probabilities with p.predict(image, probabilities=True)

The bundle is opened as every flow opens it (every file checked against its manifest first) and read from its
``model.json``: patch grid, preprocessing, class map, reconstruction rule, 16-bit rule. On the CPU the default
runtime is the one-file model (``model_full.onnx``: ONNX Runtime only, no pickle or skops loaded, no torch
imported); otherwise, or with ``runtime="two-part"``, the backbone export and ``classifier.skops``
(:class:`~tasks.evaluation.inferer.BundleModel`). Either way each image goes through the one inferer of
:mod:`tasks.evaluation.inferer` (grid -> patch probabilities -> merger -> class map -> polygons) that
``flows.predict`` and the evaluation use too.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from storage.bundle import Bundle, BundleError, open_bundle
from tasks.evaluation.inferer import BundleModel, FullModel, ImagePrediction, PatchInferer, infer_images
from tasks.imageio import (
    Decoding,
    InputDataError,
    UnsupportedPixelsError,
    as_bgr,
    bundle_decoding,
    check_pixels,
    decode_image,
    read_image,
)

K = TypeVar("K")
RUNTIMES = ("auto", "full-onnx", "two-part")
#: an image: a file path, file bytes (an image file or a NumPy ``.npy`` array), or a decoded HxW / HxWxC array (BGR,
#: grayscale or 16-bit)
ImageInput = str | Path | bytes | np.ndarray


@dataclass
class Prediction:
    """One image's prediction.

    ``class_map``: (H, W) int32 class index per pixel; ``polygons``: each defect region (``label``, ``points``
    (exterior), ``holes``, ``area``, ``mean_probability``/``max_probability``, ``supporting_patches``);
    ``summary``: image size, patches, defect regions/pixels and per class its ``regions``, ``pixels`` and
    ``max_probability`` (the highest probability any patch gave it); ``probabilities``: (C, H, W) mean class
    probability per pixel when asked for; ``patch_probabilities``: (N, C) of the grid's patches."""

    class_map: np.ndarray
    polygons: list[dict[str, Any]]
    summary: dict[str, Any]
    patch_probabilities: np.ndarray
    probabilities: np.ndarray | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        """Polygons and summary as plain JSON types."""
        return {"polygons": self.polygons, "summary": self.summary}


def summarise(pred: ImagePrediction, classes: dict[str, int]) -> dict[str, Any]:
    """The per-class summary of one image's prediction (see :class:`Prediction`)."""
    counts = np.bincount(pred.class_map.ravel(), minlength=max(classes.values()) + 1)
    per_class = {}
    for name, idx in sorted(classes.items(), key=lambda kv: kv[1]):
        column = pred.probabilities[:, idx] if len(pred.probabilities) else np.zeros(1)
        per_class[name] = {
            "index": idx,
            "regions": sum(1 for p in pred.polygons if p["label"] == name),
            "pixels": int(counts[idx]),
            "max_probability": round(float(column.max()), 6),
        }
    return {
        "height": int(pred.class_map.shape[0]),
        "width": int(pred.class_map.shape[1]),
        "patches": int(len(pred.patch_index)),
        "defect_regions": len(pred.polygons),
        "defect_pixels": pred.defect_pixels,
        "defect_classes": pred.defect_classes,
        "classes": per_class,
    }


class Predictor:
    """A loaded bundle that predicts images in this process (see the module docstring)."""

    def __init__(
        self, bundle: Bundle, model: BundleModel | FullModel, method: str, decoding: Decoding, batch_size: int
    ) -> None:
        self.bundle = bundle
        self.model = model
        self.method = method
        self.decoding = decoding
        self.batch_size = int(batch_size)
        self.runtime = "full-onnx" if isinstance(model, FullModel) else "two-part"
        self._inferers = {pp: PatchInferer(method, bundle.classes, per_pixel=pp) for pp in (False, True)}

    @classmethod
    def load(
        cls,
        bundle: str | Path | Bundle,
        device: str = "cpu",
        runtime: str = "auto",
        method: str | None = None,
        batch_size: int = 32,
        trust_pickle: bool = False,
        max_image_pixels: int | None = None,
        threads: int | None = None,
    ) -> Predictor:
        """Open the bundle (verified against its manifest) and load its model once.

        ``runtime``: ``"auto"`` (the one-file model on the CPU when the bundle has one, else two parts),
        ``"full-onnx"`` or ``"two-part"``. ``method``: reconstruction rule (default: ``model.json``'s).
        ``trust_pickle``: a bundle without a manifest or with a pickled classifier (its files may run code).
        ``max_image_pixels``: larger images are refused from their header (None: the environment's limit).
        ``threads``: ONNX Runtime's intra-op threads for the one-file model (None: its default, one per core)."""
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        if str(device) != "cpu":  # cpu needs no torch; a missing CUDA device is one line, never a CPU fallback
            from tasks.device import resolve_device

            resolve_device(device, "device")
        opened = bundle if isinstance(bundle, Bundle) else open_bundle(bundle, trust_pickle)
        full = opened.full_model_file is not None and str(device) == "cpu"
        if runtime == "full-onnx" and not full:
            where = f"device {device}" if opened.full_model_file else f"bundle {opened.root} (no model_full.onnx)"
            raise BundleError(f"runtime full-onnx is not available for {where}; use runtime='two-part'")
        decoding = bundle_decoding(opened.meta, opened.root, max_image_pixels)
        if runtime == "two-part" or not full:
            model: BundleModel | FullModel = BundleModel.load(opened, device, batch_size)
        else:
            model = FullModel.load(opened, batch_size, threads)
        chosen = method or opened.meta.get("reconstruction_method") or "major_voting"
        return cls(opened, model, chosen, decoding, batch_size)

    @property
    def classes(self) -> dict[str, int]:
        """Class map (name -> index) of the bundle."""
        return self.bundle.classes

    def image(self, image: ImageInput, name: str = "image") -> np.ndarray:
        """``image`` as BGR uint8 (H, W, 3): a path or file bytes decoded (pixel limit from the header first,
        16-bit by the bundle's rule), an array converted (grayscale, BGRA, 16-bit). Bytes of a NumPy ``.npy``
        file (``np.save``: raw camera frames, no encoding) are read as that array (never unpickled)."""
        if isinstance(image, (str, Path)):
            return read_image(image, self.decoding)
        if isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
            if data.startswith(NPY_MAGIC):
                return self.image(npy_array(data, name, self.decoding), name)
            return decode_image(data, name, decoding=self.decoding)
        arr = np.asarray(image)
        if arr.ndim >= 2:
            check_pixels(arr.shape[0], arr.shape[1], name, self.decoding)
        return as_bgr(arr, self.decoding.sixteen_bit, name)

    def infer(
        self, images: Iterable[tuple[K, np.ndarray]], probabilities: bool = False
    ) -> Iterator[tuple[K, np.ndarray, ImagePrediction]]:
        """``(key, image, prediction)`` of each ``(key, BGR uint8 image)``, in order, patches of several images
        batched together (the shared core of :meth:`predict_batch` and ``flows.predict``)."""
        return infer_images(
            images, self.bundle.grid_spec, self.model.probabilities, self._inferers[probabilities], self.batch_size
        )

    def predict(self, image: ImageInput, probabilities: bool = False) -> Prediction:
        """The prediction of one image (path, bytes or array); ``probabilities``: keep the per-pixel soft map."""
        return self.predict_batch([image], probabilities)[0]

    def predict_batch(self, images: Sequence[ImageInput], probabilities: bool = False) -> list[Prediction]:
        """The predictions of several images, their patches batched together through the model."""
        named = [(i, self.image(img, _name(img, i))) for i, img in enumerate(images)]
        return [self.result(pred) for _, _, pred in self.infer(named, probabilities)]

    def result(self, pred: ImagePrediction) -> Prediction:
        """A :class:`Prediction` from the inferer's :class:`ImagePrediction`."""
        summary = summarise(pred, self.classes)
        return Prediction(pred.class_map, pred.polygons, summary, pred.probabilities, pred.mean_probabilities)


NPY_MAGIC = b"\x93NUMPY"


def npy_array(data: bytes, name: str, decoding: Decoding) -> np.ndarray:
    """The array of a ``.npy`` file's bytes: shape and pixel limit read from its header first, no pickle."""
    import io

    fh = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape = read_header(fh)[0]
    except Exception as exc:
        raise _npy_error(name, exc) from None
    if len(shape) not in (2, 3):
        raise UnsupportedPixelsError(
            f"{name}: a .npy array of shape {shape} is not an image; send HxW (gray), HxWx3 (BGR) or HxWx4 (BGRA)"
        )
    check_pixels(shape[0], shape[1], name, decoding)
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise _npy_error(name, exc) from None


def _npy_error(name: str, exc: BaseException) -> InputDataError:
    return InputDataError(f"{name}: not a readable .npy array ({_line(exc)}); send np.save of an HxW or HxWxC array")


def _name(image: ImageInput, i: int) -> str:
    return str(image) if isinstance(image, (str, Path)) else f"image {i}"


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]
