"""Where a patch dataset may be written, and the names it is built from (issue 12: no input is ever lost).

A build replaces its output folder as a whole, so it is refused, before anything is written or deleted,
when an input (image, mask, class map file, config file, the storage root) lies inside that folder; the
flow also refuses an output folder inside its images or masks folder (a rerun would read its own
patches as images): :func:`check_dataset_paths`, run by the CLI before Prefect starts and by the flow.
Output folders are user paths: ``~`` expanded, symlinks followed (a linked folder is
built beside its target, and the target is replaced, never the link). Image and class names become
file names and ``dataset.txt`` fields, so commas, line breaks and path separators are refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from storage import layout
from storage.paths import OutputFolderError, is_within, user_path
from storage.settings import storage_root
from tasks.dataset.params import param_error
from tasks.imageio import InputDataError

if TYPE_CHECKING:
    from tasks.dataset.config import DatasetFlowConfig

#: characters that break a ``dataset.txt`` line (``<h5 name>,<class>``) or a file name built from a name
BAD_NAME_CHARS = {",": "a comma", "\n": "a line break", "\r": "a carriage return", "/": "a slash", "\\": "a backslash"}


def output_folder_path(output_folder: str | os.PathLike[str]) -> Path:
    """The folder a build writes: ``~`` expanded, absolute, symlinks followed."""
    return user_path(output_folder)


def resolve_inputs(paths: Iterable[str | os.PathLike[str]]) -> list[tuple[str, str]]:
    """``(given, resolved)`` for each input file: symlinks followed, one ``realpath`` per folder (cached), so
    100 000 images cost 100 000 ``lstat`` calls, not a full resolution each."""
    folders: dict[str, str] = {}
    cwd = os.getcwd()
    out = []
    for given in paths:
        raw = os.path.join(cwd, os.path.expanduser(os.fspath(given)))
        if os.path.islink(raw):
            real = os.path.realpath(raw)
        else:
            parent, name = os.path.split(raw)
            if parent not in folders:
                folders[parent] = os.path.realpath(parent)
            real = os.path.join(folders[parent], name)
        out.append((os.fspath(given), real))
    return out


def refuse_inputs_in(
    folder: Path,
    inputs: Sequence[tuple[str, str]],
    key: str = "output_folder",
    action: str = "a build replaces output_folder as a whole and would delete it",
) -> None:
    """Raise :class:`OutputFolderError` naming both paths when a resolved input lies inside ``folder`` (resolved),
    which is about to be replaced or cleared (``action`` says how)."""
    root = os.fspath(folder)
    prefix = root.rstrip(os.sep) + os.sep
    for given, real in inputs:
        if real == root or real.startswith(prefix):
            shown = given if os.path.abspath(given) == real else f"{given} (= {real})"
            raise OutputFolderError(
                f"{key} {folder} holds the input {shown}; {action}. "
                f"Move your inputs out of {folder} (e.g. a dataset's original/ copy) or choose another output_folder"
            )


def check_name(name: str, what: str, where: str) -> None:
    """Refuse a name that becomes a file name or a ``dataset.txt`` field when it holds a comma, a line break or a
    path separator, or is empty, ``.`` or ``..``."""
    bad = [label for ch, label in BAD_NAME_CHARS.items() if ch in name]
    if bad or name in ("", ".", ".."):
        reason = f"holds {' and '.join(bad)}" if bad else "is empty, '.' or '..'"
        raise InputDataError(
            f"{what} {name!r} ({where!r}) {reason}; it names patch and h5 files and dataset.txt fields "
            "(no commas, line breaks or slashes). Rename it"
        )


def check_output_names(train_filename: str, mask_extension: str, mask_output_folder: str | None) -> None:
    """``train_filename`` and ``mask_extension`` are plain names, ``mask_output_folder`` a relative folder inside the
    dataset (so nothing is ever written outside the build folder); a ConfigError otherwise."""
    if (
        not isinstance(train_filename, str)
        or not train_filename
        or train_filename.startswith(".")
        or any(c in train_filename for c in BAD_NAME_CHARS)
    ):
        raise param_error(
            f"train_filename {train_filename!r} must be a plain file name such as dataset.txt "
            "(no slashes, commas or line breaks, no leading dot)"
        )
    if any(c in mask_extension for c in BAD_NAME_CHARS):
        raise param_error(f"mask_extension {mask_extension!r} must be a file name suffix such as _mask (no slashes)")
    if mask_output_folder is not None:
        parts = Path(mask_output_folder).parts
        if Path(mask_output_folder).is_absolute() or ".." in parts or any(c in mask_output_folder for c in ",\n\r"):
            raise param_error(
                f"mask_output_folder {mask_output_folder!r} must be a relative folder inside the dataset "
                "(no '..', not absolute)"
            )


def check_flow_paths(
    out: Path, images: str, masks: str | None, files: dict[str, str | None], storage_root: Path | None = None
) -> None:
    """The flow's rules for ``output_folder`` ``out`` (resolved): it neither holds nor lies inside the images or masks
    folder, holds none of ``files`` (config key -> file: class map, config file) and not the storage root."""
    for key, folder in (("data.images", images), ("data.masks", masks)):
        if folder is None:
            continue
        if is_within(folder, out):
            raise OutputFolderError(
                f"output_folder {out} holds {key} {user_path(folder)}; a build replaces output_folder as a whole and "
                f"would delete them. Choose an output_folder outside {key}"
            )
        if is_within(out, folder):
            raise OutputFolderError(
                f"output_folder {out} is inside {key} {user_path(folder)}: a rerun would read its own patches as "
                f"{key.split('.')[1]} (and then delete them). Choose an output_folder outside {key}"
            )
    for key, path in files.items():
        if path is not None and is_within(path, out):
            raise OutputFolderError(
                f"output_folder {out} holds {key} {user_path(path)}; a build replaces output_folder as a whole and "
                f"would delete it. Move the file or choose another output_folder"
            )
    if storage_root is not None and is_within(storage_root, out):
        raise OutputFolderError(
            f"output_folder {out} holds storage_root {user_path(storage_root)} (cache, results, locks); a build "
            "replaces output_folder as a whole and would delete it. Choose a storage_root outside output_folder"
        )


def check_dataset_paths(config: DatasetFlowConfig, config_file: str | None = None) -> Path:
    """The dataset flow's output folder (``~`` expanded, symlinks followed) once it is checked to hold none of the
    inputs (images and masks folders, class map file, config file, storage root), to lie inside neither the images
    nor the masks folder, and to be replaceable (empty or a patch dataset); nothing is written or deleted before."""
    out = output_folder_path(config.dataset.output_folder)
    check_flow_paths(
        out,
        config.data.images,
        config.data.masks,
        {"data.class_to_idx_file": config.data.class_to_idx_file, "the config file": config_file},
        storage_root(config.storage_root),
    )
    layout.check_output_folder(out)
    return out
