"""Image/mask pairing (tasks/dataset/association.py), spec §1, with bug B18 fixed."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from tasks.dataset.association import AssociationError, get_image_mask_association


def write_png(path: Path, value: int = 0, shape=(8, 10), channels: int = 3) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full(shape + ((channels,) if channels > 1 else ()), value, np.uint8)
    ok, buf = cv2.imencode(os.path.splitext(path.name)[1] or ".png", arr)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def by_name(assoc):
    return {a["base_name"]: a for a in assoc}


def test_mask_folder_with_mask_extension(tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks"
    write_png(data / "a.png")
    write_png(data / "b.jpg")
    write_png(data / "sub" / "c.bmp")
    write_png(data / "d.png")  # no mask
    write_png(masks / "a_mask.png", channels=1)
    write_png(masks / "b_mask.png", channels=1)
    write_png(masks / "c_mask.png", channels=1)
    (data / "notes.txt").write_text("not an image")
    (data / "folder.png").mkdir()  # a folder named like an image
    (data / ".hidden.png").write_bytes(b"x")
    assoc = get_image_mask_association(str(data), str(masks), mask_extension="_mask")
    m = by_name(assoc)
    assert set(m) == {"a.png", "b.jpg", "c.bmp", "d.png"}
    assert m["a.png"]["mask"] == str(masks / "a_mask.png")
    assert m["b.jpg"]["mask"] == str(masks / "b_mask.png")
    assert m["c.bmp"]["mask"] == str(masks / "c_mask.png")
    assert m["c.bmp"]["path"] == str(data / "sub" / "c.bmp")
    assert m["d.png"]["mask"] is None
    for a in assoc:
        assert Path(a["path"]).is_file()


def test_mask_folder_same_stem_default_extension(tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks"
    write_png(data / "a.png")
    write_png(masks / "a.png", channels=1)
    assoc = get_image_mask_association(str(data), str(masks))
    assert assoc == [{"base_name": "a.png", "path": str(data / "a.png"), "mask": str(masks / "a.png")}]


def test_glob_characters_in_names(tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks"
    write_png(data / "a[1].png")
    write_png(data / "a1.png")
    write_png(masks / "a[1]_mask.png", channels=1)
    write_png(masks / "a1_mask.png", channels=1)
    names = ["a[1]"]
    try:
        write_png(data / "b*.png")
        write_png(data / "b?.png")
        write_png(masks / "b*_mask.png", channels=1)
        names += ["b*"]
    except OSError:  # filesystem without '*' support
        pass
    m = by_name(get_image_mask_association(str(data), str(masks), mask_extension="_mask"))
    assert m["a[1].png"]["mask"] == str(masks / "a[1]_mask.png")
    assert m["a1.png"]["mask"] == str(masks / "a1_mask.png")
    if "b*" in names:
        assert m["b*.png"]["mask"] == str(masks / "b*_mask.png")
        assert m["b?.png"]["mask"] is None


def test_duplicate_stems_error_names_both(tmp_path):
    data = tmp_path / "data"
    a1 = write_png(data / "a.png")
    a2 = write_png(data / "sub" / "a.jpg")
    with pytest.raises(AssociationError) as exc:
        get_image_mask_association(str(data), mask_extension="_mask")
    msg = str(exc.value)
    assert str(a1) in msg and str(a2) in msg
    assert isinstance(exc.value, ValueError)


def test_several_candidate_masks_error(tmp_path):
    data, masks = tmp_path / "data", tmp_path / "masks"
    write_png(data / "b.png")
    write_png(masks / "b.png", channels=1)
    write_png(masks / "b.bmp", channels=1)
    with pytest.raises(AssociationError) as exc:
        get_image_mask_association(str(data), str(masks))
    assert "b.png" in str(exc.value) and "b.bmp" in str(exc.value)


def test_empty_folder_error(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("x")
    (data / "sub").mkdir()
    with pytest.raises(AssociationError, match="no image files"):
        get_image_mask_association(str(data), mask_extension="_mask")


def test_missing_data_folder_error(tmp_path):
    with pytest.raises(AssociationError, match="does not exist"):
        get_image_mask_association(str(tmp_path / "nope"), mask_extension="_mask")


def test_missing_mask_folder_error(tmp_path):
    write_png(tmp_path / "data" / "a.png")
    with pytest.raises(AssociationError, match="mask_folder"):
        get_image_mask_association(str(tmp_path / "data"), str(tmp_path / "nomasks"))


def test_no_mask_folder_and_no_extension_error(tmp_path):
    write_png(tmp_path / "data" / "a.png")
    with pytest.raises(AssociationError, match="mask_extension"):
        get_image_mask_association(str(tmp_path / "data"))


def test_no_mask_folder_mode_stem_suffix_only(tmp_path):
    data = tmp_path / "data"
    write_png(data / "a.png")
    write_png(data / "a_mask.png", channels=1)
    write_png(data / "b.png")  # no mask
    write_png(data / "c_mask_v2.png")  # "_mask" inside the stem but not at its end: an image
    write_png(data / "no_mask_imgs" / "x.png")
    write_png(data / "no_mask_imgs" / "y.png")
    write_png(data / "no_mask_imgs" / "y_mask.png", channels=1)
    write_png(data / "deep" / "z.jpg")
    write_png(data / "deep" / "z_mask.png", channels=1)
    m = by_name(get_image_mask_association(str(data), mask_extension="_mask"))
    assert set(m) == {"a.png", "b.png", "c_mask_v2.png", "x.png", "y.png", "z.jpg"}
    assert m["a.png"]["mask"] == str(data / "a_mask.png")
    assert m["b.png"]["mask"] is None
    assert m["c_mask_v2.png"]["mask"] is None
    assert m["x.png"]["mask"] is None
    assert m["x.png"]["path"] == str(data / "no_mask_imgs" / "x.png")
    assert m["y.png"]["mask"] == str(data / "no_mask_imgs" / "y_mask.png")
    assert m["z.jpg"]["mask"] == str(data / "deep" / "z_mask.png")


def test_missing_mask_warning(tmp_path, caplog):
    data, masks = tmp_path / "data", tmp_path / "masks"
    write_png(data / "a.png")
    masks.mkdir()
    with caplog.at_level("WARNING"):
        assoc = get_image_mask_association(str(data), str(masks))
    assert assoc[0]["mask"] is None
    assert any("a.png" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    caplog.clear()
    with caplog.at_level("WARNING"):
        get_image_mask_association(str(data), str(masks), warning_on_missing_mask=False)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_tilde_in_folders_is_expanded(tmp_path, monkeypatch):
    """``data.images: ~/raw/images`` (config or API) is the home folder's, as output folders are."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write_png(tmp_path / "raw" / "images" / "a.png")
    write_png(tmp_path / "raw" / "masks" / "a.png", channels=1)
    assoc = get_image_mask_association("~/raw/images", "~/raw/masks")
    assert assoc == [
        {
            "base_name": "a.png",
            "path": str(tmp_path / "raw" / "images" / "a.png"),
            "mask": str(tmp_path / "raw" / "masks" / "a.png"),
        }
    ]
