"""Build state of a patch dataset on the one resumable-shard protocol (``storage/shards.py``), as checked JSON.

The build folder (``.<output_folder>.partial-<key>``) holds ``.shards/plan.json`` (a :class:`DatasetPlan`:
the build's :class:`~tasks.dataset.params.DatasetParams`, its images with their splits once assigned, the
processing order) and one ``.shards/process-<i>.json`` marker per finished process shard (its images'
results and the sizes of the files it wrote). The folder sits beside the output folder, where anyone who
can write there could plant files: so the state is plain data (never pickle), checked field by field on
load, and ``mask_preprocessing`` is stored as its import path ``module:qualname`` (a function passed in
memory is never stored: it is handed over in memory by the call that runs the build).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from storage import layout
from storage.shards import ShardState, ShardStateError
from tasks.dataset.images import Job, Result, naming_write_errors
from tasks.dataset.params import RUNTIME_FIELDS, DatasetParams, callable_path, import_callable
from tasks.imageio import parse_sixteen_bit, sixteen_bit_json

SHARD_DIR = ".shards"
MARKER_PREFIX = "process-"
FORMAT = "patchflow-dataset-plan-2"
JOB_FIELDS = tuple(f.name for f in fields(Job))  # a job is saved as a list of these (a compact plan)
SCAN_FIELDS = ("split", "size", "values", "plain_mask")  # filled in by the scan, after planning
NUMBER = (int, float)
#: stored parameters of one JSON type each (the others are checked one by one in :func:`_params`)
PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "val_size": NUMBER,
    "test_size": NUMBER,
    "seed": (int,),
    "overlap": NUMBER,
    "output_folder": (str,),
    "save_original_images_and_masks": (bool,),
    "area_threshold": NUMBER,
    "area_defect_threshold": NUMBER,
    "mask_extension": (str,),
    "mask_output_folder": (str, type(None)),
    "save_mask": (bool,),
    "clear_output_folder": (bool,),
    "train_filename": (str,),
    "repeat_good_images": (int,),
    "balance_defects": (bool,),
    "num_workers": (int,),
    "missing_mask": (str,),
    "fingerprint": (str, type(None)),
    "shard_images": (int,),
    "max_image_pixels": (int,),
}


@dataclass
class DatasetPlan:
    """A dataset being built in ``tmp`` for ``out``: its parameters, images (with their split once assigned) and
    processing order (by split, once assigned)."""

    params: DatasetParams
    jobs: list[Job]
    out: str
    tmp: str
    order: list[int] | None = None

    def shards(self, ordered: bool) -> list[list[int]]:
        """Job indices of each shard (in processing order once splits are assigned)."""
        idx = list(self.order) if ordered and self.order is not None else list(range(len(self.jobs)))
        size = self.params.shard_images
        return [idx[s : s + size] for s in range(0, len(idx), size)]


def shard_state(tmp: str | Path) -> ShardState:
    """The state folder of the build folder ``tmp``: ``.shards/plan.json`` and ``.shards/process-<i>.json``."""
    return ShardState(tmp, SHARD_DIR, MARKER_PREFIX, stage="the dataset stage")


def plan_data(plan: DatasetPlan) -> dict[str, Any]:
    """The plan as JSON-ready data (``mask_preprocessing`` as its import path, or None)."""
    p = plan.params
    params = {f.name: getattr(p, f.name) for f in fields(DatasetParams) if f.name != "mask_preprocessing"}
    params.update(
        output_folder=os.fspath(p.output_folder),
        sixteen_bit=sixteen_bit_json(p.sixteen_bit),
        mask_preprocessing=callable_path(p.mask_preprocessing),
    )
    params["mask_preprocessing_in_memory"] = p.mask_preprocessing is not None and params["mask_preprocessing"] is None
    jobs = [[getattr(j, name) for name in JOB_FIELDS] for j in plan.jobs]
    data = {
        "format": FORMAT,
        "out": plan.out,
        "tmp": plan.tmp,
        "order": plan.order,
        "params": params,
        "job_fields": JOB_FIELDS,
        "jobs": jobs,
    }
    return json.loads(json.dumps(data))


def planned_part(data: dict[str, Any]) -> dict[str, Any]:
    """``plan_data`` without what the scan fills in and the parameters that change no output byte: two plans of
    one build (a killed one and its rerun) agree on this."""
    keep = [i for i, name in enumerate(JOB_FIELDS) if name not in SCAN_FIELDS]
    jobs = [
        [j[i] for i in keep] if isinstance(j, list) and len(j) == len(JOB_FIELDS) else j for j in data.get("jobs", [])
    ]
    params = data.get("params")
    if isinstance(params, dict):
        params = {k: v for k, v in params.items() if k not in RUNTIME_FIELDS}
    return {**{k: v for k, v in data.items() if k != "order"}, "params": params, "jobs": jobs}


def write_plan(tmp: str | Path, plan: DatasetPlan) -> None:
    """Save ``plan`` in the build folder ``tmp`` (atomically)."""
    state = shard_state(tmp)
    with naming_write_errors(state.plan_path):
        state.write_plan(plan_data(plan))


def read_plan_data(tmp: str | Path) -> dict[str, Any]:
    """The saved plan's JSON data (:class:`ShardStateError`, a ``DatasetFormatError``, when missing or not a plan)."""
    state = shard_state(tmp)
    data = state.read_plan()
    if data.get("format") != FORMAT:
        raise ShardStateError(f"{state.plan_path} is not a patchflow build plan; rerun the dataset stage to start over")
    return data


def _check(value: Any, types: type | tuple[type, ...], what: str) -> Any:
    """``value`` when it is one of ``types`` (a bool is not an int here), else TypeError."""
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise TypeError(f"{what} must be {' or '.join(t.__name__ for t in types)}, got {str(value)[:80]!r}")
    return value


def _ints(value: Any, what: str, n: int | None = None) -> tuple[int, ...] | None:
    """A JSON list of ``n`` (any number when None) integers as a tuple; None stays None."""
    if value is None:
        return None
    _check(value, list, what)
    if n is not None and len(value) != n:
        raise TypeError(f"{what} must hold {n} integers")
    return tuple(_check(v, int, what) for v in value)


def _params(d: dict[str, Any], mask_preprocessing: Callable[..., Any] | None) -> DatasetParams:
    """The stored parameters, checked field by field; ``mask_preprocessing`` (in memory) wins over the stored path."""
    kw = {name: _check(d[name], types, name) for name, types in PARAM_TYPES.items()}
    kw.update({name: float(kw[name]) for name, types in PARAM_TYPES.items() if types == NUMBER})
    classes = _check(d["class_to_idx"], dict, "class_to_idx")
    kw["class_to_idx"] = {_check(k, str, "class name"): _check(v, int, "class index") for k, v in classes.items()}
    kw["patch_number"] = _ints(d["patch_number"], "patch_number", 2)
    kw["patch_size"] = _ints(d["patch_size"], "patch_size", 2)
    good = _check(d["annotated_good"], list, "annotated_good")
    kw["annotated_good"] = tuple(_check(n, str, "annotated_good") for n in good)
    kw["sixteen_bit"] = parse_sixteen_bit(d["sixteen_bit"], "sixteen_bit")
    if mask_preprocessing is None and d.get("mask_preprocessing") is not None:
        mask_preprocessing = import_callable(_check(d["mask_preprocessing"], str, "mask_preprocessing"))
    elif mask_preprocessing is None and d.get("mask_preprocessing_in_memory"):
        raise TypeError(
            "its mask_preprocessing was a function passed in memory; only the call that planned it can run it"
        )
    return DatasetParams(**kw, mask_preprocessing=mask_preprocessing)


def _job(values: list[Any]) -> Job:
    """A stored job, checked."""
    if not isinstance(values, list) or len(values) != len(JOB_FIELDS):
        raise TypeError(f"a job must be a list of {len(JOB_FIELDS)} fields")
    job = Job(**dict(zip(JOB_FIELDS, values)))
    _check(job.index, int, "index")
    for key in ("stem", "base_name", "path", "split"):
        _check(getattr(job, key), str, key)
    _check(job.mask, (str, type(None)), "mask")
    _check(job.plain_mask, bool, "plain_mask")
    size = _ints(_check(job.size, list, "size"), "size", 2)
    job.size, job.values = (size[0], size[1]) if size else (0, 0), _ints(job.values, "values")
    return job


def load_plan(tmp: str | Path, mask_preprocessing: Callable[..., Any] | None = None) -> DatasetPlan:
    """The plan saved in the build folder ``tmp``, checked field by field (``DatasetFormatError`` otherwise).

    ``mask_preprocessing``: the function to use (passed in memory); by default the saved import path's.
    """
    tmp = Path(tmp)
    d = read_plan_data(tmp)
    try:
        if d.get("job_fields") != list(JOB_FIELDS):
            raise TypeError(f"job fields {d.get('job_fields')} are not {list(JOB_FIELDS)}")
        order = _ints(d["order"], "order")
        plan = DatasetPlan(
            params=_params(_check(d["params"], dict, "params"), mask_preprocessing),
            jobs=[_job(j) for j in _check(d["jobs"], list, "jobs")],
            out=_check(d["out"], str, "out"),
            tmp=_check(d["tmp"], str, "tmp"),
            order=list(order) if order is not None else None,
        )
        if Path(plan.tmp) != tmp or not layout.build_folder_pattern(Path(plan.out)).fullmatch(tmp.name):
            raise TypeError(f"it belongs to {plan.tmp} for {plan.out}")
        if plan.params.shard_images < 1 or any(j.index != i for i, j in enumerate(plan.jobs)):
            raise TypeError("bad shard size or job indices")
        if plan.order is not None and sorted(plan.order) != list(range(len(plan.jobs))):
            raise TypeError("order is not a permutation of the images")
    except (KeyError, TypeError, ValueError, ImportError, AttributeError) as exc:
        raise ShardStateError(
            f"{shard_state(tmp).plan_path} is not a valid build plan ({exc}); rerun the dataset stage to start over"
        ) from None
    return plan


def write_marker(tmp: str | Path, shard: int, jobs: list[int], results: list[Result]) -> None:
    """Record process shard ``shard`` (images ``jobs``) as finished with its results (written last, atomically)."""
    state = shard_state(tmp)
    sizes = {rel: size for r in results for rel, (size, _) in r.files.items()}
    with naming_write_errors(state.marker_path(shard)):
        state.mark(shard, {"jobs": jobs, "results": [asdict(r) for r in results], "sizes": sizes})


def _result(d: dict[str, Any]) -> Result:
    """A stored result, checked."""
    _check(d, dict, "result")
    counts = _check(d["counts"], dict, "counts")
    res = Result(
        lines=[_check(s, str, "line") for s in _check(d["lines"], list, "lines")],
        counts={_check(k, str, "class"): _check(v, int, "count") for k, v in counts.items()},
        image_entry=_check(d["image_entry"], str, "image_entry"),
        mask_entry=_check(d["mask_entry"], (str, type(None)), "mask_entry"),
    )
    for rel, rec in _check(d["files"], dict, "files").items():
        size, digest = _check(rec, list, "file record")
        res.files[_check(rel, str, "file")] = (_check(size, int, "size"), _check(digest, str, "digest"))
    return res


def _results(rec: dict[str, Any]) -> list[Result]:
    return [_result(r) for r in _check(rec["results"], list, "results")]


def _intact(tmp: Path, rec: dict[str, Any]) -> bool:
    """A well-formed marker (one result per image) whose files are all still there with their recorded sizes."""
    jobs = _ints(rec["jobs"], "jobs") or ()
    sizes = {_check(k, str, "file"): _check(v, int, "size") for k, v in _check(rec["sizes"], dict, "sizes").items()}
    if len(_results(rec)) != len(jobs):
        return False
    return all(
        ".." not in Path(rel).parts and not Path(rel).is_absolute() and (tmp / rel).stat().st_size == size
        for rel, size in sizes.items()
    )


def load_marker(tmp: str | Path, shard: int, jobs: list[int]) -> list[Result] | None:
    """Results of process shard ``shard`` (images ``jobs``) when it is finished and its files are intact; None when
    not finished, damaged or not a marker of these images (the shard is then redone)."""
    tmp = Path(tmp)
    rec = shard_state(tmp).finished(shard, lambda r: _intact(tmp, r) and r["jobs"] == list(jobs))
    return _results(rec) if rec is not None else None


def finished_results(tmp: str | Path, plan: DatasetPlan) -> list[list[Result]]:
    """The results of every process shard, in order (:class:`ShardStateError` naming the unfinished ones)."""
    tmp = Path(tmp)
    shards = plan.shards(ordered=True)
    state = shard_state(tmp)
    records = state.require_all(len(shards), lambda r: _intact(tmp, r))
    for i, (rec, jobs) in enumerate(zip(records, shards)):
        if rec["jobs"] != jobs:
            raise ShardStateError(
                f"{state.marker_path(i)} records other images than shard {i} of the plan; "
                "rerun the dataset stage to resume"
            )
    return [_results(rec) for rec in records]
