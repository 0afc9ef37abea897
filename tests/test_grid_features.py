"""Grid patches of the train images as training rows (``trainer.grid_patches``): labelled as val/test patches,
#DISCARD# left out, masks found in patchflow's and Quadra's layouts, a clear error when one is missing, and a
store of their own, cached by its own key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from storage import layout
from storage.geometry import GridSpec
from storage.layout import DatasetFormatError
from tasks.features.grid import GridImage, GridRule, grid_rows, grid_samples, grid_thresholds
from tasks.features.sampler import iter_pass_patches
from tasks.imageio import read_image
from tasks.model.config import TrainFlowConfig
from tests import _synth


def _generate(root: Path, out: Path, **kw) -> Path:
    from tasks import generate_patch_dataset

    data = _synth.make_dataset(root / "raw", n=16, small=2, seed=5)
    params = {"val_size": 0.5, "test_size": 0.0, "patch_size": [16, 16], "overlap": 0.25, "output_folder": str(out)}
    generate_patch_dataset(data, _synth.CLASS_TO_IDX, **{**params, **kw})
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """16 images (+2 smaller than a patch) with 1-2 blobs each, 16x16 patches with overlap: many #DISCARD#."""
    root = tmp_path_factory.mktemp("grid")
    return _generate(root, root / "patches")


def _cfg(data: Path, **trainer) -> TrainFlowConfig:
    return TrainFlowConfig.model_validate(
        {
            "datamodule": {"data_path": str(data)},
            "backbone": {"name": "resnet18", "weights": None},
            "transforms": {"input_height": 32, "input_width": 32},
            "trainer": {"iteration_over_training": 1, **trainer},
        }
    )


def test_grid_rows_are_the_val_patches_of_the_dataset_stage(dataset: Path) -> None:
    """Cut and labelled as the dataset stage cut and labelled val: on the val images, the grid rows are exactly the
    val patch files that are not #DISCARD#, with their folder's class and their pixels."""
    info = layout.read_info(dataset)
    side = layout.read_sidecar(dataset)
    assert side["area_threshold"] == 0.45 and side["area_defect_threshold"] == 0.2  # recorded by the dataset stage
    images = [
        GridImage(str(dataset / e["image_path"]), Path(e["image_path"]).stem, str(dataset / e["mask_path"]))
        for e in info["val_files"]
    ]
    classes = side["class_to_idx"]
    rule = GridRule(GridSpec.from_info(info), classes, classes, grid_thresholds(_cfg(dataset)))
    samples, ids = grid_rows(images, rule)
    names = {v: k for k, v in classes.items()}
    on_disk = {p.name: p.parent.name for p in (dataset / "val").rglob("*.png")}
    kept = {name: cls for name, cls in on_disk.items() if not name.startswith(layout.DISCARD_PREFIX)}
    assert len(kept) < len(on_disk)  # the fixture has #DISCARD# patches: they are left out
    assert dict(zip(ids, (names[int(v)] for v in samples.label))) == kept
    for rows, patches in iter_pass_patches(samples, 16):
        for row, patch in zip(rows.tolist(), patches):
            want = read_image(dataset / "val" / kept[ids[row]] / ids[row])
            np.testing.assert_array_equal(patch, want, err_msg=ids[row])


def test_grid_samples_of_the_train_split(dataset: Path) -> None:
    """Every image of the training list, all of its non-#DISCARD# patches; skipped classes left out."""
    info = layout.read_info(dataset)
    samples, ids = grid_samples(_cfg(dataset))
    stems = {Path(e["image_path"]).stem for e in info["train_files"]}
    assert {layout.parse_patch_name(i)[0] for i in ids} == stems
    assert len(ids) == len(set(ids)) and set(samples.label.tolist()) == {0, 1, 2}
    skipped, ids_skip = grid_samples(_cfg(dataset).model_copy(update={"datamodule": _dm(dataset, ["a"])}))
    assert 1 not in skipped.label.tolist()
    assert set(ids_skip) == {i for i, lab in zip(ids, samples.label.tolist()) if lab != 1}


def _dm(data: Path, skip: list[str]):
    from tasks.model.config import DatamoduleSection

    return DatamoduleSection(data_path=str(data), class_to_skip_training=skip)


def test_thresholds_config_then_dataset_then_quadra_defaults(dataset: Path, tmp_path: Path) -> None:
    assert grid_thresholds(_cfg(dataset)) == (0.45, 0.2)
    assert grid_thresholds(_cfg(dataset, area_threshold=0.3)) == (0.3, 0.2)
    out = _generate(tmp_path, tmp_path / "p", area_threshold=0.6, area_defect_threshold=0.5)
    assert grid_thresholds(_cfg(out)) == (0.6, 0.5)
    assert grid_thresholds(_cfg(out, area_defect_threshold=0.1)) == (0.6, 0.1)
    (out / layout.SIDECAR_FILE).unlink()  # a Quadra dataset records none
    assert grid_thresholds(_cfg(out)) == (0.45, 0.2)


def test_missing_train_mask_is_one_clear_line(tmp_path: Path) -> None:
    out = _generate(tmp_path, tmp_path / "p", save_original_images_and_masks=False)
    info = layout.read_info(out)
    entry = next(e for e in info["train_files"] if e["mask_path"])
    Path(entry["mask_path"]).unlink()
    with pytest.raises(DatasetFormatError) as err:
        grid_samples(_cfg(out))
    msg = str(err.value)
    assert "\n" not in msg and entry["image_path"] in msg and entry["mask_path"] in msg
    assert "original/masks" in msg and "trainer.grid_patches: false" in msg


def test_quadra_layout_without_sidecar(dataset: Path, tmp_path: Path) -> None:
    """No patchflow.json, info.json paths as a caller elsewhere wrote them: masks are found through the h5 files
    (or original/masks), rows and labels are the same as with the sidecar."""
    want = grid_samples(_cfg(dataset))
    quadra = tmp_path / "quadra"
    shutil.copytree(dataset, quadra)
    (quadra / layout.SIDECAR_FILE).unlink()
    info = json.loads((quadra / "info.json").read_text())
    for e in info["train_files"]:
        e["image_path"] = f"/elsewhere/{Path(e['image_path']).name}"
        e["mask_path"] = f"/elsewhere/masks/{Path(e['mask_path']).name}" if e["mask_path"] else None
    (quadra / "info.json").write_text(json.dumps(info))
    cfg = _cfg(quadra).model_copy(
        update={"datamodule": _dm(quadra, []).model_copy(update={"class_to_idx": _synth.CLASS_TO_IDX})}
    )
    got = grid_samples(cfg)
    assert got[1] == want[1]
    np.testing.assert_array_equal(got[0].label, want[0].label)
    np.testing.assert_array_equal(got[0].box, want[0].box)
    # h5 files without mask_path and info.json naming none: original/masks/<stem>.png is the mask
    info["train_files"] = []
    (quadra / "info.json").write_text(json.dumps(info))
    for h5 in (quadra / "train").glob("*.h5"):
        _drop_mask_path(h5)
    got = grid_samples(cfg)
    assert got[1] == want[1]


def _drop_mask_path(h5: Path) -> None:
    import h5py

    with h5py.File(h5, "a") as f:
        if "mask_path" in f:
            del f["mask_path"]


def test_grid_store_has_its_own_key(dataset: Path, tmp_path: Path) -> None:
    """One more store: a threshold change changes only the grid key; a classifier change changes no store key;
    grid_patches=false is the reference's stores."""
    from tasks.features.stage import feature_jobs

    def keys(cfg: TrainFlowConfig) -> dict:
        return {what: key for what, key, _, _ in feature_jobs(cfg, tmp_path, "w")}

    base = keys(_cfg(dataset))
    assert list(base) == [0, "grid", "val"]
    moved = keys(_cfg(dataset, area_defect_threshold=0.3))
    assert {k for k in base if base[k] != moved[k]} == {"grid"}
    other_clf = _cfg(dataset).model_copy(update={"model": _cfg(dataset).model.model_copy(update={"params": {"C": 3}})})
    assert keys(other_clf) == base
    off = keys(_cfg(dataset, grid_patches=False))
    assert off == {0: base[0], "val": base["val"]}


def test_grid_store_built_and_cached(dataset: Path, tmp_path: Path) -> None:
    """The grid store through the stage's job: rows, labels and ids as planned, features of the configured width;
    built once (a second build computes no shard)."""
    from storage import features as fstore
    from tasks.features.store import grid_job

    cfg = _cfg(dataset)
    samples, ids = grid_samples(cfg)
    out = tmp_path / "grid.zarr"
    first = grid_job(cfg, out).build()
    X, y, got_ids, boxes = fstore.load_features(out)
    assert first["rows"] == len(ids) and X.shape == (len(ids), 896) and np.isfinite(X).all()
    assert got_ids.tolist() == ids and y.tolist() == samples.label.tolist()
    np.testing.assert_array_equal(boxes, samples.box)
    assert fstore.store_attrs(out)["kind"] == "grid" and fstore.store_attrs(out)["area_threshold"] == 0.45
    assert grid_job(cfg, out).build()["shards"] == 0
