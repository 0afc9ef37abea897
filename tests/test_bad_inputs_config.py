"""Bad configuration files and values (issue 12, docs/bad-inputs.md section N, cases 130-139).

YAML read from users is bounded (alias expansion, nesting, size) and strict (duplicate keys, tags that
build Python objects); every message shows user values cut short; counts, seeds and indices are
strict integers; a storage root that cannot hold files is one ConfigError naming where it came from.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from tasks.config import ConfigError, ensure_storage_root, load_config, load_yaml, parse_overrides, validate_config
from tasks.model.config import TrainFlowConfig
from tests._synth import CLASS_TO_IDX, make_dataset, tree_digest
from tests.test_bad_inputs import expect

REPO = Path(__file__).resolve().parents[1]


def _lol(levels: int = 9, indent: str = "  ") -> str:
    """The "billion laughs": 9 nested anchors of 9 aliases each (9**9 = 387 million strings once expanded)."""
    lines = [f'{indent}a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{indent}{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ============================================================================ 130. YAML alias bomb


def test_130_yaml_alias_bomb_is_refused_quickly_with_a_short_message(tmp_path: Path) -> None:
    bomb = _write(tmp_path, "datamodule:\n  data_path: x\n  bomb:\n" + _lol(indent="    "))
    assert bomb.stat().st_size < 600
    tracemalloc.start()
    t0 = time.perf_counter()
    msg = expect(
        ConfigError,
        lambda: load_config(TrainFlowConfig, bomb),
        bomb,
        "line 5",
        "100000",
        fix="write the values out or use fewer aliases",
    )
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(msg) < 400 and "\n" not in msg
    assert elapsed < 5 and peak < 50 * 2**20, (elapsed, peak)


def test_130_alias_bomb_in_an_override_and_a_recursive_alias() -> None:
    flat = "[" + ",".join(["*a"] * 9) + "]"
    bomb = (
        "{a: &a [x,x,x,x,x,x,x,x,x], "
        + ", ".join(f"{chr(98 + i)}: &{chr(98 + i)} " + flat.replace("*a", f"*{chr(97 + i)}") for i in range(8))
        + "}"
    )
    expect(
        ConfigError, lambda: parse_overrides([f"model.params={bomb}"]), "override", "model.params", fix="fewer aliases"
    )
    expect(
        ConfigError,
        lambda: parse_overrides(["model.params=&a {x: *a}"]),
        "override",
        "line 1",
        fix="recursive value.*write the value out",
    )


def test_130_moderate_aliases_are_still_allowed(tmp_path: Path) -> None:
    cfg = _write(
        tmp_path, "defaults: &f [a, b]\ndatamodule:\n  data_path: x\n  include_filter: *f\n  exclude_filter: *f\n"
    )
    data = load_yaml(cfg)
    data.pop("defaults")
    cfg = load_config(TrainFlowConfig, None, [f"datamodule={json.dumps(data['datamodule'])}"])
    assert cfg.datamodule.include_filter == cfg.datamodule.exclude_filter == ["a", "b"]


@pytest.mark.slow
def test_130_cli_alias_bomb_is_one_short_error_line(tmp_path: Path) -> None:
    """The real CLI: 575 bytes of aliases gave a 522 MB message and 1.7 GB of memory; now one line, exit 2."""
    bomb = _write(
        tmp_path, "data:\n  images: imgs\n  class_to_idx: {bg: 0}\n" + _lol() + "dataset:\n  patch_number: [2, 2]\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "flows.dataset", "--config", str(bomb)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr[:2000]
    assert len(proc.stderr) < 600
    assert str(bomb) in proc.stderr and "line 5" in proc.stderr


# ============================================================================ 131. duplicate keys


def test_131_duplicate_section_names_the_key_the_file_and_both_lines(tmp_path: Path) -> None:
    cfg = _write(
        tmp_path,
        "datamodule:\n  data_path: first\ntrainer:\n  iteration_over_training: 3\ndatamodule:\n  data_path: second\n",
    )
    expect(ConfigError, lambda: load_yaml(cfg), cfg, "key 'datamodule'", "lines 1 and 5", fix="merge them into one")


def test_131_duplicate_nested_key_and_duplicate_in_an_override(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "datamodule:\n  data_path: x\n  batch_size: 8\n  seed: 1\n  batch_size: 16\n")
    expect(
        ConfigError,
        lambda: load_config(TrainFlowConfig, cfg),
        cfg,
        "'datamodule.batch_size'",
        "lines 3 and 5",
        fix="keep only the second",
    )
    expect(
        ConfigError,
        lambda: parse_overrides(["datamodule={data_path: x, data_path: y}"]),
        "override",
        "'data_path'",
        "line 1, columns 2 and 16",
        fix="given twice",
    )


def test_131_merge_keys_override_without_being_duplicates(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "base: &b {data_path: x, batch_size: 8}\ndatamodule:\n  <<: *b\n  batch_size: 16\n")
    assert load_yaml(cfg)["datamodule"] == {"data_path": "x", "batch_size": 16}


# ============================================================================ 132. bounded messages


def test_132_huge_values_are_cut_short_in_validation_errors(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "datamodule:\n  data_path: x\n  seed: '" + "9" * 1_000_000 + "'\n")
    msg = expect(
        ConfigError, lambda: load_config(TrainFlowConfig, cfg), "'datamodule.seed'", "...", fix="valid integer"
    )
    assert len(msg) < 600
    long_key = "k" * 100_000
    msg = expect(
        ConfigError,
        lambda: load_config(TrainFlowConfig, None, ["datamodule.data_path=x", f"{long_key}=1"]),
        "unknown key",
        "...",
        fix="known keys",
    )
    assert len(msg) < 1000


def test_132_many_problems_are_counted_not_listed() -> None:
    values = json.dumps(list(range(5000)))
    msg = expect(
        ConfigError,
        lambda: load_config(TrainFlowConfig, None, ["datamodule.data_path=x", f"datamodule.include_filter={values}"]),
        "'datamodule.include_filter.0'",
        fix="and 4980 more problems",
    )
    assert msg.count("\n") <= 22 and len(msg) < 4000


def test_132_unreadable_values_are_one_line(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "datamodule:\n  data_path: x\n  seed: " + "1" * 5000 + "\n")
    msg = expect(ConfigError, lambda: load_yaml(cfg), cfg, "4300 digits", fix="quote it")
    assert len(msg) < 500
    cfg = _write(tmp_path, "core:\n  tag: 2024-13-01\n")
    expect(ConfigError, lambda: load_yaml(cfg), cfg, "month", fix="quote it to keep it as text")


# ============================================================================ 133. tags, depth, syntax


@pytest.mark.parametrize(
    "tag", ["!!python/object/apply:os.system", "!!python/name:os.system", "!!python/object/new:subprocess.Popen"]
)
def test_133_python_tags_are_refused_and_never_run(tmp_path: Path, tag: str) -> None:
    marker = tmp_path / "ran"
    cfg = _write(tmp_path, f"datamodule:\n  data_path: {tag} [['touch', '{marker}']]\n")
    expect(ConfigError, lambda: load_yaml(cfg), cfg, "line 2", fix="remove the tag")
    expect(
        ConfigError,
        lambda: parse_overrides([f"datamodule.data_path={tag} ['touch {marker}']"]),
        "override",
        fix="remove the tag",
    )
    assert not marker.exists()


def test_133_deep_nesting_and_syntax_errors_are_one_line(tmp_path: Path) -> None:
    cfg = _write(tmp_path, "model:\n  params: " + "[" * 5000 + "]" * 5000 + "\n")
    expect(ConfigError, lambda: load_yaml(cfg), cfg, "more than 100 levels", "line 2", fix="flatten it")
    cfg = _write(tmp_path, "datamodule:\n  data_path: [unclosed\n")
    msg = expect(ConfigError, lambda: load_yaml(cfg), cfg, "line 3", fix="fix the syntax there")
    assert "\n" not in msg
    cfg = _write(tmp_path, "a: 1\n---\nb: 2\n")
    expect(ConfigError, lambda: load_yaml(cfg), cfg, "another document", fix="fix the syntax")


# ============================================================================ 134. the file itself


def test_134_config_file_not_utf8_binary_or_a_folder(tmp_path: Path) -> None:
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("core:\n  name: défaut\n".encode("latin-1"))
    msg = expect(ConfigError, lambda: load_yaml(latin), latin, "not UTF-8", "0xe9", fix="save it as UTF-8")
    assert "\n" not in msg
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"a: 1\nb: \x00\x01\x02")
    expect(ConfigError, lambda: load_yaml(binary), binary, "line 2", fix="binary file")
    folder = tmp_path / "configs"
    folder.mkdir()
    expect(ConfigError, lambda: load_yaml(folder), folder, "is a folder", fix="path of a YAML file")
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbfdatamodule:\n  data_path: x\n")  # Windows editors' UTF-8 BOM is fine
    assert load_yaml(bom) == {"datamodule": {"data_path": "x"}}


@pytest.mark.slow
def test_134_cli_config_folder_is_one_error_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "flows.train", "--config", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "is a folder" in proc.stderr


# ============================================================================ 135. strict integers


@pytest.mark.parametrize(
    "override,key,got,hint",
    [
        ("datamodule.num_workers=true", "datamodule.num_workers", "True", "true/false is not a number"),
        ("datamodule.seed=4.0", "datamodule.seed", "4.0", "without a decimal point: 4"),
        ("core.seed=4.5", "core.seed", "4.5", "valid integer"),
        ("datamodule.class_to_idx={bg: 0, a: 1.0}", "datamodule.class_to_idx.a", "1.0", "decimal point: 1"),
        ("datamodule.batch_size=true", "datamodule.batch_size", "True", "true/false"),
        ("trainer.iteration_over_training='5'", "trainer.iteration_over_training", "'5'", "valid integer"),
        ("runner.n_workers=2.0", "runner.n_workers", "2.0", "decimal point"),
        ("transforms.input_height=224.0", "transforms.input_height", "224.0", "decimal point"),
        ("task.shard_patches=true", "task.shard_patches", "True", "true/false"),
    ],
)
def test_135_train_config_counts_seeds_and_indices_are_strict(override: str, key: str, got: str, hint: str) -> None:
    expect(
        ConfigError,
        lambda: load_config(TrainFlowConfig, None, ["datamodule.data_path=x", override]),
        f"'{key}'",
        f"(got {got})",
        "valid integer",
        fix=hint,
    )


@pytest.mark.parametrize(
    "override,key",
    [
        ("dataset.num_workers=true", "dataset.num_workers"),
        ("dataset.seed=4.0", "dataset.seed"),
        ("data.class_to_idx={bg: 0, a: true}", "data.class_to_idx.a"),
        ("dataset.patch_number=[2.0, 2]", "dataset.patch_number.0"),
        ("dataset.repeat_good_images=2.0", "dataset.repeat_good_images"),
        ("runner.threads_per_worker=true", "runner.threads_per_worker"),
    ],
)
def test_135_dataset_config_counts_seeds_and_indices_are_strict(override: str, key: str) -> None:
    from tasks.dataset.config import DatasetFlowConfig

    base = ["data.images=imgs", "data.class_to_idx={bg: 0, a: 1}", "dataset.patch_number=[2, 2]"]
    expect(
        ConfigError, lambda: load_config(DatasetFlowConfig, None, [*base, override]), f"'{key}'", fix="valid integer"
    )


def test_135_evaluate_predict_retrain_configs_are_strict() -> None:
    from flows.retrain import RetrainFlowConfig
    from tasks.evaluation.config import EvaluateFlowConfig
    from tasks.predict.config import PredictFlowConfig

    ev = ["datamodule.data_path=x", "task.model_path=m"]
    expect(
        ConfigError,
        lambda: load_config(EvaluateFlowConfig, None, [*ev, "task.output.n_overlays=true"]),
        "'task.output.n_overlays'",
        fix="true/false",
    )
    expect(
        ConfigError,
        lambda: load_config(EvaluateFlowConfig, None, [*ev, "datamodule.batch_size=8.0"]),
        "'datamodule.batch_size'",
        fix="decimal point: 8",
    )
    predict = {"model": "m", "images": "i", "out": "o", "batch_size": True}
    expect(ConfigError, lambda: validate_config(PredictFlowConfig, predict), "'batch_size'", fix="true/false")
    rt = ["data.images=imgs", "data.class_to_idx={bg: 0, a: 1}", "dataset.patch_size=[64, 64]"]
    expect(
        ConfigError,
        lambda: load_config(RetrainFlowConfig, None, [*rt, "train.datamodule.seed=1.0"]),
        "'train.datamodule.seed'",
        fix="decimal point",
    )


def test_135_floats_stay_lax_and_tuples_take_lists() -> None:
    from tasks.dataset.config import DatasetFlowConfig

    cfg = load_config(
        DatasetFlowConfig,
        None,
        [
            "data.images=imgs",
            "data.class_to_idx={bg: 0, a: 1}",
            "dataset.patch_size=[64, 32]",
            "dataset.val_size=0",
            "dataset.overlap=0",
            "dataset.test_size=1",
        ],
    )
    assert cfg.dataset.patch_size == (64, 32) and cfg.dataset.val_size == 0.0 and isinstance(cfg.dataset.overlap, float)
    again = validate_config(DatasetFlowConfig, json.loads(json.dumps(cfg.model_dump(mode="json"))))  # as Prefect sends
    assert again == cfg


def test_135_deployment_configs_and_json_parameters_still_validate() -> None:
    """Every shipped config validates, and prefect.yaml's parameters pass each flow's own parameter check
    (the Prefect UI and API send JSON: ints stay ints, tuples arrive as lists)."""
    from deployments.serve import _flows, deployment_specs
    from tasks.dataset.config import DatasetFlowConfig
    from tasks.evaluation.config import EvaluateFlowConfig

    dep = REPO / "deployments"
    load_config(DatasetFlowConfig, dep / "demo_dataset.yaml")
    load_config(TrainFlowConfig, dep / "demo_train.yaml", ["datamodule.data_path=x"])
    load_config(TrainFlowConfig, dep / "sklearn_classification_patch.yaml")
    load_config(EvaluateFlowConfig, dep / "sklearn_classification_patch_test.yaml")
    specs = deployment_specs()
    assert {s["name"] for s in specs} == {"retrain-weekly", "evaluate", "predict"}
    models = {flow.name: model for flow, model in _flows().values()}
    for spec in specs:
        params = json.loads(json.dumps(spec["parameters"]))
        validated = spec["flow"].validate_parameters(params)["config"]
        assert isinstance(validated, models[spec["flow"].name])


# ============================================================================ 136. class_to_idx JSON file


@pytest.mark.parametrize(
    "content,names,fix",
    [
        ('{"bg": 0, "a": true}', ["class 'a' maps to true (bool)"], "whole number"),
        ('{"bg": 0, "a": 1.0}', ["class 'a' maps to 1.0 (float)"], "whole number"),
        ('{"bg": 0, "a": 1, "a": 2}', ["key 'a' is given twice"], "cannot read a JSON mapping"),
        ('["bg", "a"]', ["not hold a list"], "must map class names to integer"),
    ],
)
def test_136_class_to_idx_file_values_are_strict(tmp_path: Path, content: str, names: list[str], fix: str) -> None:
    from tasks.dataset.config import DataSection

    f = tmp_path / "classes.json"
    f.write_text(content)
    expect(
        ConfigError,
        DataSection(images="imgs", class_to_idx_file=str(f)).resolved_class_to_idx,
        "data.class_to_idx_file",
        f,
        *names,
        fix=fix,
    )


def test_136_class_to_idx_file_not_utf8(tmp_path: Path) -> None:
    from tasks.dataset.config import DataSection

    f = tmp_path / "classes.json"
    f.write_bytes('{"bg": 0, "défaut": 1}'.encode("latin-1"))
    msg = expect(
        ConfigError,
        DataSection(images="imgs", class_to_idx_file=str(f)).resolved_class_to_idx,
        "data.class_to_idx_file",
        f,
        fix="cannot read a JSON mapping.*utf-8",
    )
    assert "\n" not in msg


# ============================================================================ 137. dataset API


@pytest.mark.parametrize(
    "kw,classes,names",
    [
        ({"num_workers": True}, CLASS_TO_IDX, ["num_workers", "True (bool)"]),
        ({"num_workers": 2.0}, CLASS_TO_IDX, ["num_workers", "2.0 (float)"]),
        ({"seed": 4.0}, CLASS_TO_IDX, ["seed", "4.0 (float)"]),
        ({}, {"bg": 0, "a": 1.0, "b": 2}, ["class_to_idx['a'] = 1.0 (float)"]),
        ({}, {"bg": 0, "a": True, "b": 2}, ["class_to_idx['a'] = True (bool)"]),
    ],
)
def test_137_generate_patch_dataset_refuses_bools_and_floats_for_integers(
    tmp_path: Path, kw: dict, classes: dict, names: list[str]
) -> None:
    from tasks.dataset.generate import generate_patch_dataset

    dd = make_dataset(tmp_path / "src", n=2, n_empty=0)
    before = tree_digest(tmp_path / "src")
    out = tmp_path / "out"
    expect(
        ValueError,
        lambda: generate_patch_dataset(dd, classes, output_folder=str(out), patch_number=[2, 2], **kw),
        *names,
        fix="integer",
    )
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert tree_digest(tmp_path / "src") == before


# ============================================================================ 138. storage_root


def test_138_storage_root_that_is_a_file_or_under_a_file(tmp_path: Path) -> None:
    f = tmp_path / "root"
    f.write_bytes(b"not a folder")
    expect(ConfigError, lambda: ensure_storage_root(str(f)), "storage_root", f, "is a file", fix="writable folder")
    expect(
        ConfigError,
        lambda: ensure_storage_root(str(f / "sub")),
        "storage_root",
        f / "sub",
        f"lies under {f}, which is a file",
        fix="writable folder",
    )
    assert f.read_bytes() == b"not a folder"
    ok = tmp_path / "new" / "root"
    assert ensure_storage_root(str(ok)) == ok.resolve() and ok.is_dir() and not list(ok.iterdir())


def test_138_storage_root_from_the_environment_or_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "root"
    f.write_text("x")
    monkeypatch.setenv("PATCHFLOW_STORAGE_ROOT", str(f))
    expect(
        ConfigError,
        lambda: ensure_storage_root(None),
        f"$PATCHFLOW_STORAGE_ROOT={f}",
        "is a file",
        fix="set PATCHFLOW_STORAGE_ROOT",
    )
    monkeypatch.delenv("PATCHFLOW_STORAGE_ROOT")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".patchflow").write_text("x")
    expect(
        ConfigError,
        lambda: ensure_storage_root(None),
        "default storage root ./.patchflow",
        "is a file",
        fix="set storage_root or PATCHFLOW_STORAGE_ROOT",
    )
    expect(
        ConfigError,
        lambda: ensure_storage_root("~no-such-user-xyz/store"),
        "storage_root",
        "cannot be resolved",
        fix="writable folder",
    )


@pytest.mark.parametrize("code,reason", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
def test_138_storage_root_read_only_simulated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, reason: str
) -> None:
    """Simulated (root ignores chmod): the file system refuses the write probe (EROFS as a read-only mount, EACCES)."""
    real = Path.write_bytes

    def refuse(self: Path, data: bytes) -> int:
        if self.name.startswith(".write-test-"):
            raise (PermissionError if code == errno.EACCES else OSError)(code, os.strerror(code), str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", refuse)
    root = tmp_path / "store"
    expect(ConfigError, lambda: ensure_storage_root(str(root)), "storage_root", root, reason, fix="writable folder")


# ============================================================================ 139. every flow checks it first


def test_139_every_flow_refuses_a_file_shaped_storage_root_before_any_work(tmp_path: Path, prefect_harness) -> None:
    from flows.dataset import dataset_flow
    from flows.evaluate import evaluate_flow
    from flows.predict import predict_flow
    from flows.retrain import retrain_flow
    from flows.train import train_flow

    root = tmp_path / "store"
    root.write_bytes(b"keep me")
    dd = make_dataset(tmp_path / "src", n=2, n_empty=0)
    images = str(Path(dd[0]["path"]).parent)
    before = tree_digest(tmp_path / "src")
    out, runs = tmp_path / "out", tmp_path / "runs"
    data = {"images": images, "class_to_idx": CLASS_TO_IDX}
    calls = {
        "dataset": lambda: dataset_flow(
            {"data": data, "dataset": {"output_folder": str(out), "patch_number": [2, 2]}, "storage_root": str(root)}
        ),
        "train": lambda: train_flow(
            {
                "datamodule": {"data_path": str(tmp_path / "ds")},
                "core": {"runs_folder": str(runs)},
                "storage_root": str(root),
            }
        ),
        "evaluate": lambda: evaluate_flow(
            {
                "datamodule": {"data_path": str(tmp_path / "ds")},
                "task": {"model_path": str(tmp_path / "m")},
                "core": {"runs_folder": str(runs)},
                "storage_root": str(root),
            }
        ),
        "predict": lambda: predict_flow(
            {"model": str(tmp_path / "m"), "images": images, "out": str(out), "storage_root": str(root)}
        ),
        "retrain": lambda: retrain_flow(
            {"data": data, "dataset": {"output_folder": str(out), "patch_size": [32, 32]}, "storage_root": str(root)}
        ),
    }
    for name, call in calls.items():
        msg = expect(ConfigError, call, "storage_root", root, "is a file", fix="writable folder")
        assert "\n" not in msg, name
    assert root.read_bytes() == b"keep me"
    assert not out.exists() and not runs.exists()
    assert tree_digest(tmp_path / "src") == before


def test_133_bundle_model_config_yaml_uses_the_same_loader(tmp_path: Path) -> None:
    """A bundle's model_config.yaml (read to rebuild a .pth backbone) is user YAML too: bounded, no tags."""
    from tasks.features.export import load_export
    from tasks.features.weights import BackboneError

    pth = tmp_path / "model.pth"
    pth.write_bytes(b"never read")
    cfg = tmp_path / "model_config.yaml"
    for text, name in [
        ("name: mobilenet_v2\nx:\n" + _lol(), "fewer aliases"),
        ("name: !!python/object/apply:os.system ['true']\n", "remove the tag"),
        ("name: mobilenet_v2\nname: resnet18\n", "given twice"),
        ("- mobilenet_v2\n", "must hold a mapping"),
    ]:
        cfg.write_text(text)
        expect(BackboneError, lambda: load_export(pth), cfg, name, fix="export the bundle again")
    cfg.write_bytes(b"name: r\xe9snet\n")
    expect(BackboneError, lambda: load_export(pth), cfg, "utf-8", fix="export the bundle again")
