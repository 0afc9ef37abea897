"""What Quadra 2.9 writes and reads, written from its documented layout (../shared/reference/quadra-patch.md §5.2-§5.4,
§7) so that bundles can be interchanged in tests without a Quadra install.

- :func:`quadra_features`: Quadra's val/test preprocessing (``cv2.imread`` BGR -> RGB -> albumentations
  ``Resize(h, w, interpolation=2)`` = cubic -> ``Normalize(mean, std, max_pixel_value=255)`` -> CHW tensor) and
  the backbone forward;
- :func:`write_quadra_bundle`: ``deployment_model/`` = ``model.pt`` (the traced feature backbone),
  ``classifier.joblib`` (``joblib.dump`` of the fitted ``LogisticRegression``) and ``model.json`` with exactly
  Quadra's keys;
- :func:`quadra_test_task`: what Quadra's test task reads from a bundle (``model.json`` ``input_size`` and
  ``classes``, ``classifier.joblib``, the ``.pt`` next to them) and its patch predictions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
#: model.json as Quadra's export writes it (quadra/tasks/patch.py:245-267)
QUADRA_MODEL_JSON_KEYS = ("input_size", "classes", "mean", "std", "horizontal_patches", "vertical_patches")
QUADRA_MODEL_JSON_KEYS += ("patch_height", "patch_width", "overlap", "reconstruction_method", "class_to_skip")


def split_patches(data: Path, split: str, class_to_idx: dict[str, int]) -> list[tuple[Path, int]]:
    """Quadra's find_test_image: ``<split>/<class>/*.png`` with the folder's label; ``None/`` -> -1 (test only)."""
    out = []
    for folder in sorted((data / split).iterdir()):
        if folder.is_dir() and (folder.name in class_to_idx or (folder.name == "None" and split == "test")):
            label = class_to_idx.get(folder.name, -1)
            out += [(p, label) for p in sorted(folder.glob("*.png"))]
    return out


def quadra_features(model: Any, paths: list[Path], size: tuple[int, int], mean=MEAN, std=STD) -> np.ndarray:
    """(N, D) features of patch files as Quadra computes them (albumentations default_resize + the backbone)."""
    import torch

    h, w = size
    batch = []
    for p in paths:
        rgb = cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.float32)
        batch.append(((rgb / 255.0 - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1))
    with torch.inference_mode():
        return model(torch.from_numpy(np.stack(batch)).float()).numpy()


def write_quadra_bundle(out: Path, data: Path, class_to_idx: dict[str, int], size: tuple[int, int] = (64, 64)) -> Path:
    """A Quadra 2.9 ``deployment_model/``: a random-init ResNet-18 feature backbone traced to ``model.pt``, a
    ``LogisticRegression`` fitted on its val-patch features and ``joblib.dump``-ed, and Quadra's ``model.json``."""
    import joblib
    import torch
    import torchvision
    from sklearn.linear_model import LogisticRegression

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    net.fc = torch.nn.Identity()
    net.eval()
    out.mkdir(parents=True)
    torch.jit.save(torch.jit.trace(net, torch.rand(1, 3, *size)), str(out / "model.pt"))
    items = split_patches(data, "val", class_to_idx)
    x = quadra_features(net, [p for p, _ in items], size)
    clf = LogisticRegression(max_iter=10000, random_state=42).fit(x, [lab for _, lab in items])
    joblib.dump(clf, out / "classifier.joblib")
    info = json.loads((data / "info.json").read_text())
    pn, ps = info.get("patch_number"), info.get("patch_size")
    meta = {
        "input_size": [[3, *size]],
        "classes": {str(v): k for k, v in sorted(class_to_idx.items(), key=lambda kv: kv[1])},
        "mean": MEAN,
        "std": STD,
        "horizontal_patches": pn[1] if pn else None,
        "vertical_patches": pn[0] if pn else None,
        "patch_height": ps[0] if ps else None,
        "patch_width": ps[1] if ps else None,
        "overlap": info.get("overlap", 0.0),
        "reconstruction_method": "major_voting",
        "class_to_skip": None,
    }
    (out / "model.json").write_text(json.dumps(meta))
    return out


def quadra_test_task(model_path: Path, data: Path, split: str = "test") -> dict[str, Any]:
    """What Quadra's test task reads from ``model_path`` (a ``.pt`` in a deployment_model/) and predicts: the
    patches of ``split`` with their ``pred_label`` and max probability, keyed by path relative to ``data``."""
    import joblib
    import torch

    folder = Path(model_path).parent
    meta = json.loads((folder / "model.json").read_text())
    class_to_idx = {name: int(i) for i, name in meta["classes"].items()}
    size = tuple(meta["input_size"][0][1:])
    model = torch.jit.load(str(model_path)).eval()
    clf = joblib.load(folder / "classifier.joblib")
    items = split_patches(data, split, class_to_idx)
    x = quadra_features(model, [p for p, _ in items], size, meta["mean"], meta["std"])
    proba = clf.predict_proba(x)
    pred = clf.classes_[proba.argmax(1)]
    return {
        p.relative_to(data).as_posix(): (int(c), float(pr.max()), int(lab))
        for (p, lab), c, pr in zip(items, pred, proba)
    }
