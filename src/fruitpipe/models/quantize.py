"""--precision int8: static QDQ quantization calibrated on the input's Training images, checked against float32
on held-back photos on the CPU at hand, with a fallback order of quantization types chosen by its features."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fruitpipe import images, jsonio, storage
from fruitpipe.errors import ModelError
from fruitpipe.models.fetch import ResolvedModel, cache_bytes

if TYPE_CHECKING:
    from fruitpipe.models.registry import ModelSpec

log = logging.getLogger(__name__)

#: Calibration images (evenly spaced over the sorted Training uris). 200 gave a linear probe's Test accuracy
#: 0.23 point below float32 on the shared sample (98.48 % against 98.71 %; bench/int8.py).
CALIBRATION_IMAGES = 200
#: Training images held back from calibration to check the quantized model against float32 (never calibrated on).
CHECK_IMAGES = 32
MIN_CALIBRATION_IMAGES = 16
#: The agreement an int8 model must reach on the held-back photos, as cosine similarity of its features to the
#: float32 features: on an AVX-512 VNNI CPU U8S8 gave mean 0.958 / min 0.910 on the sample; on an AVX2-only AMD
#: EPYC the same model gave 0.80 / 0.60 (u8s8 saturation), which this refuses. U8U8 (the non-saturating fallback)
#: gave 0.943 on 132 Test photos and 0.941 on the 7 held back by tests/test_int8.py: the bar leaves it room.
MIN_MEAN_COSINE = 0.92
MIN_MIN_COSINE = 0.80
_BATCH = 16

#: (name, activation type, weight type) as onnxruntime.quantization.QuantType names. U8S8 is fastest where the CPU
#: has VNNI (or AMX, or arm64 dot-product) instructions; without them onnxruntime's x86 U8S8 kernel (vpmaddubsw)
#: saturates, so U8U8 and S8S8 come first there. Measured on an AVX-512 VNNI AMD EPYC, 2 threads, batch 32, 132
#: Test photos of the sample: fp32 238.5 img/s; U8S8 543.4 img/s, mean cosine 0.958; U8U8 266.3 img/s, 0.943;
#: S8S8 190.7 img/s (slower than fp32 there), 0.958. (U8S8 with reduce_range: 0.678, refused.)
SCHEMES = {"u8s8": ("QUInt8", "QInt8"), "s8s8": ("QInt8", "QInt8"), "u8u8": ("QUInt8", "QUInt8")}


def cpu_features() -> dict[str, Any]:
    """The CPU facts int8 accuracy and speed depend on: architecture, and the int8 dot-product extensions."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")
    found = sorted(f for f in wanted if f in flags)
    fast_u8s8 = bool({"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"} & flags)
    return {"machine": platform.machine(), "int8_flags": found, "vnni": fast_u8s8}


def scheme_order(cpu: dict[str, Any]) -> list[str]:
    """Quantization schemes to try, best first for this CPU; each is kept only if it passes the check."""
    return ["u8s8", "u8u8", "s8s8"] if cpu["vnni"] else ["u8u8", "s8s8", "u8s8"]


def split_training(manifest: pa.Table, n_cal: int = CALIBRATION_IMAGES,
                   n_check: int = CHECK_IMAGES) -> tuple[list[str], list[str]]:
    """(calibration uris, held-back check uris): disjoint, evenly spaced over the sorted Training uris (all splits
    when there is none); small inputs hold back a fifth for the check."""
    uris = _training_uris(manifest)
    n_check = min(n_check, len(uris) // 5)
    check = _evenly(uris, n_check)
    chosen = set(check)
    return _evenly([u for u in uris if u not in chosen], n_cal), check


def calibration_uris(manifest: pa.Table, n: int = CALIBRATION_IMAGES) -> list[str]:
    """Up to n uris of the Training split (all splits if there is none), evenly spaced in uri order."""
    return _evenly(_training_uris(manifest), n)


def _training_uris(manifest: pa.Table) -> list[str]:
    """The sorted uris of the Training split, or of every row when the input has no split folders."""
    training = manifest.filter(pc.equal(manifest.column("split"), "Training"))
    rows = training if training.num_rows else manifest
    return sorted(rows.column("uri").to_pylist())


def _evenly(uris: list[str], n: int) -> list[str]:
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


def quantize_int8(fp32_path: str, calibration: np.ndarray, input_name: str, dest: str, scheme: str = "u8s8") -> None:
    """Write an int8 QDQ model of `fp32_path` to `dest`: weights per channel, MinMax calibration, `scheme` types."""
    try:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ModelError("--precision int8 needs the onnx package: pip install onnx") from None
    activation, weight = (getattr(QuantType, name) for name in SCHEMES[scheme])
    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        quant_pre_process(fp32_path, pre)  # shape inference and graph clean-up, as onnxruntime recommends
        batches = (calibration[i:i + _BATCH] for i in range(0, len(calibration), _BATCH))
        quantize_static(pre, dest, _Reader(batches, input_name), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=activation, weight_type=weight)


def _features(model: bytes | str, batch: np.ndarray, input_name: str, output_name: str) -> tuple[np.ndarray, float]:
    """(features, img/s of the inference alone) of `batch`, one session on this CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    t0 = time.perf_counter()
    out = np.concatenate([session.run([output_name], {input_name: batch[i:i + _BATCH]})[0]
                          for i in range(0, len(batch), _BATCH)]).astype(np.float64)
    return out, len(batch) / max(time.perf_counter() - t0, 1e-9)


def agreement(fp32: bytes | str, int8: bytes | str, batch: np.ndarray, input_name: str,
              output_name: str) -> dict[str, float]:
    """Cosine similarity of int8 to float32 features on `batch`, and each model's img/s, on this machine's CPU."""
    a, fp32_speed = _features(fp32, batch, input_name, output_name)
    b, int8_speed = _features(int8, batch, input_name, output_name)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {"mean_cosine": round(float(cos.mean()), 4), "min_cosine": round(float(cos.min()), 4),
            "images": int(len(batch)), "fp32_img_s": round(fp32_speed, 1), "int8_img_s": round(int8_speed, 1)}


def passes(agree: dict[str, float]) -> bool:
    """Whether an agreement reaches the stated bar (MIN_MEAN_COSINE, MIN_MIN_COSINE)."""
    return agree["mean_cosine"] >= MIN_MEAN_COSINE and agree["min_cosine"] >= MIN_MIN_COSINE


def _load(uris: list[str], spec: ModelSpec, max_pixels: int) -> list[np.ndarray]:
    arrays = []
    for u in uris:
        try:
            arrays.append(images.model_input(storage.read_bytes(u), spec.input_size, max_pixels,
                                             spec.preprocess, spec.layout))
        except (images.Rejected, OSError) as exc:
            log.debug("int8 calibration skips %s: %s", u, exc)
    return arrays


@dataclass
class Int8Model:
    """A checked int8 model: the resolved file, its int8.json, and its bytes when OUTPUT does not hold them yet."""

    model: ResolvedModel
    meta: dict[str, Any]
    new_bytes: bytes | None

    def store(self, out: str) -> None:
        """Keep a newly made model in OUTPUT/model/ (int8.json first: the model file's presence means both)."""
        name = self.model.spec.filename.replace(".onnx", ".int8.onnx")
        storage.write_bytes(storage.join(out, "model", "int8.json"), jsonio.dumps(self.meta, indent=2).encode())
        if self.new_bytes is not None:
            storage.write_bytes(storage.join(out, "model", name), self.new_bytes)


def _refuse(agree: dict[str, float], cpu: dict[str, Any], what: str) -> ModelError:
    return ModelError(
        f"{what} agrees with float32 only at mean cosine {agree['mean_cosine']:.3f} (min {agree['min_cosine']:.3f}) "
        f"on {agree['images']} held-back photos on this CPU ({cpu['machine']}, int8 flags: "
        f"{' '.join(cpu['int8_flags']) or 'none'}), below the {MIN_MEAN_COSINE} / {MIN_MIN_COSINE} bar: "
        "use --precision fp32"
    )


def prepare_int8_model(model: ResolvedModel, manifest: pa.Table, out: str,
                       max_pixels: int) -> Int8Model:
    """The int8 model of OUTPUT, checked against float32 on this CPU: the one kept in OUTPUT/model/ (so every
    incremental run embeds with the same weights), else a new one calibrated on the listing's Training images.
    Nothing is written: the caller stores a new model once it has claimed OUTPUT. ModelError if no scheme
    reaches the bar on this CPU."""
    spec = model.spec
    name = spec.filename.replace(".onnx", ".int8.onnx")
    uri = storage.join(out, "model", name)
    cpu = cpu_features()
    cal_uris, check_uris = split_training(manifest)
    if storage.exists(uri):
        data = storage.read_bytes(uri)
        try:
            meta = json.loads(storage.read_bytes(storage.join(out, "model", "int8.json")))
        except (OSError, ValueError) as exc:
            raise ModelError(f"{out}/model/int8.json is missing or corrupt ({exc}): use a new OUTPUT") from None
        if meta.get("fp32_sha256") != model.sha256:
            raise ModelError(f"{uri} was quantized from another float model ({str(meta.get('fp32_sha256'))[:12]}): "
                             "use a new OUTPUT")
        check = _load(meta.get("check_uris") or check_uris, spec, max_pixels)
        if check:  # the kept model is checked again on the CPU of this run
            agree = agreement(model.path, data, np.stack(check), spec.input_name, spec.output_name)
            if not passes(agree):
                raise _refuse(agree, cpu, f"the int8 model kept in {uri}")
            meta = {**meta, "last_check": {**agree, "cpu": cpu}}
        log.info("int8 model of this output reused: %s", uri)
        new = None
    else:
        calibration = _load(cal_uris, spec, max_pixels)
        check = _load(check_uris, spec, max_pixels)
        if len(calibration) < MIN_CALIBRATION_IMAGES or not check:
            raise ModelError(f"--precision int8 needs at least {MIN_CALIBRATION_IMAGES} readable Training images to "
                             f"calibrate on and a few more to check with, found {len(calibration) + len(check)}: "
                             "use --precision fp32 for so small an input")
        tried: dict[str, dict[str, float]] = {}
        data = b""
        for scheme in scheme_order(cpu):
            log.info("quantizing %s to int8 (%s), calibrated on %d Training image(s)", spec.name, scheme,
                     len(calibration))
            with tempfile.TemporaryDirectory() as tmp:
                dest = os.path.join(tmp, name)
                quantize_int8(model.path, np.stack(calibration), spec.input_name, dest, scheme)
                data = Path(dest).read_bytes()
            tried[scheme] = agreement(model.path, data, np.stack(check), spec.input_name, spec.output_name)
            log.info("int8 %s: mean cosine %.3f to float32 on %d held-back photos", scheme,
                     tried[scheme]["mean_cosine"], len(check))
            if passes(tried[scheme]):
                break
        else:
            best = max(tried.values(), key=lambda a: a["mean_cosine"])
            raise _refuse(best, cpu, f"every int8 scheme tried ({', '.join(tried)})")
        if tried[scheme]["int8_img_s"] < tried[scheme]["fp32_img_s"]:
            log.warning("int8 (%s) ran at %.0f img/s against %.0f for float32 on this CPU's check: it is accurate "
                        "but not faster here; --precision fp32 is the better choice on this machine", scheme,
                        tried[scheme]["int8_img_s"], tried[scheme]["fp32_img_s"])
        activation, weight = SCHEMES[scheme]
        meta = {"fp32_sha256": model.sha256, "int8_sha256": hashlib.sha256(data).hexdigest(),
                "calibration_images": len(calibration), "check_uris": check_uris, "scheme": scheme,
                "method": f"onnxruntime quantize_static, QDQ, per-channel weights, {activation} activations, "
                          f"{weight} weights, MinMax",
                "agreement": {**tried[scheme], "bar": {"mean_cosine": MIN_MEAN_COSINE, "min_cosine": MIN_MIN_COSINE}},
                "schemes_tried": tried, "cpu": cpu}
        new = data
    local = cache_bytes(data, name)
    resolved = ResolvedModel(spec, str(local), hashlib.sha256(data).hexdigest(),
                             f"int8 of {model.sha256[:12]} ({model.source})")
    return Int8Model(resolved, meta, new)
