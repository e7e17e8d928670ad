"""onnxruntime sessions built once per Python worker (cached by model sha256) and the batch predict function."""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable, Mapping

import numpy as np

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
    """predict(batch NHWC float32) -> float32 [batch, dim]; the session is built lazily, once per process."""

    def predict(batch: np.ndarray) -> np.ndarray:
        session = get_session(sha256, threads, load_bytes, device, gpu_id)
        (out,) = session.run([output_name], {input_name: np.ascontiguousarray(batch, dtype=np.float32)})  # type: ignore[attr-defined]
        return np.asarray(out, dtype=np.float32)

    return predict
