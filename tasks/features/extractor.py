"""Backbone architectures and inference: build a frozen backbone (torchvision models, and ``AnySizeViT`` for
DINO's ViT at any input size), preprocess BGR patches into a normalised batch, and run it on a device at fp32
or bf16 (:class:`FeatureExtractor`, with automatic batch-size halving on out-of-memory).

Weights are resolved offline by ``tasks/features/weights.py``; exports live in ``tasks/features/export.py``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks.device import autocast, check_precision, resolve_device
from tasks.features.layers import FINAL, check_pooling, feature_width, is_plain, resolve_layers
from tasks.features.weights import BackboneError, check_name, dino_to_torchvision, resolve_weights
from tasks.imageio import resize_patches

logger = logging.getLogger("patchflow.backbones")

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- models


def _architecture(name: str) -> nn.Module:
    """The untrained architecture (torchvision is imported here only: running an export needs none of it)."""
    if name == "dino_vitb8":
        from tasks.features.vit import AnySizeViT

        return AnySizeViT(image_size=224, patch_size=8, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072)
    from torchvision import models

    return getattr(models, name)(weights=None)


def _strip_head(name: str, model: nn.Module) -> None:
    if name.startswith("resnet"):
        model.fc = nn.Identity()  # forward: ... avgpool -> flatten -> (B, D)
    elif name == "dino_vitb8":
        model.heads = nn.Identity()  # forward returns the normalised CLS token
    else:
        model.classifier = nn.Identity()  # forward: features -> GAP -> flatten -> (B, 1280)


def _load_state(name: str, model: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(
            f"Cannot read weights file {path} for backbone {name!r}; point backbone.weights at a "
            f"PyTorch state dict (.pth) saved for this architecture. Reason: {type(exc).__name__}: {str(exc)[:200]}"
        ) from exc
    if not isinstance(state, Mapping):
        raise BackboneError(
            f"Weights file {path} does not hold a state dict (got {type(state).__name__}); "
            f"it does not fit backbone {name!r}: save model.state_dict() and point backbone.weights "
            "at it."
        )
    if name == "dino_vitb8":
        state = dino_to_torchvision(state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = str(exc).splitlines()
        raise BackboneError(
            f"Weights file {path} does not fit backbone {name!r}; set backbone.name to the "
            "architecture these weights were saved from, or point backbone.weights at a checkpoint "
            f"for {name!r}. Details: {' '.join(d.strip() for d in detail[:3])[:600]}"
        ) from exc


def build_backbone(
    name: str,
    weights: str | os.PathLike[str] | None = "imagenet",
    feature_layers: str | Sequence[str] = FINAL,
    pooling: str = "avg",
) -> nn.Module:
    """A frozen eval-mode module mapping float (B,3,H,W) images to pooled features (B, feature_dim(...)): the
    backbone itself for the reference's vector (``final``, ``avg``), else a :class:`~tasks.features.pooled.
    PooledFeatures` around it (the layers and pooling of ``tasks/features/layers.py``)."""
    check_name(name)
    layers = resolve_layers(name, feature_layers)
    check_pooling(pooling)
    path = resolve_weights(name, weights)
    model = _architecture(name)
    if name == "dino_vitb8":  # DINO checkpoints carry no classification head
        _strip_head(name, model)
    if path is not None:
        _load_state(name, model, path)
    _strip_head(name, model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if is_plain(layers, pooling):
        return model
    from tasks.features.pooled import PooledFeatures

    return PooledFeatures(model, name, layers, pooling).eval()


def inner_backbone(model: nn.Module) -> nn.Module:
    """The architecture's own module inside a :func:`build_backbone` result (its state dict is the weights file's)."""
    from tasks.features.pooled import PooledFeatures

    return model.backbone if isinstance(model, PooledFeatures) else model


def feature_dim(name: str, feature_layers: str | Sequence[str] = FINAL, pooling: str = "avg") -> int:
    """Length of the feature vector produced by backbone `name` with these layers and pooling."""
    return feature_width(check_name(name), feature_layers, pooling)


# --------------------------------------------------------------------------- preprocessing


def preprocess(
    patches: Sequence[np.ndarray],
    size: tuple[int, int] = (224, 224),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """BGR uint8 HxWx3 patches -> normalised RGB float32 batch (B,3,h,w) in channels_last; size is (h, w)."""
    h, w = int(size[0]), int(size[1])
    if not len(patches):
        return torch.empty((0, 3, h, w), dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    batch = torch.from_numpy(resize_patches(patches, (h, w))).flip(-1)  # (B,h,w,3) uint8, BGR -> RGB
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], dtype=torch.float32)
    out = (batch.to(torch.float32) * scale - shift).permute(0, 3, 1, 2)  # NHWC storage == channels_last
    return out.contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------- inference


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
    )


def cpu_has_fast_bf16() -> bool:
    """True when this CPU runs bf16 natively (AMX or AVX512-BF16); elsewhere bf16 autocast is emulated."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap in ("AVX512_BF16", "AMX"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


class FeatureExtractor:
    """Runs a backbone over batches of patches on one device (``task.device``, checked by
    :func:`~tasks.device.resolve_device`: no CPU fallback) at fp32, or fp16/bf16 autocast (fp16: GPU only)."""

    def __init__(
        self,
        model: nn.Module,
        device: str = "cpu",
        precision: str = "fp32",
        batch_size: int = 64,
        automatic_batch_size: bool = False,
    ) -> None:
        if int(batch_size) < 1:
            raise BackboneError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        check_precision(precision, self.device.type)
        # an ONNX Runtime backbone (tasks/features/export.py) takes host tensors and runs where its session runs
        self.host = torch.device("cpu") if getattr(model, "onnx_session", False) else self.device
        self.precision = precision
        self.batch_size = int(batch_size)
        self.automatic_batch_size = bool(automatic_batch_size)
        self.model = model.to(self.host, memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
        if precision == "bf16" and self.device.type == "cpu" and not cpu_has_fast_bf16():
            logger.warning(
                "precision bf16 on a CPU without AMX/AVX512-BF16 (%s) is emulated and much slower than fp32; "
                "use task.precision=fp32 here",
                torch.backends.cpu.get_cpu_capability(),
            )

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        """Features (B, D) float32 for an already preprocessed batch."""
        x = batch.to(self.host, memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.host, self.precision):
            out = self.model(x)
        return out.float().cpu().numpy()

    def extract(
        self,
        patches: Sequence[np.ndarray],
        size: tuple[int, int] = (224, 224),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> np.ndarray:
        """Features (N, D) float32 for raw BGR patches, processed in chunks of self.batch_size."""
        outputs: list[np.ndarray] = []
        start, n = 0, len(patches)
        while start < n:
            chunk = patches[start : start + self.batch_size]
            try:
                outputs.append(self(preprocess(chunk, size, mean, std)))
            except Exception as exc:
                if not (self.automatic_batch_size and _is_oom(exc)) or len(chunk) <= 1:
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.batch_size = max(1, len(chunk) // 2)
                continue
            start += len(chunk)
        if not outputs:
            return np.empty((0, 0), dtype=np.float32)
        return np.concatenate(outputs, axis=0)
