"""User-given paths: ``~`` expanded, symlinks followed, containment checks, no globbing.

Every folder a stage may replace or clear goes through :func:`refuse_inputs_inside` first, so no
input file (image, mask, class map, config) is ever deleted or overwritten. User paths are never
put into a glob pattern (a folder named ``x/*`` would match other folders); list a folder and
compare names instead (:func:`siblings_with_prefix`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path


class OutputFolderError(FileExistsError):
    """An output folder would overwrite or delete inputs, or cannot be used; the message names both paths."""


def user_path(path: str | os.PathLike[str]) -> Path:
    """``path`` with ``~`` expanded, absolute, symlinks followed (the folder a link points to is the one used)."""
    return Path(path).expanduser().resolve()


def is_within(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """True when ``path`` is ``folder`` or lies anywhere under it (both resolved)."""
    p, f = user_path(path), user_path(folder)
    return p == f or f in p.parents


def refuse_inputs_inside(
    folder: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str] | None], key: str
) -> None:
    """Raise :class:`OutputFolderError` when any of ``inputs`` lies inside ``folder`` (which is about to be
    replaced or cleared); ``key`` names the setting of ``folder`` in the message."""
    f = user_path(folder)
    for item in inputs:
        if item is not None and is_within(item, f):
            raise OutputFolderError(
                f"{key} {f} holds the input {user_path(item)}; replacing it would delete your data. "
                f"Choose an output folder that holds none of the inputs"
            )


def siblings_with_prefix(path: str | os.PathLike[str], prefix: str) -> list[Path]:
    """Entries of ``path``'s parent folder whose name starts with ``prefix`` (literal, never a glob pattern)."""
    parent = Path(path).parent
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        return []
    return [parent / n for n in names if n.startswith(prefix)]
