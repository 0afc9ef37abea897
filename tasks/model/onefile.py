"""One-file model (``model_full.onnx``): raw BGR uint8 patches in, class probabilities out, in one ONNX graph.

The graph is the bundle's own backbone export (``model.onnx``, else the torch module of ``model.pth`` /
``model.pt`` exported to ONNX the same way), with patchflow's preprocessing in front (BGR -> RGB, ``/255``,
mean/std: the same float32 arithmetic as :func:`tasks.features.extractor.preprocess`) and the classifier
converted by ``skl2onnx`` behind it, its probabilities spread over every class index of ``model.json`` (classes
absent from training get 0, as :func:`tasks.evaluation.inferer.full_probabilities` does).

Input ``images``: (N, H, W, 3) uint8 BGR at the model's input size (``model.json``'s ``input_size``; patches are
resized to it with OpenCV's bicubic rule first, see :func:`tasks.imageio.resize_patches`). Output
``probabilities``: (N, C) float32. Loading it needs ONNX Runtime only (no pickle, no skops, no torch), so a C++
or C# program can run it as it is. A classifier ``skl2onnx`` cannot convert leaves the bundle without it (one
warning): the Predictor then runs the two-part path (backbone export + ``classifier.skops``).
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from storage.bundle import FULL_MODEL_FILE, class_to_idx, input_size
from storage.writes import write_file

#: version of the one-file graph's layout (part of the bundle export key: a change re-exports bundles)
FULL_MODEL_VERSION = "1"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
OPSET = 17

logger = logging.getLogger("patchflow.model")


class NotConvertibleError(RuntimeError):
    """The classifier (or the backbone) has no ONNX form here; the bundle keeps the two-part path."""


def backbone_graph(backbone_dir: Path, name: str, size: tuple[int, int]) -> Any:
    """The backbone export as an ONNX model: ``model.onnx`` as it is, else ``model.pth`` / ``model.pt`` exported."""
    import onnx

    folder = Path(backbone_dir)
    if (folder / "model.onnx").is_file():
        return onnx.load(str(folder / "model.onnx"))
    from tasks.features.export import export_onnx, load_export

    source = next((folder / n for n in ("model.pth", "model.pt") if (folder / n).is_file()), None)
    if source is None:
        raise NotConvertibleError(f"{folder} holds no backbone export to convert")
    with tempfile.TemporaryDirectory(prefix="patchflow-onefile-") as tmp:
        try:
            with warnings.catch_warnings():  # a TorchScript module has no Python signature: nothing to act on
                warnings.filterwarnings("ignore", message="no signature found", category=UserWarning)
                export_onnx(load_export(source, name), Path(tmp) / "backbone.onnx", size)
        except Exception as exc:  # e.g. a traced op with no ONNX form
            raise NotConvertibleError(f"the backbone {source.name} has no ONNX form ({_line(exc)})") from None
        return onnx.load(str(Path(tmp) / "backbone.onnx"))


def classifier_graph(est: Any, width: int) -> Any:
    """The classifier as an ONNX model (``skl2onnx``; input ``features`` (N, width) float32, output
    ``probabilities`` over its ``classes_``, no ZipMap)."""
    try:
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import FloatTensorType
    except ImportError:
        raise NotConvertibleError("skl2onnx is not installed (pip install skl2onnx)") from None

    last = est.steps[-1][1] if hasattr(est, "steps") else est
    options = {id(est): {"zipmap": False}, id(last): {"zipmap": False}}
    try:
        return convert_sklearn(
            est,
            initial_types=[("features", FloatTensorType([None, int(width)]))],
            options=options,
            target_opset=OPSET,
        )
    except Exception as exc:
        raise NotConvertibleError(f"skl2onnx cannot convert {type(est).__name__} ({_line(exc)})") from None


def check_classifier(backbone: Any, clf: Any, est: Any, size: tuple[int, int], tolerance: float = 1e-4) -> None:
    """Refuse a conversion whose probabilities differ from ``est.predict_proba`` by more than ``tolerance`` on the
    features of a few random patches (the backbone graph and the classifier graph run by ONNX Runtime)."""
    import onnxruntime as ort

    def run(model: Any, x: np.ndarray) -> list[np.ndarray]:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})

    x = np.random.default_rng(0).normal(size=(8, 3, *size)).astype(np.float32)
    feats = run(backbone, x)[0]
    got = next(o for o in run(clf, feats) if o.ndim == 2 and o.dtype == np.float32)
    worst = float(np.abs(got - est.predict_proba(feats)).max())
    if not worst <= tolerance:
        raise NotConvertibleError(
            f"skl2onnx's conversion of {type(est).__name__} differs from its predict_proba by {worst:.2g}"
        )


def _preprocessing(size: tuple[int, int], mean: Sequence[float], std: Sequence[float], out: str) -> tuple[list, list]:
    """Nodes and initializers: uint8 NHWC BGR ``images`` -> normalised float32 NCHW RGB ``out``."""
    from onnx import TensorProto, helper, numpy_helper

    # the values preprocess() uses; planes first: a Gather over NHWC's last axis copies pixel by pixel (20x slower)
    scale = np.array([1.0 / (255.0 * s) for s in std], dtype=np.float32).reshape(1, 3, 1, 1)
    shift = np.array([m / s for m, s in zip(mean, std)], dtype=np.float32).reshape(1, 3, 1, 1)
    inits = [
        numpy_helper.from_array(np.array([2, 1, 0], np.int64), "pre/bgr_to_rgb"),
        numpy_helper.from_array(scale, "pre/scale"),
        numpy_helper.from_array(shift, "pre/shift"),
    ]
    nodes = [
        helper.make_node("Transpose", [INPUT_NAME], ["pre/nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Gather", ["pre/nchw", "pre/bgr_to_rgb"], ["pre/rgb"], axis=1),
        helper.make_node("Cast", ["pre/rgb"], ["pre/float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["pre/float", "pre/scale"], ["pre/scaled"]),
        helper.make_node("Sub", ["pre/scaled", "pre/shift"], [out]),
    ]
    return nodes, inits


def _all_classes(source: str, classes: Sequence[int], num_classes: int) -> tuple[list, list]:
    """Nodes and initializers: (N, k) probabilities over ``classes`` -> (N, num_classes) ``probabilities``
    (a zero column appended, then every class index gathered from its column or the zero one)."""
    from onnx import helper, numpy_helper

    classes = [int(c) for c in classes]
    if classes == list(range(num_classes)):
        return [helper.make_node("Identity", [source], [OUTPUT_NAME])], []
    column = {c: i for i, c in enumerate(classes)}
    index = np.array([column.get(c, len(classes)) for c in range(num_classes)], np.int64)
    inits = [
        numpy_helper.from_array(np.array([0, 0, 0, 1], np.int64), "post/pads"),
        numpy_helper.from_array(index, "post/columns"),
    ]
    nodes = [
        helper.make_node("Pad", [source, "post/pads"], ["post/padded"]),
        helper.make_node("Gather", ["post/padded", "post/columns"], [OUTPUT_NAME], axis=1),
    ]
    return nodes, inits


def _opsets(*models: Any) -> list[Any]:
    from onnx import helper

    versions: dict[str, int] = {}
    for m in models:
        for op in m.opset_import:
            versions[op.domain] = max(versions.get(op.domain, 0), op.version)
    return [helper.make_opsetid(domain, version) for domain, version in sorted(versions.items())]


def full_model(backbone: Any, est: Any, meta: dict[str, Any]) -> Any:
    """One ONNX model: preprocessing + ``backbone`` (an ONNX model, input (N,3,H,W) -> (N, D)) + ``est``
    converted, as ``model.json`` ``meta`` describes (input size, mean/std, class indices)."""
    import onnx
    from onnx import TensorProto, compose, helper

    h, w = input_size(meta)
    num_classes = max(class_to_idx(meta).values()) + 1
    width = backbone.graph.output[0].type.tensor_type.shape.dim[1].dim_value or int(est.n_features_in_)
    clf = classifier_graph(est, width)
    check_classifier(backbone, clf, est, (h, w))
    bb, clf = compose.add_prefix(backbone, "backbone/"), compose.add_prefix(clf, "classifier/")
    pre_nodes, pre_inits = _preprocessing((h, w), meta["mean"], meta["std"], bb.graph.input[0].name)
    proba = next(o.name for o in clf.graph.output if o.name.endswith("probabilities"))
    post_nodes, post_inits = _all_classes(proba, est.classes_, num_classes)
    link = helper.make_node("Identity", [bb.graph.output[0].name], [clf.graph.input[0].name])
    graph = helper.make_graph(
        [*pre_nodes, *bb.graph.node, link, *clf.graph.node, *post_nodes],
        "patchflow_full_model",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", h, w, 3])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", num_classes])],
        [*pre_inits, *bb.graph.initializer, *clf.graph.initializer, *post_inits],
        value_info=[*bb.graph.value_info, *clf.graph.value_info],
    )
    model = helper.make_model(graph, opset_imports=_opsets(bb, clf), producer_name="patchflow")
    model.ir_version = max(bb.ir_version, clf.ir_version)
    helper.set_model_props(model, {"patchflow": json.dumps(full_model_entry(meta))})
    onnx.checker.check_model(model)
    return model


def full_model_entry(meta: dict[str, Any]) -> dict[str, Any]:
    """``model.json``'s ``full_model`` entry: the file and its input and output."""
    h, w = input_size(meta)
    return {
        "file": FULL_MODEL_FILE,
        "version": FULL_MODEL_VERSION,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "channels": "BGR", "shape": [-1, h, w, 3]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [-1, max(class_to_idx(meta).values()) + 1]},
        "resize": "patches are resized to the input size with OpenCV INTER_CUBIC before the graph",
    }


def export_full_model(backbone_dir: Path, est: Any, meta: dict[str, Any], out: Path) -> dict[str, Any] | None:
    """Write ``out`` (``model_full.onnx``); its ``model.json`` entry, or None with one warning when the
    classifier (or the backbone) has no ONNX form (the bundle then keeps the two-part path only)."""
    try:
        model = full_model(backbone_graph(backbone_dir, meta.get("backbone") or "", input_size(meta)), est, meta)
    except Exception as exc:  # NotConvertibleError, or anything else: the two-part bundle is still complete
        reason = str(exc) if isinstance(exc, NotConvertibleError) else f"{type(exc).__name__}: {_line(exc)}"
        logger.warning(
            "%s; the bundle has no %s and is run as two parts (backbone export + classifier.skops)",
            reason,
            FULL_MODEL_FILE,
        )
        return None
    write_file(out, model.SerializeToString())
    return full_model_entry(meta)


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]
