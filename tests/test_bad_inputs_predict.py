"""Bad inputs of predict's outputs (docs/bad-inputs.md, section O, cases 140-149).

No input image is overwritten, deleted or read back as an output; outputs never collide; a deleted or
edited output is recomputed, never served from the cache. Every case checks by sha256 that the images
folder holds exactly the files it held, with the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from storage.paths import OutputFolderError
from tasks.imageio import InputDataError
from tests._synth import tree_digest, write_image
from tests.conftest import task_states

REPO = Path(__file__).resolve().parents[1]


def expect(exc_type: type[BaseException], fn, *names: object, fix: str) -> str:
    """Run ``fn``; it must raise ``exc_type`` whose message names every ``names`` item and matches ``fix``."""
    with pytest.raises(exc_type) as ei:
        fn()
    msg = str(ei.value)
    for name in names:
        assert str(name) in msg, f"{name!r} not named in: {msg}"
    assert re.search(fix, msg, re.IGNORECASE), f"no fix ({fix!r}) in: {msg}"
    if os.environ.get("PATCHFLOW_SHOW_ERRORS"):
        print(f"\n[{type(ei.value).__name__}] {msg}")
    return msg


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle from the train stages' own functions (no Prefect): 6 demo images, 64 px patches,
    random-init MobileNetV2 at 32 px, one feature pass, the configured classifier, a .pth export."""
    from tasks import generate_patch_dataset, get_image_mask_association
    from tasks.demo_data import make_demo_dataset
    from tasks.features.params import backbone_digest
    from tasks.features.store import extract_train_pass
    from tasks.model.bundle import export_bundle
    from tasks.model.config import TrainFlowConfig
    from tasks.model.fit import fit_classifier

    root = tmp_path_factory.mktemp("predict-bundle")
    d = make_demo_dataset(root / "raw", n_images=6, size=(96, 128), seed=3)
    assoc = get_image_mask_association(d["images"], d["masks"], mask_extension="_mask")
    data = root / "patches"
    generate_patch_dataset(
        assoc, d["class_to_idx"], val_size=0.3, test_size=0.0, patch_size=[64, 64], output_folder=str(data)
    )
    cfg = TrainFlowConfig.model_validate(
        {
            "datamodule": {"data_path": str(data)},
            "transforms": {"input_height": 32, "input_width": 32},
            "trainer": {"iteration_over_training": 1},
            "export": {"types": ["pytorch"]},
            "backbone": {"weights": None},
            "task": {"runtime": "torch"},
            "core": {"runs_folder": str(root / "runs")},
            "storage_root": str(root / "store"),
        }
    )
    wdig = backbone_digest(cfg)
    extract_train_pass(cfg, 0, root / "pass0.zarr", wdig)
    fit_classifier(cfg, [str(root / "pass0.zarr")], root / "classifier.skops")
    return export_bundle(cfg, root / "classifier.skops", root / "deployment_model", wdig)


def img(path: Path, seed: int, shape: tuple[int, int] = (72, 88)) -> Path:
    """A small real PNG/JPEG with a bright blob (so some patches look defective)."""
    a = np.random.default_rng(seed).integers(40, 90, (*shape, 3), dtype=np.uint8)
    a[10:30, 20:50] = 220
    return write_image(path, a)


def outputs(out: Path) -> dict[str, str]:
    """sha256 of every output file but predictions.json (it holds the run's timing)."""
    return {k: v for k, v in tree_digest(out).items() if k != "predictions.json"}


def predict(bundle: Path, images: Path, out: Path, **kw) -> dict:
    from tasks.predict.stage import predict_images

    return predict_images(bundle, images, out, batch_size=8, **kw)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flows.predict", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def one_error_line(proc: subprocess.CompletedProcess, rc: int = 1) -> str:
    assert proc.returncode == rc, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# ===================================================================== O. predict outputs


@pytest.mark.slow
def test_140_out_is_the_images_folder(bundle: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    img(images / "a.png", 1)
    img(images / "a_overlay.png", 2)  # an input whose name is a.png's overlay
    before = tree_digest(images)
    expect(
        OutputFolderError,
        lambda: predict(bundle, images, images),
        images,
        "is the --images folder",
        fix="choose an --out folder outside",
    )
    assert tree_digest(images) == before  # nothing overwritten, nothing added (no predictions.json)
    # the CLI: one line, exit 1, before any flow run starts; a relative --out spelling of the same folder too
    line = one_error_line(run_cli("--model", str(bundle), "--images", str(images), "--out", str(images / "sub" / "..")))
    assert str(images) in line and "overwrite images" in line
    assert tree_digest(images) == before


def test_141_out_inside_the_images_folder_or_a_link_to_it(bundle: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    img(images / "a.png", 1)
    img(images / "pred" / "old.png", 3)
    before = tree_digest(images)
    expect(
        OutputFolderError,
        lambda: predict(bundle, images, images / "pred"),
        images / "pred",
        images,
        fix="choose an --out folder outside",
    )
    link = tmp_path / "link"
    link.symlink_to(images, target_is_directory=True)  # a link is followed: it is the images folder
    expect(OutputFolderError, lambda: predict(bundle, images, link / "pred"), images / "pred", fix="outside")
    expect(OutputFolderError, lambda: predict(bundle, link, tmp_path / "images" / "x"), images / "x", fix="outside")
    assert tree_digest(images) == before


def test_142_out_holds_the_images_folder(bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "work"
    images = out / "raw"
    img(images / "a.png", 1)
    img(images / "raw" / "a_overlay.png", 2)  # <out>/raw/a_overlay.png would be raw/raw/a.png's overlay
    before = tree_digest(out)
    expect(OutputFolderError, lambda: predict(bundle, images, out), out, images, "holds", fix="does not hold it")
    assert tree_digest(out) == before


@pytest.mark.slow
def test_143_same_stem_in_two_subfolders_keeps_the_subfolders(bundle: Path, tmp_path: Path) -> None:
    images, out = tmp_path / "images", tmp_path / "pred"
    img(images / "sub1" / "dup.png", 1)
    img(images / "sub2" / "dup.png", 2, shape=(64, 100))
    img(images / "top.png", 3)
    before = tree_digest(images)
    res = predict(bundle, images, out)
    assert tree_digest(images) == before
    got = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert got == {
        "predictions.json",
        *(
            f"{s}_{k}"
            for s in ("sub1/dup", "sub2/dup", "top")
            for k in ("classmap.png", "polygons.json", "overlay.png")
        ),
    }
    # each image's own outputs: the class maps have each image's size
    assert cv2.imread(str(out / "sub1" / "dup_classmap.png"), cv2.IMREAD_UNCHANGED).shape == (72, 88)
    assert cv2.imread(str(out / "sub2" / "dup_classmap.png"), cv2.IMREAD_UNCHANGED).shape == (64, 100)
    assert json.loads((out / "sub2" / "dup_polygons.json").read_text())["image"] == str(images / "sub2" / "dup.png")
    record = json.loads((out / "predictions.json").read_text())
    assert record == json.loads(json.dumps(res))
    by_rel = {i["relative_path"]: i for i in record["images"]}
    assert sorted(by_rel) == ["sub1/dup.png", "sub2/dup.png", "top.png"]
    assert by_rel["sub1/dup.png"]["outputs"]["overlay"]["file"] == "sub1/dup_overlay.png"
    for item in record["images"]:
        for f in item["outputs"].values():
            data = (out / f["file"]).read_bytes()
            assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()


def test_144_same_stem_twice_in_one_folder_is_refused(bundle: Path, tmp_path: Path) -> None:
    images, out = tmp_path / "images", tmp_path / "pred"
    img(images / "a.png", 1)
    img(images / "a.jpg", 2)
    img(images / "b.png", 3)
    before = tree_digest(images)
    expect(
        InputDataError,
        lambda: predict(bundle, images, out),
        images / "a.jpg",
        images / "a.png",
        "a_classmap.png",
        fix="rename or remove one of them",
    )
    assert not out.exists()  # refused before the output folder is created
    assert tree_digest(images) == before
    # any other pair of images whose outputs would share a path: a subfolder named like an output
    (images / "a.jpg").unlink()
    img(images / "a_classmap.png" / "x.png", 4)
    expect(
        InputDataError,
        lambda: predict(bundle, images, out),
        images / "a.png",
        images / "a_classmap.png" / "x.png",
        fix="rename or move one of them",
    )
    img(tmp_path / "i2" / "predictions.json" / "x.png", 5)
    expect(
        InputDataError,
        lambda: predict(bundle, tmp_path / "i2", out),
        "predict's own predictions.json",
        fix="rename its folder",
    )
    assert not out.exists()


@pytest.mark.slow
def test_145_out_or_images_is_a_file(bundle: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    img(images / "a.png", 1)
    out = tmp_path / "pred.png"
    out.write_bytes(b"the user's file")
    before = tree_digest(tmp_path)
    expect(OutputFolderError, lambda: predict(bundle, images, out), out, "is a file", fix="choose another --out folder")
    expect(
        OutputFolderError,
        lambda: predict(bundle, images, out / "sub"),
        out / "sub",
        f"under {out}, which is a file",
        fix="choose another --out folder",
    )
    expect(
        FileNotFoundError,
        lambda: predict(bundle, out, tmp_path / "o"),
        out,
        "is not a folder",
        fix="point --images at a folder",
    )
    assert tree_digest(tmp_path) == before
    line = one_error_line(run_cli("--model", str(bundle), "--images", str(images), "--out", str(out)))
    assert line == f"error: --out {out} is a file, not a folder; choose another --out folder"
    assert tree_digest(tmp_path) == before


@pytest.fixture()
def flow_run(bundle: Path, tmp_path: Path, prefect_harness):
    """``run(**changes)`` runs the predict flow on 3 images (one in a subfolder) and returns its task states."""
    from flows.predict import predict_flow

    images, out = tmp_path / "images", tmp_path / "o"
    for i in range(2):
        img(images / f"part_{i:03d}.png", i)
    img(images / "sub" / "part_001.png", 7)
    cfg = {
        "model": str(bundle),
        "images": str(images),
        "out": str(out),
        "batch_size": 8,
        "storage_root": str(tmp_path / "store"),
    }
    inputs = tree_digest(images)

    def run(**changes) -> dict[str, str]:
        state = predict_flow({**cfg, **changes}, return_state=True)
        assert state.is_completed()
        assert tree_digest(images) == inputs
        return task_states(state)

    return run, out


@pytest.mark.slow
def test_146_deleted_output_is_recomputed_not_served(flow_run) -> None:
    run, out = flow_run
    assert run() == {"predict-images": "Completed"}
    first = outputs(out)
    assert run() == {"predict-images": "Cached"}  # untouched: served from the cache
    for name in ("part_001_classmap.png", "sub/part_001_overlay.png"):
        (out / name).unlink()
        assert run() == {"predict-images": "Completed"}, name
        assert outputs(out) == first  # restored with the same bytes
    assert run() == {"predict-images": "Cached"}


@pytest.mark.slow
def test_147_edited_or_resized_output_is_recomputed(flow_run) -> None:
    run, out = flow_run
    assert run() == {"predict-images": "Completed"}
    first = outputs(out)
    edits = {
        "part_000_classmap.png": lambda b: b[:-1] + bytes([b[-1] ^ 1]),  # same size, one bit changed
        "part_001_overlay.png": lambda b: b[: len(b) // 2],  # truncated
        "sub/part_001_polygons.json": lambda b: b + b" ",  # grown
        "predictions.json": lambda b: b.replace(b'"defect_regions": ', b'"defect_regions": 1'),  # the record itself
    }
    for name, edit in edits.items():
        p = out / name
        p.write_bytes(edit(p.read_bytes()))
        assert run() == {"predict-images": "Completed"}, name
        assert outputs(out) == first, name
    assert run() == {"predict-images": "Cached"}


@pytest.mark.slow
def test_148_outputs_of_another_run_in_the_same_folder_are_not_served(flow_run) -> None:
    run, out = flow_run
    assert run(method="major_voting") == {"predict-images": "Completed"}
    voting = json.loads((out / "predictions.json").read_text())
    assert run(method="soft") == {"predict-images": "Completed"}  # overwrites the folder with soft's outputs
    # major_voting's cache record exists, but the folder holds soft's outputs: recomputed, not served
    assert run(method="major_voting") == {"predict-images": "Completed"}
    again = json.loads((out / "predictions.json").read_text())
    assert again["method"] == "major_voting" and again["key"] == voting["key"]
    assert [i["outputs"] for i in again["images"]] == [i["outputs"] for i in voting["images"]]
    assert run(method="major_voting") == {"predict-images": "Cached"}


@pytest.mark.slow
def test_149_tilde_in_images_and_out_is_expanded(bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    img(home / "imgs" / "a.png", 1)
    before = tree_digest(home / "imgs")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    res = predict(bundle, Path("~/imgs"), Path("~/pred"))
    assert (home / "pred" / "a_classmap.png").is_file() and (home / "pred" / "predictions.json").is_file()
    assert res["out"] == str(home / "pred") and not (tmp_path / "~").exists()  # no folder literally named ~
    expect(OutputFolderError, lambda: predict(bundle, Path("~/imgs"), Path("~/imgs/p")), home / "imgs", fix="outside")
    assert tree_digest(home / "imgs") == before
    shutil.rmtree(home / "pred")
