"""The backbone module that returns pooled intermediate outputs (``backbone.feature_layers``/``pooling``).

:class:`PooledFeatures` wraps a head-less backbone and returns one vector per image: the layers named in
``tasks/features/layers.py``, each pooled, concatenated in depth order. It is an ordinary module, traced by
TorchScript and exported to ONNX like the plain backbone, so the feature stage (torch or ONNX Runtime), the
bundle's exports and every consumer of a bundle compute the same vector with no code of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from tasks.features.layers import FINAL, is_map

#: where each CNN layer is tapped: index into ``model.features`` (mobilenet/efficientnet) or resnet stage number
_TAPS: dict[str, dict[str, int]] = {
    "mobilenet_v2": {"stride4": 3, "stride8": 6, "stride16": 13, "stride32": 17, FINAL: 18},
    "efficientnet_b0": {"stride4": 2, "stride8": 3, "stride16": 5, "stride32": 7, FINAL: 8},
    "resnet18": {"stride4": 1, "stride8": 2, "stride16": 3, "stride32": 4, FINAL: 4},
    "resnet50": {"stride4": 1, "stride8": 2, "stride16": 3, "stride32": 4, FINAL: 4},
}


class PooledFeatures(nn.Module):
    """``backbone`` (head-less, as :func:`tasks.features.extractor.build_backbone` makes it) returning the pooled
    ``layers`` concatenated: (B, 3, H, W) -> (B, feature_width). Layers past the deepest one asked for are not run."""

    def __init__(self, backbone: nn.Module, arch: str, layers: Sequence[str], pooling: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.arch, self.layers, self.pooling = arch, tuple(layers), pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = self._vit(x) if self.arch == "dino_vitb8" else self._cnn(x)
        return torch.cat([self._pool(name, outputs[name]) for name in self.layers], dim=1)

    def _pool(self, name: str, out: torch.Tensor) -> torch.Tensor:
        if not is_map(self.arch, name):
            return out  # a CLS token
        if out.dim() == 3:  # ViT patch tokens (B, N, C)
            pooled = [out.mean(dim=1)] + ([out.amax(dim=1)] if self.pooling == "avg+max" else [])
        else:
            pooled = [torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)]
            if self.pooling == "avg+max":
                pooled.append(torch.flatten(nn.functional.adaptive_max_pool2d(out, 1), 1))
        return torch.cat(pooled, dim=1) if len(pooled) > 1 else pooled[0]

    def _cnn(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        want = {name: index for name, index in _TAPS[self.arch].items() if name in self.layers}
        m: Any = self.backbone  # the architecture's modules (torchvision's attributes)
        stages: list[Callable[[torch.Tensor], torch.Tensor]]
        if self.arch.startswith("resnet"):
            stages = [lambda t: m.maxpool(m.relu(m.bn1(m.conv1(t)))), m.layer1, m.layer2, m.layer3, m.layer4]
        else:
            stages = list(m.features)
        out: dict[str, torch.Tensor] = {}
        for index, stage in enumerate(stages[: max(want.values()) + 1]):
            x = stage(x)
            out.update({name: x for name, at in want.items() if at == index})
        return out

    def _vit(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        m: Any = self.backbone  # the architecture's modules (torchvision's attributes)
        blocks = {int(n[5:]) for n in self.layers if n.startswith("block")}
        depth = len(m.encoder.layers) if FINAL in self.layers or "tokens" in self.layers else max(blocks)
        x = m.encoder.dropout(m.embed(x))
        out: dict[str, torch.Tensor] = {}
        for index, block in enumerate(list(m.encoder.layers)[:depth], start=1):
            x = block(x)
            if index in blocks:
                out[f"block{index}"] = m.encoder.ln(x)[:, 0]
        if depth == len(m.encoder.layers):
            normed = m.encoder.ln(x)
            out[FINAL], out["tokens"] = normed[:, 0], normed[:, 1:]
        return out
