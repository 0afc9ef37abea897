"""Val/test patch labelling (tasks/dataset/labelling.py): Quadra's thresholds (spec §2.4) with bugs B6/B7 fixed."""

from __future__ import annotations

import numpy as np
import pytest

from storage.geometry import compute_grid
from tasks.dataset.labelling import label_components, label_patches

ONE = {"bg": 0, "a": 1}
TWO = {"bg": 0, "a": 1, "b": 2}
TWO_REV = {"bg": 0, "b": 2, "a": 1}


def grid_1x2():
    """Two 50x50 patches side by side on a 50x100 image (patch area 2500, 45 % = 1125 px)."""
    g = compute_grid(50, 100, patch_size=[50, 50])
    assert (g.n_h, g.n_w) == (1, 2)
    return g


def labels(mask, class_to_idx, **kw):
    return label_patches(label_components(mask), grid_1x2(), class_to_idx, **kw)


# ------------------------------------------------------------------ components


def test_components_touching_values_are_separate():
    m = np.zeros((10, 10), np.uint8)
    m[2:5, 2:5] = 1
    m[2:5, 5:8] = 2  # touches the class-1 block
    m[6, 1] = 1
    m[7, 2] = 1  # diagonal neighbours of the same value: one component (8-connectivity)
    c = label_components(m)
    assert len(c.classes) == 4  # background + 3 components
    assert sorted(c.classes[1:].tolist()) == [1, 1, 2]
    assert sorted(c.areas[1:].tolist()) == [2, 9, 9]
    # every component holds one value only, and component ids are consistent with the mask
    for j in range(1, len(c.classes)):
        vals = np.unique(m[c.labels == j])
        assert vals.tolist() == [c.classes[j]]
        assert (c.labels == j).sum() == c.areas[j]
    assert ((c.labels > 0) == (m > 0)).all()
    assert c.labels[6, 1] == c.labels[7, 2]
    assert c.labels[3, 4] != c.labels[3, 5]


def test_components_empty_mask():
    c = label_components(np.zeros((5, 7), np.uint8))
    assert c.classes.tolist() == [0] and not c.labels.any()


# ------------------------------------------------------------------ single class


def test_empty_patch_is_background_not_discarded():
    m = np.zeros((50, 100), np.uint8)
    assert labels(m, ONE) == [("bg", False), ("bg", False)]


def test_area_threshold():
    m = np.zeros((50, 100), np.uint8)
    # 2 components straddling both patches, 37.5 % of each in patch 0 (below a 90 % share rule),
    # but together more than 45 % of patch 0
    m[0:24, 20:100] = 1  # 24*30 = 720 px in patch 0, 1200 in patch 1
    m[26:50, 20:100] = 1  # another 720 in patch 0
    out = labels(m, ONE, area_defect_threshold=0.9)
    assert out[0] == ("a", False)  # 1440 > 1125 by total area although no component passes the share rule
    assert out[1] == ("a", False)
    out = labels(m, ONE, area_threshold=0.6, area_defect_threshold=0.9)  # 1440 < 1500: only a sliver
    assert out[0] == ("bg", True)


def test_area_defect_threshold_small_defect():
    m = np.zeros((50, 100), np.uint8)
    m[10:20, 10:20] = 1  # 100 px, entirely in patch 0, far below 45 % of the patch
    assert labels(m, ONE) == [("a", False), ("bg", False)]


def test_area_defect_threshold_is_strict():
    m = np.zeros((50, 100), np.uint8)
    m[10:20, 48:58] = 1  # 100 px: 20 in patch 0, 80 in patch 1
    assert labels(m, ONE, area_defect_threshold=0.2) == [("bg", True), ("a", False)]  # 20 > 20 is false
    assert labels(m, ONE, area_defect_threshold=0.19) == [("a", False), ("a", False)]


def test_sliver_is_discarded_single_class():
    m = np.zeros((50, 100), np.uint8)
    m[20:30, 48:98] = 1  # 500 px: 20 in patch 0 (4 %), 480 in patch 1
    out = labels(m, ONE)
    assert out[0] == ("bg", True)  # "#DISCARD#" with the background label
    assert out[1] == ("a", False)


# ------------------------------------------------------------------ several classes


@pytest.mark.parametrize("class_to_idx", [TWO, TWO_REV])
def test_sliver_is_discarded_with_absent_other_class(class_to_idx):
    """B6 fixed: an absent class 2 must not clear the discard flag set by a class-1 sliver."""
    m = np.zeros((50, 100), np.uint8)
    m[20:30, 48:98] = 1
    out = labels(m, class_to_idx)
    assert out[0] == ("bg", True)
    assert out[1] == ("a", False)


@pytest.mark.parametrize("class_to_idx", [TWO, TWO_REV])
@pytest.mark.parametrize("big, small", [(1, 2), (2, 1)])
def test_largest_qualifying_class_wins_regardless_of_order(class_to_idx, big, small):
    """B7 fixed: two classes pass the component-share rule: the larger area wins in any dict order."""
    m = np.zeros((50, 100), np.uint8)
    m[5:15, 5:15] = big  # 100 px
    m[30:35, 30:40] = small  # 50 px
    out = labels(m, class_to_idx)
    name = {1: "a", 2: "b"}[big]
    assert out[0] == (name, False)
    assert out[1] == ("bg", False)


def test_area_rule_beats_component_rule_by_area():
    m = np.zeros((50, 100), np.uint8)
    m[0:30, 0:40] = 2  # 1200 px > 1125 (area rule)
    m[40:45, 0:10] = 1  # 50 px (component rule)
    for cti in (TWO, TWO_REV):
        assert labels(m, cti)[0] == ("b", False)


def test_tie_goes_to_first_class_in_dict_order():
    m = np.zeros((50, 100), np.uint8)
    m[5:15, 5:15] = 1
    m[30:40, 30:40] = 2  # same area
    assert labels(m, TWO)[0] == ("a", False)
    assert labels(m, TWO_REV)[0] == ("b", False)


def test_touching_classes_count_as_separate_defects():
    """A class-2 pixel block glued to a big class-1 block is its own small defect (passes the share rule)."""
    m = np.zeros((50, 100), np.uint8)
    m[10:20, 40:95] = 1  # 550 px, 100 of them in patch 0 (18 %)
    m[10:20, 35:40] = 2  # 50 px, touching, entirely in patch 0
    out = labels(m, TWO)
    assert out[0] == ("b", False)
    assert out[1] == ("a", False)


def test_padded_small_image_labels():
    """An image smaller than the patch is padded with background; its defect still labels the patch."""
    m = np.zeros((20, 30), np.uint8)
    m[5:10, 5:10] = 1
    g = compute_grid(20, 30, patch_size=[32, 32])
    assert label_patches(label_components(m), g, ONE) == [("a", False)]
