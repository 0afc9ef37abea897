"""Configuration of the predict flow: bundle, images folder, output folder, method and limits."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictInt

from tasks.config import StrictModel
from tasks.device import Device


class PredictFlowConfig(StrictModel):
    """Configuration of the predict flow."""

    model: str = Field(description="deployment_model/ folder or any file in it")
    images: str = Field(description="Folder of images (searched recursively)")
    out: str = Field(description="Output folder for class maps, polygons and overlays")
    method: Literal["major_voting", "priority", "soft"] | None = Field(None, description="Default: the bundle's")
    batch_size: StrictInt = Field(
        32,
        ge=1,
        description="Patches per forward; 32 keeps the peak memory of a CPU "
        "forward about 350 MB lower than 64 at the same speed",
    )
    device: Device = Field("cpu", description="cpu, cuda or cuda:N; never a CPU fallback")
    storage_root: str | None = None
    force: bool = False
    max_image_pixels: StrictInt | None = Field(
        None,
        ge=1,
        description="Refuse larger images (pixels, from the header) before decoding; "
        "None: $PATCHFLOW_MAX_IMAGE_PIXELS, else 200000000",
    )
    trust_pickle: bool = Field(
        False,
        description="Load a bundle without a manifest (hand-made, Quadra's) or with a pickled "
        "classifier.joblib; a pickle runs any code it holds: only for bundles whose source "
        "you trust",
    )
