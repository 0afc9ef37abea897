"""Train/val/test split by image: iterative multi-label stratification, a pure function of inputs and seed.

The reference uses scikit-multilearn, whose tie-breaking reads the global NumPy RNG (bug B12);
here every random choice comes from ``np.random.default_rng(seed)``.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger("patchflow.split")


def iterative_stratification(labels: np.ndarray, fractions: list[float], rng: np.random.Generator) -> np.ndarray:
    """Subset index per row of a multi-hot ``labels`` matrix (Sechidis et al. 2011, order 1)."""
    n = labels.shape[0]
    shares = np.asarray(fractions, dtype=np.float64)
    desired = shares * n  # examples wanted per subset
    desired_label = shares[:, None] * labels.sum(axis=0)[None, :]  # (subsets, labels)
    assign = np.full(n, -1, dtype=np.int64)
    remaining = labels.astype(bool).copy()
    unassigned = np.ones(n, dtype=bool)
    while unassigned.any():
        counts = remaining[unassigned].sum(axis=0)
        if counts.max() == 0:  # rows without any label: fill subsets by remaining capacity
            for i in np.flatnonzero(unassigned):
                best = np.flatnonzero(desired == desired.max())
                j = best[0] if len(best) == 1 else rng.choice(best)
                assign[i] = j
                desired[j] -= 1
            break
        counts = np.where(counts == 0, np.iinfo(np.int64).max, counts)
        lab = int(np.argmin(counts))
        for i in np.flatnonzero(unassigned & remaining[:, lab]):
            cand = np.flatnonzero(desired_label[:, lab] == desired_label[:, lab].max())
            if len(cand) > 1:
                cand = cand[desired[cand] == desired[cand].max()]
            j = int(cand[0] if len(cand) == 1 else rng.choice(cand))
            assign[i] = j
            unassigned[i] = False
            desired[j] -= 1
            desired_label[j] -= labels[i]
        remaining[:, lab] = False
    return assign


def split_images(
    label_sets: list[set[int] | None],
    val_size: float,
    test_size: float,
    seed: int,
    num_classes: int,
) -> tuple[list[str], list[int]]:
    """``("train" | "val" | "test" per image, seeded image order)``. ``None`` label sets (no mask) go to test, as in
    the reference."""
    if val_size < 0 or test_size < 0 or val_size + test_size > 1:
        raise ValueError(f"val_size and test_size must be >= 0 with a sum <= 1 (got {val_size}, {test_size})")
    n = len(label_sets)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    out = ["train"] * n
    if n == 0 or val_size + test_size == 0:
        return out, order.tolist()
    if val_size == 1:
        return ["val"] * n, order.tolist()
    if test_size == 1:
        return ["test"] * n, order.tolist()
    annotated = [i for i in order if label_sets[i] is not None]
    for i in order:
        if label_sets[i] is None:
            out[i] = "test"
    n_none = n - len(annotated)
    if not annotated:
        logger.warning("no image has a mask: every image goes to test")
        return out, order.tolist()
    m = len(annotated)
    if n_none > test_size * n:  # test is exactly the mask-less images; val is a share of the annotated ones
        want_val, want_test = val_size * m, 0.0
    else:
        want_val, want_test = val_size * n, test_size * n - n_none
    if n_none > test_size * n:
        logger.warning(
            "%d images without a mask exceed the requested test share (%.2f): they all go to test", n_none, test_size
        )
    want_train = max(0.0, m - want_val - want_test)
    fractions = np.array([want_train, want_val, want_test]) / max(m, 1)
    fractions = fractions / fractions.sum()
    labels = np.zeros((m, num_classes), dtype=np.int64)
    for row, i in enumerate(annotated):
        for v in label_sets[i]:
            labels[row, v] = 1
    subset = iterative_stratification(labels, list(fractions), rng)
    names = ("train", "val", "test")
    for row, i in enumerate(annotated):
        out[i] = names[subset[row]]
    return out, order.tolist()
