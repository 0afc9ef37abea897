"""Patch predictions -> per-pixel class maps: one small merger interface, three methods.

A merger is built for one image's :class:`~storage.geometry.PatchGrid` (geometry per image, never
from the first image: bug B2), receives patch predictions at their boxes with :meth:`Merger.add`,
and returns the class map of the original image size with :meth:`Merger.finalize`.

- ``major_voting`` (reference semantics): background patches never vote; each pixel takes the
  defect class with most covering patches, ties to the higher index; int32 counters (no uint8
  wrap, unlike the reference).
- ``priority`` (reference semantics): the highest defect index among covering patches wins.
- ``soft``: class probabilities averaged over every covering patch (background included), then
  argmax; an optional per-class threshold sends a pixel back to background when its winning
  defect class's mean probability is below it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from storage.geometry import PatchGrid

METHODS = ("major_voting", "priority", "soft")


class Cells:
    """The rectangles that the patch boxes cut the padded image into: every pixel of a cell is covered by
    the same patches, so mergers count per cell (a few hundred values instead of H*W per class) and
    expand only the result; the maps are identical to per-pixel accumulation."""

    def __init__(self, boxes: np.ndarray, padded_shape: tuple[int, int]) -> None:
        H, W = padded_shape
        self.ys = np.unique(np.concatenate([[0, H], boxes[:, 0], boxes[:, 2]]))
        self.xs = np.unique(np.concatenate([[0, W], boxes[:, 1], boxes[:, 3]]))
        self.spans = np.stack(
            [
                np.searchsorted(self.ys, boxes[:, 0]),
                np.searchsorted(self.xs, boxes[:, 1]),
                np.searchsorted(self.ys, boxes[:, 2]),
                np.searchsorted(self.xs, boxes[:, 3]),
            ],
            axis=1,
        )
        self.shape = (len(self.ys) - 1, len(self.xs) - 1)

    def expand(self, cells: np.ndarray) -> np.ndarray:
        """``(..., cells_y, cells_x)`` -> ``(..., H, W)`` of the padded image."""
        return np.repeat(np.repeat(cells, np.diff(self.ys), axis=-2), np.diff(self.xs), axis=-1)


class Merger:
    """Accumulates patch predictions of one image and produces its class map."""

    def __init__(self, grid: PatchGrid, num_classes: int) -> None:
        self.grid = grid
        self.num_classes = int(num_classes)
        self.cells = Cells(grid.boxes(), grid.padded_shape)

    def add(self, patch_index: np.ndarray, labels: np.ndarray, probabilities: np.ndarray | None = None) -> None:
        """Add predictions (class index per patch, optional (N, C) probabilities) of patches by grid index."""
        raise NotImplementedError

    def finalize(self) -> np.ndarray:
        """Class map (H, W) int32 of the original image size."""
        raise NotImplementedError


class MajorVotingMerger(Merger):
    """Most covering defect patches win; ties to the higher class index; background never votes."""

    def __init__(self, grid: PatchGrid, num_classes: int) -> None:
        super().__init__(grid, num_classes)
        self.votes = np.zeros((num_classes, *self.cells.shape), dtype=np.int32)

    def add(self, patch_index: np.ndarray, labels: np.ndarray, probabilities: np.ndarray | None = None) -> None:
        for i, lab in zip(np.asarray(patch_index).tolist(), np.asarray(labels).tolist()):
            if lab > 0:
                y0, x0, y1, x1 = self.cells.spans[i]
                self.votes[lab, y0:y1, x0:x1] += 1

    def finalize(self) -> np.ndarray:
        v = self.votes[1:]
        # argmax over reversed classes gives the higher index on ties
        best = (v.shape[0] - 1 - np.argmax(v[::-1], axis=0)) + 1
        out = np.where(v.max(axis=0) > 0, best, 0).astype(np.int32)
        return self.grid.crop(self.cells.expand(out))


class PriorityMerger(Merger):
    """The highest defect class index among covering patches wins."""

    def __init__(self, grid: PatchGrid, num_classes: int) -> None:
        super().__init__(grid, num_classes)
        self.map = np.zeros(self.cells.shape, dtype=np.int32)

    def add(self, patch_index: np.ndarray, labels: np.ndarray, probabilities: np.ndarray | None = None) -> None:
        for i, lab in zip(np.asarray(patch_index).tolist(), np.asarray(labels).tolist()):
            if lab > 0:
                y0, x0, y1, x1 = self.cells.spans[i]
                np.maximum(self.map[y0:y1, x0:x1], lab, out=self.map[y0:y1, x0:x1])

    def finalize(self) -> np.ndarray:
        return self.grid.crop(self.cells.expand(self.map))


class SoftMerger(Merger):
    """Mean class probability over covering patches, argmax, optional per-class thresholds."""

    def __init__(self, grid: PatchGrid, num_classes: int, thresholds: Sequence[float] | None = None) -> None:
        super().__init__(grid, num_classes)
        self.sum = np.zeros((num_classes, *self.cells.shape), dtype=np.float32)
        self.count = np.zeros(self.cells.shape, dtype=np.int32)
        self.thresholds = None if thresholds is None else np.asarray(thresholds, dtype=np.float32)

    def add(self, patch_index: np.ndarray, labels: np.ndarray, probabilities: np.ndarray | None = None) -> None:
        if probabilities is None:
            raise ValueError("the soft reconstruction needs class probabilities (predict_proba)")
        probs = np.asarray(probabilities, dtype=np.float32)
        if probs.shape[1] != self.num_classes:
            raise ValueError(
                f"probabilities have {probs.shape[1]} columns, expected {self.num_classes} (one per class index)"
            )
        for i, p in zip(np.asarray(patch_index).tolist(), probs):
            y0, x0, y1, x1 = self.cells.spans[i]
            self.sum[:, y0:y1, x0:x1] += p[:, None, None]
            self.count[y0:y1, x0:x1] += 1

    def _mean_cells(self) -> np.ndarray:
        return self.sum / np.maximum(self.count, 1)[None]

    def mean_probabilities(self) -> np.ndarray:
        """(C, H, W) mean probabilities of the original image area (0 where no patch)."""
        return self.cells.expand(self._mean_cells())[:, : self.grid.height, : self.grid.width]

    def finalize(self) -> np.ndarray:
        mean = self._mean_cells()
        out = np.argmax(mean, axis=0).astype(np.int32)
        if self.thresholds is not None:
            win = np.take_along_axis(mean, out[None], axis=0)[0]
            out[win < self.thresholds[out]] = 0
        out[self.count == 0] = 0
        return self.grid.crop(self.cells.expand(out))


def mean_probabilities(
    merger: Merger, patch_index: np.ndarray, labels: np.ndarray, probabilities: np.ndarray
) -> np.ndarray:
    """(C, H, W) mean class probabilities of the patches ``merger`` was given (the same ones again here);
    a soft merger's own sums are reused instead of accumulated twice."""
    if not isinstance(merger, SoftMerger):
        merger = SoftMerger(merger.grid, merger.num_classes)
        merger.add(patch_index, labels, probabilities)
    return merger.mean_probabilities()


def make_merger(method: str, grid: PatchGrid, num_classes: int, thresholds: Sequence[float] | None = None) -> Merger:
    """Merger for ``method`` in :data:`METHODS`."""
    if method == "major_voting":
        return MajorVotingMerger(grid, num_classes)
    if method == "priority":
        return PriorityMerger(grid, num_classes)
    if method == "soft":
        return SoftMerger(grid, num_classes, thresholds)
    raise ValueError(f"unknown reconstruction method {method!r}; choose one of {', '.join(METHODS)}")
