"""The one per-image inference path: patch grid -> patch class probabilities -> merger -> class map -> mean
probabilities -> polygons. Shaped after MONAI's ``monai/inferers`` (Splitter / Merger / PatchInferer):

- splitting: :meth:`storage.geometry.GridSpec.grid` places the patches, :func:`split_image` cuts them
  (padded bottom/right as the dataset stage does);
- merging: :func:`tasks.evaluation.reconstruction.make_merger` (one merger per image and method);
- :class:`PatchInferer` turns one image's patch probabilities into an :class:`ImagePrediction`. Scoring
  calls it with probabilities of stored features (patches already split, like MONAI's ``splitter=None``);
  :func:`infer_images` splits images, batches their patches across images through a ``classify`` callable
  and calls it for each image once its patches are scored (predict);
- :class:`BundleModel`: a bundle's backbone and classifier as that callable (patches -> probabilities);
  :class:`FullModel`: the same from the bundle's one-file ONNX model (``model_full.onnx``: no torch, no pickle).

Nothing here needs Prefect: the in-process :class:`tasks.predict.predictor.Predictor` is a model + ``PatchInferer``
+ ``infer_images``, and ``flows.predict`` runs through it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from storage.bundle import Bundle
from storage.geometry import GridSpec, PatchGrid
from tasks.evaluation.reconstruction import make_merger, mean_probabilities
from tasks.evaluation.region_metrics import prediction_polygons

K = TypeVar("K")


def full_probabilities(proba: np.ndarray, classes: Sequence[int], num_classes: int) -> np.ndarray:
    """(N, num_classes) probabilities from a classifier's ``predict_proba`` over its ``classes_``."""
    out = np.zeros((proba.shape[0], num_classes), dtype=np.float32)
    out[:, np.asarray(classes, dtype=np.int64)] = proba
    return out


def split_image(image: np.ndarray, grid: PatchGrid) -> list[np.ndarray]:
    """The patches of ``image`` in patch-index order (the image padded as :meth:`PatchGrid.pad` says)."""
    padded = grid.pad(image)
    return [padded[y0:y1, x0:x1] for y0, x0, y1, x1 in grid.boxes().tolist()]


@dataclass
class ImagePrediction:
    """One image's prediction: its grid, the patches that voted, the class map and the defect polygons."""

    grid: PatchGrid
    patch_index: np.ndarray  # (N,) grid index of each patch given
    labels: np.ndarray  # (N,) predicted class index of each patch
    probabilities: np.ndarray  # (N, C) class probabilities of each patch
    class_map: np.ndarray  # (H, W) int32 class index per pixel, the original image size
    polygons: list[dict[str, Any]]  # label, points, holes, area, mean/max probability, supporting patches
    mean_probabilities: np.ndarray | None = field(default=None)  # (C, H, W), when asked for (PatchInferer.per_pixel)

    @property
    def defect_pixels(self) -> int:
        """Pixels predicted as a defect class."""
        return int((self.class_map > 0).sum())

    @property
    def defect_classes(self) -> list[str]:
        """Names of the classes of the predicted regions, sorted."""
        return sorted({p["label"] for p in self.polygons})


class PatchInferer:
    """Merges one image's patch predictions with ``method`` into an :class:`ImagePrediction`.

    ``thresholds``: per-class-index minimum mean probability (soft method); ``good``: annotated-good class
    indices, shown as background in the class map; ``per_pixel``: keep the (C, H, W) mean probabilities
    (otherwise computed only for the polygons of images with a predicted defect)."""

    def __init__(
        self,
        method: str,
        class_to_idx: dict[str, int],
        thresholds: Sequence[float] | None = None,
        good: Collection[int] = (),
        per_pixel: bool = False,
    ) -> None:
        self.method = method
        self.idx_to_class = {v: k for k, v in class_to_idx.items()}
        self.num_classes = max(class_to_idx.values()) + 1
        self.thresholds = thresholds
        self.good = sorted(good)
        self.per_pixel = per_pixel

    def merge(
        self,
        grid: PatchGrid,
        probabilities: np.ndarray,
        patch_index: np.ndarray | None = None,
        labels: np.ndarray | None = None,
    ) -> ImagePrediction:
        """Prediction of the image of ``grid`` from its patches' (N, C) ``probabilities``.

        ``patch_index``: the grid index of each row (default: every patch of the grid, in order); ``labels``: the
        predicted class of each row (default: the most probable one)."""
        idx = np.arange(grid.num_patches) if patch_index is None else np.asarray(patch_index)
        labels = probabilities.argmax(axis=1) if labels is None else labels
        merger = make_merger(self.method, grid, self.num_classes, self.thresholds)
        merger.add(idx, labels, probabilities)
        class_map = merger.finalize()
        if self.good:
            class_map[np.isin(class_map, self.good)] = 0  # annotated-good classes are good in maps (B3 fixed)
        needed = self.per_pixel or class_map.any()  # per-pixel probabilities only feed the polygons of defects
        mean = mean_probabilities(merger, idx, labels, probabilities) if needed else None
        boxes = grid.boxes()[idx] if len(idx) else None
        polygons = prediction_polygons(class_map, self.idx_to_class, mean, boxes, labels)
        return ImagePrediction(grid, idx, labels, probabilities, class_map, polygons, mean if self.per_pixel else None)


def infer_images(
    images: Iterable[tuple[K, np.ndarray]],
    spec: GridSpec,
    classify: Callable[[list[np.ndarray]], np.ndarray],
    inferer: PatchInferer,
    batch_size: int,
) -> Iterator[tuple[K, np.ndarray, ImagePrediction]]:
    """``(key, image, prediction)`` of each ``(key, image)``, in order. Patches of several images share a
    ``classify`` call (patches -> (N, C) probabilities) of at least ``batch_size`` patches (the last may be
    smaller); an image is yielded as soon as its batch is scored, and images are read as they are needed."""
    pending: list[tuple[K, np.ndarray, PatchGrid, int]] = []
    patches: list[np.ndarray] = []
    for key, image in images:
        grid = spec.grid(image.shape[0], image.shape[1])
        tiles = split_image(image, grid)
        pending.append((key, image, grid, len(tiles)))
        patches.extend(tiles)
        if len(patches) >= batch_size:
            yield from _scored(pending, classify(patches), inferer)
            pending, patches = [], []
    if patches:
        yield from _scored(pending, classify(patches), inferer)


def _scored(
    pending: list[tuple[K, np.ndarray, PatchGrid, int]], proba: np.ndarray, inferer: PatchInferer
) -> Iterator[tuple[K, np.ndarray, ImagePrediction]]:
    start = 0
    for key, image, grid, n in pending:
        yield key, image, inferer.merge(grid, proba[start : start + n])
        start += n


def gpu_backbone_file(bundle: Bundle, device: str) -> Path:
    """The bundle's backbone export to run on ``device``: :attr:`Bundle.backbone_file`, except that an ONNX export is
    passed over on a GPU when ONNX Runtime has no CUDA provider and the bundle holds a torch export (still the GPU)."""
    path = bundle.backbone_file
    if path.suffix != ".onnx" or str(device).strip().lower() == "cpu" or _onnx_has_cuda():
        return path
    for name in ("model.pt", "model.pth"):
        if (bundle.root / name).is_file():
            return bundle.root / name
    return path  # the ONNX session then refuses the device in one line (tasks.device.onnx_providers)


def _onnx_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


@dataclass
class BundleModel:
    """A bundle's backbone and classifier, checked to fit each other: raw BGR patches -> class probabilities."""

    bundle: Bundle
    extractor: Any  # tasks.features.extractor.FeatureExtractor
    classifier: Any
    extract_s: float = 0.0  # seconds spent in the backbone so far

    @classmethod
    def load(cls, bundle: Bundle, device: str = "cpu", batch_size: int = 64) -> BundleModel:
        """Load the classifier, then the backbone export onto ``device`` (cpu, cuda, cuda:N: checked by
        :func:`tasks.device.resolve_device`, never a CPU fallback), and refuse a classifier whose feature length is not
        the backbone's before any image is read. Exports are device-independent (a bundle trained on the CPU runs on a
        GPU and the reverse); an ONNX backbone runs on a GPU with onnxruntime-gpu, else the bundle's torch export."""
        from tasks.features.export import load_export
        from tasks.features.extractor import FeatureExtractor
        from tasks.features.store import feature_dim_of

        est = bundle.load_classifier()
        path = gpu_backbone_file(bundle, device)
        extractor = FeatureExtractor(
            load_export(path, bundle.meta.get("backbone"), device), device, batch_size=batch_size
        )
        bundle.check_width(est, feature_dim_of(extractor, bundle.input_size))
        return cls(bundle, extractor, est)

    def features(self, patches: list[np.ndarray]) -> np.ndarray:
        """(N, D) backbone features of raw BGR patches, preprocessed as the bundle says."""
        t = time.perf_counter()
        feats = self.extractor.extract(
            patches, self.bundle.input_size, self.bundle.meta["mean"], self.bundle.meta["std"]
        )
        self.extract_s += time.perf_counter() - t
        return feats

    def probabilities(self, patches: list[np.ndarray]) -> np.ndarray:
        """(N, C) class probabilities over every class index of the bundle."""
        proba = self.classifier.predict_proba(self.features(patches))
        return full_probabilities(proba, self.classifier.classes_, max(self.bundle.classes.values()) + 1)


@dataclass
class FullModel:
    """A bundle's one-file ONNX model (``model_full.onnx``, ONNX Runtime on the CPU): raw BGR patches -> class
    probabilities. Loading it reads no pickle and imports no torch."""

    bundle: Bundle
    session: Any  # onnxruntime.InferenceSession
    batch_size: int = 64
    extract_s: float = 0.0  # seconds spent in the graph so far

    @classmethod
    def load(cls, bundle: Bundle, batch_size: int = 64, threads: int | None = None) -> FullModel:
        """Open ``model_full.onnx`` (the bundle was verified against its manifest) with ONNX Runtime."""
        import onnxruntime as ort

        path = bundle.full_model_file
        if path is None:
            from storage.bundle import FULL_MODEL_FILE, BundleError

            raise BundleError(
                f"bundle {bundle.root} has no {FULL_MODEL_FILE}; re-export it, or use the two-part runtime"
            )
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        width = session.get_outputs()[0].shape[-1]
        if width != max(bundle.classes.values()) + 1:
            from storage.bundle import BundleError

            raise BundleError(
                f"bundle {bundle.root}: {path.name} gives {width} classes, model.json lists "
                f"{max(bundle.classes.values()) + 1}; re-export the model"
            )
        return cls(bundle, session, max(1, int(batch_size)))

    def probabilities(self, patches: list[np.ndarray]) -> np.ndarray:
        """(N, C) class probabilities over every class index of the bundle, in chunks of ``batch_size``."""
        from tasks.imageio import resize_patches

        t = time.perf_counter()
        size, out = self.bundle.input_size, []
        for start in range(0, len(patches), self.batch_size):
            batch = resize_patches(patches[start : start + self.batch_size], size)
            out.append(self.session.run(["probabilities"], {"images": batch})[0])
        self.extract_s += time.perf_counter() - t
        num_classes = max(self.bundle.classes.values()) + 1
        return np.concatenate(out) if out else np.zeros((0, num_classes), np.float32)
