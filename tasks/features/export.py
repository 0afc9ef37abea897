"""Backbone exports for bundles: TorchScript and ONNX files (written through ``storage/writes.py`` so a full
disk is named), loading them back (:func:`load_export`), and :class:`OnnxBackbone`, an exported ONNX backbone
run by ONNX Runtime wherever the torch module is used (:func:`onnx_backbone` exports it once per weights).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from storage.writes import serialise_to
from tasks.features.extractor import build_backbone, inner_backbone, parse_device
from tasks.features.layers import FINAL, is_plain, resolve_layers
from tasks.features.weights import BackboneError, resolve_weights, weights_digest

# --------------------------------------------------------------------------- export


def _export_copy(model: nn.Module, input_size: tuple[int, int]) -> tuple[nn.Module, torch.Tensor]:
    m = copy.deepcopy(model).to("cpu", torch.float32).eval()
    example = torch.zeros((2, 3, int(input_size[0]), int(input_size[1])), dtype=torch.float32)
    return m, example


def export_torchscript(model: nn.Module, path: Path, input_size: tuple[int, int] = (224, 224)) -> Path:
    """Trace the model on CPU/fp32 and save it as TorchScript at `path` (atomic replace; a full disk is named)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m, example = _export_copy(model, input_size)
    with torch.no_grad(), _quiet_tracing():
        traced = torch.jit.trace(m, example, check_trace=False)
        # serialised in memory, then written by Python: torch's own writer reports a full disk without its errno
        return serialise_to(path, lambda fh: torch.jit.save(traced, fh))


def load_torchscript(path: Path, device: str = "cpu") -> torch.jit.ScriptModule:
    """Load a TorchScript backbone onto `device` in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"TorchScript file does not exist: {path}")
    with _quiet_tracing():
        module = torch.jit.load(str(path), map_location=parse_device(device))
    return module.eval()


@contextmanager
def _plain_attention() -> Iterator[None]:
    """Attention as plain ops while exporting: the fused inference kernel (``_native_multi_head_attention``)
    has no ONNX form, so ViT backbones (dino_vitb8) would not export."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


@contextmanager
def _quiet_tracing() -> Iterator[None]:
    """TorchScript and the TorchScript-based ONNX exporter are the formats the reference and its users deploy:
    their deprecation notices are not something a patchflow user can act on, and exports trace one fixed
    input size on purpose (tracer warnings), so both are silenced here (and only here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\..* is deprecated")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*|tasks\.features\.export")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def export_onnx(model: nn.Module, path: Path, input_size: tuple[int, int] = (224, 224)) -> Path:
    """Export the model to ONNX (opset 17, dynamic batch axis) at `path` (atomic replace)."""
    if importlib.util.find_spec("onnx") is None:
        raise BackboneError("ONNX export needs the `onnx` package: pip install onnx")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    m, example = _export_copy(model, input_size)

    def save(fh: Any) -> None:
        with _quiet_tracing(), _plain_attention():  # the TorchScript-based exporter is chosen on purpose
            torch.onnx.export(
                m,
                (example,),
                fh,
                dynamo=False,
                opset_version=17,
                input_names=["images"],
                output_names=["features"],
                dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
            )

    return serialise_to(path, save)  # in memory first: a full disk is named (see export_torchscript)


# --------------------------------------------------------------------------- ONNX Runtime


class OnnxBackbone(nn.Module):
    """An exported ONNX backbone run by ONNX Runtime on the CPU, usable wherever the torch module is."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackboneError(
                "runtime onnxruntime needs the `onnxruntime` package: pip install onnxruntime"
            ) from None
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads or torch.get_num_threads())
        so.inter_op_num_threads = 1
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: arr})[0])


def onnx_backbone(
    name: str,
    weights: str | os.PathLike[str] | None,
    input_size: tuple[int, int],
    cache_dir: Path,
    digest: str | None = None,
    feature_layers: str | Sequence[str] = FINAL,
    pooling: str = "avg",
) -> OnnxBackbone:
    """ONNX Runtime version of :func:`build_backbone`, exported once into ``cache_dir`` (keyed by weights digest,
    feature layers and pooling)."""
    digest = digest or weights_digest(resolve_weights(name, weights), name)
    layers = resolve_layers(name, feature_layers)
    options = "" if is_plain(layers, pooling) else json.dumps([layers, pooling])
    tag = hashlib.sha256((digest + options).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"{name}-{tag}-{input_size[0]}x{input_size[1]}.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(build_backbone(name, weights, layers, pooling), path, input_size)
    return OnnxBackbone(path)


def _exported_config(path: Path, backbone_name: str | None) -> tuple[str, Any, str]:
    """(backbone name, feature layers, pooling) of a ``.pth`` export: its ``model_config.yaml``'s ``name``,
    ``feature_layers`` and ``pooling``, else ``backbone_name`` and the reference's vector (``final``, ``avg``)."""
    cfg_file = path.with_name("model_config.yaml")
    name: str | None = backbone_name
    cfg: Any = {}
    if cfg_file.is_file():
        from tasks.safe_yaml import load

        try:
            cfg = load(cfg_file.read_text(encoding="utf-8"), str(cfg_file)) or {}
        except (OSError, ValueError) as exc:  # YamlError, UnicodeDecodeError
            raise BackboneError(f"{cfg_file} cannot be read ({exc}); export the bundle again") from None
        if not isinstance(cfg, dict):
            raise BackboneError(f"{cfg_file} must hold a mapping with the backbone 'name'; export the bundle again")
        name = cfg.get("name", name)
    if not name:
        raise BackboneError(
            f"{path}: a .pth export needs model_config.yaml (or model.json's backbone) to rebuild the architecture"
        )
    return name, cfg.get("feature_layers", FINAL), str(cfg.get("pooling", "avg"))


def load_export(path: Path, backbone_name: str | None = None) -> nn.Module:
    """A backbone from a bundle export: ``.onnx`` (ONNX Runtime), ``.pt`` (TorchScript) or ``.pth`` (state dict)."""
    path = Path(path)
    if path.suffix == ".onnx":
        return OnnxBackbone(path)
    if path.suffix == ".pt":
        return load_torchscript(path)
    if path.suffix != ".pth":
        raise BackboneError(f"{path}: unsupported backbone export (use model.pt, model.onnx or model.pth)")
    name, layers, pooling = _exported_config(path, backbone_name)
    model = build_backbone(name, None, layers, pooling)
    try:  # saved by patchflow from the built (head-less) architecture: names match as they are
        inner_backbone(model).load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    except Exception as exc:
        raise BackboneError(f"{path} does not fit backbone {name!r}: {str(exc)[:400]}") from exc
    return model.eval()
