"""Model registry: name -> spec (file, sha256, pinned URL, input size, output tensor, embedding size)."""

from __future__ import annotations

from dataclasses import dataclass

from fruitpipe.errors import ConfigError

#: Where the project publishes its model files (a release per model set, never a moving "latest").
#: FRUITPIPE_MODEL_BASE_URL overrides it, e.g. for a mirror or the loopback server of the tests.
DEFAULT_BASE_URL = "https://github.com/fruitpipe/fruitpipe/releases/download/models-v1/"


@dataclass(frozen=True)
class ModelSpec:
    """One backbone: how to fetch it, verify it, feed it and read its embedding."""

    name: str
    filename: str
    sha256: str
    size_bytes: int
    dim: int
    input_size: int = 224
    input_name: str = "input"
    output_name: str = "features"
    #: Pixel scaling (images.PREPROCESS): "tf" = pixel / 127.5 - 1 (MODELS.md; every registered model), "torch" =
    #: ImageNet mean/std, "raw" = 0..255.
    preprocess: str = "tf"
    #: Tensor layout of the input: "nhwc" (every registered model) or "nchw" (torchvision exports).
    layout: str = "nhwc"

    def url(self, base_url: str = DEFAULT_BASE_URL) -> str:
        """The pinned download URL of this model's file."""
        return base_url.rstrip("/") + "/" + self.filename


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="mobilenet_v2",
            filename="mobilenet_v2_features.onnx",
            sha256="ad116e43570b0c581f3d87b9b0797648f0920f3a978b9ed3b052533afc91aa04",
            size_bytes=8_872_772,
            dim=1280,
        ),
        ModelSpec(
            name="efficientnet_lite0",
            filename="efficientnet_lite0.onnx",
            sha256="da857609b8664704c49e4d4e2664905bd58808d575ea9579112f0752845d17ba",
            size_bytes=18_550_813,
            dim=1280,
        ),
    )
}


#: Name of a model given by file and flags (--model-path with --input-size/--preprocess/--layout/--output).
CUSTOM = "custom"


def get_spec(name: str) -> ModelSpec:
    """The spec registered under `name`; an unknown name fails with the list of known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}: use --model with one of {', '.join(sorted(REGISTRY))}") from None
