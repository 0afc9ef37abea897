"""Patch geometry (storage/geometry.py) against Quadra's verified examples (spec §2.2) and grid invariants."""

from __future__ import annotations

import numpy as np
import pytest

from storage.geometry import (
    GRID_POLICY,
    GridSpec,
    PatchGrid,
    compute_grid,
    compute_patch_info,
    compute_patch_info_from_patch_dim,
    pad_to,
    safe_crop_origin,
)

# ------------------------------------------------------------------ Quadra's verified examples (§2.2)


@pytest.mark.parametrize(
    "length, n, overlap, patch, step",
    [
        (224, 2, 0.0, 112, 112),
        (224, 3, 0.0, 75, 75),
        (1000, 3, 0.0, 334, 334),
        (1000, 3, 0.5, 500, 250),
    ],
)
def test_patch_number_examples_square(length, n, overlap, patch, step):
    (ph, sh), (pw, sw) = compute_patch_info(length, length, n, n, overlap)
    assert (ph, sh) == (patch, step)
    assert (pw, sw) == (patch, step)


def test_patch_number_example_1001x999_4x5():
    (ph, sh), (pw, sw) = compute_patch_info(1001, 999, 4, 5, 0.25)
    assert (ph, sh) == (308, 231)
    assert (pw, sw) == (251, 187)


def test_patch_number_example_224_12x18():
    (ph, sh), (pw, sw) = compute_patch_info(224, 224, 12, 18, 0.5)
    assert (ph, sh) == (37, 17)
    assert (pw, sw) == (24, 12)


@pytest.mark.parametrize(
    "length, patch, overlap, n, step",
    [
        (224, 32, 0.5, 13, 16),
        (224, 100, 0.0, 3, 100),
        (1000, 224, 0.0, 5, 224),
        (1000, 224, 0.5, 8, 112),
    ],
)
def test_patch_size_examples(length, patch, overlap, n, step):
    (nh, sh), (nw, sw) = compute_patch_info_from_patch_dim(length, length, patch, patch, overlap)
    assert (nh, sh) == (n, step)
    assert (nw, sw) == (n, step)


def test_rows_start_flush_224_3x75():
    """224 px with 3 patches of 75: rows start at 0, 75, 149 (last one flush with the border)."""
    g = compute_grid(224, 224, patch_number=[3, 3])
    assert sorted(set(g.origins()[:, 0].tolist())) == [0, 75, 149]


@pytest.mark.parametrize(
    "length, n, overlap, patch, step",
    [
        (29, 7, 0.0, 5, 4),  # repair-loop difference (patchflow: 6, 4)
        (201, 20, 0.0, 11, 10),  # repair-loop difference (patchflow: 12, 10)
        (31, 4, 0.3, 10, 7),  # float rounding of the initial size (patchflow: 11, 7)
    ],
)
def test_patch_number_matches_quadra_repair_loop(length, n, overlap, patch, step):
    (ph, sh), _ = compute_patch_info(length, 64, n, 2, overlap)
    assert (ph, sh) == (patch, step)


# ------------------------------------------------------------------ invariants


def _check_grid(g: PatchGrid) -> None:
    hp, wp = g.padded_shape
    boxes = g.boxes()
    assert boxes.shape == (g.n_h * g.n_w, 4)
    # all boxes the same size, inside the (padded) image
    assert np.all(boxes[:, 2] - boxes[:, 0] == g.patch_h)
    assert np.all(boxes[:, 3] - boxes[:, 1] == g.patch_w)
    assert boxes[:, :2].min() >= 0
    assert boxes[:, 2].max() <= hp and boxes[:, 3].max() <= wp
    # last row/column flush with the bottom/right border; first at 0
    assert boxes[:, 2].max() == hp and boxes[:, 3].max() == wp
    assert boxes[0, 0] == 0 and boxes[0, 1] == 0
    # row-major index: r * n_w + c
    for r in range(g.n_h):
        for c in range(g.n_w):
            y0, x0, _, _ = boxes[r * g.n_w + c]
            assert y0 == min(r * g.step_h, hp - g.patch_h)
            assert x0 == min(c * g.step_w, wp - g.patch_w)
    # rows strictly increasing along r, columns along c (no duplicate patches)
    ys = boxes[:: g.n_w, 0]
    xs = boxes[: g.n_w, 1]
    assert np.all(np.diff(ys) > 0) and np.all(np.diff(xs) > 0)
    # full coverage
    cover = np.zeros((hp, wp), bool)
    for y0, x0, y1, x1 in boxes.tolist():
        cover[y0:y1, x0:x1] = True
    assert cover.all()


def _axis_invariants(length: int, n: int, p: int, step: int) -> None:
    assert 1 <= p <= length
    if n > 1:
        assert step >= 1
        assert (n - 1) * step + p >= length, "grid falls short of the image"
        assert (n - 2) * step + p <= length, "more than one extra flush patch"


def test_random_patch_number_invariants():
    rng = np.random.default_rng(0)
    cases = [(1001, 777, 4, 5, 0.25), (777, 1001, 7, 3, 0.5), (1001, 777, 1, 1, 0.0), (999, 1001, 2, 13, 0.75)]
    for _ in range(400):
        h, w = rng.integers(16, 1200, size=2)
        # up to 64 patches an axis, each at least ~16 px (denser grids can be infeasible, see below)
        nh = int(rng.integers(1, max(2, min(65, h // 16))))
        nw = int(rng.integers(1, max(2, min(65, w // 16))))
        ov = float(rng.choice([0.0, 0.1, 0.2, 0.25, 1 / 3, 0.5, 0.6, 0.75, 0.8]))
        cases.append((int(h), int(w), nh, nw, ov))
    for h, w, nh, nw, ov in cases:
        g = compute_grid(h, w, patch_number=[nh, nw], overlap=ov)
        assert (g.n_h, g.n_w) == (nh, nw)
        assert g.padded_shape == (h, w)  # patch_number never needs padding
        _axis_invariants(h, nh, g.patch_h, g.step_h)
        _axis_invariants(w, nw, g.patch_w, g.step_w)
        if nh * nw <= 400:
            _check_grid(g)


def test_random_patch_size_invariants():
    rng = np.random.default_rng(1)
    cases = [(1001, 777, 64, 96, 0.25), (777, 1001, 224, 224, 0.5), (1001, 777, 1001, 777, 0.0)]
    for _ in range(400):
        h, w = (int(v) for v in rng.integers(16, 1200, size=2))
        ph, pw = int(rng.integers(1, h + 1)), int(rng.integers(1, w + 1))
        ov = float(rng.choice([0.0, 0.1, 0.25, 1 / 3, 0.5, 0.75, 0.9]))
        cases.append((h, w, max(ph, 4), max(pw, 4), ov))
    for h, w, ph, pw, ov in cases:
        g = compute_grid(h, w, patch_size=[ph, pw], overlap=ov)
        assert (g.patch_h, g.patch_w) == (min(ph, max(h, ph)), pw)
        assert g.step_h == ph - int(np.floor(ov * ph)) and g.step_w == pw - int(np.floor(ov * pw))
        hp, wp = g.padded_shape
        for length, n, p, step in ((hp, g.n_h, ph, g.step_h), (wp, g.n_w, pw, g.step_w)):
            assert (n - 1) * step + p >= length
            if n > 1:
                assert (n - 2) * step + p < length  # no patch entirely past the border
        if g.num_patches <= 400:
            _check_grid(g)


def test_unfittable_patch_number_raises_instead_of_hanging():
    """Quadra's repair loop never ends here (120 patches on 1084 px, overlap 0.6); a clear error is expected."""
    with pytest.raises(ValueError, match="120 patches on 1084 px"):
        compute_patch_info(1084, 64, 120, 2, 0.6)


def test_patch_number_never_returns_zero_step():
    try:
        (p, step), _ = compute_patch_info(20, 20, 2, 2, 0.99)
    except ValueError:
        return  # a clear refusal would also be acceptable
    assert step >= 1, f"patch {p} with step {step}: both patches are the same"


def test_non_square_patch_size_not_transposed():
    g = compute_grid(300, 500, patch_size=[64, 96], overlap=0.0)
    assert (g.patch_h, g.patch_w) == (64, 96)
    (nh, sh), (nw, sw) = compute_patch_info_from_patch_dim(300, 500, 64, 96, 0.0)
    assert (sh, sw) == (64, 96)
    assert (nh, nw) == (g.n_h, g.n_w) == (5, 6)
    boxes = g.boxes()
    assert np.all(boxes[:, 2] - boxes[:, 0] == 64)
    assert np.all(boxes[:, 3] - boxes[:, 1] == 96)


def test_small_image_is_padded_to_patch():
    g = compute_grid(20, 30, patch_size=[32, 48], overlap=0.25)
    assert g.padded_shape == (32, 48) != (g.height, g.width)
    assert (g.n_h, g.n_w) == (1, 1)
    assert g.boxes().tolist() == [[0, 0, 32, 48]]
    img = np.arange(20 * 30 * 3, dtype=np.uint16).reshape(20, 30, 3)
    padded = g.pad(img)
    assert padded.shape == (32, 48, 3)
    np.testing.assert_array_equal(g.crop(padded), img)
    # one axis only
    g2 = compute_grid(20, 100, patch_size=[32, 32], overlap=0.0)
    assert g2.padded_shape == (32, 100) and g2.n_h == 1 and g2.n_w == 4
    m = np.ones((20, 100), np.uint8)
    np.testing.assert_array_equal(g2.crop(g2.pad(m, is_mask=True)), m)


def test_pad_to_replicates_images_and_zero_fills_masks():
    img = np.arange(12, dtype=np.uint8).reshape(3, 4) + 1
    p = pad_to(img, (5, 6))
    assert p.shape == (5, 6)
    np.testing.assert_array_equal(p[:3, :4], img)
    np.testing.assert_array_equal(p[3:, :4], np.repeat(img[-1:], 2, axis=0))  # bottom rows = last row
    np.testing.assert_array_equal(p[:, 4:], np.repeat(p[:, 3:4], 2, axis=1))  # right cols = last col
    m = pad_to(img, (5, 6), is_mask=True)
    np.testing.assert_array_equal(m[:3, :4], img)
    assert (m[3:] == 0).all() and (m[:, 4:] == 0).all()
    color = np.random.default_rng(0).integers(0, 255, (3, 4, 3), dtype=np.uint8)
    pc = pad_to(color, (4, 4))
    assert pc.shape == (4, 4, 3)
    np.testing.assert_array_equal(pc[3], color[2])
    # already big enough: unchanged
    assert pad_to(img, (2, 2)) is img


def test_safe_crop_origin_shifts_inside():
    o = safe_crop_origin(np.array([0, 5, 50, 99]), 10, 100)
    assert o.tolist() == [0, 0, 45, 90]


# ------------------------------------------------------------------ invalid parameters


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(patch_number=[2, 2], patch_size=[32, 32]), ["exactly one", "patch_number", "patch_size"]),
        (dict(), ["exactly one", "patch_number", "patch_size"]),
        (dict(patch_number=[2, 2], overlap=1.0), ["overlap", "[0, 1)"]),
        (dict(patch_size=[32, 32], overlap=1.0), ["overlap"]),
        (dict(patch_size=[32, 32], overlap=-0.1), ["overlap"]),
        (dict(patch_number=[0, 2]), ["patch_number"]),
        (dict(patch_size=[32, 0]), ["patch_size"]),
        (dict(patch_size=[32]), ["patch_size"]),
        (dict(patch_number=[2.5, 2]), ["patch_number"]),
    ],
)
def test_invalid_params_raise_helpful_value_error(kwargs, words):
    with pytest.raises(ValueError) as exc:
        compute_grid(100, 120, **kwargs)
    msg = str(exc.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"


def test_more_patches_than_pixels_is_refused():
    with pytest.raises(ValueError, match="patch_number"):
        compute_grid(10, 100, patch_number=[11, 2])


def test_grid_spec_from_info_model_json_and_params_gives_the_same_grid():
    """One GridSpec, three sources: a dataset's info.json (patch_size wins over patch_number, as the reference
    extracted with it), a bundle's model.json (the reference's keys) and the generation parameters."""
    want = compute_grid(100, 130, patch_size=[32, 48], overlap=0.25)
    info = GridSpec.from_info({"patch_size": [32, 48], "patch_number": [3, 3], "overlap": 0.25})
    meta = GridSpec.from_model_json(
        {
            "patch_height": 32,
            "patch_width": 48,
            "vertical_patches": None,
            "horizontal_patches": None,
            "overlap": 0.25,
            "grid_policy": GRID_POLICY,
        }
    )
    params = GridSpec.from_params(None, [32, 48], 0.25)
    assert info == meta == params and info.grid(100, 130) == want
    by_number = GridSpec.from_model_json({"vertical_patches": 3, "horizontal_patches": 4, "overlap": None})
    assert by_number == GridSpec.from_info({"patch_number": [3, 4], "patch_size": None})
    assert by_number.grid(90, 120) == compute_grid(90, 120, patch_number=[3, 4])
    with pytest.raises(ValueError, match="no patch geometry"):
        GridSpec.from_model_json({"overlap": 0.0})
    with pytest.raises(ValueError, match="exactly one"):
        GridSpec.from_params([2, 2], [32, 32], 0.0)
