"""Region masks -> polygons with holes (shapely) -> triangles (mapbox-earcut) -> area weights.

Polygons are the exact union of the region's pixel squares (pixel-edge coordinates, so vertices
are integers), then simplified by Douglas-Peucker (which keeps a subset of those integer vertices)
only while the area changes by less than ``max_area_change``. Holes stay holes (no row cutting,
unlike the reference), and 1-px scratches keep their area (no collapse under simplification).
"""

from __future__ import annotations

import mapbox_earcut
import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon


def _row_runs(region: np.ndarray) -> np.ndarray:
    """Horizontal runs ``(row, c0, c1)`` of True pixels, row-major."""
    padded = np.zeros((region.shape[0], region.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = region
    d = np.diff(padded, axis=1)
    starts = np.argwhere(d == 1)
    ends = np.argwhere(d == -1)
    return np.column_stack([starts[:, 0], starts[:, 1], ends[:, 1]])


def _merge_runs(runs: np.ndarray) -> np.ndarray:
    """Stack identical runs of consecutive rows into rectangles ``(y0, y1, x0, x1)``."""
    rects: list[list[int]] = []
    open_: dict[tuple[int, int], int] = {}  # (c0, c1) -> index in rects, for rects ending at the previous row
    current_row = -1
    next_open: dict[tuple[int, int], int] = {}
    for r, c0, c1 in runs.tolist():
        if r != current_row:
            open_ = next_open if r == current_row + 1 else {}
            next_open = {}
            current_row = r
        key = (c0, c1)
        idx = open_.get(key)
        if idx is not None:
            rects[idx][1] = r + 1
        else:
            idx = len(rects)
            rects.append([r, r + 1, c0, c1])
        next_open[key] = idx
    return np.asarray(rects, dtype=np.int64).reshape(-1, 4)


def region_to_geometry(region: np.ndarray, offset: tuple[int, int] = (0, 0)) -> Polygon | MultiPolygon:
    """Exact pixel-union geometry of a boolean region, shifted by ``offset`` (y, x); x = column."""
    region = np.asarray(region, dtype=bool)
    if not region.any():
        return Polygon()
    rects = _merge_runs(_row_runs(region))
    oy, ox = offset
    boxes = shapely.box(rects[:, 2] + ox, rects[:, 0] + oy, rects[:, 3] + ox, rects[:, 1] + oy)
    return shapely.union_all(boxes)


def _polygons(geom: Polygon | MultiPolygon) -> list[Polygon]:
    if geom.is_empty:
        return []
    if isinstance(geom, Polygon):
        return [geom]
    return [g for g in getattr(geom, "geoms", []) if isinstance(g, Polygon) and not g.is_empty]


def simplify_polygon(poly: Polygon, tolerance: float = 1.0, max_area_change: float = 0.01) -> Polygon:
    """Douglas-Peucker simplification kept only if valid and within ``max_area_change`` of the area."""
    if tolerance <= 0:
        return poly
    simple = poly.simplify(tolerance, preserve_topology=True)
    if (
        isinstance(simple, Polygon)
        and not simple.is_empty
        and simple.is_valid
        and abs(simple.area - poly.area) <= max_area_change * poly.area
    ):
        return simple
    return poly


def triangulate_polygon(poly: Polygon) -> np.ndarray:
    """Triangles ``(T, 3, 2)`` as (x, y) of a polygon with holes."""
    rings = [np.asarray(poly.exterior.coords)[:-1]] + [np.asarray(r.coords)[:-1] for r in poly.interiors]
    rings = [r for r in rings if len(r) >= 3]
    if not rings:
        return np.zeros((0, 3, 2), dtype=np.float64)
    verts = np.concatenate(rings)
    ends = np.cumsum([len(r) for r in rings]).astype(np.uint32)
    if np.all(verts == np.round(verts)):
        idx = mapbox_earcut.triangulate_int64(verts.astype(np.int64), ends)
    else:
        idx = mapbox_earcut.triangulate_float64(verts.astype(np.float64), ends)
    return verts[np.asarray(idx, dtype=np.int64).reshape(-1, 3)]


def triangle_areas(tri: np.ndarray) -> np.ndarray:
    """Unsigned areas of triangles ``(T, 3, 2)``."""
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    return 0.5 * np.abs((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1]))


def triangulate_region(
    region: np.ndarray,
    offset: tuple[int, int] = (0, 0),
    tolerance: float = 1.0,
    max_area_change: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """``(triangles int32 (T,3,2) as (y, x), weights float64 (T,))`` of a boolean region; empty if none."""
    tris = []
    for poly in _polygons(region_to_geometry(region, offset)):
        t = triangulate_polygon(simplify_polygon(poly, tolerance, max_area_change))
        if len(t):
            tris.append(t)
    if not tris:
        return np.zeros((0, 3, 2), dtype=np.int32), np.zeros((0,), dtype=np.float64)
    tri = np.concatenate(tris)
    areas = triangle_areas(tri)
    keep = areas > 0
    tri, areas = tri[keep], areas[keep]
    if not len(tri):
        return np.zeros((0, 3, 2), dtype=np.int32), np.zeros((0,), dtype=np.float64)
    tri_yx = np.round(tri[..., ::-1]).astype(np.int32)
    return tri_yx, areas / areas.sum()


def sample_points(triangles: np.ndarray, weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points ``(n, 2)`` (y, x) float, uniform over the area of the triangles."""
    idx = rng.choice(len(triangles), size=n, p=weights)
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)[:, None]
    t = r2[:, None]
    tri = np.asarray(triangles, dtype=np.float64)[idx]
    return (1 - s) * tri[:, 0] + s * (1 - t) * tri[:, 1] + s * t * tri[:, 2]
