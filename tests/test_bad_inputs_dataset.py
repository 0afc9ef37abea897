"""Bad-input catalogue, section L (docs/bad-inputs.md): dataset output folders and names (issue 12).

No input is ever lost: a build that would replace or clear a folder holding an input is refused before
anything is written or deleted, and each data-loss test checks by sha256 (``tree_digest``) that every
file under the test folder, inputs included, is still there with the same bytes. User paths are never
glob patterns; ``~`` and symlinks are followed; two builds of one folder are serialised; the build
folder's state is JSON, never unpickled.

Test names are ``test_<NN>_<what>``; ``NN`` is the entry number in docs/bad-inputs.md.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from storage import layout
from storage.paths import OutputFolderError
from tasks.dataset.association import get_image_mask_association
from tasks.dataset.generate import generate_patch_dataset, plan_patch_dataset
from tasks.dataset.shards import scan_shard
from tasks.imageio import InputDataError
from tests._synth import CLASS_TO_IDX, make_dataset, tree_digest

REPO = Path(__file__).resolve().parents[1]
SLOW_ENV = "PATCHFLOW_TEST_SLOW_MASKS"


def slow_identity(mask: np.ndarray) -> np.ndarray:
    """mask_preprocessing that is slow when ``$PATCHFLOW_TEST_SLOW_MASKS`` is set (so two builds overlap)."""
    if os.environ.get(SLOW_ENV):
        time.sleep(float(os.environ[SLOW_ENV]))
    return mask


def expect(exc_type: type[BaseException], fn, *names: object, fix: str) -> str:
    """Run ``fn``; it must raise ``exc_type`` whose one-line message names every ``names`` item and matches ``fix``."""
    with pytest.raises(exc_type) as ei:
        fn()
    msg = str(ei.value)
    for name in names:
        assert str(name) in msg, f"{name!r} not named in: {msg}"
    assert re.search(fix, msg, re.IGNORECASE), f"no fix ({fix!r}) in: {msg}"
    assert "\n" not in msg and "\r" not in msg, f"not one line: {msg!r}"
    if os.environ.get("PATCHFLOW_SHOW_ERRORS"):
        print(f"\n[{type(ei.value).__name__}] {msg}")
    return msg


def generate(dd: list[dict], out: Path | str, **kw) -> dict:
    params = dict(val_size=0.25, test_size=0.25, patch_number=[2, 2])
    params.update(kw)
    return generate_patch_dataset([dict(d) for d in dd], dict(CLASS_TO_IDX), output_folder=str(out), **params)


def source(root: Path, n: int = 4) -> list[dict]:
    return make_dataset(root, n=n, n_empty=1)


def leftovers(folder: Path) -> list[str]:
    """Hidden build siblings of ``folder`` (build folders, old copies, lock file)."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def flow_cfg(images: Path, masks: Path | None, out: Path, root: Path, **data) -> dict:
    return {
        "data": {
            "images": str(images),
            "masks": str(masks) if masks else None,
            "class_to_idx": dict(CLASS_TO_IDX),
            **data,
        },
        "dataset": {"output_folder": str(out), "patch_number": [2, 2], "val_size": 0.25, "test_size": 0.25},
        "storage_root": str(root),
    }


# ====================================================== L. inputs inside the output folder are never deleted


@pytest.mark.parametrize("how", ["copied", "symlinked", "in-a-leftover-build-folder"])
def test_105_raw_inputs_inside_the_output_folder(tmp_path: Path, how: str) -> None:
    """Raw images and masks kept in ``out/ds/raw/`` (or linked from there, or kept in a killed build's leftover
    folder ``out/.ds.partial-<hex>/``, which a build removes), rebuilt into ``out/ds``: refused."""
    out = tmp_path / "out" / "ds"
    generate(source(tmp_path / "first"), out)
    raw = out / "raw"
    fix = "would delete it.*choose another output_folder"
    if how == "in-a-leftover-build-folder":
        raw = out.parent / f".ds.partial-{'0' * 16}" / "raw"
        shutil.copytree(tmp_path / "first", raw)
        dd = get_image_mask_association(str(raw / "images"), str(raw / "masks"))
        out, fix = raw.parent, "killed build's leftover"
    elif how == "copied":
        shutil.copytree(tmp_path / "first", raw)
        dd = get_image_mask_association(str(raw / "images"), str(raw / "masks"))
    else:  # inputs outside, but symlinks to files inside the output folder
        (tmp_path / "links").mkdir()
        dd = []
        for f in sorted((out / "original" / "images").iterdir()):
            (tmp_path / "links" / f.name).symlink_to(f)
            dd.append({"base_name": f.name, "path": str(tmp_path / "links" / f.name), "mask": None})
    before = tree_digest(tmp_path)
    target = tmp_path / "out" / "ds"
    msg = expect(OutputFolderError, lambda: generate(dd, target, seed=7, fingerprint="f" * 64), out, fix=fix)
    assert dd[0]["path"] in msg
    assert tree_digest(tmp_path) == before  # every input byte-identical, and nothing written (no lock, no build folder)


def test_106_rebuild_from_its_own_original_copy(tmp_path: Path) -> None:
    """A dataset rebuilt from its own ``original/`` copy with ``save_original_images_and_masks=False``: refused."""
    out = tmp_path / "ds"
    generate(source(tmp_path / "src"), out)
    shutil.rmtree(tmp_path / "src")  # the dataset's copy is now the only one
    dd = get_image_mask_association(str(out / "original" / "images"), str(out / "original" / "masks"))
    before = tree_digest(tmp_path)
    expect(
        OutputFolderError,
        lambda: generate(dd, out, save_original_images_and_masks=False),
        out,
        out / "original" / "images",
        fix="original/ copy",
    )
    assert tree_digest(tmp_path) == before


def test_107_output_folder_inside_the_images_folder(tmp_path: Path, prefect_harness) -> None:
    """Flow: refused at the first run (a rerun would read its own patches). API: the first run builds, the rerun with
    the re-listed folder (now holding the patches) is refused and the patches are kept."""
    from flows.dataset import dataset_flow

    source(tmp_path / "raw")
    images, masks = tmp_path / "raw" / "images", tmp_path / "raw" / "masks"
    out = images / "ds"
    before = tree_digest(tmp_path)
    expect(
        OutputFolderError,
        lambda: dataset_flow(flow_cfg(images, masks, out, tmp_path / "store")),
        out,
        images,
        fix="would read its own patches as images",
    )
    assert tree_digest(tmp_path) == before

    dd = get_image_mask_association(str(images), str(masks))
    generate(dd, out)
    patches = sorted((out / "val").rglob("*.png"))  # what a recursive re-listing of the images folder adds
    dd += [{"base_name": p.name, "path": str(p), "mask": None} for p in patches]
    before = tree_digest(tmp_path)
    expect(OutputFolderError, lambda: generate(dd, out), out, fix="would delete it")
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("where", ["equal", "under"])
def test_108_images_folder_inside_the_output_folder(tmp_path: Path, prefect_harness, where: str) -> None:
    """data.images equal to, or under, output_folder: always refused (here a dataset folder holding raw/ images)."""
    from flows.dataset import dataset_flow

    out = tmp_path / "ds"
    generate(source(tmp_path / "src"), out)
    images = out if where == "equal" else out / "raw" / "images"
    if where == "under":
        shutil.copytree(tmp_path / "src", out / "raw")
    before = tree_digest(tmp_path)
    expect(
        OutputFolderError,
        lambda: dataset_flow(flow_cfg(images, None, out, tmp_path / "store", mask_extension="_m")),
        out,
        images,
        fix="choose an output_folder outside data.images",
    )
    assert tree_digest(tmp_path) == before


def test_109_class_map_config_or_storage_root_inside_the_output_folder(tmp_path: Path, prefect_harness) -> None:
    """The class map file, the config file (CLI: exit 1, one line, before Prefect starts) or the storage root."""
    from flows.dataset import dataset_flow

    src = tmp_path / "src"
    source(src)
    out = tmp_path / "ds"
    generate(source(tmp_path / "first"), out)
    (out / "class_to_idx.json").write_text(json.dumps(CLASS_TO_IDX))
    cfg = flow_cfg(src / "images", src / "masks", out, tmp_path / "store")
    cfg["data"]["class_to_idx"], cfg["data"]["class_to_idx_file"] = None, str(out / "class_to_idx.json")
    before = tree_digest(tmp_path)
    expect(OutputFolderError, lambda: dataset_flow(cfg), out, out / "class_to_idx.json", fix="move the file")
    cfg = flow_cfg(src / "images", src / "masks", out, out / ".patchflow")
    expect(OutputFolderError, lambda: dataset_flow(cfg), out, out / ".patchflow", fix="storage_root outside")
    assert tree_digest(tmp_path) == before

    cfg = flow_cfg(src / "images", src / "masks", out, tmp_path / "store")
    (out / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    before = tree_digest(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "flows.dataset", "--config", str(out / "cfg.yaml")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: output_folder"), proc.stderr
    assert f"holds the config file {out / 'cfg.yaml'}" in proc.stderr
    assert tree_digest(tmp_path) == before


# ============================================================== L. output folder paths taken literally


@pytest.mark.parametrize(
    "name,victim",
    [("*", ".precious.partial-1234"), ("[ab]", ".a.partial-0123456789abcdef"), ("?", ".b.tmp-99-0123abcd")],
)
def test_110_glob_characters_in_output_folder(tmp_path: Path, name: str, victim: str) -> None:
    """``output_folder='x/*'``: the build-folder cleanup matches names literally, an unrelated folder is kept."""
    x = tmp_path / "x"
    (x / victim).mkdir(parents=True)
    (x / victim / "keep.txt").write_text("precious")
    dd = source(tmp_path / "src")
    before = tree_digest(tmp_path)
    for seed in (1, 2):  # the second build replaces the first and cleans up after it
        generate(dd, x / name, fingerprint=f"{seed:x}" * 64, seed=seed)
    assert layout.is_complete(x / name)
    after = tree_digest(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # every input and the victim kept
    assert not leftovers(x / name)


def test_111_output_folder_dot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``output_folder='.'``: one line, nothing written (before: a ``..partial-*`` that blocked every rerun)."""
    dd = source(tmp_path / "src")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = tree_digest(tmp_path)
    for kw in ({}, {"fingerprint": "f" * 64}):
        expect(
            FileExistsError,
            lambda kw=kw: generate(dd, ".", **kw),
            work,
            fix="is the current folder.*choose a sub-folder",
        )
        expect(FileExistsError, lambda kw=kw: generate(dd, "..", **kw), tmp_path, fix="or holds it")
    assert tree_digest(tmp_path) == before
    generate(dd, "extraction_data")  # the fix the message gives
    assert layout.is_complete(work / "extraction_data")


def test_112_output_folder_with_tilde(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``output_folder: ~/x`` is expanded (as storage_root is), never a folder literally named ``~``."""
    from tasks.dataset.stage import dataset_is_current

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    generate(source(tmp_path / "src"), "~/x", fingerprint="e" * 64)
    assert layout.is_complete(home / "x", "e" * 64) and dataset_is_current("~/x", "e" * 64)
    assert not list(work.iterdir())
    assert not leftovers(home / "x")


def test_113_symlinked_output_folder(tmp_path: Path) -> None:
    """A symlinked output_folder is followed: built beside the target, the target replaced, the link kept as it was,
    no ``.link.old-*`` left; inputs inside the target (reached through the link) are refused."""
    target = tmp_path / "real" / "ds"
    target.parent.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    dd = source(tmp_path / "src")
    inputs = tree_digest(tmp_path / "src")
    for seed in (1, 2):
        generate(dd, link, seed=seed, fingerprint=f"{seed}" * 64)
        assert link.is_symlink() and os.readlink(link) == str(target)
        assert layout.read_sidecar(target)["seed"] == seed
        assert not leftovers(link) and not leftovers(target)
    assert tree_digest(tmp_path / "src") == inputs

    shutil.copytree(tmp_path / "src", target / "raw")
    dd = get_image_mask_association(str(link / "raw" / "images"), str(link / "raw" / "masks"))
    before = tree_digest(tmp_path)
    expect(OutputFolderError, lambda: generate(dd, link, seed=3), target, target / "raw" / "images", fix="would delete")
    assert tree_digest(tmp_path) == before


# ===================================================================== L. concurrent builds of one folder

_BUILD = textwrap.dedent(
    """
    import json, logging, sys
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    from tasks.dataset.generate import generate_patch_dataset
    from tests.test_bad_inputs_dataset import slow_identity
    a = json.loads(sys.argv[1])
    generate_patch_dataset(a["dd"], a["classes"], output_folder=a["out"], seed=a["seed"], fingerprint=a["fp"],
                           mask_preprocessing=slow_identity, patch_number=[2, 2], val_size=0.25, test_size=0.25,
                           shard_images=2)
    """
)


@pytest.mark.slow
def test_114_two_concurrent_builds_with_different_seeds(tmp_path: Path) -> None:
    """Two real processes, seeds 1 and 2, one output folder: the second waits for the first (before: it deleted the
    first's build folder and one failed with "free disk space"); both succeed and the folder holds the second's
    complete dataset, byte-identical to a build of it alone (never a mix)."""
    dd = source(tmp_path / "src", n=8)
    refs = {}
    for seed in (1, 2):
        refs[seed] = tmp_path / f"ref{seed}"
        generate(
            dd, refs[seed], seed=seed, fingerprint=f"{seed}" * 64, mask_preprocessing=slow_identity, shard_images=2
        )
    out = tmp_path / "ds"
    env = {**os.environ, SLOW_ENV: "0.3"}

    def start(seed: int) -> subprocess.Popen:
        arg = json.dumps({"dd": dd, "classes": CLASS_TO_IDX, "out": str(out), "seed": seed, "fp": f"{seed}" * 64})
        return subprocess.Popen(
            [sys.executable, "-c", _BUILD, arg],
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    first = start(1)
    deadline = time.time() + 60
    while not (tmp_path / f".ds.partial-{'1' * 16}" / ".shards").is_dir():  # the first holds the lock and builds
        assert time.time() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.05)
    second = start(2)
    results = [p.communicate(timeout=120) + (p.returncode,) for p in (first, second)]
    for _, err, rc in results:
        assert rc == 0, err
    assert "waiting for another build of" in results[1][1]
    assert tree_digest(out) == tree_digest(refs[2])
    assert not leftovers(out)  # no build folder, no lock file


def test_115_flow_holds_the_build_lock(tmp_path: Path, prefect_harness) -> None:
    """The dataset flow takes the output folder's lock for the whole build: it waits while another process holds it."""
    from flows.dataset import dataset_flow

    source(tmp_path / "src")
    out = tmp_path / "ds"
    code = (
        "import sys, time; from storage import layout\n"
        f"with layout.build_lock({str(out)!r}):\n"
        "    print('held', flush=True); time.sleep(4); print(time.time(), flush=True)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert layout.lock_path(out).exists()
    dataset_flow(flow_cfg(tmp_path / "src" / "images", tmp_path / "src" / "masks", out, tmp_path / "store"))
    released = float(holder.stdout.readline())
    assert holder.wait(timeout=30) == 0
    assert (out / "patchflow.json").stat().st_mtime > released  # built only after the other holder let go
    assert not leftovers(out)


# ============================================================================= L. names and state files


@pytest.mark.parametrize("bad", ["im,0.png", "im\n0.png", "im\r0.png"], ids=["comma", "newline", "carriage-return"])
def test_116_image_or_class_name_with_comma_or_line_break(tmp_path: Path, bad: str) -> None:
    """Refused at generation time, naming the file or class, before anything is written (never a broken dataset.txt)."""
    dd = source(tmp_path / "src")
    orig = dd[0]["path"]
    renamed = Path(orig).with_name(bad)
    os.rename(orig, renamed)
    bad_dd = [dict(d) for d in dd]
    bad_dd[0].update(path=str(renamed), base_name=bad)
    out = tmp_path / "ds"
    before = tree_digest(tmp_path)
    expect(
        InputDataError,
        lambda: generate(bad_dd, out),
        repr(str(renamed)),
        fix="no commas, line breaks or slashes.*rename",
    )
    assert tree_digest(tmp_path) == before
    os.rename(renamed, orig)
    cls = "scr" + bad[2] + "atch"
    before = tree_digest(tmp_path)
    expect(
        InputDataError,
        lambda: generate_patch_dataset(dd, {"bg": 0, cls: 1, "b": 2}, output_folder=str(out), patch_number=[2, 2]),
        repr(cls),
        fix="no commas or slashes, no line breaks",
    )
    assert tree_digest(tmp_path) == before


class _Payload:
    """Unpickling this creates ``marker``: a planted pickle that would run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_117_planted_build_state_is_never_executed(tmp_path: Path) -> None:
    """A planted ``.shards/plan.pkl`` / ``process-*.pkl`` (a pickle that would create a file), a garbage ``plan.json``,
    a garbage shard marker and another build's valid ``plan.json`` next to the output folder: nothing runs, nothing
    outside the output folder is touched, and the build gives the same bytes as a clean one."""
    dd = source(tmp_path / "src")
    fp = "c" * 64
    generate(dd, tmp_path / "ref", fingerprint=fp)
    victim = tmp_path / "victim"
    plan_patch_dataset(
        [dict(d) for d in dd],
        dict(CLASS_TO_IDX),
        output_folder=str(victim),
        patch_number=[2, 2],
        val_size=0.25,
        test_size=0.25,
        fingerprint=fp,
    )
    other_plan = (tmp_path / f".victim.partial-{'c' * 16}" / ".shards" / "plan.json").read_bytes()
    marker = tmp_path / "pwned"
    out = tmp_path / "ds"
    shards = tmp_path / f".ds.partial-{'c' * 16}" / ".shards"
    for planted in (
        {"plan.pkl": pickle.dumps(_Payload(marker)), "process-000000.pkl": pickle.dumps(_Payload(marker))},
        {"plan.json": b"\x80garbage{", "process-000000.json": b"[1, 2"},
        {"plan.json": other_plan},
    ):
        shards.mkdir(parents=True, exist_ok=True)
        for name, data in planted.items():
            (shards / name).write_bytes(data)
        victim_before = tree_digest(tmp_path / f".victim.partial-{'c' * 16}")
        generate(dd, out, fingerprint=fp)
        assert not marker.exists()
        assert tree_digest(out) == tree_digest(tmp_path / "ref")
        assert tree_digest(tmp_path / f".victim.partial-{'c' * 16}") == victim_before and not victim.exists()
        assert not leftovers(out)

    (shards).mkdir(parents=True)
    (shards / "plan.json").write_text("garbage")
    expect(
        layout.DatasetFormatError, lambda: scan_shard(shards.parent, 0), shards / "plan.json", fix="rerun the dataset"
    )


def double_mask(mask: np.ndarray) -> np.ndarray:
    """An importable mask_preprocessing (stored in the plan as its import path)."""
    return mask


def test_118_mask_preprocessing_kept_as_import_path_or_in_memory(tmp_path: Path) -> None:
    """The plan stores ``module:qualname`` (re-imported to the same object); a lambda is never stored: it works in
    ``generate_patch_dataset`` with num_workers=1 (before: PicklingError) and is refused where shards read the plan."""
    dd = source(tmp_path / "src")
    kw = dict(patch_number=[2, 2], val_size=0.25, test_size=0.25, fingerprint="d" * 64)
    tmp = plan_patch_dataset(
        [dict(d) for d in dd],
        dict(CLASS_TO_IDX),
        output_folder=str(tmp_path / "a"),
        mask_preprocessing=double_mask,
        **kw,
    )
    saved = json.loads((tmp / ".shards" / "plan.json").read_text())
    assert saved["params"]["mask_preprocessing"] == "tests.test_bad_inputs_dataset:double_mask"
    assert sorted(p.suffix for p in (tmp / ".shards").iterdir()) == [".json"]
    expect(
        ValueError,
        lambda: plan_patch_dataset(
            [dict(d) for d in dd],
            dict(CLASS_TO_IDX),
            output_folder=str(tmp_path / "b"),
            mask_preprocessing=lambda m: m,
            **kw,
        ),
        "mask_preprocessing",
        fix="module-level function",
    )
    assert not (tmp_path / "b").exists() and not leftovers(tmp_path / "b")
    generate(dd, tmp_path / "c", mask_preprocessing=lambda m: np.where(m == 2, 1, m).astype(np.uint8))
    counts = layout.read_sidecar(tmp_path / "c")["counts"]
    assert not any("b" in c for c in counts.values()) and any("a" in c for c in counts.values())


@pytest.mark.parametrize(
    "kw",
    [
        {"train_filename": "../evil.txt"},
        {"mask_output_folder": "../../evil", "save_mask": True},
        {"base_name": "../escape.png"},
        {"base_name": ".."},
    ],
    ids=["train_filename", "mask_output_folder", "base_name", "dotdot"],
)
def test_119_output_names_that_leave_the_dataset(tmp_path: Path, kw: dict) -> None:
    """File and folder names that would write outside the dataset are refused before anything is written."""
    dd = source(tmp_path / "src")
    if "base_name" in kw:
        dd[0]["base_name"] = kw.pop("base_name")
    before = tree_digest(tmp_path)
    expect(
        (ValueError, InputDataError),
        lambda: generate(dd, tmp_path / "ds", **kw),
        fix="slash|relative folder|is empty, '.' or '..'",
    )
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize(
    "kw",
    [
        {"class_to_idx": {"bg": 0, "a": 1.0}},
        {"val_size": 0.8, "test_size": 0.5},
        {"patch_number": [2, 0]},
        {"sixteen_bit": 7},
        {"train_filename": "a/b.txt"},
        {"num_workers": 0},
    ],
    ids=["class_to_idx", "split_sizes", "geometry", "sixteen_bit", "train_filename", "num_workers"],
)
def test_bad_parameters_are_one_cli_line(tmp_path: Path, kw: dict) -> None:
    """A bad parameter reached through the API or a flow is a ConfigError (still a ValueError): the CLI prints it as
    one ``error:`` line with exit code 2, never a traceback; nothing is written."""
    from tasks.cli import cli_error
    from tasks.config import ConfigError

    dd = source(tmp_path / "src")
    classes = kw.pop("class_to_idx", dict(CLASS_TO_IDX))
    before = tree_digest(tmp_path)
    with pytest.raises(ConfigError) as ei:
        generate_patch_dataset(
            [dict(d) for d in dd], classes, output_folder=str(tmp_path / "ds"), **{"patch_number": [2, 2], **kw}
        )
    assert isinstance(ei.value, ValueError) and cli_error(ei.value) == (2, str(ei.value))
    assert tree_digest(tmp_path) == before
