"""The parameters of one patch dataset build: :class:`DatasetParams`, bound once from Quadra's call or the config.

``generate_patch_dataset`` (Quadra's signature) and the flow's ``GenerationSection`` both become one
:class:`DatasetParams`; the checks (``tasks/dataset/checks.py``) return it normalised, the build plan
stores it as JSON (``tasks/dataset/state.py``) and the workers receive it. ``mask_preprocessing`` is a
function: it is stored as its import path ``module:qualname`` when it has one (:func:`callable_path`). A bad
parameter is a ConfigError (:func:`param_error`).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: parameters that change no byte of the dataset: a killed build resumes under other values (the new ones apply)
RUNTIME_FIELDS = ("output_folder", "clear_output_folder", "num_workers", "max_image_pixels")


@dataclass(frozen=True)
class DatasetParams:
    """Every parameter of :func:`tasks.dataset.generate.generate_patch_dataset` but ``data_dictionary``, in its order.

    As given (lists, numpy integers, ``None`` defaults) until ``tasks/dataset/checks.py: check_params`` returns
    the normalised copy: tuples, plain ints and floats, the pixel limit and the 16-bit rule resolved.
    """

    class_to_idx: dict[str, int]
    val_size: float
    test_size: float
    seed: int
    patch_number: Sequence[int] | None
    patch_size: Sequence[int] | None
    overlap: float
    output_folder: str | os.PathLike[str]
    save_original_images_and_masks: bool
    area_threshold: float
    area_defect_threshold: float
    mask_extension: str
    mask_output_folder: str | None
    save_mask: bool
    clear_output_folder: bool
    mask_preprocessing: Callable[[np.ndarray], np.ndarray] | None
    train_filename: str
    repeat_good_images: int
    balance_defects: bool
    annotated_good: Sequence[str] | None
    num_workers: int
    missing_mask: str
    fingerprint: str | None
    shard_images: int
    max_image_pixels: int | None
    sixteen_bit: Any  # "auto", the camera's bits or a [low, high] window (tasks/imageio.py: to_uint8)

    def info_geometry(self) -> dict[str, Any]:
        """The geometry keys of Quadra's ``info.json``."""
        return {
            "patch_size": list(self.patch_size) if self.patch_size is not None else None,
            "patch_number": list(self.patch_number) if self.patch_number is not None else None,
            "overlap": float(self.overlap),
            "annotated_good": list(self.annotated_good) if self.annotated_good else None,
        }


def param_error(message: str) -> ValueError:
    """A bad parameter: a :class:`tasks.config.ConfigError` (a ValueError the CLI prints as one line, exit code 2;
    imported on first use, so ``import tasks`` stays free of pydantic)."""
    from tasks.config import ConfigError

    return ConfigError(message)


def callable_path(fn: Callable[..., Any] | None) -> str | None:
    """``module:qualname`` of ``fn`` when importing that path gives back ``fn`` itself, else None (lambdas, local
    functions, partials, callable objects)."""
    if fn is None:
        return None
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname or module == "__main__":
        return None  # __main__ is another module in each worker process
    path = f"{module}:{qualname}"
    try:
        return path if import_callable(path) is fn else None
    except (ImportError, AttributeError, ValueError, TypeError):
        return None


def import_callable(path: str) -> Callable[..., Any]:
    """The object at ``module:qualname`` (imports the module, which must be importable already)."""
    module, sep, qualname = path.partition(":")
    if not sep or not module or not qualname:
        raise ValueError(f"{path!r} is not 'module:qualname'")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{path} is not callable")
    return obj
