"""Train/val/test split by image (tasks/dataset/split.py), spec §2.3; B12 fixed (a pure function of inputs + seed)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from tasks.dataset.split import iterative_stratification, split_images


def label_sets(n=40, seed=3, rare_every=7, n_none=0):
    rng = np.random.default_rng(seed)
    out: list[set[int] | None] = []
    for i in range(n):
        s = {0, int(rng.integers(1, 3))}
        if i % rare_every == 0:
            s.add(3)  # rare class
        out.append(s)
    return out + [None] * n_none


def test_deterministic_and_independent_of_global_numpy_state():
    ls = label_sets()
    np.random.seed(0)
    a = split_images(ls, 0.3, 0.2, 42, 4)
    np.random.seed(12345)
    np.random.random(1000)
    b = split_images(ls, 0.3, 0.2, 42, 4)
    c = split_images(ls, 0.3, 0.2, 42, 4)
    assert a == b == c


def test_different_seed_different_split():
    ls = label_sets(n=36)
    splits = {tuple(split_images(ls, 0.3, 0.2, seed, 4)[0]) for seed in range(5)}
    assert len(splits) >= 4
    # the image order is a seeded permutation as well
    o1 = split_images(ls, 0.3, 0.2, 1, 4)[1]
    o2 = split_images(ls, 0.3, 0.2, 2, 4)[1]
    assert sorted(o1) == list(range(36)) and o1 != o2


@pytest.mark.parametrize("seed", range(8))
def test_rare_class_in_every_split(seed):
    ls = label_sets(n=40)  # class 3 in 6 images
    assign, _ = split_images(ls, 0.3, 0.2, seed, 4)
    per_split = {s: Counter(c for lab, a in zip(ls, assign) if a == s for c in lab) for s in ("train", "val", "test")}
    for s, counts in per_split.items():
        for cls in (0, 1, 2, 3):
            assert counts[cls] > 0, f"class {cls} missing from {s}: {per_split}"
    # the rare class is spread roughly by the fractions (6 images: ~3/2/1)
    assert per_split["train"][3] >= 2


@pytest.mark.parametrize("val, test", [(0.2, 0.1), (0.3, 0.0), (0.0, 0.25), (0.5, 0.5)])
def test_fractions_approximately_honoured(val, test):
    ls = label_sets(n=100, rare_every=5)
    assign, _ = split_images(ls, val, test, 0, 4)
    c = Counter(assign)
    assert abs(c["val"] - 100 * val) <= 3, c
    assert abs(c["test"] - 100 * test) <= 3, c
    assert c["train"] + c["val"] + c["test"] == 100


def test_maskless_images_go_to_test():
    ls = label_sets(n=20, n_none=4)  # 4 of 24 without a mask: 16.7 % < 30 %
    assign, _ = split_images(ls, 0.2, 0.3, 0, 4)
    assert all(a == "test" for a in assign[20:])
    c = Counter(assign)
    assert c["test"] > 4  # some annotated images also go to test, to reach ~30 %
    assert abs(c["test"] - 0.3 * 24) <= 2
    assert abs(c["val"] - 0.2 * 24) <= 2


def test_maskless_beyond_test_share_only_they_go_to_test(caplog):
    ls = label_sets(n=20, n_none=6)  # 23 % > test_size 0.1
    with caplog.at_level("WARNING"):
        assign, _ = split_images(ls, 0.25, 0.1, 0, 4)
    assert [i for i, a in enumerate(assign) if a == "test"] == list(range(20, 26))
    assert Counter(assign)["val"] > 0
    assert any("without a mask" in r.getMessage() for r in caplog.records)


def test_all_maskless_go_to_test():
    assign, _ = split_images([None] * 5, 0.3, 0.2, 0, 2)
    assert assign == ["test"] * 5


def test_special_cases():
    ls = label_sets(n=10, n_none=2)
    assert split_images(ls, 0.0, 0.0, 0, 4)[0] == ["train"] * 12  # mask-less ones included
    assert split_images(ls, 1.0, 0.0, 0, 4)[0] == ["val"] * 12
    assert split_images(ls, 0.0, 1.0, 0, 4)[0] == ["test"] * 12
    assert split_images([], 0.3, 0.2, 0, 4)[0] == []


@pytest.mark.parametrize("val, test", [(-0.1, 0.0), (0.0, -0.5), (0.7, 0.4)])
def test_invalid_sizes(val, test):
    with pytest.raises(ValueError, match="val_size"):
        split_images(label_sets(n=5), val, test, 0, 4)


def test_single_remaining_image_goes_to_val():
    """With one image to spare for val+test it goes to val (test when val_size == 0), as in PR #61."""
    ls = [{0, 1}] * 4
    assert Counter(split_images(ls, 0.25, 0.0, 0, 2)[0]) == {"train": 3, "val": 1}
    assert Counter(split_images(ls, 0.0, 0.25, 0, 2)[0]) == {"train": 3, "test": 1}


def test_iterative_stratification_balances_labels():
    rng = np.random.default_rng(0)
    labels = np.zeros((60, 3), np.int64)
    labels[:, 0] = 1
    labels[:10, 2] = 1  # rare label on 10 rows
    labels[rng.permutation(60)[:30], 1] = 1
    assign = iterative_stratification(labels, [0.5, 0.3, 0.2], np.random.default_rng(0))
    assert set(assign.tolist()) == {0, 1, 2}
    rare = Counter(assign[:10].tolist())
    assert rare[0] == 5 and rare[1] == 3 and rare[2] == 2
    sizes = Counter(assign.tolist())
    assert (sizes[0], sizes[1], sizes[2]) == (30, 18, 12)


def test_maskless_beyond_test_share_keeps_train_split():
    ls = [{0, 1}] * 10 + [None] * 10
    assign, _ = split_images(ls, 0.5, 0.1, 0, 2)
    c = Counter(assign)
    assert c["test"] == 10  # exactly the mask-less images
    assert c["train"] > 0, c
    assert abs(c["val"] - 0.5 * 10) <= 1, c  # ratio val_size on the annotated pool, as in Quadra
