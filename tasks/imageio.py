"""Reading images and index masks with clear errors (decode once, from bytes).

Every decode checks the file's header against the pixel limit first (``tasks/imageheader.py``), then
decodes once with OpenCV in the stored pixel frame; 16-bit images become 8-bit by one rule
(:func:`to_uint8`), recorded in the dataset sidecar and in ``model.json`` so every stage decodes a file
to the same pixels.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from tasks.imageheader import (  # noqa: F401 - re-exported: callers import decoding settings from here
    DEFAULT_MAX_IMAGE_PIXELS,
    LEGACY_SIXTEEN_BIT,
    MAX_PIXELS_ENV,
    Decoding,
    Header,
    ImageTooLargeError,
    InputDataError,
    SixteenBit,
    UnsupportedPixelsError,
    bundle_decoding,
    check_header,
    check_pixels,
    dataset_decoding,
    default_decoding,
    make_decoding,
    max_image_pixels,
    parse_sixteen_bit,
    pil_open,
    sixteen_bit_json,
    warn_once,
)

_COLOR = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
_UNCHANGED = cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION
# 8-bit files decode exactly as with _COLOR (grayscale ones as 1 channel); 16-bit ones keep their values
_NATIVE = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR | cv2.IMREAD_IGNORE_ORIENTATION


# ------------------------------------------------------------------------------------------ decoding


def read_bytes(path: str | Path) -> bytes:
    """File bytes, or a clear error naming the file."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise InputDataError(f"{path}: file not found; check the path or rerun the association") from None
    except OSError as exc:
        raise InputDataError(f"{path}: cannot be read ({exc})") from None


def _imdecode(data: bytes, flag: int, path: str | Path) -> np.ndarray | None:
    if not data:
        return None
    try:
        return cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    except cv2.error as exc:  # e.g. OpenCV's own size limits on a header PIL could not read
        reason = str(exc).split("error: ", 1)[-1].split(" in function", 1)[0].strip()
        reason = re.sub(r"^\(-?\d+:[^)]*\)\s*", "", reason)  # "(-215:Assertion failed) "
        if "CV_IO_MAX_IMAGE" in reason:
            reason = f"over OpenCV's size limits of 2^30 pixels and 2^20 per side: {reason} failed"
        raise InputDataError(
            f"{path}: OpenCV refuses to decode it ({reason}); split the image or re-save it as PNG"
        ) from None


@lru_cache(maxsize=16)
def _lut(rule: SixteenBit, bits: int) -> np.ndarray:
    values = np.arange(65536, dtype=np.float64)
    if isinstance(rule, tuple):
        low, high = rule
        return np.clip(np.round((values - low) * 255.0 / (high - low)), 0, 255).astype(np.uint8)
    return np.minimum(np.arange(65536) >> (bits - 8), 255).astype(np.uint8)


def to_uint8(img: np.ndarray, rule: SixteenBit, path: str | Path) -> np.ndarray:
    """An 8-bit copy of a decoded image by the 16-bit rule (8-bit images are returned as they are).

    ``"auto"``: per image, the smallest of 10, 12, 14, 16 bits that holds its largest value, shifted to 8
    (``>> 2 .. >> 8``); ``bits``: ``>> (bits - 8)``, larger values clipped to 255; ``(low, high)``: a linear
    map of ``[low, high]`` to ``[0, 255]``, clipped.
    """
    if img.dtype == np.uint8:
        return img
    if img.dtype != np.uint16:
        raise UnsupportedPixelsError(f"{path}: {img.dtype} pixels are not supported; save it as an 8- or 16-bit image")
    top = int(img.max()) if img.size else 0
    if top < 256:
        warn_once(
            "depth",
            path,
            "%s is a 16-bit image whose largest value is %d: it uses less than 8 bits of range "
            "and decodes dark under sixteen_bit=%r; check the camera's bit depth (or set sixteen_bit)",
            path,
            top,
            sixteen_bit_json(rule),
        )
    bits = 0
    if rule == "auto":
        bits = next(b for b in (10, 12, 14, 16) if top < 1 << b)
    elif isinstance(rule, int):
        bits = rule
    return np.take(_lut(rule if isinstance(rule, tuple) else "bits", bits), img)


def _as_bgr(img: np.ndarray, keep_gray: bool, path: str | Path = "image") -> np.ndarray:
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    if img.ndim == 2 and not keep_gray:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise UnsupportedPixelsError(
            f"{path}: shape {img.shape} is not an image of 1, 3 (BGR) or 4 (BGRA) channels; pass an HxW or HxWxC array"
        )
    return img


def as_bgr(image: np.ndarray, rule: SixteenBit, name: str | Path = "image") -> np.ndarray:
    """A decoded image array as BGR uint8 (H, W, 3): grayscale and BGRA converted, 16-bit by ``rule``
    (:func:`to_uint8`); ``name`` is for the error."""
    return _as_bgr(to_uint8(np.asarray(image), rule, name), False, name)


def resize_patches(patches: Sequence[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """BGR uint8 HxWx3 patches as one (N, h, w, 3) uint8 batch at ``size`` = (h, w): patches of another size are
    resized with OpenCV's bicubic rule (``INTER_CUBIC``), the one training used."""
    from tasks.features.weights import BackboneError

    h, w = int(size[0]), int(size[1])
    out = np.empty((len(patches), h, w, 3), np.uint8)
    for i, p in enumerate(patches):
        p = np.asarray(p)
        if p.ndim != 3 or p.shape[2] != 3 or p.dtype != np.uint8:
            raise BackboneError(f"Patch {i} must be a uint8 HxWx3 BGR array, got {p.dtype} {p.shape}")
        out[i] = p if p.shape[:2] == (h, w) else cv2.resize(p, (w, h), interpolation=cv2.INTER_CUBIC)
    return out


def decode_image(
    data: bytes,
    path: str | Path,
    reduced: bool = False,
    keep_gray: bool = False,
    decoding: Decoding | None = None,
) -> np.ndarray:
    """BGR uint8 (H, W, 3) image from file bytes; grayscale and RGBA inputs are converted, 16-bit ones by the rule.

    The header is checked against the pixel limit first. ``reduced`` only checks that the file decodes
    (1/8-scale grayscale, much cheaper). ``keep_gray`` returns a grayscale file as (H, W) uint8 (the same
    pixels any BGR reader gets, a third of the bytes). ``decoding``: None means the environment's limit and
    the ``"auto"`` rule.
    """
    dec = decoding or default_decoding()
    hdr = check_header(data, path, dec)
    flag = cv2.IMREAD_REDUCED_GRAYSCALE_8 | cv2.IMREAD_IGNORE_ORIENTATION if reduced else _NATIVE
    img = _imdecode(data, flag, path)
    if img is None:
        raise InputDataError(
            f"{path}: not a readable image (corrupt, truncated or unsupported format); replace or remove it"
        )
    if hdr is None:  # PIL could not read the header: the limit still holds (OpenCV's own limits came first)
        scale = 8 if reduced else 1
        check_pixels(img.shape[0] * scale, img.shape[1] * scale, path, dec)
    if reduced:
        return img
    return _as_bgr(to_uint8(img, dec.sixteen_bit, path), keep_gray, path)


def read_image(path: str | Path, decoding: Decoding | None = None, keep_gray: bool = False) -> np.ndarray:
    """BGR uint8 image from a path (see :func:`decode_image`)."""
    return decode_image(read_bytes(path), path, keep_gray=keep_gray, decoding=decoding)


def decode_mask(
    data: bytes,
    path: str | Path,
    preprocessing: Callable[[np.ndarray], np.ndarray] | None = None,
    decoding: Decoding | None = None,
) -> tuple[np.ndarray, bool]:
    """``(uint8 (H, W) index mask, plain)``; ``plain`` means the file already is a 1-channel 8-bit PNG.

    ``preprocessing`` gets the 3-channel BGR mask, as in the reference. Palette PNGs give their indices.
    The header is checked against the pixel limit first.
    """
    dec = decoding or default_decoding()
    hdr = check_header(data, path, dec)
    buf = np.frombuffer(data, np.uint8)
    mask = None
    plain = False
    if preprocessing is not None:
        raw = _imdecode(data, _COLOR, path)
        if raw is None:
            raise InputDataError(f"{path}: not a readable mask image; replace it")
        mask = np.asarray(preprocessing(raw))
    else:
        try:
            with pil_open(data) as im:
                if im.mode == "L":  # the common case: OpenCV decodes it faster
                    mask = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
                    plain = im.format == "PNG"
                elif im.mode in ("P", "I;16", "I;16B", "I", "1"):
                    mask = np.asarray(im if im.mode != "1" else im.convert("L"))
        except Exception:
            mask = None
        if mask is None:
            mask = _imdecode(data, _UNCHANGED, path)
        if mask is None:
            raise InputDataError(f"{path}: not a readable mask image; replace it")
    if hdr is None:
        check_pixels(mask.shape[0], mask.shape[1], path, dec)
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
            raise InputDataError(
                f"{path}: mask values up to {mask.max()} do not fit class indices 0..255; re-encode it"
            )
        mask = mask.astype(np.uint8)
    return np.ascontiguousarray(mask), plain


def image_header(path: str | Path, decoding: Decoding | None = None) -> Header:
    """Stored size and EXIF orientation of an image file, checked against the pixel limit (header only
    when PIL can read it, else by decoding)."""
    dec = decoding or default_decoding()
    hdr = check_header(str(path), path, dec)
    if hdr is None:
        img = decode_image(read_bytes(path), path, decoding=dec)
        hdr = Header(int(img.shape[0]), int(img.shape[1]))
    return hdr


def file_image_size(path: str | Path, decoding: Decoding | None = None) -> tuple[int, int]:
    """``(height, width)`` of an image file, reading only its header when possible (pixel limit checked)."""
    hdr = image_header(path, decoding)
    return hdr.height, hdr.width


def image_size(data: bytes, path: str | Path, decoding: Decoding | None = None) -> tuple[int, int]:
    """``(height, width)`` of image bytes from the header when possible, else by decoding (pixel limit checked)."""
    dec = decoding or default_decoding()
    hdr = check_header(data, path, dec)
    if hdr is None:
        img = decode_image(data, path, decoding=dec)
        return int(img.shape[0]), int(img.shape[1])
    return hdr.height, hdr.width


def encode_png(array: np.ndarray, name: str | Path) -> bytes:
    """PNG bytes of an array (OpenCV's default settings, as ``cv2.imwrite``); ``name`` is for the error."""
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise ValueError(f"could not encode {name} as PNG ({array.dtype}, shape {array.shape})")
    return buf.tobytes()


def write_png(path: Path, array: np.ndarray, fix: str) -> None:
    """Write an image or fail loudly naming the file and ``fix`` (OpenCV only returns False on a full disk or a bad
    folder)."""
    if not cv2.imwrite(str(path), array):
        raise OSError(f"could not write {path} (disk full, read-only or missing folder?); {fix}")
