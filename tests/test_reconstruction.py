"""Reconstruction (mergers), region measures and polygons, and the split evaluation on real files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from storage.geometry import compute_grid
from tasks.evaluation.reconstruction import make_merger
from tasks.evaluation.region_metrics import defect_coverage, pixel_scores, prediction_polygons, region_counts


def reconstruct(
    method: str,
    grid,
    num_classes: int,
    patch_index: np.ndarray,
    labels: np.ndarray,
    probabilities: np.ndarray | None = None,
    thresholds: list[float] | None = None,
) -> np.ndarray:
    """Class map of one image from its patch predictions, through the merger the inferer uses."""
    merger = make_merger(method, grid, num_classes, thresholds)
    merger.add(patch_index, labels, probabilities)
    return merger.finalize()


def _patch_labels(mask: np.ndarray, grid) -> np.ndarray:
    """Ground-truth patch label: the largest class present in the patch (0 if none)."""
    padded = grid.pad(mask, is_mask=True)
    return np.array([int(padded[y0:y1, x0:x1].max()) for y0, x0, y1, x1 in grid.boxes().tolist()])


@pytest.mark.parametrize("method", ["major_voting", "priority"])
def test_round_trip_of_ground_truth_patch_labels(method: str) -> None:
    mask = np.zeros((64, 80), np.uint8)
    mask[5:12, 3:9] = 1
    mask[40:60, 50:78] = 2
    grid = compute_grid(64, 80, patch_size=[16, 16])
    labels = _patch_labels(mask, grid)
    expected = np.zeros_like(mask, dtype=np.int32)
    for (y0, x0, y1, x1), lab in zip(grid.boxes().tolist(), labels.tolist()):
        expected[y0:y1, x0:x1] = lab
    got = reconstruct(method, grid, 3, np.arange(grid.num_patches), labels)
    np.testing.assert_array_equal(got, expected)
    assert got.shape == mask.shape


def test_round_trip_with_flush_last_patch_and_padding() -> None:
    grid = compute_grid(50, 20, patch_size=[16, 32])  # width padded to 32, last row flush with the bottom
    labels = np.zeros(grid.num_patches, np.int64)
    labels[-1] = 1  # bottom patch: rows 34..49
    got = reconstruct("major_voting", grid, 2, np.arange(grid.num_patches), labels)
    assert got.shape == (50, 20)
    assert got[34:, :].min() == 1 and got[:34].max() == 0


def test_major_voting_counts_past_255_and_breaks_ties_upwards() -> None:
    grid = compute_grid(64, 64, patch_size=[32, 32], overlap=0.97)  # step 1: 1,089 patches, 1,024 cover the centre
    assert grid.step_h == 1
    boxes = grid.boxes()
    covers = np.flatnonzero((boxes[:, 0] <= 32) & (boxes[:, 2] > 32) & (boxes[:, 1] <= 32) & (boxes[:, 3] > 32))
    labels = np.zeros(grid.num_patches, np.int64)
    labels[covers[:256]] = 1  # 256 votes: a uint8 counter would wrap to 0
    labels[covers[256:257]] = 2
    got = reconstruct("major_voting", grid, 3, np.arange(grid.num_patches), labels)
    assert got[32, 32] == 1
    m = make_merger("major_voting", compute_grid(16, 16, patch_size=[8, 8]), 3)
    m.add(np.array([0, 0]), np.array([1, 2]))  # one vote each on the same pixels: higher index wins
    assert m.finalize()[0, 0] == 2


def test_priority_and_good_patches() -> None:
    grid = compute_grid(16, 32, patch_size=[16, 16], overlap=0.5)  # three overlapping columns of patches
    got = reconstruct("priority", grid, 3, np.arange(3), np.array([2, 1, 0]))
    assert got[0, 0] == 2 and got[0, 12] == 2 and got[0, 20] == 1 and got[0, 31] == 0


def test_soft_merger_lets_good_evidence_outvote_a_weak_defect() -> None:
    grid = compute_grid(16, 32, patch_size=[16, 16], overlap=0.5)
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.9, 0.1]], np.float32)
    labels = probs.argmax(1)
    hard = reconstruct("major_voting", grid, 2, np.arange(3), labels, probs)
    soft = reconstruct("soft", grid, 2, np.arange(3), labels, probs)
    assert hard[:, 8:24].min() == 1  # one defect patch paints its whole box
    assert soft[0, 10] == 0 and soft[0, 16] == 0  # averaged with the good neighbours: 0.35 < 0.65
    strict = reconstruct("soft", grid, 2, np.arange(1, 2), np.array([1]), probs[1:2], thresholds=[0.0, 0.7])
    assert strict.max() == 0  # 0.6 is below the class threshold


def _per_pixel(method: str, grid, num_classes: int, labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Brute-force reference: accumulate every patch on every pixel it covers."""
    H, W = grid.padded_shape
    votes = np.zeros((num_classes, H, W), np.int64)
    psum = np.zeros((num_classes, H, W), np.float32)
    count = np.zeros((H, W), np.int64)
    for (y0, x0, y1, x1), lab, p in zip(grid.boxes().tolist(), labels.tolist(), probs):
        votes[lab, y0:y1, x0:x1] += 1
        psum[:, y0:y1, x0:x1] += p[:, None, None]
        count[y0:y1, x0:x1] += 1
    if method == "soft":
        out = np.argmax(psum / np.maximum(count, 1)[None], axis=0)
    else:
        out = np.zeros((H, W), np.int64)
        for y in range(H):
            for x in range(W):
                v = votes[1:, y, x]
                if v.any():
                    if method == "priority":
                        out[y, x] = np.flatnonzero(v).max() + 1
                    else:
                        out[y, x] = np.flatnonzero(v == v.max()).max() + 1
    out[count == 0] = 0
    return out[: grid.height, : grid.width]


@pytest.mark.parametrize("method", ["major_voting", "priority", "soft"])
@pytest.mark.parametrize(
    "h, w, size, overlap", [(37, 53, (16, 12), 0.5), (40, 30, (7, 9), 0.3), (12, 10, (16, 16), 0.0)]
)
def test_cell_mergers_equal_per_pixel_accumulation(
    method: str, h: int, w: int, size: tuple[int, int], overlap: float
) -> None:
    """Counting per cell of the box arrangement gives exactly the per-pixel maps (overlaps, flush patch, padding)."""
    grid = compute_grid(h, w, patch_size=size, overlap=overlap)
    rng = np.random.default_rng(h * w)
    probs = rng.dirichlet(np.ones(4), grid.num_patches).astype(np.float32)
    labels = rng.integers(0, 4, grid.num_patches)
    got = reconstruct(method, grid, 4, np.arange(grid.num_patches), labels, probs)
    assert got.shape == (h, w)
    assert np.array_equal(got, _per_pixel(method, grid, 4, labels, probs))


def test_polygons_keep_holes_of_any_region() -> None:
    pred = np.zeros((60, 90), np.int32)
    pred[2:10, 2:10] = 2  # a plain square first in raster order
    pred[20:50, 30:70] = 1
    pred[30:40, 40:55] = 0  # hole in the second region (the reference misses it: B8)
    polys = prediction_polygons(pred, {0: "bg", 1: "a", 2: "b"})
    ring = [p for p in polys if p["label"] == "a"]
    assert len(ring) == 1 and len(ring[0]["holes"]) == 1
    assert ring[0]["area"] == 30 * 40 - 10 * 15
    xs = {pt["x"] for pt in ring[0]["holes"][0]}
    assert xs == {40, 55}  # pixel-edge coordinates of the hole
    square = next(p for p in polys if p["label"] == "b")
    assert square["holes"] == [] and {pt["x"] for pt in square["points"]} == {2, 10}


def test_region_counts_past_255_regions_and_coverage() -> None:
    pred = np.zeros((80, 80), np.int32)
    pred[::4, ::4] = 1  # 400 isolated predicted regions
    assert region_counts(np.zeros_like(pred), pred)["false_region_bad"] == 400
    gt = np.zeros((40, 40), np.uint8)
    gt[0:10, 0:10] = 1
    gt[20:30, 20:30] = 2
    pred = np.zeros((40, 40), np.int32)
    pred[0:10, 0:5] = 1  # half of defect 1, right class
    pred[35:40, 35:40] = 2  # a false region
    counts = region_counts(gt, pred)
    assert counts == {"false_region_bad": 1, "predicted_regions": 2, "false_region_good": 1, "true_region_bad": 1}
    cov = {d["class"]: d for d in defect_coverage(gt, pred, {0: "bg", 1: "a", 2: "b"}, coverage_threshold=0.4)}
    assert cov["a"]["coverage"] == 0.5 and cov["a"]["right_class_coverage"] == 0.5 and cov["a"]["detected"]
    assert cov["b"]["coverage"] == 0.0 and not cov["b"]["detected"]
    s = pixel_scores(gt, pred, [1, 2])
    assert s[1]["iou"] == 0.5 and s[2]["iou"] == 0.0


def test_evaluate_split_on_a_generated_dataset(tmp_path: Path) -> None:
    """Folder labels used as predictions: every annotated defect whose patches are labelled is found."""
    from storage.layout import parse_patch_name
    from tasks import generate_patch_dataset, get_image_mask_association
    from tasks.demo_data import make_demo_dataset
    from tasks.evaluation.scoring import evaluate_split

    d = make_demo_dataset(tmp_path / "raw", n_images=8, size=(128, 160), seed=1)
    assoc = get_image_mask_association(d["images"], d["masks"], mask_extension="_mask")
    data = tmp_path / "ds"
    classes = d["class_to_idx"]
    generate_patch_dataset(
        assoc, classes, val_size=1.0, patch_size=[32, 32], overlap=0.5, output_folder=str(data), area_threshold=0.05
    )
    files = sorted(p for p in (data / "val").rglob("*.png"))
    ids = [str(p.relative_to(data)) for p in files]
    labels = np.array([classes[p.parent.name] for p in files])
    probs = np.eye(max(classes.values()) + 1, dtype=np.float32)[labels]
    res = evaluate_split(data, "val", ids, labels, probs, classes, "major_voting", maps_dir=tmp_path / "maps")
    for key in (
        "false_region_bad",
        "false_region_good",
        "true_region_bad",
        "reconstructions",
        "reconstructions_type",
        "patch_reconstruction_method",
        "summary",
    ):
        assert key in res
    assert len(res["reconstructions"]) == 8 and res["reconstructions_type"] == "polygon"
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == sorted(f"{Path(a['path']).stem}.png" for a in assoc)
    stems_with_defect_patches = {parse_patch_name(p.name)[0] for p, lab in zip(files, labels) if lab > 0}
    for rec in res["reconstructions"]:
        if Path(rec["file_name"]).stem in stems_with_defect_patches:
            assert rec["prediction"] and rec["true_region_bad"] >= 1
            assert all("supporting_patches" in p and p["supporting_patches"] >= 1 for p in rec["prediction"])
    summary = res["summary"]
    assert summary["all_defects"]["defects"] > 0 and summary["all_defects"]["detection_rate"] > 0.5
    json.dumps(res)  # serialisable as is
    soft = evaluate_split(data, "val", ids, labels, probs, classes, "soft")
    assert soft["summary"]["all_defects"]["detected"] == summary["all_defects"]["detected"]  # one-hot probs: no change
    impossible = {name: 1.01 for name, v in classes.items() if v > 0}
    none = evaluate_split(data, "val", ids, labels, probs, classes, "soft", soft_thresholds=impossible)
    assert none["summary"]["all_defects"]["detected"] == 0 and none["summary"]["predicted_regions"] == 0
    with pytest.raises(ValueError, match="unknown classes"):
        evaluate_split(data, "val", ids, labels, probs, classes, "soft", soft_thresholds={"nope": 0.5})


def test_discard_patches_are_reconstructed_but_not_scored(tmp_path: Path) -> None:
    """B28: ambiguous (#DISCARD#) val patches stay out of accuracy and the confusion matrix, yet vote in the maps."""
    import csv

    from sklearn.linear_model import LogisticRegression

    from storage import features as fstore
    from tasks import generate_patch_dataset, get_image_mask_association
    from tasks.demo_data import make_demo_dataset
    from tasks.evaluation.scoring import score_split

    d = make_demo_dataset(tmp_path / "raw", n_images=8, size=(128, 160), seed=1)
    assoc = get_image_mask_association(d["images"], d["masks"], mask_extension="_mask")
    data = tmp_path / "ds"
    classes = d["class_to_idx"]
    generate_patch_dataset(assoc, classes, val_size=1.0, patch_size=[32, 32], output_folder=str(data))
    files = sorted((data / "val").rglob("*.png"))
    ids = [str(p.relative_to(data)) for p in files]
    labels = np.array([classes[p.parent.name] for p in files], dtype=np.int16)
    discard = np.array([p.name.startswith("#DISCARD#") for p in files])
    assert discard.any() and (~discard).any()
    # features that make the classifier predict each patch's folder label, except #DISCARD# patches (folder:
    # background), which it predicts as a defect: were they scored, accuracy would drop below 1
    shown = np.where(discard, max(classes.values()), labels)
    X = np.eye(max(classes.values()) + 1, dtype=np.float32)[shown] * 10
    fstore.create_store(tmp_path / "val.zarr", len(ids), X.shape[1], {"kind": "val"})
    fstore.write_feature_rows(tmp_path / "val.zarr", 0, X)
    fstore.write_row_meta(tmp_path / "val.zarr", labels, ids, np.full((len(ids), 4), -1))
    fstore.mark_complete(tmp_path / "val.zarr", fstore.store_digest(tmp_path / "val.zarr"))
    clf = LogisticRegression(max_iter=1000).fit(X, shown)
    m = score_split(
        clf, tmp_path / "val.zarr", data, "val", classes, None, "major_voting", 0.3, tmp_path / "out"
    ).metrics
    assert m["n_patches"] == len(ids) and m["n_discarded"] == int(discard.sum())
    assert m["n_evaluated"] == int((~discard).sum()) and m["accuracy"] == 1.0
    assert sum(map(sum, m["confusion_matrix"]["matrix"])) == m["n_evaluated"]
    rows = list(csv.DictReader((tmp_path / "out" / "test_results.csv").open()))
    assert [int(r["real_label"]) == -1 for r in rows] == discard.tolist()
    recon = json.loads((tmp_path / "out" / "reconstruction_results.json").read_text())
    assert sum(r["n_patches"] for r in recon["reconstructions"]) == len(ids)  # every patch votes
