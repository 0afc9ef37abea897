"""Bad inputs of image decoding (issue 12, docs/bad-inputs.md section M): pixel limit, 16-bit rule, EXIF orientation.

Every decode (dataset stage, training crops, val/test patches, report, predict) goes through
``tasks/imageio.py``: the header is checked against the pixel limit before any pixel is decoded, 16-bit
images become 8-bit by the rule recorded in ``patchflow.json`` and ``model.json``, and images are used in
their stored pixel frame. Test names are ``test_<NN>_<what>``; ``NN`` is the entry number in the catalogue.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from storage import bundle as bdl
from storage.layout import DatasetFormatError
from tasks.config import ConfigError, load_config, validate_config
from tasks.features.listing import read_train_list
from tasks.features.sampler import draw_pass, iter_pass_patches
from tasks.imageio import MAX_PIXELS_ENV, InputDataError, dataset_decoding, read_image
from tests._synth import CLASS_TO_IDX, make_dataset, tree_digest, write_image
from tests.test_bad_inputs import (  # the catalogue's helpers; bundle_src is its bundle fixture
    _edit_meta,
    assert_no_dataset,
    bundle_src,  # noqa: F401
    expect,
    generate,
)

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ helpers


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black 1-bit grayscale PNG of ``width x height``, streamed (a few MB of memory, ~50 KB on disk)."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = bytearray()
    block = row * 1000
    for start in range(0, height, 1000):
        idat += comp.compress(block if start + 1000 <= height else row * (height - start))
    idat += comp.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + _chunk(b"IDAT", bytes(idat))
        + _chunk(b"IEND", b"")
    )
    return path


def header_only_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` 8-bit gray pixels, with almost no data (a few hundred bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )
    return path


def gradient12(h: int = 64, w: int = 80, channels: int = 1) -> np.ndarray:
    """A 12-bit ramp 0..4095 (plus a row offset) in a uint16 array: what a 12-bit camera writes to a 16-bit PNG."""
    ramp = np.round(np.linspace(0, 4095, w))[None, :] * np.ones((h, 1))
    img = np.clip(ramp + np.arange(h)[:, None] * 3, 0, 4095).astype(np.uint16)
    return np.dstack([img, img // 2, 4095 - img]) if channels == 3 else img


def entries(images: dict[str, np.ndarray], root: Path, masks: bool = True) -> list[dict]:
    out = []
    for name, img in images.items():
        ip = write_image(root / "images" / name, img)
        mp = None
        if masks:
            mp = write_image(root / "masks" / f"{Path(name).stem}.png", np.zeros(img.shape[:2], np.uint8))
        out.append({"base_name": ip.name, "path": str(ip), "mask": str(mp) if mp else None})
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def patches_of(out: Path) -> dict[str, np.ndarray]:
    """Every val/test patch as a BGR reader (Quadra's cv2.imread) sees it."""
    files = [p for s in ("val", "test") for p in sorted((out / s).rglob("*.png"))]
    return {p.relative_to(out).as_posix(): cv2.imread(str(p)) for p in files}


def bgr(img8: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(img8, cv2.COLOR_GRAY2BGR) if img8.ndim == 2 else img8


# ===================================================================== M. image decoding


def test_120_huge_png_refused_from_its_header(tmp_path: Path) -> None:
    """A ~50 KB PNG of 20000x20000 pixels (1.2 GB as BGR) is refused from its header: nothing is decoded."""
    dd = make_dataset(tmp_path / "src", n=3, n_empty=1)
    big = huge_png(tmp_path / "src" / "images" / "line_scan.png", 20000, 20000)
    assert big.stat().st_size < 200_000
    dd.append({"base_name": big.name, "path": str(big), "mask": None})
    before, rss = tree_digest(tmp_path / "src"), peak_rss_mb()
    out = tmp_path / "out"
    msg = expect(
        InputDataError,
        lambda: generate(dd, out),
        big,
        "20000x20000",
        "200000000",
        "dataset.max_image_pixels",
        fix="raise dataset.max_image_pixels",
    )
    assert "GiB" in msg
    assert peak_rss_mb() - rss < 300, "the huge image was decoded"  # a decode takes >= 400 MB (1 channel)
    assert_no_dataset(out)
    assert tree_digest(tmp_path / "src") == before  # inputs untouched
    # the limit is a setting: a lower one refuses the ordinary 64x80 images too, naming the limit
    expect(
        InputDataError,
        lambda: generate(dd[:3], out, max_image_pixels=1000),
        "64",
        "1000",
        fix="raise dataset.max_image_pixels",
    )
    assert_no_dataset(out)


def test_120b_pixel_limit_from_the_environment_and_the_config_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without dataset.max_image_pixels, $PATCHFLOW_MAX_IMAGE_PIXELS applies; the config key wins over it."""
    from tasks.dataset.config import DatasetFlowConfig

    dd = make_dataset(tmp_path / "src", n=3, n_empty=1)
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")
    out = tmp_path / "out"
    expect(InputDataError, lambda: generate(dd, out), "1000", fix="raise dataset.max_image_pixels")
    generate(dd, out, max_image_pixels=64 * 80)  # exactly the image size: accepted
    assert (out / "info.json").is_file()
    cfg = load_config(
        DatasetFlowConfig,
        None,
        [
            "data.images=i",
            "data.class_to_idx={bg: 0}",
            "dataset.patch_number=[2, 2]",
            "dataset.max_image_pixels=400000000",
        ],
    )
    assert cfg.dataset.max_image_pixels == 400_000_000


def test_121_pixel_limit_in_the_training_evaluation_and_report_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stages after the dataset read the limit from $PATCHFLOW_MAX_IMAGE_PIXELS and name it in the error."""
    from tasks.evaluation.figures import overlay_image
    from tasks.evaluation.scoring import evaluate_split
    from tasks.features.plans import plan_batches

    out, fresh = tmp_path / "ds", tmp_path / "ds2"
    generate(make_dataset(tmp_path / "src", n=6, n_empty=1), out)
    shutil.copytree(out, fresh)  # sizes are read once per image and process: a copy is read afresh
    s = draw_pass(out, read_train_list(out), CLASS_TO_IDX, seed=0, pass_index=0)
    monkeypatch.setenv(MAX_PIXELS_ENV, "1000")  # 64x80 images, 32x40 patches: all over the limit
    for fn in (
        lambda: draw_pass(fresh, read_train_list(fresh), CLASS_TO_IDX, seed=0, pass_index=0),
        lambda: list(iter_pass_patches(s, 4, dataset_decoding(out))),
    ):
        expect(DatasetFormatError, fn, "64", "1000", MAX_PIXELS_ENV, fix=f"raise {MAX_PIXELS_ENV}")
    rel = next(p.relative_to(out).as_posix() for p in sorted((out / "val").rglob("*.png")))
    plan = {"kind": np.array("val"), "rel": np.array([rel])}
    expect(
        InputDataError,
        lambda: list(plan_batches(plan, {"data_path": str(out), "sixteen_bit": "auto"}, 0, 1, 4)),
        rel,
        "40x32",
        MAX_PIXELS_ENV,
        fix=f"raise {MAX_PIXELS_ENV}",
    )
    val = json.loads((out / "info.json").read_text())["val_files"]
    ids = [rel]
    expect(
        InputDataError,
        lambda: evaluate_split(out, "val", ids, np.zeros(1, int), np.ones((1, 3), np.float32) / 3, CLASS_TO_IDX),
        "64",
        MAX_PIXELS_ENV,
        fix="raise",
    )
    rec = {**val[0], "file_name": Path(val[0]["image_path"]).name}
    expect(
        InputDataError,
        lambda: overlay_image(rec, out, tmp_path / "maps", CLASS_TO_IDX),
        "64",
        MAX_PIXELS_ENV,
        fix="raise",
    )


@pytest.mark.slow
def test_122_predict_pixel_limit_flag(bundle_src: Path, tmp_path: Path) -> None:  # noqa: F811
    """predict refuses an image over --max-image-pixels (default: the environment's limit) before decoding it."""
    from tasks.predict.config import PredictFlowConfig
    from tasks.predict.stage import predict_images

    images, out = tmp_path / "raw", tmp_path / "pred"
    write_image(images / "a.png", np.random.default_rng(1).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    expect(
        InputDataError,
        lambda: predict_images(bundle_src, images, out, batch_size=8, max_image_pixels=1000),
        images / "a.png",
        "48x40",
        "1000",
        "--max-image-pixels",
        fix="raise --max-image-pixels",
    )
    assert not (out / "predictions.json").exists()
    big = huge_png(images / "b.png", 20000, 20000)
    expect(
        InputDataError,
        lambda: predict_images(bundle_src, images, out, batch_size=8),
        big,
        "20000x20000",
        MAX_PIXELS_ENV,
        fix="raise",
    )
    cfg = validate_config(PredictFlowConfig, {"model": "m", "images": "i", "out": "o", "max_image_pixels": 300_000_000})
    assert cfg.max_image_pixels == 300_000_000


def test_123_header_beyond_opencv_limits_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenCV refuses headers over 2^30 pixels with a cv2.error: caught from the header, or from OpenCV when PIL
    cannot read the header (a Radiance HDR stream here); never a cv2.error."""
    claim = header_only_png(tmp_path / "claim.png", 40000, 40000)  # 1.6 GP in a few hundred bytes
    expect(InputDataError, lambda: read_image(claim), claim, "40000x40000", fix=f"raise {MAX_PIXELS_ENV}")
    monkeypatch.setenv(MAX_PIXELS_ENV, str(4 * 10**9))  # a limit above OpenCV's own
    expect(
        InputDataError, lambda: read_image(claim), claim, "40000x40000", fix="more than OpenCV decodes.*split the image"
    )
    hdr = tmp_path / "radiance.png"  # unknown to PIL: no header check possible, OpenCV's refusal becomes one line
    hdr.write_bytes(b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 40000 +X 40000\n" + b"\x00" * 64)
    expect(
        InputDataError, lambda: read_image(hdr), hdr, fix="OpenCV refuses to decode it.*size limits.*split the image"
    )


@pytest.mark.slow
def test_123b_cli_huge_header_ends_with_one_error_line(tmp_path: Path) -> None:
    """The dataset CLI on an image whose header claims 1.6 GP: exit 1, one 'error: ...' line, no traceback."""
    src = tmp_path / "imgs"
    make_dataset(tmp_path / "src", n=3, n_empty=1)
    os.rename(tmp_path / "src" / "images", src)
    header_only_png(src / "claim.png", 40000, 40000)
    out = tmp_path / "patches"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        textwrap.dedent(f"""\
        data:
          images: {src}
          masks: {tmp_path / "src" / "masks"}
          warning_on_missing_mask: false
          class_to_idx: {{bg: 0, a: 1, b: 2}}
        dataset:
          output_folder: {out}
          patch_number: [2, 2]
        storage_root: {tmp_path / "store"}
        """)
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", MAX_PIXELS_ENV)}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    proc = subprocess.run(
        [sys.executable, "-m", "flows.dataset", "--config", str(cfg)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(src / "claim.png") in errors[0] and "dataset.max_image_pixels" in errors[0], errors
    assert "cv2.error" not in proc.stderr
    assert not (out / "info.json").exists()


@pytest.mark.slow
def test_124_12bit_data_in_16bit_png_has_the_full_range_everywhere(bundle_src: Path, tmp_path: Path) -> None:  # noqa: F811
    """Rule "auto" (default): a 12-bit ramp saved as 16-bit PNG gives 0..255 (value >> 4), not 0..15 (>> 8), in the
    val/test patches, in training crops and in predict; patchflow.json and model.json record the rule."""
    from tasks.features.plans import decode_attrs
    from tasks.model.bundle import model_json
    from tasks.model.config import TrainFlowConfig
    from tasks.predict.stage import predict_images

    ramps = {f"r{i}.png": gradient12(channels=3 if i % 2 else 1) for i in range(4)}
    expected = {Path(k).stem: bgr((v >> 4).astype(np.uint8)) for k, v in ramps.items()}
    out = tmp_path / "ds"
    generate(entries(ramps, tmp_path / "src"), out)  # 2 train, 1 val, 1 test images
    side = json.loads((out / "patchflow.json").read_text())
    assert side["sixteen_bit"] == "auto"
    patches = patches_of(out)
    assert len(patches) == 8
    for rel, patch in patches.items():  # 2x2 grid of 32x40 patches
        stem, idx = Path(rel).stem.rsplit("_", 1)
        y, x = divmod(int(idx), 2)
        np.testing.assert_array_equal(patch, expected[stem][32 * y : 32 * y + 32, 40 * x : 40 * x + 40])
    assert max(int(p.max()) for p in patches.values()) == 255
    s = draw_pass(out, read_train_list(out), CLASS_TO_IDX, seed=0, pass_index=0)
    n = 0
    for rows, crops in iter_pass_patches(s, 8, dataset_decoding(out)):
        for r, crop in zip(rows.tolist(), crops):
            y0, x0, y1, x1 = s.box[r]
            np.testing.assert_array_equal(crop, expected[Path(s.image_path[r]).stem][y0:y1, x0:x1])
            n += 1
    assert n == len(s) > 0
    assert decode_attrs(out) == {"sixteen_bit": "auto"}  # what the feature stores decode with
    cfg = TrainFlowConfig.model_validate({"datamodule": {"data_path": str(out)}})
    assert model_json(cfg, "digest")["sixteen_bit"] == "auto"
    # predict decodes by the bundle's rule: overlay = image where the class map is 0, (image + colour) / 2 elsewhere
    bundle = tmp_path / "deployment_model"
    shutil.copytree(bundle_src, bundle)
    images = tmp_path / "raw"
    write_image(images / "r1.png", ramps["r1.png"])
    for rule, want in (("auto", expected["r1"]), (None, bgr((ramps["r1.png"] >> 8).astype(np.uint8)))):
        _edit_meta(bundle, sixteen_bit=rule if rule is not None else ...)  # no key: legacy >> 8 (older bundles)
        predict_images(bundle, images, tmp_path / f"pred-{rule}", batch_size=8)
        overlay = cv2.imread(str(tmp_path / f"pred-{rule}" / "r1_overlay.png")).astype(np.int32)
        cmap = cv2.imread(str(tmp_path / f"pred-{rule}" / "r1_classmap.png"), cv2.IMREAD_UNCHANGED)
        from tasks.evaluation.figures import class_colour

        base = overlay.copy()
        for c in np.unique(cmap[cmap > 0]):
            base[cmap == c] = 2 * overlay[cmap == c] - np.array(class_colour(int(c)))
        assert np.abs(base - want.astype(np.int32)).max() <= 1, rule


@pytest.mark.parametrize(
    "rule, expect_fn",
    [
        (10, lambda v: np.minimum(v >> 2, 255)),
        (12, lambda v: v >> 4),
        ([1000, 3000], lambda v: np.clip(np.round((v.astype(np.float64) - 1000) * 255 / 2000), 0, 255)),
    ],
)
def test_125_sixteen_bit_fixed_bits_and_window(tmp_path: Path, rule, expect_fn) -> None:
    """sixteen_bit=<bits>: value >> (bits - 8), clipped; [low, high]: a linear map to 0..255, clipped. Recorded in
    patchflow.json and model.json; a Quadra dataset (no sidecar) gets the legacy >> 8 that cut its patches."""
    from tasks.model.bundle import model_json
    from tasks.model.config import TrainFlowConfig

    img = gradient12()
    out = tmp_path / "ds"
    generate(entries({"r.png": img}, tmp_path / "src"), out, val_size=1.0, test_size=0.0, sixteen_bit=rule)
    want = expect_fn(img.astype(np.int64)).astype(np.uint8)
    for rel, patch in patches_of(out).items():
        y, x = divmod(int(Path(rel).stem.rsplit("_", 1)[1]), 2)
        np.testing.assert_array_equal(patch[..., 0], want[32 * y : 32 * y + 32, 40 * x : 40 * x + 40])
    assert json.loads((out / "patchflow.json").read_text())["sixteen_bit"] == rule
    assert dataset_decoding(out).sixteen_bit == (tuple(rule) if isinstance(rule, list) else rule)
    cfg = TrainFlowConfig.model_validate({"datamodule": {"data_path": str(out)}})
    assert model_json(cfg, "digest")["sixteen_bit"] == rule
    (out / "patchflow.json").unlink()  # now it looks like a Quadra dataset
    assert dataset_decoding(out).sixteen_bit == 16


def test_126_16bit_image_with_less_than_8_bits_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A 16-bit image whose values stay below 256 decodes dark under every shift: one warning per image, however
    often it is decoded (dataset stage, every training pass)."""
    dim = (np.arange(64 * 80).reshape(64, 80) % 200).astype(np.uint16)
    dd = entries({f"d{i}.png": dim for i in range(4)}, tmp_path / "src")
    out = tmp_path / "ds"
    with caplog.at_level(logging.WARNING, logger="patchflow"):
        generate(dd, out)
        for p in range(3):
            s = draw_pass(out, read_train_list(out), CLASS_TO_IDX, seed=0, pass_index=p)
            list(iter_pass_patches(s, 8, dataset_decoding(out)))
    warned = [r.getMessage() for r in caplog.records if "less than 8 bits" in r.getMessage()]
    assert warned, "no warning"
    for d in dd:
        assert sum(Path(d["path"]).name in m for m in warned) <= 1, warned
    assert "largest value is 199" in warned[0] and "sixteen_bit" in warned[0]


@pytest.mark.parametrize("orientation", [5, 6, 7, 8])
def test_127_exif_rotated_jpeg_with_a_mask_of_the_displayed_size(tmp_path: Path, orientation: int) -> None:
    """A JPEG stored 80x30 with an EXIF rotation (viewers show it 30x80) and a mask drawn on the displayed frame:
    the message says the image carries an EXIF rotation and that the stored frame is used."""
    from PIL import Image

    dd = make_dataset(tmp_path / "src", n=3, n_empty=1)
    im = Image.fromarray(np.random.default_rng(3).integers(0, 255, (30, 80, 3), dtype=np.uint8))
    exif = im.getexif()
    exif[0x0112] = orientation
    jpg = tmp_path / "src" / "images" / "rot.jpg"
    im.save(jpg, exif=exif)
    mask = write_image(tmp_path / "src" / "masks" / "rot.png", np.zeros((80, 30), np.uint8))  # displayed frame
    dd.append({"base_name": jpg.name, "path": str(jpg), "mask": str(mask)})
    before = tree_digest(tmp_path / "src")
    out = tmp_path / "out"
    expect(
        InputDataError,
        lambda: generate(dd, out),
        jpg,
        mask,
        f"EXIF rotation (orientation {orientation})",
        "stored pixel frame 80x30",
        fix="rotate the mask to the stored frame or re-save the image without the EXIF rotation",
    )
    assert_no_dataset(out)
    assert tree_digest(tmp_path / "src") == before


@pytest.mark.parametrize("orientation", [2, 3, 4])
def test_128_exif_flip_cannot_be_seen_by_size_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, orientation: int
) -> None:
    """Orientations 2-4 (mirror, rotate 180, flip) keep the size: accepted in the stored frame, with one warning per
    image saying so."""
    from PIL import Image

    dd = make_dataset(tmp_path / "src", n=3, n_empty=1)
    im = Image.fromarray(np.random.default_rng(4).integers(0, 255, (64, 80, 3), dtype=np.uint8))
    exif = im.getexif()
    exif[0x0112] = orientation
    jpg = tmp_path / "src" / "images" / "flip.jpg"
    im.save(jpg, exif=exif, quality=95)
    mask = write_image(tmp_path / "src" / "masks" / "flip.png", np.zeros((64, 80), np.uint8))
    dd.append({"base_name": jpg.name, "path": str(jpg), "mask": str(mask)})
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="patchflow"):
        generate(dd, out, val_size=0.5, test_size=0.5)  # the scan and the patch cut both read the header
    warned = [r.getMessage() for r in caplog.records if "EXIF orientation" in r.getMessage()]
    assert len(warned) == 1 and str(jpg) in warned[0] and f"({orientation})" in warned[0], warned
    assert "stored pixel frame 80x64" in warned[0]
    stored = cv2.imread(str(jpg), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    got = sorted((out / "val").rglob("flip_*.png")) + sorted((out / "test").rglob("flip_*.png"))
    if got:  # in val or test: patches are cut from the stored frame
        for p in got:
            y, x = divmod(int(p.stem.rsplit("_", 1)[1]), 2)
            np.testing.assert_array_equal(cv2.imread(str(p)), stored[32 * y : 32 * y + 32, 40 * x : 40 * x + 40])


def test_129_bad_decoding_settings(tmp_path: Path, bundle_src: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """sixteen_bit, max_image_pixels and $PATCHFLOW_MAX_IMAGE_PIXELS are checked before anything is read."""
    from tasks.dataset.config import DatasetFlowConfig
    from tasks.predict.config import PredictFlowConfig
    from tasks.predict.stage import predict_images

    base = ["data.images=i", "data.class_to_idx={bg: 0}", "dataset.patch_number=[2, 2]"]
    for bad in ("7", "[3000, 1000]", "bright", "true"):
        expect(
            ConfigError,
            lambda bad=bad: load_config(DatasetFlowConfig, None, [*base, f"dataset.sixteen_bit={bad}"]),
            "dataset.sixteen_bit",
            fix="'auto'.*8..16.*low, high",
        )
    expect(
        ConfigError,
        lambda: load_config(DatasetFlowConfig, None, [*base, "dataset.max_image_pixels=0"]),
        "dataset.max_image_pixels",
        fix="greater than or equal to 1",
    )
    pred = {"model": "m", "images": "i", "out": "o", "max_image_pixels": 0}
    expect(
        ConfigError,
        lambda: validate_config(PredictFlowConfig, pred),
        "max_image_pixels",
        fix="greater than or equal to 1",
    )
    dd = make_dataset(tmp_path / "src", n=3, n_empty=1)
    out = tmp_path / "out"
    expect(ValueError, lambda: generate(dd, out, sixteen_bit=17), "sixteen_bit", "17", fix="8..16")
    assert_no_dataset(out)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    expect(ConfigError, lambda: generate(dd, out), MAX_PIXELS_ENV, "'lots'", fix="fix or unset it")
    assert_no_dataset(out)
    monkeypatch.delenv(MAX_PIXELS_ENV)
    bundle = tmp_path / "deployment_model"
    shutil.copytree(bundle_src, bundle)
    _edit_meta(bundle, sixteen_bit="bright")
    write_image(tmp_path / "raw" / "a.png", np.zeros((40, 48, 3), np.uint8))
    expect(
        bdl.BundleError,
        lambda: predict_images(bundle, tmp_path / "raw", tmp_path / "pred"),
        bundle / "model.json",
        "'bright'",
        fix="re-export the model",
    )
