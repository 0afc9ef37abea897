"""End-to-end patch dataset generation (tasks/dataset/generate.py) on tiny synthetic PNG datasets: layout (spec §2.5),
labelling/weighting rules, determinism, worker-count independence, input errors and output-folder safety."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from storage.geometry import compute_grid
from tasks.dataset.generate import generate_patch_dataset
from tasks.dataset.labelling import label_components, label_patches
from tasks.dataset.params import DatasetParams
from tasks.dataset.split import split_images
from tests._synth import CLASS_TO_IDX, make_dataset, tree_digest, write_image

INFO_KEYS = {"patch_size", "patch_number", "overlap", "annotated_good", "train_files", "val_files", "test_files"}
PATCH_RE = re.compile(r"^(?P<discard>#DISCARD#)?(?P<stem>.+)_(?P<idx>\d+)\.png$")
COMPONENT_H5_RE = re.compile(r"^(?P<stem>.+)_(?P<id>\d+)\.h5$")


@pytest.fixture()
def synth(tmp_path: Path) -> list[dict]:
    """12 images 64x80: 3 with an empty mask, 2 without a mask, the others with 1-2 blobs of classes a/b."""
    return make_dataset(tmp_path / "src", n=12, n_empty=3, n_none=2)


def run(dd, out: Path, **kw) -> dict:
    params = dict(val_size=0.3, test_size=0.2, patch_number=[2, 2])
    params.update(kw)
    return generate_patch_dataset([dict(d) for d in dd], dict(CLASS_TO_IDX), output_folder=str(out), **params)


def read_lines(root: Path, name: str = "dataset.txt") -> list[tuple[str, str]]:
    text = (root / "train" / name).read_text()
    assert text == "" or text.endswith("\n")
    out = []
    for line in text.splitlines():
        parts = line.split(",")
        assert len(parts) == 2, line
        out.append((parts[0], parts[1]))
    return out


def patches_by_image(root: Path, split: str) -> dict[str, list[tuple[int, str, bool, Path]]]:
    out: dict[str, list] = {}
    for p in sorted((root / split).rglob("*.png")):
        m = PATCH_RE.match(p.name)
        assert m, p
        out.setdefault(m["stem"], []).append((int(m["idx"]), p.parent.name, bool(m["discard"]), p))
    return out


def stem_of(entry: dict) -> str:
    return Path(entry["image_path"]).stem


def check_layout(root: Path, info: dict, class_to_idx: dict, patch_number=None, patch_size=None, overlap=0.0):
    """Everything spec §2.5 says about the folder, plus consistency between its parts."""
    # info.json: exactly Quadra's keys, equal to the returned dict
    on_disk = json.loads((root / "info.json").read_text())
    assert set(on_disk) == INFO_KEYS
    assert on_disk == info
    assert on_disk["patch_number"] == (list(patch_number) if patch_number else None)
    assert on_disk["patch_size"] == (list(patch_size) if patch_size else None)
    assert on_disk["overlap"] == overlap
    side = json.loads((root / "patchflow.json").read_text())
    assert side["complete"] is True
    # originals
    for split in ("train", "val", "test"):
        for e in info[f"{split}_files"]:
            assert not Path(e["image_path"]).is_absolute()
            assert e["image_path"].startswith("original/images/")
            assert (root / e["image_path"]).is_file()
            if e["mask_path"] is not None:
                assert e["mask_path"] == f"original/masks/{stem_of(e)}.png"
                assert (root / e["mask_path"]).is_file()
    n_images = sum(len(info[f"{s}_files"]) for s in ("train", "val", "test"))
    assert len(list((root / "original" / "images").iterdir())) == n_images
    # class folders
    for split in ("val", "test"):
        for name in class_to_idx:
            assert (root / split / name).is_dir()
    assert (root / "test" / "None").is_dir()
    assert not (root / "val" / "None").exists() or not any((root / "val" / "None").iterdir())
    # train: h5 files and dataset.txt
    lines = read_lines(root)
    train_stems = {stem_of(e) for e in info["train_files"]}
    h5_files = {p.name for p in (root / "train").glob("*.h5")}
    assert {h for h, _ in lines} == h5_files  # every listed h5 exists, every h5 is listed
    for h5name, cls in lines:
        assert cls in class_to_idx
        m = COMPONENT_H5_RE.match(h5name)
        stem = m["stem"] if m else h5name[: -len("_good.h5")]
        assert stem in train_stems
        with h5py.File(root / "train" / h5name, "r") as f:
            keys = set(f.keys())
            assert {"img_path", "patch_size", "triangles", "triangles_weights"} <= keys
            img_path = f["img_path"][()]
            img_path = img_path.decode() if isinstance(img_path, bytes) else str(img_path)
            assert img_path == f"original/images/{stem}.png"
            img = cv2.imread(str(root / img_path))
            grid = compute_grid(img.shape[0], img.shape[1], patch_number, patch_size, overlap)
            assert f["patch_size"].dtype == np.int64
            assert f["patch_size"][()].tolist() == [grid.patch_h, grid.patch_w]
            tri = f["triangles"][()]
            w = f["triangles_weights"][()]
            if tri.size:
                assert tri.dtype == np.int32 and tri.ndim == 3 and tri.shape[1:] == (3, 2)
                assert w.dtype == np.float64 and w.shape == (tri.shape[0],) and np.isclose(w.sum(), 1.0)
                hp, wp = grid.padded_shape
                assert tri[..., 0].min() >= 0 and tri[..., 0].max() <= hp
                assert tri[..., 1].min() >= 0 and tri[..., 1].max() <= wp
            if m:  # component file
                assert cls != next(k for k, v in class_to_idx.items() if v == 0)
                assert {"mask_path", "labelled_index"} <= keys
                assert f["labelled_index"].dtype == np.int32 and int(f["labelled_index"][()]) == int(m["id"])
                assert tri.size > 0
            else:
                assert h5name.endswith("_good.h5") and cls == "bg"
    # val/test patches: names, indices, one file per grid cell, sizes, pixels
    for split in ("val", "test"):
        entries = {stem_of(e): e for e in info[f"{split}_files"]}
        found = patches_by_image(root, split)
        assert set(found) == set(entries), split
        for stem, items in found.items():
            e = entries[stem]
            img = cv2.imread(str(root / e["image_path"]))
            grid = compute_grid(img.shape[0], img.shape[1], patch_number, patch_size, overlap)
            assert sorted(i for i, *_ in items) == list(range(grid.num_patches))
            boxes = grid.boxes()
            padded = grid.pad(img)
            for idx, cls, discard, path in items:
                if e["mask_path"] is None:
                    assert split == "test" and cls == "None" and discard
                else:
                    assert cls in class_to_idx
                patch = cv2.imread(str(path))
                assert patch.shape[:2] == (grid.patch_h, grid.patch_w)
                y0, x0, y1, x1 = boxes[idx]
                np.testing.assert_array_equal(patch, padded[y0:y1, x0:x1])
    return lines


# ------------------------------------------------------------------ layout, both modes


def test_layout_patch_number(synth, tmp_path):
    out = tmp_path / "ds"
    info = run(synth, out, patch_number=[2, 2])
    check_layout(out, info, CLASS_TO_IDX, patch_number=[2, 2])
    # mask-less images go to test/None, everything else is split
    none_stems = {Path(d["path"]).stem for d in synth if d["mask"] is None}
    assert {stem_of(e) for e in info["test_files"]} >= none_stems
    assert all(e["mask_path"] is None for e in info["test_files"] if stem_of(e) in none_stems)
    assert info["train_files"] and info["val_files"]
    # val/test folders and #DISCARD# flags are exactly the labelling rule applied to the saved masks
    for split in ("val", "test"):
        found = patches_by_image(out, split)
        for e in info[f"{split}_files"]:
            if e["mask_path"] is None:
                continue
            mask = cv2.imread(str(out / e["mask_path"]), cv2.IMREAD_UNCHANGED)
            grid = compute_grid(mask.shape[0], mask.shape[1], patch_number=[2, 2])
            expected = label_patches(label_components(mask), grid, CLASS_TO_IDX)
            got = {idx: (cls, discard) for idx, cls, discard, _ in found[stem_of(e)]}
            assert [got[i] for i in range(grid.num_patches)] == expected
    # empty-mask train images: one good h5 with empty triangles (uniform centre), no mask_path
    empty = {Path(d["path"]).stem for d in synth[:3]}
    for e in info["train_files"]:
        if stem_of(e) in empty:
            with h5py.File(out / "train" / f"{stem_of(e)}_good.h5", "r") as f:
                assert f["triangles"].shape == (0,) and f["triangles"].dtype == np.uint8
                assert "mask_path" not in f


def test_layout_patch_size_with_overlap(synth, tmp_path):
    out = tmp_path / "ds"
    info = run(synth, out, patch_number=None, patch_size=[32, 32], overlap=0.25)
    check_layout(out, info, CLASS_TO_IDX, patch_size=[32, 32], overlap=0.25)
    g = compute_grid(64, 80, patch_size=[32, 32], overlap=0.25)
    assert (g.n_h, g.n_w) == (3, 3)
    any_val = next(iter(patches_by_image(out, "val").values()))
    assert len(any_val) == 9


def test_dataset_lines_weighting_and_defect_labels(synth, tmp_path):
    """Component lines carry their class; balance_defects adds the good line after each; val labels match masks."""
    out = tmp_path / "ds"
    info = run(synth, out, val_size=0.0, test_size=0.0)  # everything in train
    lines = read_lines(out)
    assert len(info["train_files"]) == 12
    for i, (h5name, cls) in enumerate(lines):
        if COMPONENT_H5_RE.match(h5name):
            stem = COMPONENT_H5_RE.match(h5name)["stem"]
            if (out / "train" / f"{stem}_good.h5").exists():
                assert lines[i + 1] == (f"{stem}_good.h5", "bg")
            # the component class is the mask value under the component
            with h5py.File(out / "train" / h5name, "r") as f:
                lab_idx = int(f["labelled_index"][()])
            mask = cv2.imread(str(out / "original" / "masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
            labelled = cv2.imread(str(out / "original" / "labelled_masks" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
            vals = np.unique(mask[labelled == lab_idx])
            assert vals.tolist() == [CLASS_TO_IDX[cls]]


def test_annotated_good_by_name(synth, tmp_path):
    out = tmp_path / "ds"
    info = run(synth, out, val_size=0.2, test_size=0.0, annotated_good=["b"], repeat_good_images=3)
    assert info["annotated_good"] == ["b"]
    assert json.loads((out / "info.json").read_text())["annotated_good"] == ["b"]
    lines = read_lines(out)
    counts = Counter(lines)
    b_lines = [k for k in counts if k[1] == "b"]
    a_lines = [k for k in counts if k[1] == "a"]
    assert b_lines and a_lines
    assert all(counts[k] == 3 for k in b_lines)
    assert all(counts[k] == 1 for k in a_lines)
    # the repeated lines are consecutive, followed by the image's good line when it exists
    text = [f"{h},{c}" for h, c in lines]
    for h5name, _ in b_lines:
        i = text.index(f"{h5name},b")
        assert text[i : i + 3] == [f"{h5name},b"] * 3
    # empty-mask images are listed repeat_good_images times
    for e in info["train_files"]:
        if stem_of(e) in {"im_0", "im_1", "im_2"}:
            assert counts[(f"{stem_of(e)}_good.h5", "bg")] == 3
    # unknown / background names are refused
    with pytest.raises(ValueError, match="annotated_good"):
        run(synth, tmp_path / "ds2", annotated_good=["nope"])
    with pytest.raises(ValueError, match="annotated_good"):
        run(synth, tmp_path / "ds3", annotated_good=["bg"])


def test_non_square_patch_size_not_transposed(synth, tmp_path):
    out = tmp_path / "ds"
    info = run(synth, out, patch_number=None, patch_size=[16, 24], val_size=0.4, test_size=0.0)
    assert info["patch_size"] == [16, 24]
    check_layout(out, info, CLASS_TO_IDX, patch_size=[16, 24])
    val_pngs = list((out / "val").rglob("*.png"))
    assert val_pngs
    for p in val_pngs:
        assert cv2.imread(str(p)).shape[:2] == (16, 24)
    h5s = list((out / "train").glob("*.h5"))
    assert h5s
    for p in h5s:
        with h5py.File(p, "r") as f:
            assert f["patch_size"][()].tolist() == [16, 24]


def test_image_smaller_than_patch_size(tmp_path):
    dd = make_dataset(tmp_path / "src", n=4, n_empty=1, small=2)  # im_4, im_5 are 20x20
    # in test (padded patches)
    out = tmp_path / "test_only"
    info = run(dd, out, patch_number=None, patch_size=[32, 32], val_size=0.0, test_size=1.0)
    check_layout(out, info, CLASS_TO_IDX, patch_size=[32, 32])
    small = patches_by_image(out, "test")["im_4"]
    assert len(small) == 1 and cv2.imread(str(small[0][3])).shape[:2] == (32, 32)
    # in train (sampling regions inside the padded image)
    out = tmp_path / "train_only"
    info = run(dd, out, patch_number=None, patch_size=[32, 32], val_size=0.0, test_size=0.0)
    check_layout(out, info, CLASS_TO_IDX, patch_size=[32, 32])
    assert any(h.startswith("im_4_") for h, _ in read_lines(out))
    # mixed split does not crash either
    info = run(dd, tmp_path / "mixed", patch_number=None, patch_size=[32, 32], val_size=0.5, test_size=0.0)
    check_layout(tmp_path / "mixed", info, CLASS_TO_IDX, patch_size=[32, 32])


# ------------------------------------------------------------------ determinism


@pytest.mark.slow
def test_same_output_for_one_and_two_workers(synth, tmp_path):
    kw = dict(patch_number=None, patch_size=[32, 32], overlap=0.25, annotated_good=["b"], repeat_good_images=2)
    run(synth, tmp_path / "w1", num_workers=1, **kw)
    run(synth, tmp_path / "w2", num_workers=2, **kw)
    d1, d2 = tree_digest(tmp_path / "w1"), tree_digest(tmp_path / "w2")
    assert len(d1) > 50
    assert d1 == d2


def test_deterministic_and_seed_dependent(synth, tmp_path):
    info1 = run(synth, tmp_path / "a", seed=7)
    info2 = run(synth, tmp_path / "b", seed=7)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert info1 == info2
    differs = False
    for seed in (8, 9, 10):
        info3 = run(synth, tmp_path / f"s{seed}", seed=seed)
        if {stem_of(e) for e in info3["val_files"]} != {stem_of(e) for e in info1["val_files"]}:
            differs = True
            break
    assert differs


def test_data_dictionary_not_required_to_be_fresh(synth, tmp_path):
    """The caller's dictionary can be reused for a second run (no in-place path rewriting breaks it)."""
    dd = [dict(d) for d in synth]
    generate_patch_dataset(dd, CLASS_TO_IDX, patch_number=[2, 2], output_folder=str(tmp_path / "a"))
    generate_patch_dataset(dd, CLASS_TO_IDX, patch_number=[2, 2], output_folder=str(tmp_path / "b"))
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")


# ------------------------------------------------------------------ input errors


def _corrupt(dd, tmp_path):
    Path(dd[5]["path"]).write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    return dd, [dd[5]["path"]]


def _mask_size(dd, tmp_path):
    write_image(Path(dd[4]["mask"]), np.zeros((30, 30), np.uint8))
    return dd, [dd[4]["mask"], dd[4]["path"]]


def _mask_value(dd, tmp_path):
    m = cv2.imread(dd[6]["mask"], cv2.IMREAD_UNCHANGED)
    m[0, 0] = 7
    write_image(Path(dd[6]["mask"]), m)
    return dd, [dd[6]["mask"], "7"]


def _duplicate_stem(dd, tmp_path):
    other = write_image(tmp_path / "other" / "im_3.jpg", np.zeros((64, 80, 3), np.uint8))
    return dd + [{"base_name": "im_3.jpg", "path": str(other), "mask": None}], ["im_3", dd[3]["path"], str(other)]


def _colour_mask(dd, tmp_path):
    m = np.zeros((64, 80, 3), np.uint8)
    m[..., 2] = 1
    write_image(Path(dd[7]["mask"]), m)
    return dd, [dd[7]["mask"]]


def _missing_file(dd, tmp_path):
    Path(dd[8]["path"]).unlink()
    return dd, [dd[8]["path"]]


@pytest.mark.parametrize(
    "breaker",
    [_corrupt, _mask_size, _mask_value, _duplicate_stem, _colour_mask, _missing_file],
    ids=lambda f: f.__name__,
)
def test_bad_input_file_errors_name_the_file(synth, tmp_path, breaker):
    dd, words = breaker(synth, tmp_path)
    out = tmp_path / "ds"
    with pytest.raises(ValueError) as exc:
        run(dd, out)
    msg = str(exc.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    assert not out.exists()
    assert not list(tmp_path.glob(".ds.*"))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(patch_number=[2, 2], overlap=1.0), ["overlap"]),
        (dict(patch_number=[2, 2], overlap=-0.1), ["overlap"]),
        (dict(patch_number=[2, 2], patch_size=[32, 32]), ["patch_number", "patch_size"]),
        (dict(patch_number=None, patch_size=None), ["patch_number", "patch_size"]),
        (dict(val_size=0.8, test_size=0.3), ["val_size"]),
        (dict(num_workers=0), ["num_workers"]),
    ],
)
def test_bad_parameters(synth, tmp_path, kwargs, words):
    out = tmp_path / "ds"
    with pytest.raises(ValueError) as exc:
        run(synth, out, **kwargs)
    for w in words:
        assert w in str(exc.value)
    assert not out.exists()


def test_empty_data_dictionary(tmp_path):
    with pytest.raises(ValueError, match="data_dictionary"):
        generate_patch_dataset([], CLASS_TO_IDX, patch_number=[2, 2], output_folder=str(tmp_path / "ds"))
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize(
    "class_to_idx, word",
    [
        ({"bg": 0, "a,b": 1, "b": 2}, "a,b"),
        ({"a": 1, "b": 2, "c": 3}, "0"),  # no background
    ],
)
def test_bad_class_to_idx(synth, tmp_path, class_to_idx, word):
    with pytest.raises(ValueError) as exc:
        generate_patch_dataset(synth, class_to_idx, patch_number=[2, 2], output_folder=str(tmp_path / "ds"))
    assert word in str(exc.value)


# ------------------------------------------------------------------ output folder safety


def test_refuses_non_dataset_folder_and_keeps_user_files(synth, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.txt").write_text("precious")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = tree_digest(out)
    with pytest.raises(FileExistsError) as exc:
        run(synth, out)
    assert str(out) in str(exc.value)
    assert tree_digest(out) == before
    with pytest.raises(FileExistsError):
        run(synth, out, clear_output_folder=True)
    assert tree_digest(out) == before
    assert not list(tmp_path.glob(".mine.*"))


def test_failing_run_leaves_nothing(synth, tmp_path):
    """A truncated PNG: its header (size) reads fine, decoding fails mid-way, after the scan phase."""
    data = Path(synth[9]["path"]).read_bytes()
    Path(synth[9]["path"]).write_bytes(data[: len(data) // 2])
    out = tmp_path / "ds"
    with pytest.raises(ValueError) as exc:
        run(synth, out)
    assert synth[9]["path"] in str(exc.value)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_failing_run_keeps_previous_dataset(synth, tmp_path):
    out = tmp_path / "ds"
    run(synth, out)
    before = tree_digest(out)
    data = Path(synth[9]["path"]).read_bytes()
    Path(synth[9]["path"]).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        run(synth, out, patch_number=[3, 3])
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "src"]


def test_rerun_replaces_dataset(synth, tmp_path):
    out = tmp_path / "ds"
    run(synth, out, patch_number=[3, 3])
    assert any(int(PATCH_RE.match(p.name)["idx"]) >= 4 for p in (out / "val").rglob("*.png"))
    (out / "val" / "a" / "stale_99.png").write_bytes(b"old")
    (out / "train" / "stale_good.h5").write_bytes(b"old")
    info = run(synth, out, patch_number=[2, 2], seed=3)
    assert not (out / "val" / "a" / "stale_99.png").exists()
    assert not (out / "train" / "stale_good.h5").exists()
    for split in ("val", "test"):
        for p in (out / split).rglob("*.png"):
            assert int(PATCH_RE.match(p.name)["idx"]) < 4, p
    check_layout(out, info, CLASS_TO_IDX, patch_number=[2, 2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "src"]
    # same result as a fresh run
    run(synth, tmp_path / "fresh", patch_number=[2, 2], seed=3)
    assert tree_digest(out) == tree_digest(tmp_path / "fresh")


@pytest.mark.slow
def test_failing_run_with_two_workers_leaves_no_temp_folder(tmp_path):
    n = 40
    dd = make_dataset(tmp_path / "src", n=n, h=96, w=128, n_empty=2)
    _, order = split_images([None] * n, 0.0, 0.0, 42, 3)  # processing order = the seeded permutation
    bad = Path(dd[order[1]]["path"])  # fails early in the first chunk, while the other worker is busy
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "ds"
    with pytest.raises(ValueError) as exc:
        run(
            dd,
            out,
            patch_number=None,
            patch_size=[8, 8],
            val_size=1.0,
            test_size=0.0,
            save_mask=True,
            seed=42,
            num_workers=2,
        )
    assert str(bad) in str(exc.value)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_val_only_split_keeps_maskless_patches(tmp_path):
    dd = make_dataset(tmp_path / "src", n=6, n_empty=1, n_none=2)
    out = tmp_path / "ds"
    info = run(dd, out, val_size=1.0, test_size=0.0)
    assert len(info["val_files"]) == 6
    found = patches_by_image(out, "val")
    for e in info["val_files"]:
        assert len(found.get(stem_of(e), [])) == 4, stem_of(e)


def test_dataset_params_bind_generate_patch_dataset_in_order() -> None:
    """``generate_patch_dataset`` binds its arguments into :class:`DatasetParams` by position: the fields are its
    parameters (but ``data_dictionary``) in its order, and the flow's section fills every one of them."""
    import dataclasses
    import inspect

    from tasks.dataset.config import GenerationSection

    names = [f.name for f in dataclasses.fields(DatasetParams)]
    assert names == list(inspect.signature(generate_patch_dataset).parameters)[1:]
    section = GenerationSection(patch_number=(2, 2))
    params = section.build_params(dict(CLASS_TO_IDX), "k")
    assert dataclasses.asdict(params) == {
        **section.model_dump(),
        "class_to_idx": dict(CLASS_TO_IDX),
        "fingerprint": "k",
    }
