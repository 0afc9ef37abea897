"""The bad-input catalogue (issue 7, documented in docs/bad-inputs.md): one test per entry.

A *rejected* input must raise one exception whose message names the offending file or config key and
says what to do, and leave no output that looks complete (no ``info.json``/``patchflow.json`` in the
dataset folder, no temporary sibling, no bundle or prediction marker). An *accepted* input (RGBA,
16-bit or grayscale images, small images...) must give the documented output.

Test names are ``test_<NN>_<what>``; ``NN`` is the entry number in docs/bad-inputs.md.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from storage import bundle as bdl
from storage.fingerprint import CODE_VERSION
from storage.h5files import read_region
from storage.layout import DatasetFormatError, read_info
from storage.manifest import write_manifest
from tasks.cli import parse_cli
from tasks.config import ConfigError, load_config, load_yaml
from tasks.dataset.association import AssociationError, get_image_mask_association
from tasks.dataset.generate import generate_patch_dataset
from tasks.features.listing import list_split, read_train_list
from tasks.features.sampler import draw_pass
from tasks.imageio import InputDataError
from tasks.model.config import TrainFlowConfig
from tests._synth import CLASS_TO_IDX, make_dataset, tree_digest, write_image

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ helpers


def expect(exc_type: type[BaseException], fn, *names: object, fix: str) -> str:
    """Run ``fn``; it must raise ``exc_type`` whose message names every ``names`` item and matches ``fix``."""
    with pytest.raises(exc_type) as ei:
        fn()
    msg = str(ei.value)
    for name in names:
        assert str(name) in msg, f"{name!r} not named in: {msg}"
    assert re.search(fix, msg, re.IGNORECASE), f"no fix ({fix!r}) in: {msg}"
    if os.environ.get(
        "PATCHFLOW_SHOW_ERRORS"
    ):  # `PATCHFLOW_SHOW_ERRORS=1 pytest -s ...` prints the catalogue's messages
        print(f"\n[{type(ei.value).__name__}] {msg}")
    return msg


def assert_no_dataset(out: Path, existed: bool = False) -> None:
    """Nothing that looks like a finished dataset at ``out`` and no temporary/old sibling left over."""
    out = Path(out)
    if not existed:
        assert not out.exists(), f"{out} was created: {sorted(p.name for p in out.iterdir())}"
    assert not (out / "info.json").exists() and not (out / "patchflow.json").exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, f"temporary folders left next to {out}: {leftovers}"


def source(tmp_path: Path, n: int = 4, **kw) -> list[dict]:
    """A tiny valid source dataset (64x80 images, 1-channel index masks of classes bg/a/b)."""
    return make_dataset(tmp_path / "src", n=n, n_empty=1, **kw)


def generate(dd: list[dict], out: Path, **kw) -> dict:
    params = dict(val_size=0.25, test_size=0.25, patch_number=[2, 2], class_to_idx=dict(CLASS_TO_IDX))
    params.update(kw)
    class_to_idx = params.pop("class_to_idx")
    return generate_patch_dataset([dict(d) for d in dd], class_to_idx, output_folder=str(out), **params)


def png(path: Path, array: np.ndarray) -> Path:
    return write_image(path, array)


def single(tmp_path: Path, img: np.ndarray, mask: np.ndarray | None, name: str = "x") -> list[dict]:
    ip = png(tmp_path / "in" / f"{name}.png", img)
    mp = png(tmp_path / "in" / "masks" / f"{name}.png", mask) if mask is not None else None
    return [{"base_name": ip.name, "path": str(ip), "mask": str(mp) if mp else None}]


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    """A valid generated patch dataset (to be damaged by the reading-side tests)."""
    out = tmp_path / "ds"
    generate(source(tmp_path, n=6), out)
    return out


# ===================================================================== A. association (folders, names)


def test_01_data_folder_missing(tmp_path: Path) -> None:
    expect(
        AssociationError,
        lambda: get_image_mask_association(str(tmp_path / "nope"), mask_extension="_mask"),
        tmp_path / "nope",
        fix="point it at your images",
    )


def test_02_data_folder_empty(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    expect(
        AssociationError,
        lambda: get_image_mask_association(str(tmp_path / "data"), str(tmp_path / "data")),
        tmp_path / "data",
        fix="check data_folder",
    )


def test_03_data_folder_only_non_image_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("not an image")
    (data / "scan.pdf").write_bytes(b"%PDF-1.4")
    (data / "folder.png").mkdir()  # a folder named like an image
    expect(
        AssociationError,
        lambda: get_image_mask_association(str(data), mask_extension="_mask"),
        data,
        ".png",
        fix="check data_folder",
    )


def test_04_non_image_files_among_images_are_ignored(tmp_path: Path) -> None:
    """Accepted: only image extensions are listed; folders, hidden and other files are skipped."""
    data = tmp_path / "data"
    png(data / "a.png", np.zeros((8, 8, 3), np.uint8))
    png(data / "a_mask.png", np.zeros((8, 8), np.uint8))
    (data / "notes.txt").write_text("x")
    (data / "folder.png").mkdir()
    (data / ".hidden.png").write_bytes(b"x")
    assoc = get_image_mask_association(str(data), mask_extension="_mask")
    assert assoc == [{"base_name": "a.png", "path": str(data / "a.png"), "mask": str(data / "a_mask.png")}]


def test_05_duplicate_stems(tmp_path: Path) -> None:
    data = tmp_path / "data"
    png(data / "a.png", np.zeros((8, 8, 3), np.uint8))
    png(data / "sub" / "a.jpg", np.zeros((8, 8, 3), np.uint8))
    expect(
        AssociationError,
        lambda: get_image_mask_association(str(data), str(tmp_path / "data")),
        data / "a.png",
        data / "sub" / "a.jpg",
        fix="rename or remove",
    )


def test_06_duplicate_stems_in_a_hand_made_data_dictionary(tmp_path: Path) -> None:
    dd = source(tmp_path, n=2)
    dd[1] = dict(dd[1], base_name=dd[0]["base_name"])
    out = tmp_path / "out"
    expect(ValueError, lambda: generate(dd, out), "im_0", dd[1]["path"], fix="rename one")
    assert_no_dataset(out)


def test_07_several_candidate_masks(tmp_path: Path) -> None:
    data, masks = tmp_path / "data", tmp_path / "masks"
    png(data / "a.png", np.zeros((8, 8, 3), np.uint8))
    png(masks / "a.png", np.zeros((8, 8), np.uint8))
    png(masks / "a.bmp", np.zeros((8, 8), np.uint8))
    expect(
        AssociationError,
        lambda: get_image_mask_association(str(data), str(masks)),
        masks / "a.png",
        masks / "a.bmp",
        fix="keep exactly one",
    )


def test_08_mask_folder_missing(tmp_path: Path) -> None:
    png(tmp_path / "data" / "a.png", np.zeros((8, 8, 3), np.uint8))
    expect(
        AssociationError,
        lambda: get_image_mask_association(str(tmp_path / "data"), str(tmp_path / "masks")),
        tmp_path / "masks",
        fix="point it at your masks",
    )


def test_09_no_mask_folder_and_no_mask_extension(tmp_path: Path) -> None:
    png(tmp_path / "data" / "a.png", np.zeros((8, 8, 3), np.uint8))
    expect(
        AssociationError, lambda: get_image_mask_association(str(tmp_path / "data")), "mask_extension", fix="is needed"
    )


def test_10_empty_mask_folder_warns_per_image(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Accepted: every image gets mask None (test/None later) and one warning naming it."""
    png(tmp_path / "data" / "a.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "masks").mkdir()
    with caplog.at_level("WARNING", logger="patchflow.association"):
        assoc = get_image_mask_association(str(tmp_path / "data"), str(tmp_path / "masks"))
    assert [a["mask"] for a in assoc] == [None]
    assert any(str(tmp_path / "data" / "a.png") in r.getMessage() for r in caplog.records)


# ============================================================================== B. images (generation)


def test_11_corrupt_image(tmp_path: Path) -> None:
    dd = source(tmp_path)
    Path(dd[2]["path"]).write_bytes(os.urandom(500))
    out = tmp_path / "out"
    expect(InputDataError, lambda: generate(dd, out), dd[2]["path"], fix="replace or remove")
    assert_no_dataset(out)


@pytest.mark.parametrize("ext,split", [(".png", "train"), (".png", "val"), (".jpg", "train"), (".jpg", "val")])
def test_12_truncated_image(tmp_path: Path, ext: str, split: str) -> None:
    """The header is intact (size known in phase 1): the pixel decode of phase 2 must still refuse it."""
    img = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    path = png(tmp_path / "in" / f"t{ext}", img)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out = tmp_path / "out"
    dd = [{"base_name": path.name, "path": str(path), "mask": None}]
    sizes = {"train": (0.0, 0.0), "val": (1.0, 0.0)}[split]
    expect(
        InputDataError,
        lambda: generate(dd, out, val_size=sizes[0], test_size=sizes[1], missing_mask="good"),
        path,
        fix="replace or remove",
    )
    assert_no_dataset(out)


def test_13_non_image_file_in_data_dictionary(tmp_path: Path) -> None:
    dd = source(tmp_path)
    notes = tmp_path / "src" / "images" / "notes.txt"
    notes.write_text("hello")
    dd.append({"base_name": "notes.txt", "path": str(notes), "mask": None})
    out = tmp_path / "out"
    expect(InputDataError, lambda: generate(dd, out), notes, fix="replace or remove")
    assert_no_dataset(out)


def test_14_image_deleted_after_association(tmp_path: Path) -> None:
    dd = source(tmp_path)
    os.remove(dd[1]["path"])
    out = tmp_path / "out"
    expect(InputDataError, lambda: generate(dd, out), dd[1]["path"], fix="rerun the association")
    assert_no_dataset(out)


def test_15_corrupt_image_with_worker_processes(tmp_path: Path) -> None:
    """The same error crosses the process pool; workers are stopped before the temp folder is removed."""
    dd = source(tmp_path, n=6)
    Path(dd[4]["path"]).write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    out = tmp_path / "out"
    expect(InputDataError, lambda: generate(dd, out, num_workers=2), dd[4]["path"], fix="replace or remove")
    assert_no_dataset(out)


def _one_val_patch(tmp_path: Path, path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Generate a 1x1-grid dataset with ``path`` in val and return its only patch."""
    mask = png(tmp_path / "in" / "masks" / f"{path.stem}.png", np.zeros(shape, np.uint8))
    out = tmp_path / "out"
    generate(
        [{"base_name": path.name, "path": str(path), "mask": str(mask)}],
        out,
        val_size=1.0,
        test_size=0.0,
        patch_number=[1, 1],
    )
    patch = cv2.imread(str(out / "val" / "bg" / f"{path.stem}_0.png"), cv2.IMREAD_UNCHANGED)
    assert patch is not None and (out / "patchflow.json").is_file()
    return patch


def test_16_rgba_image_accepted(tmp_path: Path) -> None:
    """Accepted: alpha is dropped, the patch holds the BGR channels."""
    bgr = np.random.default_rng(1).integers(0, 255, (16, 20, 3), dtype=np.uint8)
    path = png(tmp_path / "in" / "rgba.png", np.dstack([bgr, np.full((16, 20), 9, np.uint8)]))
    patch = _one_val_patch(tmp_path, path, (16, 20))
    assert patch.shape == (16, 20, 3) and patch.dtype == np.uint8
    assert np.array_equal(patch, bgr)


def test_17_16bit_image_accepted(tmp_path: Path) -> None:
    """Accepted: 16-bit values are scaled to 8 bits (value >> 8), 3 channels."""
    img16 = np.random.default_rng(2).integers(0, 65535, (16, 20, 3)).astype(np.uint16)
    path = png(tmp_path / "in" / "deep.png", img16)
    patch = _one_val_patch(tmp_path, path, (16, 20))
    assert patch.dtype == np.uint8 and np.array_equal(patch, (img16 >> 8).astype(np.uint8))


def test_18_grayscale_image_accepted(tmp_path: Path) -> None:
    """Accepted: patches stay 1-channel PNGs; any BGR reader (ours, Quadra's cv2.imread) gets the channel repeated."""
    gray = np.random.default_rng(3).integers(0, 255, (16, 20), dtype=np.uint8)
    path = png(tmp_path / "in" / "gray.png", gray)
    patch = _one_val_patch(tmp_path, path, (16, 20))
    assert patch.shape == (16, 20) and np.array_equal(patch, gray)
    bgr = cv2.imread(str(tmp_path / "out" / "val" / "bg" / "gray_0.png"))
    assert bgr.shape == (16, 20, 3) and all(np.array_equal(bgr[..., c], gray) for c in range(3))


def test_19_image_smaller_than_a_patch_is_padded(tmp_path: Path) -> None:
    """Accepted: padded bottom/right by edge replication up to the patch size (policy in storage/geometry.py)."""
    img = np.random.default_rng(4).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    ip = png(tmp_path / "in" / "small.png", img)
    mp = png(tmp_path / "in" / "masks" / "small.png", np.zeros((20, 24), np.uint8))
    out = tmp_path / "out"
    generate(
        [{"base_name": ip.name, "path": str(ip), "mask": str(mp)}],
        out,
        val_size=1.0,
        test_size=0.0,
        patch_number=None,
        patch_size=[32, 32],
    )
    patch = cv2.imread(str(out / "val" / "bg" / "small_0.png"))
    assert patch.shape == (32, 32, 3)
    assert np.array_equal(patch[:20, :24], img)
    assert np.array_equal(patch[20:, :24], np.repeat(img[19:20], 12, axis=0))
    assert np.array_equal(patch[:20, 24:], np.repeat(img[:, 23:24], 8, axis=1))
    assert json.loads((out / "patchflow.json").read_text())["grid_policy"].endswith("pad-bottom-right-replicate")


# ====================================================================================== C. masks


def test_20_mask_of_another_size(tmp_path: Path) -> None:
    dd = source(tmp_path)
    png(Path(dd[1]["mask"]), np.zeros((30, 30), np.uint8))
    out = tmp_path / "out"
    expect(InputDataError, lambda: generate(dd, out), dd[1]["mask"], dd[1]["path"], fix="must match their image")
    assert_no_dataset(out)


def test_21_mask_values_outside_class_to_idx(tmp_path: Path) -> None:
    dd = source(tmp_path)
    mask = np.zeros((64, 80), np.uint8)
    mask[5:9, 5:9] = 7
    png(Path(dd[0]["mask"]), mask)
    out = tmp_path / "out"
    expect(InputDataError, lambda: generate(dd, out), dd[0]["mask"], "[7]", fix="add those classes or fix the mask")
    assert_no_dataset(out)


def test_22_rgb_colour_mask(tmp_path: Path) -> None:
    dd = source(tmp_path)
    mask = np.zeros((64, 80, 3), np.uint8)
    mask[5:9, 5:9] = (0, 0, 255)  # a red annotation
    png(Path(dd[0]["mask"]), mask)
    out = tmp_path / "out"
    expect(InputDataError, lambda: generate(dd, out), dd[0]["mask"], fix="mask_preprocessing")
    assert_no_dataset(out)


def test_23_16bit_mask_with_large_values(tmp_path: Path) -> None:
    dd = source(tmp_path)
    mask = np.zeros((64, 80), np.uint16)
    mask[5:9, 5:9] = 1000
    png(Path(dd[0]["mask"]), mask)
    out = tmp_path / "out"
    expect(InputDataError, lambda: generate(dd, out), dd[0]["mask"], fix="re-encode")
    assert_no_dataset(out)


def test_24_corrupt_mask_file(tmp_path: Path) -> None:
    dd = source(tmp_path)
    Path(dd[3]["mask"]).write_bytes(b"not a png at all")
    out = tmp_path / "out"
    expect(InputDataError, lambda: generate(dd, out), dd[3]["mask"], fix="replace it")
    assert_no_dataset(out)


@pytest.mark.parametrize("kind", ["16bit-small-values", "rgb-equal-channels", "palette"])
def test_25_mask_encodings_accepted(tmp_path: Path, kind: str) -> None:
    """Accepted: 16-bit masks with values <= 255, 3 equal channels and palette PNGs give their indices."""
    from PIL import Image

    mask = np.zeros((16, 20), np.uint8)
    mask[2:10, 3:12] = 2
    mp = tmp_path / "in" / "masks" / "m.png"
    mp.parent.mkdir(parents=True)
    if kind == "16bit-small-values":
        png(mp, mask.astype(np.uint16))
    elif kind == "rgb-equal-channels":
        png(mp, np.dstack([mask] * 3))
    else:
        im = Image.fromarray(mask, mode="P")
        im.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
        im.save(mp)
    ip = png(tmp_path / "in" / "m.png", np.full((16, 20, 3), 80, np.uint8))
    out = tmp_path / "out"
    generate(
        [{"base_name": ip.name, "path": str(ip), "mask": str(mp)}],
        out,
        val_size=1.0,
        test_size=0.0,
        patch_number=[1, 1],
    )
    assert [p.name for p in (out / "val" / "b").iterdir()] == ["m_0.png"]  # class 'b' = index 2
    saved = cv2.imread(str(out / "original" / "masks" / "m.png"), cv2.IMREAD_UNCHANGED)
    assert saved.ndim == 2 and np.array_equal(saved, mask)


# ========================================================================= D. generation parameters


def test_26_empty_data_dictionary(tmp_path: Path) -> None:
    out = tmp_path / "out"
    expect(ValueError, lambda: generate([], out), "data_dictionary", fix="check get_image_mask_association")
    assert_no_dataset(out)


@pytest.mark.parametrize("bad", ["scratch,deep", "a/b", "None", ".hidden"])
def test_27_unusable_class_names(tmp_path: Path, bad: str) -> None:
    dd = source(tmp_path, n=2)
    out = tmp_path / "out"
    expect(
        ValueError,
        lambda: generate(dd, out, class_to_idx={"bg": 0, bad: 1, "b": 2}),
        repr(bad),
        fix="no commas or slashes",
    )
    assert_no_dataset(out)


@pytest.mark.parametrize("mapping", [{"a": 1, "b": 2}, {"bg": 0, "a": 1, "b": 1}, {"bg": 0, "a": 300}])
def test_28_bad_class_to_idx_values(tmp_path: Path, mapping: dict) -> None:
    dd = source(tmp_path, n=2)
    out = tmp_path / "out"
    expect(ValueError, lambda: generate(dd, out, class_to_idx=mapping), "class_to_idx", fix="must")
    assert_no_dataset(out)


@pytest.mark.parametrize(
    "kw,key",
    [
        ({"patch_number": None, "patch_size": None}, "patch_number"),
        ({"patch_number": [2, 2], "patch_size": [8, 8]}, "patch_size"),
        ({"patch_number": [0, 2]}, "patch_number"),
        ({"overlap": 1.5}, "overlap"),
    ],
    ids=["no-geometry", "both-geometries", "zero-patches", "overlap>=1"],
)
def test_29_bad_geometry(tmp_path: Path, kw: dict, key: str) -> None:
    dd = source(tmp_path, n=2)
    out = tmp_path / "out"
    expect(ValueError, lambda: generate(dd, out, **kw), key, fix="give exactly one|must be")
    assert_no_dataset(out)


def test_30_val_plus_test_above_one(tmp_path: Path) -> None:
    out = tmp_path / "out"
    expect(
        ValueError,
        lambda: generate(source(tmp_path, n=2), out, val_size=0.7, test_size=0.5),
        "val_size",
        "test_size",
        fix="sum <= 1",
    )
    assert_no_dataset(out)


def test_31_annotated_good_not_a_class(tmp_path: Path) -> None:
    out = tmp_path / "out"
    expect(
        ValueError,
        lambda: generate(source(tmp_path, n=2), out, annotated_good=["scratch"]),
        "annotated_good",
        "'scratch'",
        fix="must be a non-background class name",
    )
    assert_no_dataset(out)


def test_32_lambda_mask_preprocessing_with_workers(tmp_path: Path) -> None:
    out = tmp_path / "out"
    expect(
        ValueError,
        lambda: generate(source(tmp_path, n=2), out, num_workers=2, mask_preprocessing=lambda m: m[..., 0]),
        "mask_preprocessing",
        fix="module-level function",
    )
    assert_no_dataset(out)


# ============================================================================ E. output folder / disk


def test_33_clear_output_folder_on_a_user_folder(tmp_path: Path) -> None:
    user = tmp_path / "my_documents"
    (user / "thesis").mkdir(parents=True)
    (user / "thesis" / "chapter1.tex").write_text("precious")
    (user / "notes.txt").write_text("precious too")
    before = tree_digest(user)
    expect(
        FileExistsError,
        lambda: generate(source(tmp_path, n=2), user, clear_output_folder=True),
        user,
        fix="choose a new or empty folder",
    )
    assert tree_digest(user) == before  # never deleted, never touched
    assert_no_dataset(user, existed=True)


def test_34_output_folder_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_text("a file")
    expect(FileExistsError, lambda: generate(source(tmp_path, n=2), target), target, fix="choose a folder path")
    assert target.read_text() == "a file"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_35_read_only_output_disk_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated: the file system refuses to write a patch PNG (EROFS, as a read-only mount does)."""
    dd = source(tmp_path)
    real = Path.write_bytes

    def refuse_png(self: Path, data: bytes) -> int:
        if self.suffix == ".png" and "val" in self.parts:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse_png)
    out = tmp_path / "out"
    expect(OSError, lambda: generate(dd, out), "could not write", ".png", fix="disk full|read-only")
    assert_no_dataset(out)


_FULL_DISK = textwrap.dedent(
    """
    import json, resource, signal, sys
    from tasks.dataset.generate import generate_patch_dataset
    args = json.loads(sys.argv[1])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
    try:
        generate_patch_dataset(args["dd"], args["classes"], output_folder=args["out"], patch_number=[2, 2],
                               val_size=0.25, test_size=0.25, **args["kw"])
        print(json.dumps({"type": None, "msg": ""}))
    except Exception as exc:
        print(json.dumps({"type": type(exc).__name__, "msg": str(exc), "errno": getattr(exc, "errno", None)}))
    """
)


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """A real full disk: generation in a subprocess whose file size limit (RLIMIT_FSIZE) is 2000 bytes."""
    runs = {}
    for name, kw in {"default": {}, "no-originals": {"save_original_images_and_masks": False}}.items():
        tmp = tmp_path_factory.mktemp(f"full-disk-{name}")
        dd = make_dataset(tmp / "src", n=4, n_empty=1)
        out = tmp / "out"
        arg = json.dumps({"dd": dd, "classes": CLASS_TO_IDX, "out": str(out), "kw": kw})
        proc = subprocess.run(
            [sys.executable, "-c", _FULL_DISK, arg], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        runs[name] = (out, json.loads(proc.stdout.strip().splitlines()[-1]))
    return runs


@pytest.mark.slow
def test_36_full_output_disk(full_disk) -> None:
    for out, res in full_disk.values():
        assert res["type"] == "OSError" and res["errno"] == 27, res  # EFBIG, as on a full disk
        assert_no_dataset(out)


def test_37_full_output_disk_h5_message(full_disk) -> None:
    """The first write of a run without copied originals is an h5 file: the error names it and the fix."""
    _out, res = full_disk["no-originals"]
    assert re.search(r"could not write \S+\.h5", res["msg"]), res
    assert "free disk space" in res["msg"]


def test_38_full_output_disk_message_names_the_file(full_disk) -> None:
    _out, res = full_disk["default"]
    assert "could not write" in res["msg"] and "free disk space" in res["msg"], res


def test_39_failed_rerun_keeps_the_previous_dataset(tmp_path: Path) -> None:
    """Documented: the previous complete dataset stays untouched (its sidecar fingerprint is the old inputs')."""
    dd = source(tmp_path)
    out = tmp_path / "out"
    generate(dd, out, fingerprint="old-inputs")
    before = tree_digest(out)
    Path(dd[0]["path"]).write_bytes(b"garbage")
    expect(InputDataError, lambda: generate(dd, out, fingerprint="new-inputs"), dd[0]["path"], fix="replace or remove")
    assert tree_digest(out) == before
    assert json.loads((out / "patchflow.json").read_text())["fingerprint"] == "old-inputs"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# ============================================================================ F. reading a dataset


def test_40_missing_info_json(dataset: Path) -> None:
    (dataset / "info.json").unlink()
    expect(DatasetFormatError, lambda: read_info(dataset), dataset / "info.json", fix="point data_path at the folder")


def test_41_info_json_not_json(dataset: Path) -> None:
    (dataset / "info.json").write_text('{"patch_size": [2, ')
    expect(DatasetFormatError, lambda: read_info(dataset), dataset / "info.json", fix="regenerate the patch dataset")


def test_42_info_json_missing_keys(dataset: Path) -> None:
    info = json.loads((dataset / "info.json").read_text())
    del info["train_files"]
    (dataset / "info.json").write_text(json.dumps(info))
    expect(
        DatasetFormatError,
        lambda: read_info(dataset),
        dataset / "info.json",
        "train_files",
        fix="regenerate the patch dataset",
    )


@pytest.mark.parametrize("line", ["im_0_good.h5,bg,extra", "im_0_good.h5", ",bg", "im_0_good.h5,"])
def test_43_broken_dataset_txt_line(dataset: Path, line: str) -> None:
    p = dataset / "train" / "dataset.txt"
    p.write_text(p.read_text() + line + "\n")
    n = len(p.read_text().splitlines())
    expect(DatasetFormatError, lambda: read_train_list(dataset), p, f"line {n}", fix="fix or remove the line")


def test_44_dataset_txt_class_not_in_class_to_idx(dataset: Path) -> None:
    p = dataset / "train" / "dataset.txt"
    h5 = p.read_text().splitlines()[0].split(",")[0]
    p.write_text(f"{h5},scratch\n")
    expect(
        DatasetFormatError,
        lambda: draw_pass(dataset, read_train_list(dataset), CLASS_TO_IDX, 0, 0),
        "'scratch'",
        h5,
        fix="add it to class_to_idx or list it in class_to_skip",
    )


def _first_h5(dataset: Path) -> Path:
    return dataset / "train" / (dataset / "train" / "dataset.txt").read_text().splitlines()[0].split(",")[0]


def test_45_h5_missing_datasets(dataset: Path) -> None:
    h5 = _first_h5(dataset)
    with h5py.File(h5, "a") as f:
        del f["triangles"]
    expect(
        DatasetFormatError,
        lambda: draw_pass(dataset, read_train_list(dataset), CLASS_TO_IDX, 0, 0),
        h5,
        "triangles",
        fix="regenerate the dataset",
    )


def test_46_h5_not_an_hdf5_file(dataset: Path) -> None:
    h5 = _first_h5(dataset)
    h5.write_bytes(b"this is not hdf5")
    expect(DatasetFormatError, lambda: read_region(h5), h5, fix="regenerate the dataset")


def test_47_h5_listed_but_missing(dataset: Path) -> None:
    h5 = _first_h5(dataset)
    h5.unlink()
    expect(
        DatasetFormatError,
        lambda: draw_pass(dataset, read_train_list(dataset), CLASS_TO_IDX, 0, 0),
        h5,
        fix="regenerate the dataset or remove its lines",
    )


def test_48_h5_bad_triangles_shape(dataset: Path) -> None:
    h5 = next(p for p in sorted((dataset / "train").glob("*.h5")) if not p.stem.endswith("good"))
    with h5py.File(h5, "a") as f:
        del f["triangles"]
        f.create_dataset("triangles", data=np.zeros((3, 4), np.int32))
    expect(DatasetFormatError, lambda: read_region(h5), h5, "(T, 3, 2)", fix="regenerate the dataset")


def test_49_image_referenced_by_h5_missing(dataset: Path) -> None:
    for p in (dataset / "original" / "images").iterdir():
        p.unlink()
    expect(
        DatasetFormatError,
        lambda: draw_pass(dataset, read_train_list(dataset), CLASS_TO_IDX, 0, 0),
        dataset / "original" / "images",
        fix="restore the image or regenerate the dataset",
    )


def test_50_val_patch_in_an_unknown_class_folder(dataset: Path) -> None:
    stray = dataset / "val" / "masks" / "x_0.png"
    png(stray, np.zeros((4, 4, 3), np.uint8))
    expect(
        DatasetFormatError,
        lambda: list_split(dataset, "val", CLASS_TO_IDX),
        dataset / "val" / "masks",
        fix="add it to class_to_idx, or exclude",
    )


def test_51_val_patch_directly_in_the_split_folder(dataset: Path) -> None:
    stray = png(dataset / "val" / "x_0.png", np.zeros((4, 4, 3), np.uint8))
    expect(DatasetFormatError, lambda: list_split(dataset, "val", CLASS_TO_IDX), stray, fix="must be in")


@pytest.mark.slow
def test_52_train_filename_names_a_missing_file(dataset: Path, tmp_path: Path) -> None:
    from tasks.features.store import extract_train_pass

    cfg = TrainFlowConfig.model_validate(
        {"datamodule": {"data_path": str(dataset), "train_filename": "datset.txt"}, "backbone": {"weights": None}}
    )
    expect(
        ValueError,
        lambda: extract_train_pass(cfg, 0, tmp_path / "store"),
        "datset.txt",
        "datamodule.train_filename",
        fix="not found|does not exist",
    )


# ================================================================================ G. configuration


def _yaml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_53_config_file_not_found(tmp_path: Path) -> None:
    expect(
        ConfigError,
        lambda: parse_cli(TrainFlowConfig, ["--config", str(tmp_path / "nope.yaml")], "x"),
        tmp_path / "nope.yaml",
        fix="check the --config path",
    )


def test_54_bad_yaml(tmp_path: Path) -> None:
    p = _yaml(tmp_path, "datamodule:\n  data_path: [unclosed\n")
    msg = expect(ConfigError, lambda: load_yaml(p), p, fix="fix the syntax")
    assert "line" in msg


def test_55_yaml_not_a_mapping(tmp_path: Path) -> None:
    p = _yaml(tmp_path, "- datamodule\n- backbone\n")
    expect(ConfigError, lambda: load_yaml(p), p, fix="must hold a mapping")


def test_56_unknown_config_key_names_close_matches(tmp_path: Path) -> None:
    p = _yaml(tmp_path, "datamodule:\n  data_path: x\n  batchsize: 8\ntrainer:\n  iterations: 3\n")
    msg = expect(
        ConfigError,
        lambda: load_config(TrainFlowConfig, p),
        p,
        "datamodule.batchsize",
        "trainer.iterations",
        fix="did you mean 'batch_size'",
    )
    assert "iteration_over_training" in msg


def test_57_unknown_key_in_an_override() -> None:
    expect(
        ConfigError,
        lambda: load_config(TrainFlowConfig, None, ["datamodule.data_path=x", "backbone.nmae=resnet18"]),
        "backbone.nmae",
        fix="did you mean 'name'",
    )


@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.iteration_over_training=many", "trainer.iteration_over_training"),
        ("datamodule.batch_size=0", "datamodule.batch_size"),
        ("transforms.mean=[0.5, 0.5]", "transforms.mean"),
        ("backbone.name=resnet19", "backbone.name"),
        ("task.precision=fp16", "task.precision"),
    ],
)
def test_58_wrong_types_and_values(override: str, key: str) -> None:
    expect(
        ConfigError,
        lambda: parse_cli(TrainFlowConfig, ["datamodule.data_path=x", override], "x"),
        f"'{key}'",
        fix="should|must|give a list",
    )


def test_59_missing_required_key(tmp_path: Path) -> None:
    p = _yaml(tmp_path, "backbone:\n  name: resnet18\n")
    expect(ConfigError, lambda: load_config(TrainFlowConfig, p), "datamodule", fix="set it in the config file")


def test_60_malformed_override() -> None:
    expect(
        ConfigError,
        lambda: parse_cli(TrainFlowConfig, ["datamodule.data_path"], "x"),
        "datamodule.data_path",
        fix="must look like dotted.key=value",
    )


def test_61_override_into_a_value_that_is_not_a_section() -> None:
    expect(
        ConfigError,
        lambda: load_config(TrainFlowConfig, None, ["datamodule.data_path=x", "datamodule.data_path.sub=1"]),
        "data_path",
        fix="is not a section",
    )


def test_62_dataset_config_geometry_and_class_map() -> None:
    from tasks.dataset.config import DatasetFlowConfig

    base = ["data.images=imgs", "data.class_to_idx={bg: 0, a: 1}"]
    expect(
        ConfigError,
        lambda: load_config(DatasetFlowConfig, None, [*base, "dataset.val_size=0.2"]),
        "dataset.patch_number",
        "dataset.patch_size",
        fix="set exactly one",
    )
    expect(
        ConfigError,
        lambda: load_config(DatasetFlowConfig, None, ["data.images=imgs", "dataset.patch_number=[2, 2]"]),
        "data.class_to_idx",
        fix="set data.class_to_idx",
    )


def test_63_class_to_idx_file_unreadable(tmp_path: Path) -> None:
    from tasks.dataset.config import DataSection

    bad = tmp_path / "classes.json"
    bad.write_text("{bg: 0")
    section = DataSection(images="imgs", class_to_idx_file=str(bad))
    expect(ConfigError, section.resolved_class_to_idx, "data.class_to_idx_file", bad, fix="JSON mapping")
    bad.write_text('{"bg": "zero"}')
    expect(ConfigError, section.resolved_class_to_idx, bad, fix="must map class names to integer")


def test_64_evaluate_config_unknown_key() -> None:
    from tasks.evaluation.config import EvaluateFlowConfig

    expect(
        ConfigError,
        lambda: load_config(
            EvaluateFlowConfig, None, ["datamodule.data_path=x", "task.model_path=m", "task.output.reconstruction=soft"]
        ),
        "task.output.reconstruction",
        fix="did you mean 'reconstruction_method'",
    )


@pytest.mark.slow
def test_65_cli_prints_one_error_and_exits_2(tmp_path: Path) -> None:
    """The real CLI: one 'error:' message, no traceback, exit code 2, no output folder."""
    out = tmp_path / "patches"
    cfg = _yaml(
        tmp_path,
        f"""\
        data:
          images: {tmp_path / "imgs"}
          class_to_idx: {{bg: 0}}
        dataset:
          output_folder: {out}
          patch_number: [2, 2]
          overlp: 0.5
        """,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "flows.dataset", "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "dataset.overlp" in proc.stderr and "did you mean 'overlap'" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_65b_cli_input_error_ends_with_one_error_line_and_exit_1(tmp_path: Path) -> None:
    """A bad input found inside a flow run (empty image folder): exit 1 and one 'error: ...' line naming the folder."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    out = tmp_path / "patches"
    cfg = _yaml(
        tmp_path,
        f"""\
        data:
          images: {imgs}
          masks: {imgs}
          class_to_idx: {{bg: 0, a: 1}}
        dataset:
          output_folder: {out}
          patch_number: [2, 2]
        storage_root: {tmp_path / "store"}
        """,
    )
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "home")
    proc = subprocess.run(
        [sys.executable, "-m", "flows.dataset", "--config", str(cfg)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(imgs) in errors[0], proc.stderr[-2000:]
    assert not out.exists()


# ==================================================================================== H. backbones


def test_66_unknown_backbone() -> None:
    from tasks.features.weights import BackboneError, resolve_weights

    expect(BackboneError, lambda: resolve_weights("resnet19", None), "'resnet19'", fix="did you mean: resnet18")


def test_67_weights_file_missing(tmp_path: Path) -> None:
    from tasks.features.weights import BackboneError, resolve_weights

    expect(
        BackboneError,
        lambda: resolve_weights("mobilenet_v2", str(tmp_path / "w.pth")),
        tmp_path / "w.pth",
        fix="fix backbone.weights",
    )


def test_68_weights_file_not_a_checkpoint(tmp_path: Path) -> None:
    from tasks.features.extractor import build_backbone
    from tasks.features.weights import BackboneError

    w = tmp_path / "w.pth"
    w.write_bytes(b"definitely not a torch file")
    expect(
        BackboneError,
        lambda: build_backbone("mobilenet_v2", str(w)),
        w,
        fix="point backbone.weights at a pytorch state dict",
    )


def test_69_weights_of_another_architecture(tmp_path: Path) -> None:
    import torch
    from torchvision import models

    from tasks.features.extractor import build_backbone
    from tasks.features.weights import BackboneError

    w = tmp_path / "resnet18.pth"
    torch.save(models.resnet18(weights=None).state_dict(), w)
    expect(
        BackboneError,
        lambda: build_backbone("mobilenet_v2", str(w)),
        w,
        "'mobilenet_v2'",
        fix="set backbone.name to the architecture",
    )


def test_70_imagenet_weights_absent_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.features.weights import BackboneError, resolve_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expect(
        BackboneError,
        lambda: resolve_weights("resnet18", "imagenet"),
        "resnet18-f37072fd.pth",
        tmp_path / "torch",
        fix="put the official file",
    )


# ===================================================================== I. bundles, predict, evaluate


@pytest.fixture(scope="module")
def bundle_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small valid bundle: random-init MobileNetV2 (.pth export), a logistic regression, 2x2 grid, 32 px input."""
    import skops.io
    import torch
    import yaml
    from sklearn.linear_model import LogisticRegression

    from tasks.features.extractor import build_backbone

    root = tmp_path_factory.mktemp("bundle") / "deployment_model"
    root.mkdir()
    torch.save(build_backbone("mobilenet_v2", None).state_dict(), root / "model.pth")
    (root / "model_config.yaml").write_text(yaml.safe_dump({"name": "mobilenet_v2"}))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 1280)), np.arange(20) % 2
    skops.io.dump(LogisticRegression(max_iter=200).fit(x, y), root / "classifier.skops")
    meta = {
        "input_size": [[3, 32, 32]],
        "classes": {"0": "bg", "1": "a"},
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "horizontal_patches": 2,
        "vertical_patches": 2,
        "patch_height": None,
        "patch_width": None,
        "overlap": 0.0,
        "reconstruction_method": "major_voting",
        "class_to_skip": None,
        "backbone": "mobilenet_v2",
        "runtime": "torch",
        "patchflow_version": CODE_VERSION,
    }
    (root / "model.json").write_text(json.dumps(meta))
    write_manifest(root)  # as the train flow's export does
    return root


@pytest.fixture()
def bundle(bundle_src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "deployment_model"
    shutil.copytree(bundle_src, dst)
    return dst


def _load(b: Path) -> dict:
    root = bdl.resolve_bundle(b)
    meta = bdl.read_meta(root)
    bdl.grid_spec(meta)
    bdl.backbone_file(root, meta)
    return meta


def _edit_meta(b: Path, **changes) -> None:
    meta = json.loads((b / "model.json").read_text())
    meta.update(changes)
    meta = {k: v for k, v in meta.items() if v is not ...}
    (b / "model.json").write_text(json.dumps(meta))
    write_manifest(b)  # a bundle exported that way (an edit after export is refused: tests/test_bundle_security.py)


def test_71_bundle_path_missing(tmp_path: Path) -> None:
    expect(
        bdl.BundleError,
        lambda: _load(tmp_path / "runs" / "deployment_model"),
        tmp_path / "runs",
        fix="point it at a deployment_model/ folder",
    )


@pytest.mark.parametrize("missing", ["classifier.skops", "model.json"])
def test_72_bundle_missing_files(bundle: Path, missing: str) -> None:
    (bundle / missing).unlink()
    expect(
        bdl.BundleError,
        lambda: _load(bundle / "model.pth"),
        bundle,
        f"{missing} was deleted after export",
        fix=r"re-export the model \(or restore the file\)",
    )  # an exported bundle: its manifest names the file
    (bundle / "_manifest.json").unlink()  # a hand-made folder
    expect(
        bdl.BundleError,
        lambda: _load(bundle / "model.pth"),
        bundle,
        missing,
        fix=r"needs model.json and classifier.skops \(or Quadra's classifier.joblib\)",
    )


def test_73_bundle_from_an_incompatible_version(bundle: Path) -> None:
    _edit_meta(bundle, patchflow_version="patchflow-1.2.0")
    expect(bdl.BundleError, lambda: _load(bundle), bundle / "model.json", "patchflow-1.2.0", fix="retrain or upgrade")


def test_74_bundle_model_json_corrupt_or_incomplete(bundle: Path) -> None:
    _edit_meta(bundle, mean=..., std=...)
    expect(bdl.BundleError, lambda: _load(bundle), bundle / "model.json", "'mean'", fix="re-export the model")
    (bundle / "model.json").write_text("{not json")
    expect(bdl.BundleError, lambda: _load(bundle), bundle / "model.json", fix="re-export the model")


def test_75_bundle_without_backbone_export(bundle: Path) -> None:
    (bundle / "model.pth").unlink()
    expect(bdl.BundleError, lambda: _load(bundle), bundle, "model.pt", fix="re-export the model")


@pytest.mark.slow
def test_76_predict_corrupt_image_removes_stale_marker(bundle: Path, tmp_path: Path) -> None:
    from tasks.predict.stage import predict_images

    images, out = tmp_path / "raw", tmp_path / "pred"
    png(images / "a.png", np.random.default_rng(5).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    predict_images(bundle, images, out, batch_size=8)  # a first, successful run
    assert (out / "predictions.json").is_file() and (out / "a_classmap.png").is_file()
    (images / "b.png").write_bytes(b"\x89PNG broken")
    expect(
        InputDataError,
        lambda: predict_images(bundle, images, out, batch_size=8),
        images / "b.png",
        fix="replace or remove",
    )
    assert not (out / "predictions.json").exists()  # the earlier run's marker cannot pass for this run's


def test_77_predict_images_folder_missing(bundle: Path, tmp_path: Path) -> None:
    from tasks.predict.stage import predict_images

    out = tmp_path / "pred"
    expect(
        FileNotFoundError,
        lambda: predict_images(bundle, tmp_path / "nope", out),
        tmp_path / "nope",
        fix="point --images at",
    )
    assert not out.exists()


def test_78_predict_with_an_incompatible_bundle(bundle: Path, tmp_path: Path) -> None:
    from tasks.predict.stage import predict_images

    _edit_meta(bundle, patchflow_version="patchflow-9.0.0")
    png(tmp_path / "raw" / "a.png", np.zeros((8, 8, 3), np.uint8))
    out = tmp_path / "pred"
    expect(
        bdl.BundleError,
        lambda: predict_images(bundle, tmp_path / "raw", out),
        "patchflow-9.0.0",
        fix="retrain or upgrade",
    )
    assert not out.exists()


def test_79_evaluate_on_a_folder_that_is_not_a_dataset(bundle: Path, tmp_path: Path) -> None:
    from tasks.evaluation.config import EvaluateFlowConfig
    from tasks.evaluation.stage import extract_with_bundle

    data = tmp_path / "raw_images"
    png(data / "test" / "a.png", np.zeros((8, 8, 3), np.uint8))
    cfg = EvaluateFlowConfig.model_validate(
        {"datamodule": {"data_path": str(data)}, "task": {"model_path": str(bundle)}}
    )
    store = tmp_path / "store"
    expect(
        DatasetFormatError,
        lambda: extract_with_bundle(cfg, bdl.open_bundle(bundle), store),
        data / "info.json",
        fix="point data_path at",
    )
    assert not store.exists()


def test_80_dino_input_size_not_a_multiple_of_8() -> None:
    """Refused when the config is read (not at the first batch): ViT-B/8 cuts images into 8x8 patches."""
    msg = expect(
        ConfigError,
        lambda: load_config(
            TrainFlowConfig, None, ["datamodule.data_path=x", "backbone.name=dino_vitb8", "transforms.input_height=100"]
        ),
        "dino_vitb8",
        "transforms.input_height",
        "100x224",
        fix="multiples of 8",
    )
    assert "Value error" not in msg
