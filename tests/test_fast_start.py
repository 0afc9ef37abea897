"""Fast start (issue 15 part 4): every ``python -m flows.<name> --help`` answers before Prefect and torch are
imported, the stage keys of a fully cached run import no torch/sklearn/skops/onnxruntime, and the temporary API
server is started early only when nothing else configures Prefect's API. Timings: benchmarks/startup.py."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import flows
from storage import prefect_server

REPO = Path(__file__).resolve().parents[1]
FLOWS = sorted(m.name for m in pkgutil.iter_modules(flows.__path__))
HEAVY = ("prefect", "torch", "torchvision", "onnxruntime", "sklearn", "skops")


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "home")}


@pytest.mark.slow
@pytest.mark.parametrize("name", FLOWS)
def test_help_answers_before_prefect_and_torch(name: str, tmp_path: Path) -> None:
    """The real command (``-X importtime`` lists every module imported): usage text, exit 0, no Prefect, no torch."""
    res = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", f"flows.{name}", "--help"],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith(f"usage: {name}.py") and "show this help message and exit" in res.stdout
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in res.stderr.splitlines() if "|" in line}
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_help_text_comes_from_the_flow_parser(capsys: pytest.CaptureFixture[str]) -> None:
    """--help is the parser that ``main`` uses: the module docstring and the flow's own options."""
    from flows import predict, train

    for parse in (predict.parse, lambda argv: train.parse_cli(train.TrainFlowConfig, argv, train.__doc__)):
        with pytest.raises(SystemExit) as exit_:
            parse(["--help"])
        assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--device DEVICE" in out and "cpu, cuda or cuda:N" in out  # predict's own options
    assert "Training flow: pass features" in out and "--config CONFIG" in out


def test_cached_run_keys_import_nothing_heavy(demo_patch_dataset: Path, tmp_path: Path) -> None:
    """Everything a fully cached train run computes before it knows all stages are cached (backbone digest, feature
    store keys and attributes, model.json, validation job) and every flow module: no torch, sklearn, skops, ORT."""
    code = f"""
import json, sys
import flows.dataset, flows.evaluate, flows.predict, flows.retrain, flows.train, flows.demo
from pathlib import Path
from tasks.config import validate_config
from tasks.evaluation.stage import validation_job, validation_key
from tasks.features.params import backbone_digest, feature_params
from tasks.model.bundle import model_json
from tasks.model.config import TrainFlowConfig
from tasks.model.stage import backbone_key, bundle_key, fit_key
cfg = validate_config(TrainFlowConfig, {{"datamodule": {{"data_path": {str(demo_patch_dataset)!r}}},
                                        "backbone": {{"name": "mobilenet_v2", "weights": None}}}})
w = backbone_digest(cfg)
feature_params(cfg, w)
fk = fit_key(cfg, ["a", "b"])
bundle_key(cfg, fk, backbone_key(cfg, w), w)
model_json(cfg, w)
validation_job(cfg, "c.skops", "store")
validation_key(cfg, fk, "store")
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr[-3000:]
    # prefect: the flows' own framework; sklearn: the model spec is built when the config is read (issue 14: a model
    # without predict_proba is refused before any run starts). No torch, torchvision, ONNX Runtime or skops.
    assert json.loads(res.stdout.strip().splitlines()[-1]) == ["prefect", "sklearn"]


def test_early_server_only_when_nothing_configures_the_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for key in (*prefect_server.EPHEMERAL_SWITCHES, "PREFECT_PROFILE", "PREFECT_PROFILES_PATH"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    assert not prefect_server._configured_elsewhere()
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert prefect_server._configured_elsewhere()
    monkeypatch.delenv("PREFECT_API_URL")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "profiles.toml").write_text('[profiles.local]\nPREFECT_API_URL = "http://h:4200/api"\n')
    assert prefect_server._configured_elsewhere()
    (tmp_path / "home" / "profiles.toml").unlink()
    (tmp_path / "prefect.toml").write_text("[api]\nurl = 'http://h:4200/api'\n")
    assert prefect_server._configured_elsewhere()
    # in this (pytest) process prefect is imported already: never started from here
    (tmp_path / "prefect.toml").unlink()
    assert "prefect" not in sys.modules or prefect_server.start_early() is None
