"""--precision int8: static QDQ quantization (onnxruntime, per-channel) calibrated on the input's Training images."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fruitpipe import images, storage
from fruitpipe.errors import ModelError
from fruitpipe.models.fetch import ResolvedModel, cache_bytes

if TYPE_CHECKING:
    from fruitpipe.storage import StorageOptions

log = logging.getLogger(__name__)

#: Calibration images (evenly spaced over the sorted Training uris). 200 gave a linear probe's Test accuracy
#: 0.23 point below float32 on the shared sample (98.48 % against 98.71 %; bench/int8.py).
CALIBRATION_IMAGES = 200
MIN_CALIBRATION_IMAGES = 16
_BATCH = 16


def calibration_uris(manifest: pa.Table, n: int = CALIBRATION_IMAGES) -> list[str]:
    """Up to n uris of the Training split (all splits if there is none), evenly spaced in uri order."""
    training = manifest.filter(pc.equal(manifest.column("split"), "Training"))
    rows = training if training.num_rows else manifest
    uris = sorted(rows.column("uri").to_pylist())
    if len(uris) <= n:
        return uris
    step = len(uris) / n
    return [uris[int(i * step)] for i in range(n)]


class _Reader:
    """onnxruntime CalibrationDataReader over preprocessed batches."""

    def __init__(self, batches: Iterator[np.ndarray], input_name: str) -> None:
        self._batches, self._name = batches, input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._name: batch}


def quantize_int8(fp32_path: str, calibration: np.ndarray, input_name: str, dest: str) -> None:
    """Write an int8 QDQ model of `fp32_path` to `dest`: weights int8 per channel, activations uint8 (MinMax)."""
    try:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ModelError("--precision int8 needs the onnx package: pip install 'fruitpipe[int8]'") from None
    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        quant_pre_process(fp32_path, pre)  # shape inference and graph clean-up, as onnxruntime recommends
        batches = (calibration[i:i + _BATCH] for i in range(0, len(calibration), _BATCH))
        quantize_static(pre, dest, _Reader(batches, input_name), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def output_int8_model(model: ResolvedModel, manifest: pa.Table, out: str, opts: "StorageOptions",
                      max_pixels: int) -> ResolvedModel:
    """The int8 model of OUTPUT: made on its first int8 run and kept in OUTPUT/model/, so every later
    (incremental) run embeds with exactly the same weights."""
    spec = model.spec
    name = spec.filename.replace(".onnx", ".int8.onnx")
    uri = storage.join(out, "model", name)
    if storage.exists(uri, opts):
        data = storage.read_bytes(uri, opts)
        meta = json.loads(storage.read_bytes(storage.join(out, "model", "int8.json"), opts))
        if meta["fp32_sha256"] != model.sha256:
            raise ModelError(f"{uri} was quantized from another float model ({meta['fp32_sha256'][:12]}): "
                             "use a new OUTPUT")
        log.info("int8 model of this output reused: %s", uri)
    else:
        uris = calibration_uris(manifest)
        arrays = []
        for u in uris:
            try:
                arrays.append(images.model_input(storage.read_bytes(u, opts), spec.input_size, max_pixels))
            except (images.Rejected, OSError) as exc:
                log.debug("calibration skips %s: %s", u, exc)
        if len(arrays) < MIN_CALIBRATION_IMAGES:
            raise ModelError(f"--precision int8 needs at least {MIN_CALIBRATION_IMAGES} readable images to calibrate "
                             f"on, found {len(arrays)}: use --precision fp32 for so small an input")
        log.info("quantizing %s to int8, calibrated on %d Training image(s)", spec.name, len(arrays))
        with tempfile.TemporaryDirectory() as tmp:
            dest = os.path.join(tmp, name)
            quantize_int8(model.path, np.stack(arrays), spec.input_name, dest)
            data = Path(dest).read_bytes()
        meta = {"fp32_sha256": model.sha256, "calibration_images": len(arrays), "method":
                "onnxruntime quantize_static, QDQ, per-channel int8 weights, uint8 activations, MinMax"}
        storage.write_bytes(storage.join(out, "model", "int8.json"), json.dumps(meta, indent=2).encode(), opts)
        storage.write_bytes(uri, data, opts)  # last: its presence means the metadata is there too
    local = cache_bytes(data, name)
    return ResolvedModel(spec, str(local), hashlib.sha256(data).hexdigest(),
                         f"int8 of {model.sha256[:12]} ({model.source})")
