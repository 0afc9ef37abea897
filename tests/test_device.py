"""task.device / task.precision (tasks/device.py): parsing, the one-line error on a machine without the GPU asked for
(this test machine has no CUDA device: the GPU branches are skipped there), fp16 on the CPU refused, the CPU path
unchanged, and ONNX Runtime providers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tasks.config import ConfigError, validate_config
from tasks.device import (
    check_config_devices,
    check_precision,
    config_devices,
    device_name,
    onnx_providers,
    resolve_device,
)
from tasks.model.config import TrainFlowConfig

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()


def _train(**task: object) -> TrainFlowConfig:
    return validate_config(TrainFlowConfig, {"datamodule": {"data_path": "x"}, "task": task})


@pytest.mark.parametrize("text,name", [("cpu", "cpu"), ("cuda", "cuda"), ("cuda:2", "cuda:2"), (" CUDA:1 ", "cuda:1")])
def test_device_names(text: str, name: str) -> None:
    assert device_name(text) == name
    assert _train(device=text).task.device == name


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:-1", "tpu", "cuda:0,1", "mps"])
def test_bad_device_names_are_config_errors_naming_the_key(text: str) -> None:
    with pytest.raises(ConfigError, match=r"'task\.device'.*cpu, cuda or cuda:N"):
        _train(device=text)
    with pytest.raises(ConfigError, match=r"^task\.device=.* is not a device; use cpu, cuda or cuda:N"):
        resolve_device(text)


def test_every_flow_config_types_its_device() -> None:
    from tasks.evaluation.config import EvaluateFlowConfig
    from tasks.predict.config import PredictFlowConfig
    from tasks.retrain_config import RetrainFlowConfig

    ev = {"datamodule": {"data_path": "x"}, "task": {"model_path": "m", "device": "gpu"}}
    with pytest.raises(ConfigError, match=r"'task\.device'"):
        validate_config(EvaluateFlowConfig, ev)
    with pytest.raises(ConfigError, match=r"'device'"):
        validate_config(PredictFlowConfig, {"model": "m", "images": "i", "out": "o", "device": "cuda:x"})
    data = {"images": "i", "masks": "m", "class_to_idx": {"good": 0, "bad": 1}}
    retrain = {"data": data, "dataset": {"patch_size": [8, 8]}, "train": {"task": {"device": "cuda:3"}}}
    cfg = validate_config(RetrainFlowConfig, retrain)
    assert config_devices(cfg) == {"train.task.device": "cuda:3"}


def test_cpu_resolves_and_checks_without_a_gpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    check_config_devices(_train())  # nothing to check on the CPU
    assert check_precision("bf16", "cpu") == "bf16"


def test_fp16_on_the_cpu_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        _train(precision="fp16")
    assert "task.precision=fp16 needs a GPU (task.device=cpu)" in str(err.value)
    assert _train(precision="fp16", device="cuda:2").task.precision == "fp16"  # spelling only: no GPU asked here
    with pytest.raises(ConfigError, match="runs at task.precision=fp32 only"):
        from tasks.features.params import feature_runtime

        feature_runtime(_train(precision="fp16", device="cuda", runtime="onnxruntime"))


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA device")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:2"])
def test_missing_gpu_is_one_line_naming_the_key(device: str) -> None:
    from tasks.features.extractor import FeatureExtractor

    for fn in (
        lambda: resolve_device(device, "task.device"),
        lambda: check_config_devices(_train(device=device)),
        lambda: FeatureExtractor(nn.Identity(), device),  # feature extraction: never a CPU fallback
    ):
        with pytest.raises(ConfigError) as err:
            fn()
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(f"task.device={device}: no CUDA device is available")
        assert "set task.device=cpu" in msg


@pytest.mark.skipif(NO_CUDA, reason="no CUDA device on this machine")
def test_gpu_index_beyond_the_device_count_is_refused() -> None:  # pragma: no cover (GPU machines)
    n = torch.cuda.device_count()
    assert resolve_device(f"cuda:{n - 1}").index == n - 1
    with pytest.raises(ConfigError, match=rf"task\.device=cuda:{n}: this machine has {n} CUDA device"):
        resolve_device(f"cuda:{n}")


def test_cpu_extraction_keeps_working_at_fp32_and_bf16() -> None:
    from tasks.features.extractor import FeatureExtractor

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    patches = [np.full((16, 16, 3), v, np.uint8) for v in (0, 127, 255)]
    fp32 = FeatureExtractor(model, "cpu").extract(patches, size=(16, 16))
    bf16 = FeatureExtractor(model, "cpu", "bf16").extract(patches, size=(16, 16))
    assert fp32.shape == bf16.shape == (3, 4) and fp32.dtype == bf16.dtype == np.float32
    np.testing.assert_allclose(bf16, fp32, atol=0.05)


def test_onnx_providers() -> None:
    ort = pytest.importorskip("onnxruntime")
    assert onnx_providers("cpu") == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():  # pragma: no cover (onnxruntime-gpu)
        assert onnx_providers("cuda:1")[0] == ("CUDAExecutionProvider", {"device_id": 1})
    else:
        with pytest.raises(ConfigError, match=r"^task\.device=cuda:1: ONNX Runtime .* install onnxruntime-gpu"):
            onnx_providers("cuda:1")


@pytest.mark.slow
@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA device")
@pytest.mark.parametrize(
    "args,line",
    [
        (["-m", "flows.train", "datamodule.data_path=x", "task.device=cuda:2"], "error: task.device=cuda:2: no CUDA"),
        (
            ["-m", "flows.predict", "--model", "m", "--images", "i", "--out", "o", "--device", "cuda"],
            "error: --device=cuda:",
        ),
    ],
)
def test_cli_refuses_a_missing_gpu_in_one_line_before_prefect(args: list[str], line: str, tmp_path: Path) -> None:
    (tmp_path / "i").mkdir()
    res = subprocess.run(
        [sys.executable, *args],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and res.stderr.startswith(line), res.stderr
    assert "Starting temporary server" not in res.stdout + res.stderr
