"""Which backbone outputs make the feature vector: the layer names of each backbone, what ``multiscale`` picks,
and the resulting feature width (``backbone.feature_layers`` and ``backbone.pooling``).

Plain functions (no torch): the config validates names here, the content keys and ``model.json`` record the
resolved list, and ``tasks/features/pooled.py`` builds the module that computes the vector.

Layer names (in depth order):

- resnet18/resnet50: ``stride4``, ``stride8``, ``stride16``, ``stride32`` = the outputs of ``layer1`` ..
  ``layer4`` (``layer1`` .. ``layer4`` are accepted as synonyms), ``final`` = the global-average-pooled
  ``layer4`` output (the reference's vector);
- mobilenet_v2 / efficientnet_b0: ``stride4`` .. ``stride32`` = the last block output at that stride
  (mobilenet_v2: 24/32/96/320 channels, ``features[3/6/13/17]``; efficientnet_b0: 24/40/112/320 channels,
  ``features[2/3/5/7]``), ``final`` = the pooled 1280-channel head (the reference's vector);
- dino_vitb8: ``block1`` .. ``block12`` = the CLS token after that transformer block (through the final
  LayerNorm, as DINO's ``get_intermediate_layers``), ``tokens`` = the patch tokens of the last block (pooled),
  ``final`` = the last block's CLS token (the reference's vector, same as ``block12``).

Pooling: a feature map (CNN layers, ViT ``tokens``) is reduced by global average (``avg``) or by global average
and global max concatenated (``avg+max``, twice the width); a ViT CLS token is taken as it is.
``multiscale``: the stride-8 and stride-16 maps plus ``final`` for CNNs; ``tokens`` plus ``final`` for
dino_vitb8 (DINO's own linear-evaluation recipe for ViT-B).
"""

from __future__ import annotations

from collections.abc import Sequence

from tasks.features.weights import BackboneError, check_name

FINAL = "final"
MULTISCALE = "multiscale"
POOLINGS = ("avg", "avg+max")
_CNN = ("stride4", "stride8", "stride16", "stride32", FINAL)

#: channels of every layer, in depth order
LAYER_WIDTHS: dict[str, dict[str, int]] = {
    "resnet18": dict(zip(_CNN, (64, 128, 256, 512, 512))),
    "resnet50": dict(zip(_CNN, (256, 512, 1024, 2048, 2048))),
    "mobilenet_v2": dict(zip(_CNN, (24, 32, 96, 320, 1280))),
    "efficientnet_b0": dict(zip(_CNN, (24, 40, 112, 320, 1280))),
    "dino_vitb8": {**{f"block{i}": 768 for i in range(1, 12)}, "tokens": 768, FINAL: 768},
}
_MULTISCALE: dict[str, tuple[str, ...]] = {
    "dino_vitb8": ("tokens", FINAL),
    **dict.fromkeys(("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0"), ("stride8", "stride16", FINAL)),
}
_SYNONYMS: dict[str, dict[str, str]] = {
    "resnet18": {f"layer{i}": s for i, s in enumerate(_CNN[:4], start=1)},
    "resnet50": {f"layer{i}": s for i, s in enumerate(_CNN[:4], start=1)},
    "dino_vitb8": {"block12": FINAL},
}


def is_map(backbone: str, layer: str) -> bool:
    """True when ``layer`` is a feature map (pooled), False for a ViT CLS token (taken as it is)."""
    return backbone != "dino_vitb8" or layer == "tokens"


def resolve_layers(backbone: str, spec: str | Sequence[str]) -> tuple[str, ...]:
    """The layer names of ``spec`` (``"final"``, ``"multiscale"`` or a list of names) for ``backbone``, canonical
    (synonyms replaced) and in depth order; :class:`BackboneError` names an unknown or repeated layer."""
    check_name(backbone)
    if isinstance(spec, str):
        if spec == FINAL:
            return (FINAL,)
        if spec == MULTISCALE:
            return _MULTISCALE[backbone]
        spec = [spec]
    widths, synonyms = LAYER_WIDTHS[backbone], _SYNONYMS.get(backbone, {})
    names = [synonyms.get(str(s), str(s)) for s in spec]
    unknown = [s for s, n in zip(spec, names) if n not in widths]
    if unknown or not names:
        valid = ", ".join([*widths, *synonyms])
        raise BackboneError(
            f"backbone.feature_layers: {unknown or 'an empty list'} is not a layer of {backbone}; use "
            f"'{FINAL}', '{MULTISCALE}' or a list of: {valid}"
        )
    if len(set(names)) < len(names):
        raise BackboneError(f"backbone.feature_layers {list(spec)} names a layer twice (synonyms: {synonyms})")
    order = list(widths)
    return tuple(sorted(names, key=order.index))


def check_pooling(pooling: str) -> str:
    """``pooling`` when it is supported, else :class:`BackboneError`."""
    if pooling not in POOLINGS:
        raise BackboneError(f"backbone.pooling {pooling!r} is not supported; use one of {', '.join(POOLINGS)}")
    return pooling


def is_plain(layers: Sequence[str], pooling: str) -> bool:
    """True for the reference's vector (``final`` with average pooling): the backbone module as it is."""
    return tuple(layers) == (FINAL,) and pooling == "avg"


def layer_width(backbone: str, layer: str, pooling: str) -> int:
    """Width one layer contributes to the feature vector."""
    width = LAYER_WIDTHS[backbone][layer]
    return 2 * width if pooling == "avg+max" and is_map(backbone, layer) else width


def feature_width(backbone: str, spec: str | Sequence[str] = FINAL, pooling: str = "avg") -> int:
    """Length of the feature vector of ``backbone`` with these layers and pooling."""
    check_pooling(pooling)
    return sum(layer_width(backbone, layer, pooling) for layer in resolve_layers(backbone, spec))
