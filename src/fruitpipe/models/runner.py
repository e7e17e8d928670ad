"""onnxruntime sessions built once per Python worker (cached by model sha256) and the batch predict function."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from fruitpipe.errors import ModelError

if TYPE_CHECKING:
    from fruitpipe.models.fetch import ResolvedModel

log = logging.getLogger(__name__)

_SESSIONS: dict[tuple[str, int, str, int | None], object] = {}
_LOCK = threading.Lock()
#: Sessions this process has built, per model sha256; tasks report theirs so tests can prove "once per worker"
#: (a worker reused by a later run with another model, e.g. --precision int8, builds one for that model too).
SESSIONS_BUILT: dict[str, int] = {}


def providers_for(device: str, gpu_id: int | None = None) -> list:
    """onnxruntime execution providers for `device` (auto, cpu, cuda); CUDA only where onnxruntime has it, on
    CUDA device `gpu_id` when given (the GPU Spark assigned to the task), else the default device 0."""
    if uses_cuda(device):
        cuda = "CUDAExecutionProvider" if gpu_id is None else ("CUDAExecutionProvider", {"device_id": gpu_id})
        return [cuda, "CPUExecutionProvider"]
    if device == "cuda":
        log.warning("--device cuda: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu on a "
                    "machine with a GPU); falling back to the CPU")
    return ["CPUExecutionProvider"]


def task_gpu(resources: Mapping[str, object]) -> int | None:
    """The CUDA device id of the GPU Spark assigned to a task (TaskContext.resources(), set by
    spark.task.resource.gpu.amount), or None when the task was assigned none."""
    addresses = getattr(resources.get("gpu"), "addresses", None) or []
    return int(addresses[0]) if addresses else None


def uses_cuda(device: str) -> bool:
    """True when sessions for `device` run on onnxruntime's CUDA provider."""
    import onnxruntime as ort

    return device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers()


def get_session(sha256: str, threads: int, load_bytes: Callable[[], bytes], device: str = "cpu",
                gpu_id: int | None = None) -> object:
    """The process-wide onnxruntime session for a model (one per GPU); `load_bytes` is called only on first use."""
    key = (sha256, threads, device, gpu_id)
    with _LOCK:
        session = _SESSIONS.get(key)
        if session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            providers = providers_for(device, gpu_id)
            session = ort.InferenceSession(load_bytes(), sess_options=opts, providers=providers)
            _SESSIONS[key] = session
            SESSIONS_BUILT[sha256] = SESSIONS_BUILT.get(sha256, 0) + 1
            log.info("built onnxruntime session %s (threads=%d, %s%s) in pid %d", sha256[:12], threads,
                     session.get_providers()[0], "" if gpu_id is None else f" on GPU {gpu_id}", os.getpid())
    return session


def make_predict_fn(
    sha256: str,
    load_bytes: Callable[[], bytes],
    threads: int,
    input_name: str = "input",
    output_name: str = "features",
    device: str = "cpu",
    gpu_id: int | None = None,
) -> Callable[[np.ndarray], np.ndarray]:
    """predict(batch) -> float32 [batch, dim], the batch in the dtype the model takes (uint8 for a wrapped model,
    float32 otherwise); the session is built lazily, once per process."""

    def predict(batch: np.ndarray) -> np.ndarray:
        session = get_session(sha256, threads, load_bytes, device, gpu_id)
        (out,) = session.run([output_name], {input_name: np.ascontiguousarray(batch)})  # type: ignore[attr-defined]
        return np.asarray(out, dtype=np.float32)

    return predict


def check_model(model: ResolvedModel) -> None:
    """Load a model on the driver and run one blank image through it, before any output is claimed: a file that
    is not ONNX, a truncated one, a wrong input or output name or size is one ModelError line, not a worker trace."""
    import onnxruntime as ort

    spec = model.spec
    where = f"model file {model.path} ({model.source})"
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.path, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"{where} is not a loadable ONNX model ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:160] if str(exc) else ''}): point --model-path at a valid "
                         ".onnx file") from None
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = [o.name for o in session.get_outputs()]
    if spec.input_name not in inputs:
        raise ModelError(f"{where} has no input named {spec.input_name!r} (it has {', '.join(inputs)}): use a model "
                         f"exported for {spec.name}")
    if spec.output_name not in outputs:
        raise ModelError(f"{where} has no output named {spec.output_name!r} (it has {', '.join(outputs)}): use a "
                         f"model exported for {spec.name}")
    shape = inputs[spec.input_name].shape
    if len(shape) != 4:
        raise ModelError(f"{where}: input {spec.input_name!r} has rank {len(shape)}, expected 4 (NHWC images)")
    blank = np.zeros((1, spec.input_size, spec.input_size, 3), dtype=np.float32)
    try:
        (out,) = session.run([spec.output_name], {spec.input_name: blank})
    except Exception as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise ModelError(f"{where} fails on a {spec.input_size}x{spec.input_size}x3 image ({type(exc).__name__}: "
                         f"{first}): use a model for this input size") from None
    if np.asarray(out).reshape(1, -1).shape[1] != spec.dim:
        raise ModelError(f"{where} gives {np.asarray(out).size} features per image, {spec.name} has {spec.dim}: use "
                         "the matching --model")
