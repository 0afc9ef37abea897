"""Reading images and index masks with clear errors (decode once, from bytes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np

_COLOR = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
_UNCHANGED = cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION
_ANYCOLOR = cv2.IMREAD_ANYCOLOR | cv2.IMREAD_IGNORE_ORIENTATION


class InputDataError(ValueError):
    """A user input file is unusable; the message names the file and the fix."""


def read_bytes(path: str | Path) -> bytes:
    """File bytes, or a clear error naming the file."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise InputDataError(f"{path}: file not found; check the path or rerun the association") from None
    except OSError as exc:
        raise InputDataError(f"{path}: cannot be read ({exc})") from None


def decode_image(data: bytes, path: str | Path, reduced: bool = False, keep_gray: bool = False) -> np.ndarray:
    """BGR uint8 (H, W, 3) image from file bytes; grayscale, RGBA and 16-bit inputs are converted.

    ``reduced`` only checks that the file decodes (1/8-scale grayscale, much cheaper). ``keep_gray``
    returns a grayscale file as (H, W) uint8 (the same pixels any BGR reader gets, a third of the bytes).
    """
    if reduced:
        flag = cv2.IMREAD_REDUCED_GRAYSCALE_8 | cv2.IMREAD_IGNORE_ORIENTATION
    else:
        flag = _ANYCOLOR if keep_gray else _COLOR
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flag) if data else None
    if img is None:
        raise InputDataError(f"{path}: not a readable image (corrupt, truncated or unsupported format); replace or remove it")
    return img


def read_image(path: str | Path) -> np.ndarray:
    """BGR uint8 image from a path."""
    return decode_image(read_bytes(path), path)


def decode_mask(
    data: bytes, path: str | Path, preprocessing: Callable[[np.ndarray], np.ndarray] | None = None
) -> tuple[np.ndarray, bool]:
    """``(uint8 (H, W) index mask, plain)``; ``plain`` means the file already is a 1-channel 8-bit PNG.

    ``preprocessing`` gets the 3-channel BGR mask, as in the reference. Palette PNGs give their indices.
    """
    buf = np.frombuffer(data, np.uint8)
    mask = None
    plain = False
    if preprocessing is not None:
        raw = cv2.imdecode(buf, _COLOR) if data else None
        if raw is None:
            raise InputDataError(f"{path}: not a readable mask image; replace it")
        mask = np.asarray(preprocessing(raw))
    else:
        try:
            from io import BytesIO

            from PIL import Image

            with Image.open(BytesIO(data)) as im:
                if im.mode == "L":  # the common case: OpenCV decodes it faster
                    mask = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
                    plain = im.format == "PNG"
                elif im.mode in ("P", "I;16", "I;16B", "I", "1"):
                    mask = np.asarray(im if im.mode != "1" else im.convert("L"))
        except Exception:  # noqa: BLE001 - not decodable by PIL: try OpenCV below
            mask = None
        if mask is None:
            mask = cv2.imdecode(buf, _UNCHANGED) if data else None
        if mask is None:
            raise InputDataError(f"{path}: not a readable mask image; replace it")
    if mask.ndim == 3:
        chans = mask[..., :3]
        if not (np.array_equal(chans[..., 0], chans[..., 1]) and np.array_equal(chans[..., 0], chans[..., 2])):
            raise InputDataError(
                f"{path}: colour mask (its channels differ); masks must hold class indices (0 = background, "
                "1..N = classes) in one channel, or pass a mask_preprocessing function that maps colours to indices"
            )
        mask = chans[..., 0]
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise InputDataError(f"{path}: mask values up to {mask.max()} do not fit class indices 0..255; re-encode it")
        mask = mask.astype(np.uint8)
    return np.ascontiguousarray(mask), plain


def _header_size(source: Any) -> tuple[int, int] | None:
    """``(height, width)`` from an image header (path or file object), None if PIL cannot tell."""
    try:
        import warnings

        from PIL import Image

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. decompression-bomb warnings on huge images
            with Image.open(source) as im:
                w, h = im.size
                return int(h), int(w)
    except Exception:  # noqa: BLE001 - unknown to PIL, truncated...: the caller decodes instead
        return None


def image_size(data: bytes, path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of image bytes from the header when possible, else by decoding."""
    from io import BytesIO

    size = _header_size(BytesIO(data))
    if size is None:
        img = decode_image(data, path)
        size = int(img.shape[0]), int(img.shape[1])
    return size


def file_image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` of an image file, reading only its header when possible."""
    size = _header_size(str(path))
    return size if size is not None else image_size(read_bytes(path), path)


def encode_png(array: np.ndarray, name: str | Path) -> bytes:
    """PNG bytes of an array (OpenCV's default settings, as ``cv2.imwrite``); ``name`` is for the error."""
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise ValueError(f"could not encode {name} as PNG ({array.dtype}, shape {array.shape})")
    return buf.tobytes()


def write_png(path: Path, array: np.ndarray, fix: str) -> None:
    """Write an image or fail loudly naming the file and ``fix`` (OpenCV only returns False on a full disk or a bad folder)."""
    if not cv2.imwrite(str(path), array):
        raise OSError(f"could not write {path} (disk full, read-only or missing folder?); {fix}")
