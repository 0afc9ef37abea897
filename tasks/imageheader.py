"""Image decoding settings and header checks: the pixel limit, the 16-bit rule, EXIF orientation.

Every decode (``tasks/imageio.py``) first reads the file's header (PIL, no pixels) and refuses images
over the pixel limit, so a small file that claims a huge size never reaches OpenCV. Images are used in
their stored pixel frame (EXIF orientation ignored, with a one-time warning per image).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("patchflow.imageio")

#: default pixel limit: 200 MP (a 16k-pixel line-scan frame of 12k lines); see docs/bad-inputs.md, section M
DEFAULT_MAX_IMAGE_PIXELS = 200_000_000
MAX_PIXELS_ENV = "PATCHFLOW_MAX_IMAGE_PIXELS"
CV_MAX_PIXELS = 1 << 30  # OpenCV refuses larger images (CV_IO_MAX_IMAGE_PIXELS)
CV_MAX_SIDE = 1 << 20  # and wider or taller ones (CV_IO_MAX_IMAGE_WIDTH/HEIGHT)
#: 16-bit rule of files written before the rule was recorded (Quadra's and patchflow's ``cv2.imread``: value >> 8)
LEGACY_SIXTEEN_BIT = 16

SixteenBit = str | int | tuple[int, int]  # "auto" | bits 8..16 | (low, high) window


class InputDataError(ValueError):
    """A user input file is unusable; the message names the file and the fix."""


class ImageTooLargeError(InputDataError):
    """An image is over the pixel limit (or over what OpenCV decodes); found from its header."""


class UnsupportedPixelsError(InputDataError):
    """An image decodes, but its pixel depth or number of channels is not one patchflow reads."""


# ----------------------------------------------------------------------------------------- settings


def parse_sixteen_bit(value: Any, key: str = "sixteen_bit") -> SixteenBit:
    """The 16-bit rule of a setting: ``"auto"``, the bits the camera uses (8..16) or a ``[low, high]`` window."""
    bad = ValueError(
        f"{key} must be 'auto', the number of bits the camera uses (8..16) or a window [low, high] "
        f"with 0 <= low < high <= 65535; got {value!r}"
    )
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        if not text.isdigit():
            raise bad
        value = int(text)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if 8 <= int(value) <= 16:
            return int(value)
        raise bad
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    ):
        low, high = int(value[0]), int(value[1])
        if 0 <= low < high <= 65535:
            return low, high
    raise bad


def sixteen_bit_json(rule: SixteenBit) -> str | int | list[int]:
    """The rule as stored in ``patchflow.json`` and ``model.json``."""
    return list(rule) if isinstance(rule, tuple) else rule


def max_image_pixels(configured: int | None = None) -> int:
    """The pixel limit: ``configured``, else ``$PATCHFLOW_MAX_IMAGE_PIXELS``, else :data:`DEFAULT_MAX_IMAGE_PIXELS`."""
    if configured is not None:
        if isinstance(configured, bool) or not isinstance(configured, (int, np.integer)) or configured < 1:
            raise ValueError(f"max_image_pixels must be a whole number of pixels >= 1, got {configured!r}")
        return int(configured)
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        from tasks.config import ConfigError

        raise ConfigError(
            f"{MAX_PIXELS_ENV}={raw!r} must be a whole number of pixels >= 1 (e.g. 400000000); fix or unset it"
        )
    return value


@dataclass(frozen=True)
class Decoding:
    """How images are decoded: the pixel limit, the setting named in its error, and the 16-bit rule."""

    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    limit_setting: str = MAX_PIXELS_ENV
    sixteen_bit: SixteenBit = "auto"


def make_decoding(max_pixels: int | None = None, setting: str | None = None, sixteen_bit: Any = "auto") -> Decoding:
    """Decoding settings; ``max_pixels`` None: the environment's limit. ``setting`` names how to raise it."""
    return Decoding(max_image_pixels(max_pixels), setting or MAX_PIXELS_ENV, parse_sixteen_bit(sixteen_bit))


def default_decoding() -> Decoding:
    """The environment's pixel limit and the ``"auto"`` 16-bit rule."""
    return Decoding(max_image_pixels(), MAX_PIXELS_ENV, "auto")


def dataset_decoding(data_path: str | Path) -> Decoding:
    """Decoding of a patch dataset's images: its sidecar's 16-bit rule (the legacy ``>> 8`` for datasets
    without one: Quadra cut their val/test patches so), the environment's pixel limit."""
    from storage.layout import SIDECAR_FILE, DatasetFormatError, read_sidecar

    raw = (read_sidecar(Path(data_path)) or {}).get("sixteen_bit", LEGACY_SIXTEEN_BIT)
    try:
        rule = parse_sixteen_bit(raw, f"sixteen_bit of {Path(data_path) / SIDECAR_FILE}")
    except ValueError as exc:
        raise DatasetFormatError(f"{exc}; regenerate the dataset") from None
    return Decoding(max_image_pixels(), MAX_PIXELS_ENV, rule)


def bundle_decoding(
    meta: dict[str, Any], root: str | Path, max_pixels: int | None = None, setting: str | None = None
) -> Decoding:
    """Decoding for a deployment bundle: the 16-bit rule of its ``model.json`` (the dataset's; the legacy
    ``>> 8`` for bundles without one) and the given or the environment's pixel limit."""
    from storage.bundle import BundleError

    try:
        key = f"sixteen_bit of {Path(root) / 'model.json'}"
        rule = parse_sixteen_bit(meta.get("sixteen_bit", LEGACY_SIXTEEN_BIT), key)
    except ValueError as exc:
        raise BundleError(f"{exc}; re-export the model") from None
    return Decoding(max_image_pixels(max_pixels), setting or MAX_PIXELS_ENV, rule)


# ------------------------------------------------------------------------------------------- header


@dataclass(frozen=True)
class Header:
    """What an image file's header says: its stored size and EXIF orientation (1: none)."""

    height: int
    width: int
    orientation: int = 1


_PIL_LOCK = threading.Lock()
_WARNED: set[tuple[str, str]] = set()


def pil_open(source: str | Path | bytes) -> Any:
    """``PIL.Image.open`` without Pillow's own decompression-bomb refusal (we check our limit first)."""
    from PIL import Image

    def fp() -> Any:
        return BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # decompression-bomb warnings on large images
        try:
            return Image.open(fp())
        except Image.DecompressionBombError:
            with _PIL_LOCK:
                old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                try:
                    return Image.open(fp())
                finally:
                    Image.MAX_IMAGE_PIXELS = old


def _orientation(im: Any) -> int:
    try:
        tags = getattr(im, "tag_v2", None)  # TIFF
        if tags is not None:
            return int(tags.get(0x0112, 1) or 1)
        raw = im.info.get("exif")  # JPEG, PNG (eXIf before the pixels), WebP: never decodes the image
        if not raw:
            return 1
        from PIL import Image

        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(0x0112, 1) or 1)
    except Exception:
        return 1


def read_header(source: str | Path | bytes) -> Header | None:
    """Header of an image (path or bytes) without decoding it; None if PIL cannot read it."""
    try:
        with pil_open(source) as im:
            w, h = im.size
            return Header(int(h), int(w), _orientation(im))
    except Exception:
        return None


def warn_once(key: str, path: str | Path, msg: str, *args: Any) -> None:
    """Log a warning about ``path`` once per process (e.g. once per image, not once per training pass)."""
    if (key, str(path)) not in _WARNED:
        _WARNED.add((key, str(path)))
        logger.warning(msg, *args)


def _memory(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{max(1, round(nbytes / 2**20))} MiB"


def check_pixels(height: int, width: int, path: str | Path, dec: Decoding) -> None:
    """Refuse an image over the pixel limit (or over what OpenCV decodes) before it is decoded."""
    n = int(height) * int(width)
    if n > dec.max_pixels:
        raise ImageTooLargeError(
            f"{path}: {width}x{height} = {n} pixels ({n / 1e6:g} MP) is over the limit of {dec.max_pixels} pixels "
            f"({dec.max_pixels / 1e6:g} MP); decoding it takes at least {_memory(3 * n)} of memory: "
            f"raise {dec.limit_setting} if the machine has it, or split the image"
        )
    if n > CV_MAX_PIXELS or width > CV_MAX_SIDE or height > CV_MAX_SIDE:
        raise ImageTooLargeError(
            f"{path}: {width}x{height} pixels is more than OpenCV decodes (2^30 pixels, 2^20 per side); split the image"
        )


def check_header(source: str | Path | bytes, path: str | Path, dec: Decoding) -> Header | None:
    """Read the header, refuse an image over the limit, warn once about an EXIF orientation; None if unreadable."""
    hdr = read_header(source)
    if hdr is not None:
        check_pixels(hdr.height, hdr.width, path, dec)
        if hdr.orientation not in (0, 1):
            warn_once(
                "exif",
                path,
                "%s carries an EXIF orientation (%d): patchflow uses the stored pixel frame %dx%d "
                "(not rotated or flipped as viewers show it); masks must match that frame",
                path,
                hdr.orientation,
                hdr.width,
                hdr.height,
            )
    return hdr
