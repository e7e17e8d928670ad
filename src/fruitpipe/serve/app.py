"""The FastAPI app: one POST /predict through the batch pipeline's own decode and preprocessing and the one ONNX
file `fruitpipe train` wrote, answering the species first, then the variety, and "not sure" under the threshold
train chose; photos stay in memory and are never logged; bad input is a 4xx with the same reason
names as `rejects`, never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, Request  # Request at module level: FastAPI resolves the endpoints' annotations here
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartParser
from starlette.requests import ClientDisconnect

from fruitpipe import images, storage
from fruitpipe.classify.export import FruitClassifier
from fruitpipe.classify.fruits import describe, species_name
from fruitpipe.classify.published import CLASSIFIER_DIR, ONNX_NAME, read_classifier
from fruitpipe.errors import FruitpipeError
from fruitpipe.serve.server import HeldBytes
from fruitpipe.serve.settings import ServeSettings
from fruitpipe.version import __version__

log = logging.getLogger(__name__)

#: HTTP status per reject reason: not an image -> 415; an image that cannot be used -> 422.
STATUS_BY_REASON = {"not_an_image": 415, "empty": 422, "too_large": 422, "too_small": 422, "truncated": 422,
                    "corrupt": 422, "not_finite": 422}
#: Multipart framing on top of the photo itself (boundaries, part headers): the body may exceed max_bytes by this.
FRAMING = 64 * 1024


class _ByteBudget:
    """An asyncio semaphore counted in bytes: hold(n) waits until n more fit under `total` (the event loop's
    thread only). Every estimate the caller lets in is at most `total`, so each one gets its turn."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._freed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, n: int) -> AsyncIterator[None]:
        async with self._freed:
            await self._freed.wait_for(lambda: self.used + n <= self.total)
            self.used += n
        try:
            yield
        finally:
            async with self._freed:
                self.used -= n
                self._freed.notify_all()


def load_classifier(settings: ServeSettings) -> tuple[FruitClassifier, str]:
    """The exported classifier of OUTPUT (local or s3://) and its sha256."""
    uri = storage.join(settings.output, CLASSIFIER_DIR, ONNX_NAME)
    with storage.configured(settings.storage):
        data = read_classifier(settings.output)
    try:
        clf = FruitClassifier(data, settings.threads, settings.crop)
    except Exception as exc:  # onnxruntime's own errors on a damaged file: one line, not its traceback
        raise FruitpipeError(f"{uri} is not a usable classifier ({type(exc).__name__}): run `fruitpipe train "
                             f"{settings.output}` again") from None
    return clf, hashlib.sha256(data).hexdigest()


def create_app(settings: ServeSettings) -> Any:
    """The ASGI app, with its own Prometheus registry (several apps in one process stay apart)."""
    # Uploads stay in memory up to the size limit: Starlette would spool larger parts to a temporary file.
    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, settings.max_bytes + 1)
    classifier, sha = load_classifier(settings)
    registry = CollectorRegistry()
    requests = Counter("fruitpipe_http_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                       registry=registry)
    latency = Histogram("fruitpipe_http_request_duration_seconds", "Time to answer, by endpoint", ["endpoint"],
                        registry=registry, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
    rejects = Counter("fruitpipe_rejects", "Uploads refused, by reason (rejects/ names)", ["reason"],
                      registry=registry)
    predictions = Counter("fruitpipe_predictions", "Top-1 answers by class", ["label"], registry=registry)
    not_sure = Counter("fruitpipe_not_sure_answers", "Answers under the classifier's confidence threshold "
                       "(\"not sure\")", registry=registry)
    docs: dict[str, Any] = {} if settings.api_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="fruitpipe", description="Which fruit is this? Photo in, top-5 classes out.",
                  version=__version__, **docs)
    decoders = settings.decoders or os.cpu_count() or 1
    slots = asyncio.Semaphore(decoders)
    budget = _ByteBudget(settings.decode_budget)
    Gauge("fruitpipe_uploads_admitted", "Uploads decoding or waiting for the decode budget or a decoder",
          registry=registry).set_function(lambda: admitted[0])
    Gauge("fruitpipe_decode_bytes_reserved", "Estimated peak bytes of the decodes running or admitted",
          registry=registry).set_function(lambda: budget.used)
    admitted = [0]  # uploads decoding or waiting for a decoder (the event loop's thread only: no lock)
    # Request bytes held by requests not yet answered: upload bodies, and pipelined requests queued by the
    # connection layer (server.py), one budget (the event loop's thread only).
    buffered = HeldBytes(settings.max_buffered)
    app.state.held_bytes = buffered
    Gauge("fruitpipe_upload_bytes_buffered", "Request bytes held in memory by requests not yet answered (upload "
          "bodies, and queued pipelined requests)", registry=registry).set_function(lambda: buffered.used)

    refused = Counter("fruitpipe_connections_refused", "Connections refused by the connection layer, by reason "
                      "(max_connections, header_too_large, pipelined)", ["reason"], registry=registry)
    app.state.count_refused = lambda reason: refused.labels(reason).inc()

    def refuse(status: int, reason: str, detail: str, headers: dict[str, str] | None = None,
               close: bool = False) -> Any:
        """A JSON refusal; `close` when the upload was not read to its end, so its rest is not read and discarded
        (after an early 413 the server once read 3.6 GB of a body it had refused)."""
        rejects.labels(reason).inc()
        if close:
            headers = {**(headers or {}), "Connection": "close"}
        # The reason and status only: nothing of the upload (its name, bytes or metadata) reaches the logs.
        log.info("upload refused: %s (HTTP %d)", reason, status)
        return JSONResponse({"error": reason, "detail": detail}, status_code=status, headers=headers)

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Any:
        t0 = time.perf_counter()
        response = await call_next(request)
        endpoint = request.url.path if request.url.path in ("/", "/predict", "/health", "/metrics") else "other"
        requests.labels(endpoint, str(response.status_code)).inc()
        latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    page = resources.files("fruitpipe.serve").joinpath("static", "index.html").read_bytes()

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def index() -> Any:
        return Response(page, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; "
                                 "style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
                                 "frame-ancestors 'none'",
                                 "X-Content-Type-Options": "nosniff"})

    @app.head("/health", include_in_schema=False)  # load balancers' probes
    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "classes": len(classifier.classes), "model_sha256": sha}

    @app.get("/metrics")
    def metrics() -> Any:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/predict")
    async def predict(request: Request) -> Any:
        held = [0]
        try:
            return await identify(request, held)
        finally:
            buffered.give(held[0])

    async def identify(request: Request, held: list[int]) -> Any:
        t0 = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_bytes + FRAMING:
            return refuse(413, "too_big", f"upload of {int(length)} bytes; the limit is {settings.max_bytes}",
                          close=True)
        # The body is counted as it arrives, whatever the transfer encoding (chunked has no Content-Length), and
        # kept in memory: past the limit it is refused at once, and nothing is ever spooled to disk. Every
        # request's bytes count against one budget, so stalled uploads cannot hold more than it.
        chunks: list[bytes] = []
        received = 0
        stream = request.stream().__aiter__()
        deadline = t0 + settings.upload_timeout
        while True:
            left = deadline - time.perf_counter()
            try:
                if left <= 0:
                    raise TimeoutError
                chunk = await asyncio.wait_for(stream.__anext__(), min(settings.body_timeout, left))
            except StopAsyncIteration:
                break
            except TimeoutError:
                if time.perf_counter() >= deadline:
                    return refuse(408, "timeout", f"the upload took over {settings.upload_timeout:g} s "
                                  "(--upload-timeout)", close=True)
                return refuse(408, "timeout", f"no byte of the upload arrived for {settings.body_timeout:g} s",
                              close=True)
            except ClientDisconnect:  # the client went away mid-upload: its bytes are freed, nobody to answer
                return refuse(400, "disconnected", "the client closed the connection during the upload")
            received += len(chunk)
            if received > settings.max_bytes + FRAMING:
                return refuse(413, "too_big", f"upload over {settings.max_bytes} bytes", close=True)
            if not buffered.take(len(chunk)):
                return refuse(503, "busy", "the server holds as many uploads as it may: try again in a second",
                              {"Retry-After": "1"}, close=True)
            held[0] += len(chunk)
            chunks.append(chunk)
        request._body = b"".join(chunks)  # Starlette's form parser reads the cached body (no second read)
        del chunks
        try:
            form = await request.form(max_files=1, max_fields=4, max_part_size=settings.max_bytes)
        except Exception as exc:  # malformed multipart, too many parts, a part over the limit
            status = 413 if "exceeded maximum size" in str(exc).lower() else 400
            return refuse(status, "too_big" if status == 413 else "bad_request", str(exc)[:200])
        upload = form.get("image") or form.get("file")
        if upload is None or isinstance(upload, str):
            return refuse(400, "bad_request", "send the photo as multipart/form-data in a field named 'image'")
        data = await upload.read(settings.max_bytes + 1)
        await form.close()
        if len(data) > settings.max_bytes:
            return refuse(413, "too_big", f"the photo is over {settings.max_bytes} bytes")

        def infer() -> Any:  # decode and inference off the event loop, in one hop to the thread pool
            return classifier.photo_probabilities(data, settings.max_pixels)

        if admitted[0] >= decoders + settings.queue:
            return refuse(503, "busy", f"{admitted[0]} photos are being identified or waiting: try again in a "
                          "second", {"Retry-After": "1"})
        cost = images.decode_cost(data, settings.max_pixels, classifier.input_size)  # the header only
        if cost > settings.decode_budget:
            return refuse(422, "too_large", f"decoding this image would take about {cost >> 20} MiB; this server "
                          f"decodes {settings.decode_budget >> 20} MiB at most (--decode-mb)")
        admitted[0] += 1
        try:
            # The decodes' memory is the server's peak: each waits until its estimate fits the budget, then for
            # one of `decoders` threads.
            async with budget.hold(cost), slots:
                p = await run_in_threadpool(infer)
        except images.Rejected as rj:
            return refuse(STATUS_BY_REASON.get(rj.reason, 422), rj.reason, images.REASONS[rj.reason])
        finally:
            admitted[0] -= 1
        if not np.all(np.isfinite(p)):  # a model that overflows on this photo: no answer rather than a wrong one
            return refuse(422, "not_finite", images.REASONS["not_finite"])
        got = classifier.answer(p)
        for t in got["top5"]:
            t["name"] = describe(t["label"])["name"]
        # The fruit named is the top species, told by its most probable variety.
        in_species = classifier.species == classifier.species_names.index(got["species"][0]["name"])
        label = classifier.classes[int(np.argmax(np.where(in_species, p, -1.0)))]
        predictions.labels(label).inc()
        if got["not_sure"]:
            not_sure.inc()
        fruit = describe(label)
        if label in classifier.maps_to:  # learned from other photos (train --also): the species, no variety
            fruit.update(name=species_name(label), variety=None)
        return {**got, "fruit": fruit, "model_sha256": sha,
                "embedding_model_sha256": classifier.metadata.get("embedding_model_sha256"),
                "server_ms": round((time.perf_counter() - t0) * 1000, 2)}

    app.state.classifier = classifier
    return app
