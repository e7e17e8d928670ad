"""Any ONNX image model: a spec built from the file and the flags (--input-size, --preprocess, --layout, --output),
validated on load with one-line errors, and kept in the output's marker so later commands read it back."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import numpy as np

from fruitpipe.errors import ModelError
from fruitpipe.images import LAYOUTS, PREPROCESS
from fruitpipe.models.fetch import ResolvedModel, resolve_model
from fruitpipe.models.registry import CUSTOM, ModelSpec, get_spec

#: The fields of a custom spec stored in the output's marker and run.json (`model_spec`).
SPEC_FIELDS = ("filename", "sha256", "dim", "input_size", "input_name", "output_name", "preprocess", "layout")


def _static(dim: Any) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def inspect(path: str, sha256: str, input_size: int | None, preprocess: str | None, layout: str | None,
            output: str | None) -> ModelSpec:
    """Load `path` with onnxruntime and build its spec: one image input of rank 4 with 3 channels where `layout`
    puts them, spatial size `input_size` (default: the model's own if fixed, else 224), output `output` (default: its
    only output) giving one vector per image, checked on a blank image. ModelError says what to change."""
    import onnxruntime as ort

    where = f"--model-path {path}"
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    try:
        session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"{where} is not a loadable ONNX model ({type(exc).__name__}): point it at a .onnx "
                         "file") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise ModelError(f"{where} has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}): an image model "
                         "with one image input is needed")
    shape = list(inputs[0].shape)
    if len(shape) != 4:
        raise ModelError(f"{where}: input {inputs[0].name!r} has rank {len(shape)} {shape}, expected 4 (a batch of "
                         "images, NHWC or NCHW)")
    if layout is None:  # from the shape when it says it, else the house default
        layout = "nchw" if _static(shape[1]) == 3 and _static(shape[3]) != 3 else "nhwc"
    if layout not in LAYOUTS:
        raise ModelError(f"--layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    channels, spatial = (shape[1], shape[2:4]) if layout == "nchw" else (shape[3], shape[1:3])
    if _static(channels) not in (None, 3):
        other = "nhwc" if layout == "nchw" else "nchw"
        raise ModelError(f"{where}: with --layout {layout} the input {shape} has {channels} channels, not 3: use "
                         f"--layout {other}")
    fixed = [_static(d) for d in spatial]
    size = input_size or fixed[0] or fixed[1] or 224
    if any(d is not None and d != size for d in fixed):
        raise ModelError(f"{where}: the input is {shape} ({layout}) and takes {fixed[0]}x{fixed[1]} images, not "
                         f"{size}x{size}: use --input-size {fixed[0] or fixed[1]}")
    names = [o.name for o in outputs]
    output = output or (names[0] if len(names) == 1 else None)
    if output is None or output not in names:
        hint = f" ({output!r} is not one)" if output else ""
        raise ModelError(f"{where}: choose the embedding output with --output, one of {', '.join(names)}{hint}")
    preprocess = preprocess or "tf"
    if preprocess not in PREPROCESS:
        raise ModelError(f"--preprocess {preprocess!r} is not one of {', '.join(PREPROCESS)}")
    blank = np.zeros((1, 3, size, size) if layout == "nchw" else (1, size, size, 3), np.float32)
    try:
        (out,) = session.run([output], {inputs[0].name: blank})
    except Exception as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise ModelError(f"{where} fails on a {size}x{size} {layout} image ({type(exc).__name__}: {first}): check "
                         "--input-size and --layout") from None
    out = np.asarray(out)
    if out.ndim == 4 and out.shape[2:] != (1, 1) and out.shape[1:3] != (1, 1):
        raise ModelError(f"{where}: output {output!r} has shape {list(out.shape)}, a feature map, not one vector per "
                         "image: export the model with its global pooling, or pick the pooled output with --output")
    dim = int(out.reshape(1, -1).shape[1])
    return ModelSpec(name=CUSTOM, filename=os.path.basename(path), sha256=sha256, size_bytes=os.path.getsize(path),
                     dim=dim, input_size=size, input_name=inputs[0].name, output_name=output, preprocess=preprocess,
                     layout=layout)


def resolve_custom(model_path: str | None, input_size: int | None, preprocess: str | None, layout: str | None,
                   output: str | None) -> ResolvedModel:
    """The file of --model-path (local, or s3:// copied into the cache) and its validated spec."""
    if not model_path:
        raise ModelError("--input-size, --preprocess, --layout and --output describe a model file: add --model-path "
                         "FILE.onnx")
    provisional = ModelSpec(name=CUSTOM, filename=model_path.rstrip("/").rsplit("/", 1)[-1] or "model.onnx",
                            sha256="", size_bytes=0, dim=0)
    found = resolve_model(provisional, model_path)
    spec = inspect(found.path, found.sha256, input_size, preprocess, layout, output)
    return ResolvedModel(spec, found.path, found.sha256, found.source)


def spec_record(spec: ModelSpec) -> dict[str, Any]:
    """What an output keeps of a custom spec (marker and run.json)."""
    d = asdict(spec)
    return {k: d[k] for k in SPEC_FIELDS}


def spec_of(model: dict[str, Any]) -> ModelSpec:
    """The spec an output was embedded with, from its marker or run.json's `model`: a registered name, or a custom
    model's stored `model_spec`."""
    name = model.get("model") or model.get("name")
    if name == CUSTOM:
        stored = model.get("model_spec") or model.get("spec")
        if not isinstance(stored, dict):
            raise ModelError("the output was embedded with a custom model but does not record its spec: re-run "
                             "`fruitpipe embed` with --overwrite")
        return ModelSpec(name=CUSTOM, size_bytes=0, **{k: stored[k] for k in SPEC_FIELDS})
    return get_spec(str(name))
