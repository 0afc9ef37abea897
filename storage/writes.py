"""Writing model files (backbone exports, classifiers) so that a full disk is named as such.

Serialisers that write through their own C++ code (``torch.jit.save``, ``torch.onnx.export``) report a
failed write as a bare ``RuntimeError`` with no errno, so model files are serialised into memory first
and written here with plain Python I/O: a full disk (``ENOSPC``), a file size limit (``EFBIG``) or a
quota (``EDQUOT``) becomes one :class:`OSError` that names the file and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

#: errno values that mean "no room to write this file"
DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)})
STORAGE_FIX = "free disk space or set storage_root to another disk"


class WriteError(OSError):
    """A failed write: ``errno`` kept, ``str()`` is the message alone (no ``[Errno N]`` prefix)."""

    def __str__(self) -> str:
        return str(self.strerror)


def write_error(path: Path, exc: OSError, fix: str = STORAGE_FIX) -> WriteError:
    """One :class:`WriteError` naming ``path``: ``disk full (...)`` for ENOSPC/EFBIG/EDQUOT, else the OS reason."""
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno in DISK_FULL:
        return WriteError(exc.errno, f"could not write {path}: disk full ({reason}); {fix}")
    return WriteError(exc.errno, f"could not write {path} ({reason}); {fix}")


def write_file(path: Path, data: bytes, fix: str = STORAGE_FIX) -> Path:
    """Write ``data`` to ``path`` atomically (hidden temp file + rename); a failed write names the file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc, fix) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def serialise_to(path: Path, save: Callable[[BinaryIO], None], fix: str = STORAGE_FIX) -> Path:
    """Run ``save(buffer)`` into memory, then :func:`write_file` the bytes to ``path``."""
    import io

    buf = io.BytesIO()
    save(buf)
    return write_file(path, buf.getvalue(), fix)


@contextlib.contextmanager
def naming_write_errors(path: Path, fix: str = STORAGE_FIX) -> Iterator[None]:
    """Turn an :class:`OSError` raised inside the block (a copy, a small write) into one that names ``path``."""
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        raise write_error(Path(path), exc, fix) from None
