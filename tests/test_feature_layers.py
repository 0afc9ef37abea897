"""Multi-scale pooled features (``backbone.feature_layers``, ``backbone.pooling``): layer names per backbone, the
feature width, the module's output against the plain backbone, and its TorchScript/ONNX exports."""

from __future__ import annotations

import pytest
import torch

from tasks.features import export, extractor
from tasks.features.layers import LAYER_WIDTHS, feature_width, resolve_layers
from tasks.features.pooled import PooledFeatures
from tasks.features.weights import SUPPORTED_BACKBONES, BackboneError

#: multiscale width per backbone: stride-8 + stride-16 + final for CNNs, mean patch token + CLS for DINO
MULTISCALE_WIDTH = {
    "resnet18": 128 + 256 + 512,
    "resnet50": 512 + 1024 + 2048,
    "mobilenet_v2": 32 + 96 + 1280,
    "efficientnet_b0": 40 + 112 + 1280,
    "dino_vitb8": 768 + 768,
}


def test_layer_names_synonyms_and_errors() -> None:
    assert resolve_layers("mobilenet_v2", "final") == ("final",)
    assert resolve_layers("mobilenet_v2", "multiscale") == ("stride8", "stride16", "final")
    assert resolve_layers("resnet50", ["final", "layer2"]) == ("stride8", "final")  # depth order, synonyms
    assert resolve_layers("dino_vitb8", ["block12", "block3", "tokens"]) == ("block3", "tokens", "final")
    assert resolve_layers("dino_vitb8", "multiscale") == ("tokens", "final")
    with pytest.raises(BackboneError, match="stride64.*stride4, stride8"):
        resolve_layers("efficientnet_b0", ["stride64"])
    with pytest.raises(BackboneError, match="twice"):
        resolve_layers("resnet18", ["layer4", "stride32"])
    with pytest.raises(BackboneError, match="empty"):
        resolve_layers("resnet18", [])
    assert feature_width("mobilenet_v2", ["stride8"], "avg+max") == 64
    assert feature_width("dino_vitb8", ["block6", "tokens"], "avg+max") == 768 + 2 * 768  # a CLS token is not pooled


def test_unknown_layer_is_refused_when_the_config_is_read() -> None:
    from pydantic import ValidationError

    from tasks.model.config import TrainFlowConfig

    cfg = {"datamodule": {"data_path": "x"}, "backbone": {"name": "resnet18", "feature_layers": ["stride8", "x"]}}
    with pytest.raises(ValidationError, match="not a layer of resnet18"):
        TrainFlowConfig.model_validate(cfg)
    cfg["backbone"] = {"name": "resnet18", "pooling": "max"}
    with pytest.raises(ValidationError, match="pooling"):
        TrainFlowConfig.model_validate(cfg)


@pytest.mark.parametrize("name", SUPPORTED_BACKBONES)
def test_width_and_final_part_for_every_backbone(name: str) -> None:
    """The multiscale vector has the documented width; its last part is the plain backbone's vector; final + avg is
    the plain backbone itself."""
    torch.manual_seed(0)
    plain = extractor.build_backbone(name, None)
    assert not isinstance(plain, PooledFeatures)
    multi = PooledFeatures(plain, name, resolve_layers(name, "multiscale"), "avg")
    both = PooledFeatures(plain, name, resolve_layers(name, "multiscale"), "avg+max")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        ref, got, got2 = plain(x), multi(x), both(x)
    assert got.shape == (2, MULTISCALE_WIDTH[name]) == (2, extractor.feature_dim(name, "multiscale"))
    assert got2.shape == (2, extractor.feature_dim(name, "multiscale", "avg+max"))
    torch.testing.assert_close(got[:, -ref.shape[1] :], ref, rtol=0, atol=1e-6)
    first = LAYER_WIDTHS[name][resolve_layers(name, "multiscale")[0]]  # its average leads the avg+max vector too
    torch.testing.assert_close(got2[:, :first], got[:, :first], rtol=0, atol=0)


@pytest.mark.slow  # exports (ViT-B among them)
@pytest.mark.parametrize(
    ("name", "weights", "layers"),
    [
        ("mobilenet_v2", "imagenet", "multiscale"),
        ("efficientnet_b0", None, ["stride4", "stride32"]),
        ("resnet18", None, "multiscale"),
        ("dino_vitb8", None, ["block4", "tokens", "final"]),
    ],
)
def test_multiscale_module_exports_to_torchscript_and_onnx(tmp_path, name, weights, layers) -> None:
    """The module is the backbone for every consumer: TorchScript and ONNX give the eager features (another batch
    size than the trace's)."""
    torch.manual_seed(1)
    model = extractor.build_backbone(name, weights, layers, "avg+max")
    assert isinstance(model, PooledFeatures)
    size = (32, 48)
    export.export_torchscript(model, tmp_path / "m.pt", size)
    export.export_onnx(model, tmp_path / "m.onnx", size)
    x = torch.randn(3, 3, *size)
    with torch.inference_mode():
        ref = model(x)
        torch.testing.assert_close(export.load_torchscript(tmp_path / "m.pt")(x), ref, rtol=1e-5, atol=1e-5)
    assert ref.shape[1] == extractor.feature_dim(name, layers, "avg+max")
    torch.testing.assert_close(export.OnnxBackbone(tmp_path / "m.onnx")(x), ref, rtol=1e-4, atol=1e-4)
