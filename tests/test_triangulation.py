"""Region -> triangles -> sampled patch centres (tasks/dataset/triangulation.py), spec §3.2/§3.4, bug B11 fixed."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from storage.geometry import compute_grid
from tasks.dataset.labelling import label_components
from tasks.dataset.regions import compute_regions
from tasks.dataset.triangulation import region_to_geometry, sample_points, triangle_areas, triangulate_region


def ring(h=96, w=96, r_out=36, r_in=14):
    yy, xx = np.mgrid[:h, :w]
    d2 = (yy - h / 2 + 0.5) ** 2 + (xx - w / 2 + 0.5) ** 2
    region = d2 <= r_out**2
    hole = d2 <= r_in**2
    return region & ~hole, hole


def tri_area_yx(tri: np.ndarray) -> float:
    return float(triangle_areas(np.asarray(tri, dtype=np.float64)).sum())


def floor_inside(points: np.ndarray, region: np.ndarray) -> np.ndarray:
    ij = np.floor(points).astype(np.int64)
    ok = (ij[:, 0] >= 0) & (ij[:, 0] < region.shape[0]) & (ij[:, 1] >= 0) & (ij[:, 1] < region.shape[1])
    inside = np.zeros(len(points), bool)
    inside[ok] = region[ij[ok, 0], ij[ok, 1]]
    return inside


# ------------------------------------------------------------------ format


def test_triangles_format_yx_int32():
    region = np.zeros((40, 80), bool)
    region[10:20, 30:60] = True  # 10 rows x 30 columns
    tri, w = triangulate_region(region)
    assert tri.dtype == np.int32 and tri.ndim == 3 and tri.shape[1:] == (3, 2)
    assert w.dtype == np.float64 and w.shape == (len(tri),)
    assert np.isclose(w.sum(), 1.0) and (w > 0).all()
    # (y, x) with pixel-edge coordinates
    assert tri[..., 0].min() == 10 and tri[..., 0].max() == 20
    assert tri[..., 1].min() == 30 and tri[..., 1].max() == 60
    assert tri_area_yx(tri) == 300
    # offset shifts (y, x)
    tri2, _ = triangulate_region(region[5:25, 20:70], offset=(5, 20))
    assert sorted(map(tuple, tri2.reshape(-1, 2).tolist())) == sorted(map(tuple, tri.reshape(-1, 2).tolist()))


def test_empty_region():
    tri, w = triangulate_region(np.zeros((10, 10), bool))
    assert tri.shape == (0, 3, 2) and tri.dtype == np.int32
    assert w.shape == (0,)


def test_region_geometry_area_is_pixel_count():
    region, _ = ring()
    geom = region_to_geometry(region)
    assert geom.area == region.sum()
    assert geom.geom_type == "Polygon" and len(geom.interiors) == 1


# ------------------------------------------------------------------ ring with a hole


def test_ring_area_exact_without_simplification_and_close_with_it():
    region, _ = ring()
    n = int(region.sum())
    tri0, _w0 = triangulate_region(region, tolerance=0)
    assert tri_area_yx(tri0) == n
    tri, w = triangulate_region(region)
    assert abs(tri_area_yx(tri) - n) <= 0.01 * n
    # weights are the triangle area shares
    np.testing.assert_allclose(w, triangle_areas(tri.astype(np.float64)) / tri_area_yx(tri))


def test_ring_samples_inside_region_not_in_hole():
    region, hole = ring()
    tri, w = triangulate_region(region)
    pts = sample_points(tri, w, 5000, np.random.default_rng(0))
    assert pts.shape == (5000, 2)
    inside = floor_inside(pts, region)
    assert inside.mean() >= 0.99, inside.mean()
    in_hole = floor_inside(pts, hole)
    assert in_hole.mean() <= 0.002, in_hole.mean()
    # samples cover the ring on all sides of the hole (no row cutting artefacts)
    cy, cx = region.shape[0] / 2, region.shape[1] / 2
    ang = np.arctan2(pts[:, 0] - cy, pts[:, 1] - cx)
    counts, _ = np.histogram(ang, bins=8, range=(-np.pi, np.pi))
    assert counts.min() > 0.7 * 5000 / 8


def test_ring_does_not_mutate_input():
    region, _ = ring()
    before = region.copy()
    triangulate_region(region)
    np.testing.assert_array_equal(region, before)


# ------------------------------------------------------------------ thin scratches (B11)


def diagonal_scratch(size=100):
    m = np.zeros((size, size), np.uint8)
    cv2.line(m, (8, 10), (90, 88), 1, thickness=1)  # 1-px, 8-connected, > 64 px on both axes
    return m


def test_one_pixel_diagonal_scratch_keeps_its_area():
    m = diagonal_scratch()
    region = m.astype(bool)
    tri, w = triangulate_region(region)
    assert len(tri) > 0
    assert abs(tri_area_yx(tri) - region.sum()) <= 0.01 * region.sum()
    pts = sample_points(tri, w, 2000, np.random.default_rng(1))
    assert floor_inside(pts, region).mean() >= 0.99


def test_two_pixel_horizontal_scratch():
    region = np.zeros((100, 100), bool)
    region[50:52, 5:95] = True
    tri, _w = triangulate_region(region)
    assert len(tri) > 0
    assert tri_area_yx(tri) == pytest.approx(region.sum(), rel=0.01)


def test_thin_diagonal_scratch_is_a_training_region():
    """B11 fixed: a scratch longer than the 64-px patch on both axes still yields a component h5 region."""
    m = diagonal_scratch()
    comps = label_components(m)
    assert len(comps.classes) == 2
    g = compute_grid(100, 100, patch_size=[64, 64])
    _good, regions = compute_regions(m, comps, (g.patch_h, g.patch_w), {0: "bg", 1: "scratch"}, set())
    assert len(regions) == 1
    r = regions[0]
    assert r.class_name == "scratch" and r.labelled_index == 1 and len(r.triangles) > 0
    assert np.isclose(r.weights.sum(), 1.0)


# ------------------------------------------------------------------ disjoint blobs


def test_two_blobs_weighted_by_area():
    region = np.zeros((80, 120), bool)
    region[5:25, 5:25] = True  # 400 px
    region[40:70, 60:70] = True  # 300 px
    a = np.zeros_like(region)
    a[5:25, 5:25] = True
    tri, w = triangulate_region(region)
    assert tri_area_yx(tri) == 700
    centroid = tri.astype(np.float64).mean(axis=1)
    in_a = floor_inside(centroid, a)
    assert in_a.any() and (~in_a).any()
    assert w[in_a].sum() == pytest.approx(400 / 700)
    n = 20000
    pts = sample_points(tri, w, n, np.random.default_rng(2))
    assert floor_inside(pts, region).all()
    k = floor_inside(pts, a).sum()
    # binomial: within 5 standard deviations of n * 4/7
    p = 400 / 700
    assert abs(k - n * p) < 5 * np.sqrt(n * p * (1 - p))
    # uniform within each blob: chi-square on a 4x4 grid of the first blob
    sub = pts[floor_inside(pts, a)]
    hist, _, _ = np.histogram2d(sub[:, 0], sub[:, 1], bins=4, range=[[5, 25], [5, 25]])
    expected = len(sub) / 16
    chi2 = ((hist - expected) ** 2 / expected).sum()
    assert chi2 < 45  # 15 dof: p ~ 1e-4


def test_sample_points_deterministic_with_rng():
    region, _ = ring()
    tri, w = triangulate_region(region)
    a = sample_points(tri, w, 100, np.random.default_rng(7))
    b = sample_points(tri, w, 100, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
