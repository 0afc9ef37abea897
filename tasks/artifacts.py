"""Prefect artifacts of a run: the metrics table and a markdown summary with the confusion matrix."""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE


def _key(text: str) -> str:
    """Artifact key: lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", text.lower())).strip("-")[:60] or "patchflow"


artifact_key = _key


def summary_markdown(title: str, metrics: dict[str, Any], out_dir: Path | None = None) -> str:
    """Markdown summary: headline numbers, confusion matrix table (and PNG when a report made one), defect coverage."""
    lines = [f"# {title}", ""]
    if "accuracy" in metrics:
        lines.append(
            f"- patch accuracy **{metrics['accuracy']:.3f}**, balanced accuracy **{metrics['balanced_accuracy']:.3f}** "
            f"on {metrics['n_evaluated']} labelled patches"
        )
    rec = metrics.get("reconstruction", {})
    alld = rec.get("all_defects") or {}
    if alld.get("defects"):
        lines.append(
            f"- defects detected **{alld['detected']}/{alld['defects']}** "
            f"(coverage >= {rec.get('coverage_threshold')}, method {rec.get('patch_reconstruction_method')})"
        )
    if rec.get("region_precision") is not None:
        lines.append(
            f"- region precision {rec['region_precision']:.3f} "
            f"({rec['false_regions']} false regions of {rec['predicted_regions']})"
        )
    cm = metrics.get("confusion_matrix")
    if cm:
        lines += [
            "",
            "## Confusion matrix (rows: true, columns: predicted)",
            "",
            "| | " + " | ".join(cm["labels"]) + " |",
            "|---" * (len(cm["labels"]) + 1) + "|",
        ]
        lines += [
            f"| **{name}** | " + " | ".join(str(v) for v in row) + " |" for name, row in zip(cm["labels"], cm["matrix"])
        ]
    png = out_dir / "test_confusion_matrix.png" if out_dir is not None else None
    if png is not None and png.is_file():
        lines += ["", f"![confusion matrix](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})"]
    by_class = rec.get("by_class") or {}
    if by_class:
        lines += ["", "## Defects by class", "", "| class | defects | detected | mean coverage |", "|---|---|---|---|"]
        lines += [f"| {c} | {v['defects']} | {v['detected']} | {v['mean_coverage']:.3f} |" for c, v in by_class.items()]
    if out_dir is not None and (out_dir / "report.html").is_file():
        lines += ["", f"Report: `{out_dir / 'report.html'}`"]
    return "\n".join(lines) + "\n"


@task(name="publish-artifacts", cache_policy=NO_CACHE)
def publish_task(title: str, metrics: dict[str, Any], out_dir: str | None = None, bundle: str | None = None) -> None:
    """Publish the per-class metrics table, the markdown summary and links to the report and bundle."""
    from prefect.artifacts import create_link_artifact

    if out_dir and (Path(out_dir) / "report.html").is_file():
        create_link_artifact(
            link=Path(out_dir, "report.html").resolve().as_uri(),
            link_text="report.html",
            key=_key(f"{title}-report"),
            description=f"{title}: HTML report",
        )
    if bundle:
        create_link_artifact(
            link=Path(bundle).resolve().as_uri(),
            link_text="deployment_model",
            key=_key(f"{title}-bundle"),
            description=f"{title}: deployment bundle",
        )
    per_class = metrics.get("per_class") or {}
    if per_class:
        rows = [
            {"class": k, **{m: round(v[m], 4) if isinstance(v[m], float) else v[m] for m in v}}
            for k, v in per_class.items()
        ]
        create_table_artifact(table=rows, key=_key(f"{title}-metrics"), description=f"{title}: per-class patch metrics")
    create_markdown_artifact(
        markdown=summary_markdown(title, metrics, Path(out_dir) if out_dir else None),
        key=_key(f"{title}-summary"),
        description=f"{title}: summary",
    )


class Progress:
    """A Prefect progress artifact advanced as coarse units (feature passes, stages) complete."""

    MIN_INTERVAL_S = 1.0

    def __init__(self, total: int, description: str) -> None:
        from prefect.artifacts import create_progress_artifact

        self.total, self.done = max(1, int(total)), 0
        self.id = create_progress_artifact(progress=0.0, description=description)
        self.sent_at = time.monotonic()

    def step(self, n: int = 1) -> None:
        """Mark ``n`` more units done; the API hears of it at most once per ``MIN_INTERVAL_S`` (and at the end)."""
        from prefect.artifacts import update_progress_artifact

        self.done = min(self.total, self.done + n)
        now = time.monotonic()
        if (
            self.done == self.total or now - self.sent_at >= self.MIN_INTERVAL_S
        ):  # a cached rerun steps 20+ times in a second
            update_progress_artifact(
                artifact_id=self.id,  # type: ignore[arg-type]
                progress=round(100.0 * self.done / self.total, 1),
            )
            self.sent_at = now
