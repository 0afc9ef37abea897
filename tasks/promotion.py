"""Versioned model bundles and promotion to ``latest`` (scheduled retraining).

```
<models_folder>/<name>/v0001/            deployment_model files + version.json
<models_folder>/<name>/v0002/ ...
<models_folder>/<name>/latest.json       {"version": "v0002", ...}: the promoted bundle
<models_folder>/<name>/latest            symlink to the promoted version (where the platform allows)
```
A version is only added when its inputs changed (dataset fingerprint + training config), and
promoted when its validation metric is not worse than the current one (configurable).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from storage.layout import write_json
from tasks.config import StrictModel

logger = logging.getLogger("patchflow.promotion")

if TYPE_CHECKING:
    from tasks.evaluation.config import EvaluateFlowConfig
    from tasks.model.config import TrainFlowConfig

METRICS = ("balanced_accuracy", "accuracy", "defect_detection_rate")


class PromotionSection(StrictModel):
    """Where versioned bundles go and when a new one becomes ``latest``."""

    models_folder: str = Field("models", description="Versioned bundles live in <models_folder>/<core.name>/")
    metric: Literal["balanced_accuracy", "accuracy", "defect_detection_rate"] = Field(
        "balanced_accuracy", description="Validation metric compared with the current latest model"
    )
    policy: Literal["if_not_worse", "always", "never"] = Field(
        "if_not_worse", description="Promote the new version when its metric >= latest's - tolerance; always; or never"
    )
    tolerance: float = Field(
        0.0, ge=0, le=1, description="How much worse the new metric may be and still count as not worse"
    )


def metric_value(metrics: dict[str, Any], name: str) -> float | None:
    """The comparison metric from a validation metrics dict (None when not computable)."""
    if name == "defect_detection_rate":
        return (metrics.get("reconstruction", {}).get("all_defects") or {}).get("detection_rate")
    value = metrics.get(name)
    return float(value) if value is not None else None


def _versions(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("v[0-9][0-9][0-9][0-9]") if (p / "version.json").is_file())


def read_latest(folder: Path) -> dict[str, Any] | None:
    """``latest.json`` of a model folder, or None before the first promotion."""
    try:
        return json.loads((Path(folder) / "latest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _newest(versions: list[Path]) -> dict[str, Any] | None:
    """``version.json`` of the newest of ``versions`` (None when there is none)."""
    return json.loads((versions[-1] / "version.json").read_text()) if versions else None


def newest_inputs_key(folder: Path) -> str | None:
    """``inputs_key`` of the newest version in ``folder`` (None when there is none)."""
    return (_newest(_versions(Path(folder))) or {}).get("inputs_key")


def latest_bundle(folder: Path) -> Path | None:
    """The promoted version's folder (a deployment bundle), or None before the first promotion."""
    latest = read_latest(Path(folder))
    path = Path(folder) / latest["version"] if latest else None
    return path if path is not None and (path / "model.json").is_file() else None


def latest_evaluation_config(
    folder: Path, promotion: PromotionSection, train_cfg: TrainFlowConfig, storage_root: str | None
) -> EvaluateFlowConfig | None:
    """Evaluation of the promoted model on the val split ``train_cfg`` validates on, with the same scoring
    settings, so that old and new models are compared on the same patches; None when there is nothing to
    compare (no promoted model, a policy that does not compare, or another class set)."""
    from storage import bundle as bdl
    from tasks.evaluation.config import EvaluateFlowConfig
    from tasks.features.params import class_map

    bundle = latest_bundle(folder)
    if bundle is None or promotion.policy != "if_not_worse":
        return None
    if not (bundle / bdl.SKOPS_FILE).is_file() or not (bundle / bdl.MANIFEST_FILE).is_file():
        logger.warning(
            "latest model %s predates classifier.skops and bundle manifests (it would need trust_pickle): "
            "compared by the metric recorded when it was registered",
            bundle,
        )
        return None
    if bdl.class_to_idx(bdl.read_meta(bundle)) != class_map(train_cfg):
        return None  # the classes changed: the old model cannot be scored on the new split
    dm, t = train_cfg.datamodule, train_cfg.task
    return EvaluateFlowConfig.model_validate(
        {
            "datamodule": {
                "data_path": dm.data_path,
                "split": "val",
                "include_filter": dm.include_filter,
                "exclude_filter": dm.exclude_filter,
                "batch_size": dm.batch_size,
            },
            "task": {
                "model_path": str(bundle),
                "device": t.device,
                "output": {
                    "report": False,
                    "example": False,
                    "reconstruction_method": t.reconstruction_method,
                    "coverage_threshold": t.coverage_threshold,
                    "soft_thresholds": t.soft_thresholds,
                },
            },
            "core": {"name": f"{train_cfg.core.name}-latest-on-val", "runs_folder": train_cfg.core.runs_folder},
            "storage_root": storage_root,
        }
    )


def _decide(
    promotion: PromotionSection, latest: dict[str, Any] | None, value: float | None, current: float | None, basis: str
) -> tuple[bool, str]:
    """Whether the new version (metric ``value``) replaces the latest one (``current``), and why."""
    if promotion.policy == "never":
        return False, "promotion policy is 'never'"
    if promotion.policy == "always" or latest is None:
        return True, "first model" if latest is None else "promotion policy is 'always'"
    if value is None:
        return False, f"{promotion.metric} could not be computed for the new model"
    if current is None or value >= current - promotion.tolerance:
        shown = current if current is None else round(current, 4)
        return True, (
            f"{promotion.metric} {value:.4f} is not worse than the latest's {shown} {basis} "
            f"(tolerance {promotion.tolerance})"
        )
    return False, (
        f"{promotion.metric} {value:.4f} is worse than the latest's {current:.4f} {basis} "
        f"(tolerance {promotion.tolerance})"
    )


def _add_version(folder: Path, name: str, bundle: Path, record: dict[str, Any]) -> None:
    """Copy ``bundle`` to ``folder/name`` with its ``version.json`` (atomically: built aside, then renamed)."""
    tmp = folder / f".{name}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(bundle, tmp)
    write_json(tmp / "version.json", record)
    os.replace(tmp, folder / name)


def _promote(folder: Path, name: str, record: dict[str, Any]) -> None:
    """Make ``name`` the latest version: ``latest.json``, and the ``latest`` symlink where the platform allows."""
    write_json(folder / "latest.json", record)
    try:
        tmp_link = folder / f".latest.{os.getpid()}"
        if tmp_link.is_symlink():
            tmp_link.unlink()
        tmp_link.symlink_to(name, target_is_directory=True)
        os.replace(tmp_link, folder / "latest")
    except OSError:
        pass  # no symlinks here: latest.json is the reference


def register_and_promote(
    bundle: str | Path,
    folder: str | Path,
    metrics: dict[str, Any],
    inputs_key: str,
    promotion: PromotionSection,
    run_dir: str,
    latest_metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Add ``bundle`` as a new version unless identical inputs made the newest one; promote by policy. Returns what
    was done.

    ``latest_metrics``: the promoted model's metrics on the same validation split as ``metrics`` (the split
    moves when images are added); without them the value recorded when it was registered is used.
    """
    folder, bundle = Path(folder), Path(bundle)
    folder.mkdir(parents=True, exist_ok=True)
    versions, latest = _versions(folder), read_latest(folder)
    value, newest = metric_value(metrics, promotion.metric), _newest(versions)
    outcome: dict[str, Any] = {"metric": promotion.metric, "latest": (latest or {}).get("version")}
    if newest is not None and newest.get("inputs_key") == inputs_key:
        reason = "no new or changed images and the same configuration: nothing to retrain"
        return {**outcome, "action": "unchanged", "version": versions[-1].name, "reason": reason,
                "value": newest.get("metric_value")}  # fmt: skip
    current = (latest or {}).get("metric_value")
    basis = "recorded when it was registered (another validation split)"
    if latest is not None and latest_metrics is not None:
        current = metric_value(latest_metrics, promotion.metric)
        basis = "re-evaluated on this run's validation split"
    name = f"v{len(versions) + 1:04d}" if not versions else f"v{int(versions[-1].name[1:]) + 1:04d}"
    compared = None if latest is None else {"version": latest.get("version"), "metric_value": current, "basis": basis}
    record = {"version": name, "inputs_key": inputs_key, "metric": promotion.metric, "metric_value": value}
    _add_version(folder, name, bundle, {**record, "metrics": metrics, "run_dir": run_dir, "compared_with": compared})
    promote, reason = _decide(promotion, latest, value, current, basis)
    if promote:
        _promote(folder, name, {"version": name, "metric": promotion.metric, "metric_value": value,
                                "previous": (latest or {}).get("version")})  # fmt: skip
        outcome["latest"] = name
    action = "promoted" if promote else "kept_previous"
    return {**outcome, "action": action, "version": name, "reason": reason, "value": value, "previous_value": current}
