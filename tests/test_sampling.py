"""Training-sample drawing and split listing on tiny synthetic patch datasets (real h5 and PNG files)."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from storage.geometry import pad_to
from storage.layout import read_info
from tasks.features import sampler as sampling
from tasks.features.listing import TrainEntry, balance_entries, list_split, read_train_list
from tasks.features.sampler import DatasetFormatError, draw_pass, iter_pass_patches

CLASSES = {"bg": 0, "a": 1, "b": 2}


# --------------------------------------------------------------------------------- dataset helpers


def rect_triangles(y0: int, x0: int, y1: int, x1: int) -> list[list[list[int]]]:
    """Two (y, x) triangles covering the pixel-edge rectangle [y0, y1) x [x0, x1)."""
    return [[[y0, x0], [y0, x1], [y1, x1]], [[y0, x0], [y1, x1], [y1, x0]]]


def tri_area(t: np.ndarray) -> float:
    (ay, ax), (by, bx), (cy, cx) = t
    return abs((bx - ax) * (cy - ay) - (cx - ax) * (by - ay)) / 2.0


def write_h5(path: Path, img_path: str, patch_size: tuple[int, int] | None, triangles=None) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("img_path", data=img_path)
        if patch_size is not None:
            f.create_dataset("patch_size", data=np.asarray(patch_size, dtype=np.int64))
        if triangles is None:
            f.create_dataset("triangles", data=np.zeros((0,), dtype=np.uint8))
            f.create_dataset("triangles_weights", data=np.zeros((0,), dtype=np.uint8))
        else:
            tri = np.asarray(triangles, dtype=np.int32)
            areas = np.array([tri_area(t) for t in tri], dtype=np.float64)
            f.create_dataset("triangles", data=tri)
            f.create_dataset("triangles_weights", data=areas / areas.sum())


def make_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def make_dataset(
    root: Path,
    images: dict[str, tuple[int, int]],
    h5s: dict[str, tuple[str, object]],
    lines: list[str],
    patch_size: list[int] | None = (32, 32),
    patch_number: list[int] | None = None,
    h5_patch_size: dict[str, tuple[int, int]] | None = None,
) -> Path:
    """Write info.json, original/images/*.png, train/*.h5 and train/dataset.txt under ``root``."""
    (root / "original" / "images").mkdir(parents=True)
    (root / "train").mkdir()
    info = {
        "patch_size": list(patch_size) if patch_size is not None else None,
        "patch_number": patch_number,
        "overlap": 0.0,
        "annotated_good": None,
        "train_files": [{"image_path": f"original/images/{n}", "mask_path": None} for n in images],
        "val_files": [],
        "test_files": [],
    }
    (root / "info.json").write_text(json.dumps(info))
    for i, (name, (h, w)) in enumerate(images.items()):
        assert cv2.imwrite(str(root / "original" / "images" / name), make_image(h, w, i))
    for h5_name, (img, tris) in h5s.items():
        ps = (h5_patch_size or {}).get(h5_name, tuple(patch_size) if patch_size else None)
        write_h5(root / "train" / h5_name, f"original/images/{img}", ps, tris)
    (root / "train" / "dataset.txt").write_text("".join(line + "\n" for line in lines))
    return root


def ring_triangles() -> tuple[list, np.ndarray]:
    """Square ring: rows/cols [10, 50) minus [20, 40), as 4 strips = 8 triangles, and its true mask."""
    tris = (
        rect_triangles(10, 10, 20, 50)  # top strip
        + rect_triangles(40, 10, 50, 50)  # bottom strip
        + rect_triangles(20, 10, 40, 20)  # left strip
        + rect_triangles(20, 40, 40, 50)  # right strip
    )
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:50, 10:50] = True
    mask[20:40, 20:40] = False
    return tris, mask


@pytest.fixture()
def basic(tmp_path: Path) -> Path:
    """Three images; annotated components, good regions and an unannotated image."""
    tris_ring, _ = ring_triangles()
    return make_dataset(
        tmp_path / "ds",
        images={"im_0.png": (64, 64), "im_1.png": (80, 100), "im_2.png": (50, 70)},
        h5s={
            "im_0_1.h5": ("im_0.png", tris_ring),
            "im_0_good.h5": ("im_0.png", rect_triangles(0, 0, 8, 64)),
            "im_1_1.h5": ("im_1.png", rect_triangles(30, 40, 40, 60)),
            "im_1_good.h5": ("im_1.png", rect_triangles(60, 0, 80, 100)),
            "im_2_good.h5": ("im_2.png", None),
        },
        lines=[
            "im_0_1.h5,a",
            "im_0_good.h5,bg",
            "im_1_1.h5,b",
            "im_1_good.h5,bg",
            "im_2_good.h5,bg",
            "im_2_good.h5,bg",
        ],
    )


# ------------------------------------------------------------------------------------ info / list


def test_load_info_missing_names_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match="not a patch dataset") as ei:
        read_info(tmp_path)
    assert str(tmp_path / "info.json") in str(ei.value)


def test_read_train_list_filters_and_skip(basic: Path) -> None:
    all_e = read_train_list(basic)
    assert [e.h5_name for e in all_e][:2] == ["im_0_1.h5", "im_0_good.h5"]
    assert len(all_e) == 6  # repeated lines kept (weighting)
    inc = read_train_list(basic, include_filter=["im_1", "_1.h5"])
    assert {e.h5_name for e in inc} == {"im_0_1.h5", "im_1_1.h5", "im_1_good.h5"}
    exc = read_train_list(basic, exclude_filter=["good"])
    assert [e.h5_name for e in exc] == ["im_0_1.h5", "im_1_1.h5"]
    both = read_train_list(basic, include_filter=["im_1"], exclude_filter=["good"])
    assert both == [TrainEntry("im_1_1.h5", "b")]
    skip = read_train_list(basic, class_to_skip=["bg"])
    assert [e.class_name for e in skip] == ["a", "b"]
    assert read_train_list(basic, train_filename="nope.txt") == []


def test_read_train_list_bad_line_has_line_number(basic: Path) -> None:
    p = basic / "train" / "dataset.txt"
    p.write_text("im_0_1.h5,a\nim_0_good.h5,bg\nim_1_1.h5,b,extra\n")
    with pytest.raises(DatasetFormatError) as ei:
        read_train_list(basic)
    msg = str(ei.value)
    assert "line 3" in msg and str(p) in msg and "comma" in msg
    p.write_text("im_0_1.h5,a\nim_0_good.h5\n")
    with pytest.raises(DatasetFormatError, match="line 2"):
        read_train_list(basic)
    p.write_text("im_0_1.h5,\n")
    with pytest.raises(DatasetFormatError, match="line 1"):
        read_train_list(basic)


def test_balance_entries() -> None:
    entries = (
        [TrainEntry(f"a{i}.h5", "a") for i in range(7)]
        + [TrainEntry(f"b{i}.h5", "b") for i in range(2)]
        + [TrainEntry("c0.h5", "c")]
    )
    out = balance_entries(entries, seed=3)
    assert out[: len(entries)] == entries  # originals kept, in order
    counts = {c: sum(e.class_name == c for e in out) for c in "abc"}
    assert counts == {"a": 7, "b": 7, "c": 7}
    extras = out[len(entries) :]
    assert [e.class_name for e in extras] == ["b"] * 5 + ["c"] * 6  # sorted class order
    assert set(extras[:5]) <= set(entries[7:9])
    assert balance_entries(entries, seed=3) == out
    assert balance_entries([], seed=0) == []


# ------------------------------------------------------------------------------------ draw_pass


def test_draw_pass_deterministic_and_global_rng_free(basic: Path) -> None:
    entries = read_train_list(basic) * 50
    np.random.seed(0)
    random.seed(0)
    a = draw_pass(basic, entries, CLASSES, seed=7, pass_index=0)
    np.random.seed(123)
    random.seed(123)
    np.random.random(10)
    b = draw_pass(basic, entries, CLASSES, seed=7, pass_index=0)
    for f in ("entry_index", "image_path", "label", "box", "center"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    c = draw_pass(basic, entries, CLASSES, seed=7, pass_index=1)
    d = draw_pass(basic, entries, CLASSES, seed=8, pass_index=0)
    assert not np.array_equal(a.center, c.center)
    assert not np.array_equal(a.center, d.center)
    np.testing.assert_array_equal(a.label, c.label)
    # dtypes and shapes as documented
    n = len(entries)
    assert a.entry_index.dtype == np.int64 and a.label.dtype == np.int16
    assert a.box.shape == (n, 4) and a.box.dtype == np.int64
    assert a.center.shape == (n, 2) and a.center.dtype == np.int64
    assert all(Path(p).is_absolute() for p in a.image_path)
    assert a.image_path[0] == str((basic / "original/images/im_0.png").resolve())
    np.testing.assert_array_equal(a.label[:6], [1, 0, 2, 0, 0, 0])


def test_ring_region_area_uniform(tmp_path: Path) -> None:
    tris, mask = ring_triangles()
    root = make_dataset(
        tmp_path / "ds", {"im.png": (64, 64)}, {"ring.h5": ("im.png", tris)}, ["ring.h5,a"], patch_size=[16, 16]
    )
    entries = read_train_list(root) * 5000
    s = draw_pass(root, entries, CLASSES, seed=1, pass_index=0)
    cy, cx = s.center[:, 0], s.center[:, 1]
    inside = mask[cy, cx]
    assert inside.mean() >= 0.99
    # each of the 4 strips gets samples in proportion to its area (400:400:200:200 px)
    strips = np.select([cy < 20, cy >= 40, cx < 20], [0, 1, 2], 3)
    frac = np.bincount(strips, minlength=4) / len(strips)
    np.testing.assert_allclose(frac, [1 / 3, 1 / 3, 1 / 6, 1 / 6], atol=0.03)


def test_triangle_weights_and_uniformity(tmp_path: Path) -> None:
    t_small = [[0, 0], [0, 40], [40, 0]]  # area 800
    t_big = [[0, 60], [0, 180], [40, 60]]  # area 2400
    root = make_dataset(tmp_path / "ds", {"im.png": (64, 200)}, {"t.h5": ("im.png", [t_small, t_big])}, ["t.h5,a"])
    n = 5000
    s = draw_pass(root, read_train_list(root) * n, CLASSES, seed=11, pass_index=2)
    cy, cx = s.center[:, 0], s.center[:, 1]
    in_small = cx < 50
    k = int(in_small.sum())
    # chi-square (1 dof) against the area ratio 1:3; 15.1 is the 0.01 % critical value
    exp = np.array([n / 4, 3 * n / 4])
    chi2 = (((np.array([k, n - k]) - exp) ** 2) / exp).sum()
    assert chi2 < 15.1, (k, chi2)
    # uniform inside a triangle: in t_small, 3/4 of the area has y < 20 (s = sqrt(r1) matters)
    frac_top = (cy[in_small] < 20).mean()
    assert abs(frac_top - 0.75) < 0.05
    # every centre floors into its triangle's bounding pixels
    assert np.all((cy >= 0) & (cy < 40))
    assert np.all(in_small | ((cx >= 60) & (cx < 180)))


def test_no_triangles_uniform_over_image(basic: Path) -> None:
    entries = [TrainEntry("im_2_good.h5", "bg")] * 4000
    s = draw_pass(basic, entries, CLASSES, seed=0, pass_index=0)
    cy, cx = s.center[:, 0], s.center[:, 1]
    assert cy.min() >= 0 and cy.max() <= 49 and cx.min() >= 0 and cx.max() <= 69
    assert cy.max() == 49 and cx.max() == 69 and cy.min() == 0 and cx.min() == 0
    assert abs((cy < 25).mean() - 0.5) < 0.05 and abs((cx < 35).mean() - 0.5) < 0.05


@pytest.mark.parametrize("patch_size", [[75, 33], [32, 32], [1, 1], [50, 70]])
def test_boxes_inside_and_exact_size(basic: Path, patch_size: list[int]) -> None:
    info = read_info(basic) | {"patch_size": patch_size}
    entries = read_train_list(basic) * 200
    s = draw_pass(basic, entries, CLASSES, seed=5, pass_index=3, info=info)
    ph, pw = patch_size
    np.testing.assert_array_equal(s.box[:, 2] - s.box[:, 0], ph)
    np.testing.assert_array_equal(s.box[:, 3] - s.box[:, 1], pw)
    hpad = np.maximum(s.image_size[:, 0], ph)
    wpad = np.maximum(s.image_size[:, 1], pw)
    assert np.all(s.box[:, :2] >= 0)
    assert np.all(s.box[:, 2] <= hpad) and np.all(s.box[:, 3] <= wpad)
    # the centre is inside its box
    assert np.all((s.center[:, 0] >= s.box[:, 0]) & (s.center[:, 0] < s.box[:, 2]))
    assert np.all((s.center[:, 1] >= s.box[:, 1]) & (s.center[:, 1] < s.box[:, 3]))
    # interior centres (far from borders) sit at the patch centre: origin = c - p // 2
    interior = (s.center[:, 0] - ph // 2 >= 0) & (s.center[:, 0] - ph // 2 + ph <= hpad)
    np.testing.assert_array_equal(s.box[interior, 0], s.center[interior, 0] - ph // 2)
    for _, patches in iter_pass_patches(s, 64):
        assert all(p.shape == (ph, pw, 3) and p.dtype == np.uint8 for p in patches)


def test_small_image_is_padded(tmp_path: Path) -> None:
    root = make_dataset(
        tmp_path / "ds",
        {"small.png": (40, 50)},
        {"s.h5": ("small.png", None), "t.h5": ("small.png", rect_triangles(30, 40, 40, 50))},
        ["s.h5,bg", "t.h5,a"],
        patch_size=[64, 48],
    )
    entries = read_train_list(root) * 30
    s = draw_pass(root, entries, CLASSES, seed=0, pass_index=0)
    np.testing.assert_array_equal(s.box[:, 0], 0)  # H=40 < 64: the box is the padded height
    np.testing.assert_array_equal(s.box[:, 2], 64)
    assert np.all((s.box[:, 1] >= 0) & (s.box[:, 3] <= 50) & (s.box[:, 3] - s.box[:, 1] == 48))
    img = cv2.imread(str(root / "original/images/small.png"))
    padded = pad_to(img, (64, 50))
    for rows, patches in iter_pass_patches(s, 7):
        for r, p in zip(rows, patches):
            y0, x0, y1, x1 = s.box[r]
            assert p.shape == (64, 48, 3)
            np.testing.assert_array_equal(p, padded[y0:y1, x0:x1])
            np.testing.assert_array_equal(p[40:], np.repeat(p[39:40], 24, axis=0))  # edge replication


def test_transposed_h5_patch_size_ignored_in_patch_size_mode(tmp_path: Path) -> None:
    root = make_dataset(
        tmp_path / "ds",
        {"im.png": (100, 120)},
        {"g.h5": ("im.png", None)},
        ["g.h5,bg"],
        patch_size=[20, 50],
        h5_patch_size={"g.h5": (50, 20)},  # as Quadra writes it (B1)
    )
    s = draw_pass(root, read_train_list(root) * 20, CLASSES, seed=0, pass_index=0)
    np.testing.assert_array_equal(s.box[:, 2] - s.box[:, 0], 20)
    np.testing.assert_array_equal(s.box[:, 3] - s.box[:, 1], 50)


def test_patch_number_mode_uses_h5_patch_size(tmp_path: Path) -> None:
    root = make_dataset(
        tmp_path / "ds",
        {"im.png": (100, 120), "im2.png": (60, 60)},
        {"g.h5": ("im.png", None), "h.h5": ("im2.png", None)},
        ["g.h5,bg", "h.h5,bg"],
        patch_size=None,
        patch_number=[4, 3],
        h5_patch_size={"g.h5": (25, 40), "h.h5": (15, 20)},
    )
    s = draw_pass(root, read_train_list(root) * 10, CLASSES, seed=0, pass_index=0)
    sizes = np.stack([s.box[:, 2] - s.box[:, 0], s.box[:, 3] - s.box[:, 1]], axis=1)
    np.testing.assert_array_equal(sizes[0::2], [[25, 40]] * 10)
    np.testing.assert_array_equal(sizes[1::2], [[15, 20]] * 10)


def test_draw_pass_errors(basic: Path) -> None:
    with pytest.raises(DatasetFormatError, match="'zzz'.*dataset.txt"):
        draw_pass(basic, [TrainEntry("im_0_1.h5", "zzz")], CLASSES, 0, 0)
    with pytest.raises(DatasetFormatError, match="missing.h5"):
        draw_pass(basic, [TrainEntry("missing.h5", "a")], CLASSES, 0, 0)
    empty = draw_pass(basic, [], CLASSES, 0, 0)
    assert len(empty) == 0 and empty.box.shape == (0, 4)
    assert list(iter_pass_patches(empty, 4)) == []


# ----------------------------------------------------------------------------- iter_pass_patches


def test_iter_pass_patches_decodes_each_image_once(basic: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entries = read_train_list(basic) * 20  # images interleaved in entry order
    s = draw_pass(basic, entries, CLASSES, seed=2, pass_index=0)
    direct = {p: cv2.imread(p) for p in set(s.image_path)}
    calls: list[str] = []
    real = sampling.read_image  # the one decode per image (tasks.imageio: header check, then OpenCV)

    def counting(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(sampling, "read_image", counting)
    seen: list[int] = []
    for rows, patches in iter_pass_patches(s, batch_size=7):
        assert len(rows) == len(patches) <= 7
        for r, p in zip(rows.tolist(), patches):
            y0, x0, y1, x1 = s.box[r]
            np.testing.assert_array_equal(p, direct[s.image_path[r]][y0:y1, x0:x1])
            seen.append(r)
    assert sorted(seen) == list(range(len(entries)))
    assert sorted(calls) == sorted(set(s.image_path))  # one decode per distinct image
    # rows of one image are contiguous, images in first-appearance order
    imgs = [s.image_path[r] for r in seen]
    firsts = list(dict.fromkeys(s.image_path.tolist()))
    assert list(dict.fromkeys(imgs)) == firsts
    assert sum(1 for a, b in itertools.pairwise(imgs) if a != b) == len(firsts) - 1


def test_iter_pass_patches_unreadable_image(basic: Path) -> None:
    s = draw_pass(basic, read_train_list(basic), CLASSES, seed=0, pass_index=0)
    (basic / "original/images/im_1.png").write_bytes(b"not an image")
    with pytest.raises(DatasetFormatError, match="im_1.png"):
        for _ in iter_pass_patches(s, 2):
            pass


# ------------------------------------------------------------------------------------ list_split


def test_list_split(tmp_path: Path) -> None:
    root = tmp_path / "data_ds"  # "data" in the root path must not trip filters (B25)
    files = [
        "val/a/im_0_1.png",
        "val/a/#DISCARD#im_0_2.PNG",
        "val/bg/im_0_0.jpg",
        "val/bg/im_1_0.JPEG",
        "val/bg/im_1_1.bmp",
        "val/bg/notes.txt",
        "val/bg/.hidden.png",
        "val/bg/x_checkpoint.png",
        "val/.ipynb_checkpoints/a/im_0_1.png",
        "val/None/im_3_0.png",
        "val/b/sub/b/deep.png",
    ]
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_bytes(b"")
    (root / "val/b").mkdir(exist_ok=True)  # empty class folder
    got = list_split(root, "val", CLASSES)
    assert got == [
        ("val/None/im_3_0.png", -1),
        ("val/a/#DISCARD#im_0_2.PNG", 1),
        ("val/a/im_0_1.png", 1),
        ("val/b/sub/b/deep.png", 2),
        ("val/bg/im_0_0.jpg", 0),
        ("val/bg/im_1_0.JPEG", 0),
        ("val/bg/im_1_1.bmp", 0),
    ]
    assert ("val/None/im_3_0.png", -1) not in list_split(root, "val", CLASSES, include_none=False)
    assert [p for p, _ in list_split(root, "val", CLASSES, include_filter=["im_0"])] == [
        "val/a/#DISCARD#im_0_2.PNG",
        "val/a/im_0_1.png",
        "val/bg/im_0_0.jpg",
    ]
    # filters match file names only: "bg", "val", "data" appear in directories, not in names
    assert len(list_split(root, "val", CLASSES, exclude_filter=["bg", "val", "data"])) == 7
    assert [p for p, _ in list_split(root, "val", CLASSES, exclude_filter=["DISCARD", "im_1"])] == [
        "val/None/im_3_0.png",
        "val/a/im_0_1.png",
        "val/b/sub/b/deep.png",
        "val/bg/im_0_0.jpg",
    ]
    assert list_split(root, "test", CLASSES) == []
    (root / "val/zz").mkdir()
    (root / "val/zz/q.png").write_bytes(b"")
    with pytest.raises(DatasetFormatError, match="'zz'"):
        list_split(root, "val", CLASSES)
    assert all(p != "val/zz/q.png" for p, _ in list_split(root, "val", CLASSES, exclude_filter=["q.png"]))


def test_exif_orientation_ignored_and_changed_image_detected(tmp_path: Path) -> None:
    from PIL import Image

    root = make_dataset(
        tmp_path / "ds", {"im.png": (40, 60)}, {"g.h5": ("im.jpg", None)}, ["g.h5,bg"], patch_size=[16, 16]
    )
    im = Image.fromarray(make_image(30, 80, 9))
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90": cv2.imread would swap the axes unless told to ignore it
    im.save(root / "original/images/im.jpg", exif=exif)
    s = draw_pass(root, read_train_list(root) * 50, CLASSES, seed=0, pass_index=0)
    np.testing.assert_array_equal(s.image_size, [[30, 80]] * 50)  # stored pixel frame
    stored = cv2.imread(str(root / "original/images/im.jpg"), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    for rows, patches in iter_pass_patches(s, 16):
        for r, p in zip(rows, patches):
            y0, x0, y1, x1 = s.box[r]
            np.testing.assert_array_equal(p, stored[y0:y1, x0:x1])
    cv2.imwrite(str(root / "original/images/im.jpg"), make_image(30, 70, 1))  # replaced after drawing
    with pytest.raises(DatasetFormatError, match="redraw"):
        list(iter_pass_patches(s, 16))


def test_order_by_image_makes_rows_sequential(basic: Path) -> None:
    s = draw_pass(basic, read_train_list(basic) * 5, CLASSES, seed=4, pass_index=1)
    o = sampling.order_by_image(s)
    rows = np.concatenate([r for r, _ in iter_pass_patches(o, 4)])
    np.testing.assert_array_equal(rows, np.arange(len(s)))
    # same multiset of samples, still linked to their entries
    np.testing.assert_array_equal(np.sort(o.entry_index), s.entry_index)
    np.testing.assert_array_equal(o.box, s.box[o.entry_index])
    np.testing.assert_array_equal(o.label, s.label[o.entry_index])


def test_rewritten_h5_is_read_again_not_served_from_the_memo(basic: Path) -> None:
    """Passes reuse parsed h5 records within a process, but a rewritten file (new size/mtime) is parsed again."""
    import os

    entries = read_train_list(basic)
    info = read_info(basic)
    first = draw_pass(basic, entries, CLASSES, seed=0, pass_index=0, info=info)
    again = draw_pass(basic, entries, CLASSES, seed=0, pass_index=0, info=info)
    np.testing.assert_array_equal(first.box, again.box)  # memo hit: same draw
    h5 = basic / "train" / "im_1_1.h5"
    st = os.stat(h5)
    write_h5(h5, "original/images/im_1.png", (32, 32), rect_triangles(0, 0, 5, 5) + rect_triangles(70, 90, 80, 100))
    os.utime(h5, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # even within the same second
    row = next(i for i, e in enumerate(entries) if e.h5_name == "im_1_1.h5")
    moved = draw_pass(basic, entries, CLASSES, seed=0, pass_index=0, info=info)
    cy, cx = moved.center[row]
    assert (cy < 5 and cx < 5) or (cy >= 70 and cx >= 90), moved.center[row]  # sampled inside the new triangles


def test_grayscale_images_give_the_bgr_patches_of_a_colour_decode(tmp_path: Path) -> None:
    """A grayscale file is decoded as one channel (cheaper); its patches are the BGR pixels a colour decode gives."""
    root = make_dataset(
        tmp_path / "ds", {"g.png": (60, 70)}, {"g.h5": ("g.png", None)}, ["g.h5,bg"], patch_size=[24, 20]
    )
    gray = np.random.default_rng(5).integers(0, 255, (60, 70), dtype=np.uint8)
    assert cv2.imwrite(str(root / "original/images/g.png"), gray)
    s = draw_pass(root, read_train_list(root) * 12, CLASSES, seed=1, pass_index=0)
    colour = cv2.imread(str(root / "original/images/g.png"), cv2.IMREAD_COLOR)
    n = 0
    for rows, patches in iter_pass_patches(s, 5):
        for r, p in zip(rows, patches):
            y0, x0, y1, x1 = s.box[r]
            assert p.shape == (24, 20, 3) and p.flags["C_CONTIGUOUS"]
            np.testing.assert_array_equal(p, colour[y0:y1, x0:x1])
            n += 1
    assert n == 12
