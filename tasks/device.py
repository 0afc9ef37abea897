"""Where models run, checked in one place: ``task.device`` (``cpu``, ``cuda`` or ``cuda:N``, as the reference's
configs write it, e.g. ``cuda:2``) and ``task.precision`` (``fp32``, ``fp16``, ``bf16``).

- :data:`Device`: the config field type (spelling checked when a config is read, no torch imported);
- :func:`resolve_device`: the torch device, refused in one line naming the key when the machine lacks it (no CUDA,
  or ``cuda:N`` with N at or above the device count); nothing ever falls back to the CPU silently;
- :func:`check_precision`: fp16 on the CPU is refused (see its docstring); :func:`autocast` applies a precision;
- :func:`onnx_providers` / :func:`check_onnx_session`: ONNX Runtime on the requested device (CUDA provider of
  ``onnxruntime-gpu``), else one clear line;
- :func:`check_config_devices`: every ``device`` key of a flow config resolved (the command line calls it before
  Prefect starts, the flows again for runs that do not come from the command line).

Feature extraction (:class:`~tasks.features.extractor.FeatureExtractor`), the bundle's backbone (evaluation,
predict, the Predictor: :class:`~tasks.evaluation.inferer.BundleModel`) and ONNX sessions all go through here.
"""

from __future__ import annotations

import re
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, BaseModel

from tasks.config import ConfigError

if TYPE_CHECKING:
    import torch

PRECISIONS = ("fp32", "fp16", "bf16")
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")
_SPELLING = "use cpu, cuda or cuda:N (N: the GPU's index, e.g. cuda:2)"


def device_name(value: Any) -> str:
    """``value`` as a device name (``cpu``, ``cuda``, ``cuda:N``; case and spaces ignored), else ValueError."""
    text = str(value).strip().lower()
    if not _DEVICE.fullmatch(text):
        raise ValueError(_SPELLING)
    return text


#: a config's device field: spelling checked on load, availability by :func:`resolve_device` where it is used
Device = Annotated[str, AfterValidator(device_name)]


def _name(value: Any, key: str) -> str:
    try:
        return device_name(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r} is not a device; {_SPELLING}") from None


def resolve_device(value: Any, key: str = "task.device") -> torch.device:
    """The torch device named by ``value``; a :class:`ConfigError` naming ``key`` when this machine has no CUDA device
    or fewer than N+1 of them (never a CPU fallback). ``cpu`` is always there."""
    import torch

    text = _name(value, key)
    dev = torch.device(text)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(
            f"{key}={text}: no CUDA device is available on this machine (torch {torch.__version__}, {build}); "
            f"set {key}=cpu or run on a machine with a GPU"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ConfigError(
            f"{key}={text}: this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1}); "
            f"set {key} to one of them"
        )
    return dev


def check_precision(precision: str, device: str, key: str = "task.precision", device_key: str = "task.device") -> str:
    """``precision`` when it can run on ``device``. fp16 on the CPU is refused rather than ignored: CPU half
    autocast is emulated on most CPUs (slower than fp32) and its features differ from fp32's, and ignoring it would
    label fp32 features as fp16 in their store keys; bf16 is the CPU's reduced precision (fast on AMX CPUs)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{key}={precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and _name(device, device_key) == "cpu":
        raise ConfigError(
            f"{key}=fp16 needs a GPU ({device_key}=cpu): half-precision autocast on the CPU is slow emulation; "
            f"use {key}=fp32 or bf16 on the CPU, or {device_key}=cuda"
        )
    return precision


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """torch autocast to the precision's type on ``device`` (nothing for fp32)."""
    import torch

    if precision == "fp32":
        return nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def onnx_providers(device: Any, key: str = "task.device") -> list[Any]:
    """ONNX Runtime execution providers for ``device``: the CPU's, or CUDA's on GPU N (its CPU provider kept only for
    the few operators CUDA lacks, as ONNX Runtime does); a :class:`ConfigError` naming ``key`` when this ONNX Runtime
    has no CUDA provider (the ``onnxruntime`` package instead of ``onnxruntime-gpu``)."""
    text = _name(device, key)
    if text == "cpu":
        return ["CPUExecutionProvider"]
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ConfigError(
            f"{key}={text}: ONNX Runtime {ort.__version__} here has no CUDAExecutionProvider; install onnxruntime-gpu "
            f"(instead of onnxruntime) to run ONNX models on the GPU, set task.runtime=torch, or set {key}=cpu"
        )
    index = int(text.partition(":")[2] or 0)
    return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]


def check_onnx_session(session: Any, device: Any, key: str = "task.device") -> Any:
    """``session`` when it runs on ``device``: ONNX Runtime falls back to the CPU when its CUDA provider cannot start
    (no driver, missing cuDNN); that is refused here in one line instead."""
    if _name(device, key) != "cpu" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise ConfigError(
            f"{key}={device}: ONNX Runtime could not start its CUDA provider (providers: {session.get_providers()}); "
            "check the CUDA driver and cuDNN that onnxruntime-gpu needs, or set task.runtime=torch"
        )
    return session


def config_devices(cfg: BaseModel, prefix: str = "") -> dict[str, str]:
    """Every ``device`` key of a config (dotted key -> value), nested sections included."""
    found: dict[str, str] = {}
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if name == "device" and isinstance(value, str):
            found[prefix + name] = value
        elif isinstance(value, BaseModel):
            found |= config_devices(value, f"{prefix}{name}.")
    return found


def check_config_devices(cfg: Any, keys: dict[str, str] | None = None) -> None:
    """Resolve every device of a flow config (:func:`config_devices`); torch is imported only for a GPU.
    ``keys`` renames keys for the message (e.g. ``{"device": "--device"}`` for flows.predict)."""
    if not isinstance(cfg, BaseModel):
        return
    for key, value in config_devices(cfg).items():
        if value != "cpu":
            resolve_device(value, (keys or {}).get(key, key))
