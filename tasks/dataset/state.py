"""Build state of a patch dataset, as JSON (never pickle): the plan and one marker per finished shard.

The build folder (``.<output_folder>.partial-<key>``) sits beside the output folder, where anyone who can
write there could plant files; so its state is plain data, checked field by field on load, and
``mask_preprocessing`` is stored as its import path ``module:qualname`` (a function passed in memory is
never stored: it is handed over in memory by the call that runs the build).
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

from storage import layout
from storage.layout import DatasetFormatError
from tasks.dataset.images import WRITE_FIX, Job, Params, Result
from tasks.imageio import parse_sixteen_bit

SHARD_DIR = ".shards"
PLAN_FILE = "plan.json"
FORMAT = "patchflow-dataset-plan-1"
JOB_FIELDS = tuple(f.name for f in fields(Job))  # a job is saved as a list of these (a compact plan)
SCAN_FIELDS = ("split", "size", "values", "plain_mask")  # filled in by the scan, after planning


@dataclass
class DatasetPlan:
    """A dataset being built in ``tmp``: parameters, images (with their split once assigned), shards."""

    params: Params
    jobs: list[Job]
    out: str
    tmp: str
    fingerprint: str | None
    seed: int
    val_size: float
    test_size: float
    info_geometry: dict[str, Any]
    train_filename: str
    shard_images: int
    order: list[int] | None = None  # processing order (by split), once splits are assigned

    def shards(self, ordered: bool) -> list[list[int]]:
        """Job indices of each shard (in processing order once splits are assigned)."""
        idx = list(self.order) if ordered and self.order is not None else list(range(len(self.jobs)))
        return [idx[s : s + self.shard_images] for s in range(0, len(idx), self.shard_images)]


def callable_path(fn: Callable[..., Any] | None) -> str | None:
    """``module:qualname`` of ``fn`` when importing that path gives back ``fn`` itself, else None (lambdas, local
    functions, partials, callable objects)."""
    if fn is None:
        return None
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "<" in qualname or module == "__main__":
        return None  # __main__ is another module in each worker process
    path = f"{module}:{qualname}"
    try:
        return path if import_callable(path) is fn else None
    except (ImportError, AttributeError, ValueError, TypeError):
        return None


def import_callable(path: str) -> Callable[..., Any]:
    """The object at ``module:qualname`` (imports the module, which must be importable already)."""
    module, sep, qualname = path.partition(":")
    if not sep or not module or not qualname:
        raise ValueError(f"{path!r} is not 'module:qualname'")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{path} is not callable")
    return obj


def plan_data(plan: DatasetPlan) -> dict[str, Any]:
    """The plan as JSON-ready data (``mask_preprocessing`` as its import path, or None)."""
    params = {f.name: getattr(plan.params, f.name) for f in fields(Params) if f.name != "mask_preprocessing"}
    params["mask_preprocessing"] = callable_path(plan.params.mask_preprocessing)
    params["mask_preprocessing_in_memory"] = plan.params.mask_preprocessing is not None and params["mask_preprocessing"] is None
    data = {f.name: getattr(plan, f.name) for f in fields(DatasetPlan) if f.name not in ("params", "jobs")}
    jobs = [[getattr(j, name) for name in JOB_FIELDS] for j in plan.jobs]
    return json.loads(json.dumps({"format": FORMAT, **data, "params": params, "job_fields": JOB_FIELDS, "jobs": jobs}))


def planned_part(data: dict[str, Any]) -> dict[str, Any]:
    """``plan_data`` without what the scan fills in: two plans of one build agree on this."""
    keep = [i for i, name in enumerate(JOB_FIELDS) if name not in SCAN_FIELDS]
    jobs = [[j[i] for i in keep] if isinstance(j, list) and len(j) == len(JOB_FIELDS) else j for j in data.get("jobs", [])]
    params = data.get("params")
    if isinstance(params, dict):  # the pixel limit changes no output: a build resumes under a raised one
        params = {k: v for k, v in params.items() if k != "max_image_pixels"}
    return {**{k: v for k, v in data.items() if k != "order"}, "params": params, "jobs": jobs}


def _write(path: Path, text: str) -> None:
    """Write a state file atomically; an OS error names the file and the fix."""
    try:
        layout.write_atomic(path, text)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise OSError(exc.errno, f"could not write {path} ({reason}); {WRITE_FIX}") from None


def write_plan(tmp: Path, plan: DatasetPlan) -> None:
    """Save ``plan`` in the build folder ``tmp`` (atomically)."""
    _write(Path(tmp) / SHARD_DIR / PLAN_FILE, json.dumps(plan_data(plan), separators=(",", ":")))


def read_plan_data(tmp: Path) -> dict[str, Any]:
    """The saved plan's JSON data (``DatasetFormatError`` when missing or not a plan)."""
    path = Path(tmp) / SHARD_DIR / PLAN_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetFormatError(f"{path}: no readable build plan ({exc}); rerun the dataset stage to start over") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DatasetFormatError(f"{path} is not a patchflow build plan; rerun the dataset stage to start over")
    return data


def _check(value: Any, types: type | tuple[type, ...], what: str) -> Any:
    """``value`` when it is one of ``types`` (a bool is not an int here), else TypeError."""
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise TypeError(f"{what} must be {' or '.join(t.__name__ for t in types)}, got {str(value)[:80]!r}")
    return value


def _ints(value: Any, what: str, n: int | None = None) -> tuple[int, ...] | None:
    if value is None:
        return None
    _check(value, list, what)
    if n is not None and len(value) != n:
        raise TypeError(f"{what} must hold {n} integers")
    return tuple(_check(v, int, what) for v in value)


def _params(d: dict[str, Any], tmp: Path, mask_preprocessing: Callable[..., Any] | None) -> Params:
    kw = {f.name: d[f.name] for f in fields(Params) if f.name != "mask_preprocessing"}
    for key in ("root", "mask_extension", "missing_mask"):
        _check(kw[key], str, key)
    _check(kw["mask_output_folder"], (str, type(None)), "mask_output_folder")
    for key in ("save_original", "save_mask", "balance_defects"):
        _check(kw[key], bool, key)
    for key in ("overlap", "area_threshold", "area_defect_threshold"):
        kw[key] = float(_check(kw[key], (int, float), key))
    _check(kw["repeat_good_images"], int, "repeat_good_images")
    _check(kw["max_image_pixels"], int, "max_image_pixels")
    kw["sixteen_bit"] = parse_sixteen_bit(kw["sixteen_bit"], "sixteen_bit")
    _check(kw["class_to_idx"], dict, "class_to_idx")
    kw["class_to_idx"] = {_check(k, str, "class name"): _check(v, int, "class index") for k, v in kw["class_to_idx"].items()}
    kw["patch_number"], kw["patch_size"] = _ints(kw["patch_number"], "patch_number", 2), _ints(kw["patch_size"], "patch_size", 2)
    kw["annotated_good"] = tuple(_check(n, str, "annotated_good") for n in _check(kw["annotated_good"], list, "annotated_good"))
    if Path(kw["root"]) != Path(tmp):
        raise TypeError(f"root {kw['root']} is not this build folder")
    if mask_preprocessing is None and d.get("mask_preprocessing") is not None:
        mask_preprocessing = import_callable(_check(d["mask_preprocessing"], str, "mask_preprocessing"))
    elif mask_preprocessing is None and d.get("mask_preprocessing_in_memory"):
        raise TypeError("its mask_preprocessing was a function passed in memory; only the call that planned it can run it")
    return Params(**kw, mask_preprocessing=mask_preprocessing)


def _job(values: list[Any]) -> Job:
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
        plan = DatasetPlan(
            params=_params(_check(d["params"], dict, "params"), tmp, mask_preprocessing),
            jobs=[_job(j) for j in _check(d["jobs"], list, "jobs")],
            **{f.name: d[f.name] for f in fields(DatasetPlan) if f.name not in ("params", "jobs")},
        )
        for key in ("out", "tmp", "train_filename"):
            _check(getattr(plan, key), str, key)
        _check(plan.fingerprint, (str, type(None)), "fingerprint")
        _check(plan.seed, int, "seed")
        _check(plan.shard_images, int, "shard_images")
        _check(plan.info_geometry, dict, "info_geometry")
        plan.val_size, plan.test_size = (float(_check(v, (int, float), "split size")) for v in (plan.val_size, plan.test_size))
        order = _ints(plan.order, "order")
        plan.order = list(order) if order is not None else None
        if Path(plan.tmp) != tmp or not layout.build_folder_pattern(Path(plan.out)).fullmatch(tmp.name):
            raise TypeError(f"it belongs to {plan.tmp} for {plan.out}")
        if plan.shard_images < 1 or any(j.index != i for i, j in enumerate(plan.jobs)):
            raise TypeError("bad shard size or job indices")
        if plan.order is not None and sorted(plan.order) != list(range(len(plan.jobs))):
            raise TypeError("order is not a permutation of the images")
    except (KeyError, TypeError, ValueError, ImportError, AttributeError) as exc:
        raise DatasetFormatError(
            f"{tmp / SHARD_DIR / PLAN_FILE} is not a valid build plan ({exc}); rerun the dataset stage to start over"
        ) from None
    return plan


def shard_marker(tmp: Path, shard: int) -> Path:
    """Marker of a finished process shard: its results and the sizes of the files it wrote."""
    return Path(tmp) / SHARD_DIR / f"process-{shard:06d}.json"


def write_marker(tmp: Path, shard: int, results: list[Result]) -> None:
    """Record process shard ``shard`` as finished (written last, atomically)."""
    sizes = {rel: size for r in results for rel, (size, _) in r.files.items()}
    _write(shard_marker(tmp, shard), json.dumps({"results": [asdict(r) for r in results], "sizes": sizes}, separators=(",", ":")))


def _result(d: dict[str, Any]) -> Result:
    _check(d, dict, "result")
    res = Result(lines=[_check(s, str, "line") for s in _check(d["lines"], list, "lines")],
                 counts={_check(k, str, "class"): _check(v, int, "count") for k, v in _check(d["counts"], dict, "counts").items()},
                 image_entry=_check(d["image_entry"], str, "image_entry"),
                 mask_entry=_check(d["mask_entry"], (str, type(None)), "mask_entry"))
    for rel, rec in _check(d["files"], dict, "files").items():
        size, digest = _check(rec, list, "file record")
        res.files[_check(rel, str, "file")] = (_check(size, int, "size"), _check(digest, str, "digest"))
    return res


def load_marker(tmp: Path, shard: int, n_images: int) -> list[Result] | None:
    """Results of a finished process shard of ``n_images`` images whose files are all still there with their
    recorded sizes; None when not finished, damaged or not a marker (the shard is then redone)."""
    tmp = Path(tmp)
    try:
        rec = json.loads(shard_marker(tmp, shard).read_text())
        results = [_result(r) for r in _check(rec["results"], list, "results")]
        sizes = {_check(k, str, "file"): _check(v, int, "size") for k, v in _check(rec["sizes"], dict, "sizes").items()}
        if len(results) != n_images:
            return None
        for rel, size in sizes.items():
            if ".." in Path(rel).parts or Path(rel).is_absolute() or (tmp / rel).stat().st_size != size:
                return None
        return results
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None
