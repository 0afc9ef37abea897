"""Classifier files: skops by default (loading cannot run code), joblib only when its source is trusted.

A pickle (``joblib``) runs whatever code it holds while it is loaded, so patchflow stores fitted
classifiers with skops (scikit-learn's secure persistence): a skops file is a zip of JSON and numpy
arrays, and loading it only builds objects of types on skops's trusted list (scikit-learn estimators,
numpy, scipy, builtins). Types outside that list (a classifier class from the user's own module,
tree-ensemble internals that can crash the process on crafted data) are refused unless the caller
names them as trusted. :func:`load_classifier_file` is the one place that loads a classifier file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

from storage.layout import DatasetFormatError
from storage.writes import serialise_to, write_file

SKOPS_FILE = "classifier.skops"
JOBLIB_FILE = "classifier.joblib"
PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")

logger = logging.getLogger("patchflow.classifier")

Trust = Literal["all"] | Collection[str]


class ClassifierFileError(DatasetFormatError):
    """A classifier file is untrusted, damaged or not a classifier; the message names the file and the fix."""


def reviewed_types() -> set[str]:
    """Types that skops keeps off its default list although they hold no code: scikit-learn's tree storage
    (``sklearn.tree._tree.Tree``...), whose crafted node indices can crash ``predict`` (no code is run)."""
    from skops.io.exceptions import UNTRUSTED_TYPE_REASONS

    return set(UNTRUSTED_TYPE_REASONS)


def skops_bytes(est: Any) -> bytes:
    """The skops serialisation of ``est`` (in memory), the same bytes for the same model (:func:`_stable_zip`)."""
    import io

    import skops.io as sio

    buf = io.BytesIO()
    sio.dump(est, buf)
    return _stable_zip(buf.getvalue())


def _stable_zip(data: bytes) -> bytes:
    """skops names objects and array files by ``id()`` and stamps zip entries with the current time; renumber the
    ids in order of appearance and fix the timestamps, so a refit of the same model writes the same bytes."""
    import io
    import zipfile

    src = zipfile.ZipFile(io.BytesIO(data))
    schema = json.loads(src.read("schema.json"))
    ids: dict[int, int] = {}

    def renumber(node: Any) -> Any:
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                if k == "__id__" and isinstance(v, int):
                    v = ids.setdefault(v, len(ids) + 1)
                elif k == "file" and isinstance(v, str) and v.endswith(".npy") and v[:-4].isdigit():
                    v = f"{ids.setdefault(int(v[:-4]), len(ids) + 1)}.npy"
                out[k] = renumber(v)
            return out
        return [renumber(v) for v in node] if isinstance(node, list) else node

    schema = renumber(schema)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as dst:
        for info in src.infolist():
            name = info.filename
            if name.endswith(".npy") and name[:-4].isdigit():
                name = f"{ids.setdefault(int(name[:-4]), len(ids) + 1)}.npy"
            payload = json.dumps(schema, indent=2).encode() if name == "schema.json" else src.read(info.filename)
            entry = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            dst.writestr(entry, payload, compress_type=info.compress_type)
    return buf.getvalue()


def untrusted_types(data: bytes | None = None, path: Path | None = None) -> list[str]:
    """Types in a skops file (or its bytes) that are not on skops's default trusted list."""
    import skops.io as sio

    try:
        return sio.get_untrusted_types(data=data) if data is not None else sio.get_untrusted_types(file=path)
    except Exception as exc:
        raise ClassifierFileError(_damaged(Path(path or "classifier"), exc)) from None


def _damaged(path: Path, exc: BaseException) -> str:
    return f"{path.name} is damaged or truncated ({type(exc).__name__}: {str(exc)[:200]})"


def write_skops(est: Any, path: Path, data: bytes | None = None) -> Path:
    """Save ``est`` with skops at ``path`` (atomically; a full disk is named)."""
    return write_file(Path(path), data if data is not None else skops_bytes(est))


def write_joblib(est: Any, path: Path) -> Path:
    """Save ``est`` with joblib at ``path`` (Quadra compatibility only; loading it needs trust)."""
    import joblib

    return serialise_to(Path(path), lambda fh: joblib.dump(est, fh))


def load_classifier_file(path: Path, trust: Trust, fix: str) -> Any:
    """Load a classifier file: skops with only skops's trusted types plus ``trust`` (``"all"``: every type),
    a pickle only when ``trust == "all"``. Refusals and damaged files raise :class:`ClassifierFileError`
    naming the file; ``fix`` (how to pass the trust flag) ends the refusal messages."""
    path = Path(path)
    if not path.is_file():
        raise ClassifierFileError(f"{path} does not exist")
    if path.suffix == ".skops":
        types = untrusted_types(path=path)
        refused = [] if trust == "all" else sorted(set(types) - set(trust))
        if refused:
            raise ClassifierFileError(
                f"{path.name} holds types that skops does not trust by default: {refused}; loading them can run "
                f"their code (or crash on crafted data). {fix}"
            )
        import skops.io as sio

        try:
            est = sio.load(path, trusted=types)
        except Exception as exc:
            raise ClassifierFileError(_damaged(path, exc)) from None
    elif path.suffix in PICKLE_SUFFIXES:
        if trust != "all":
            raise ClassifierFileError(f"{path.name} is a pickle (joblib): loading it runs any code it holds. {fix}")
        logger.warning("loading the pickle %s because trust_pickle is set: it can run any code it holds", path)
        import joblib

        try:
            est = joblib.load(path)
        except Exception as exc:
            raise ClassifierFileError(_damaged(path, exc)) from None
    else:
        raise ClassifierFileError(f"{path.name}: unknown classifier format (expected .skops or .joblib)")
    if not (hasattr(est, "predict_proba") and hasattr(est, "classes_")):
        raise ClassifierFileError(
            f"{path.name} holds a {type(est).__name__}, not a fitted classifier with predict_proba"
        )
    return est


def width_problem(est: Any, width: int) -> str | None:
    """``None`` when ``est`` takes ``width`` features (or does not say), else
    ``expects N features, backbone gives M``."""
    n = getattr(est, "n_features_in_", None)
    if n is None or int(n) == int(width):
        return None
    return f"expects {int(n)} features, backbone gives {int(width)}"
