"""`fruitpipe serve`: a real uvicorn server on 127.0.0.1 answering with the exported classifier."""

from __future__ import annotations

import http.client
import io
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from fruitpipe.serve import ServeSettings, create_app


class _Client:
    """Requests to a fruitpipe server on a loopback port."""

    def __init__(self, port: int) -> None:
        self.port = port

    def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, data

    def predict(self, data: bytes, field: str = "image", filename: str = "photo.jpg") -> tuple[int, dict]:
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        status, raw = self.request("POST", "/predict", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return status, json.loads(raw)


class _Server(_Client):
    """The server `fruitpipe serve` runs (uvicorn with fruitpipe's bounded protocol, serve/server.py, with serve's
    default limits unless given) in a thread on a free loopback port; ready when uvicorn says it started (an event,
    not a sleep). `protocol`: uvicorn's h11 or httptools one, default as `serve` picks."""

    def __init__(self, app, protocol=None, header_timeout: float = 5.0, max_connections: int = 256) -> None:
        import time

        import uvicorn

        from fruitpipe.serve.server import config

        self.server = uvicorn.Server(config(app, host="127.0.0.1", port=0, header_timeout=header_timeout,
                                            max_connections=max_connections, protocol=protocol,
                                            log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        super().__init__(self.server.servers[0].sockets[0].getsockname()[1])

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(trained):
    srv = _Server(create_app(ServeSettings(output=str(trained["out"]), max_bytes=2_000_000, max_pixels=20_000_000)))
    yield srv
    srv.stop()


def _spark_predictions(out: Path) -> dict[str, dict]:
    return {r["uri"]: r for r in pq.read_table(out / "classifier" / "test_predictions.parquet").to_pylist()}


def test_predict_answers_as_the_batch_pipeline(server, trained) -> None:
    """Same decode, preprocessing and ONNX file as `fruitpipe run` + `train`: the API's top-1 and its probability
    are Spark's for every Test photo (Spark's came from the embeddings `fruitpipe run` wrote)."""
    spark = _spark_predictions(trained["out"])
    for uri, row in sorted(spark.items()):
        status, body = server.predict(Path(uri).read_bytes())
        assert status == 200, body
        top = body["top5"]
        assert len(top) == 5 and top[0]["label"] == row["predicted"]
        assert abs(top[0]["probability"] - row["probability"]) < 1e-4
        assert body["fruit"]["label"] == row["predicted"] and body["fruit"]["name"]
    assert body["model_sha256"] == trained["metrics"]["onnx"]["sha256"] and body["server_ms"] > 0
    assert body["embedding_model_sha256"] == trained["metrics"]["embedding_model"]["sha256"]
    status, health = server.request("GET", "/health")
    assert status == 200 and json.loads(health)["classes"] == 5


def _jpeg_with_gps(src: Path) -> bytes:
    img = Image.open(src)
    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 24.12), 3: "E", 4: (2.0, 21.0, 7.77)}  # GPSInfo: Paris
    exif[0x010F] = "SecretPhoneMaker"
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def test_bad_uploads_get_4xx_with_rejects_reason_names_and_the_server_lives_on(server, trained, caplog) -> None:
    photo = sorted(_spark_predictions(trained["out"]))[0]
    jpeg = Path(photo).read_bytes()
    bomb = io.BytesIO()
    Image.new("L", (6000, 6000)).save(bomb, "PNG")  # 36 Mpx: over this server's 20 Mpx limit, tiny on the wire
    cases = [
        (b"just some text, not a photo", 415, "not_an_image"),
        (jpeg[: len(jpeg) // 2], 422, "truncated"),
        (b"", 422, "empty"),
        (bomb.getvalue(), 422, "too_large"),
        (b"\xff\xd8" + b"\x00" * 3_000_000, 413, "too_big"),
    ]
    for data, status, reason in cases:
        got, body = server.predict(data)
        assert (got, body["error"]) == (status, reason), body
        assert "Traceback" not in json.dumps(body)
    got, body = server.predict(jpeg, field="photo")
    assert got == 400 and "'image'" in body["detail"]
    with_gps = _jpeg_with_gps(Path(photo))
    with caplog.at_level("DEBUG"):
        got, body = server.predict(with_gps)
    assert got == 200
    text = json.dumps(body) + caplog.text
    assert "SecretPhoneMaker" not in text and "48.0" not in text and "GPS" not in text  # EXIF never returned/logged
    status, raw = server.request("GET", "/metrics")
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
    rejects = {s.labels["reason"]: s.value for s in families["fruitpipe_rejects"].samples if s.name.endswith("_total")}
    assert rejects == {"not_an_image": 1, "truncated": 1, "empty": 1, "too_large": 1, "too_big": 1,
                       "bad_request": 1}
    statuses = {(s.labels["endpoint"], s.labels["status"]) for s in families["fruitpipe_http_requests"].samples}
    assert {("/predict", "200"), ("/predict", "413"), ("/predict", "415"), ("/predict", "422")} <= statuses
    assert "fruitpipe_http_request_duration_seconds" in families and "fruitpipe_predictions" in families


def test_300_requests_8_at_a_time_without_an_error(server, trained) -> None:
    photos = [Path(u).read_bytes() for u in sorted(_spark_predictions(trained["out"]))]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: server.predict(photos[i % len(photos)])[0], range(300)))
    assert results.count(200) == 300


def test_serve_refuses_an_output_without_classifier(tmp_path: Path, capsys) -> None:
    from fruitpipe.cli import main

    assert main(["serve", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run `fruitpipe train" in err


def test_serve_reads_its_classifier_from_s3(trained, s3_endpoint: str) -> None:
    """OUTPUT on s3://: the app loads the same file from the loopback S3 server and answers with it."""
    import boto3

    from conftest import REGION
    from fruitpipe.storage import StorageOptions

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION)
    s3.create_bucket(Bucket="fruits-serve", CreateBucketConfiguration={"LocationConstraint": REGION})
    onnx_file = trained["out"] / "classifier" / "fruit_classifier.onnx"
    s3.put_object(Bucket="fruits-serve", Key="runs/1/classifier/fruit_classifier.onnx", Body=onnx_file.read_bytes())
    srv = _Server(create_app(ServeSettings(output="s3://fruits-serve/runs/1",
                                           storage=StorageOptions(s3_endpoint, REGION))))
    try:
        photo = sorted(_spark_predictions(trained["out"]))[0]
        status, body = srv.predict(Path(photo).read_bytes())
        assert status == 200 and body["top5"][0]["label"] == _spark_predictions(trained["out"])[photo]["predicted"]
        assert body["model_sha256"] == trained["metrics"]["onnx"]["sha256"]
    finally:
        srv.stop()


def test_serve_logs_are_json_lines_with_no_upload_metadata(trained) -> None:
    """`fruitpipe --log-format json serve` in its own process: uvicorn's lines (start, access log) and ours (a refused
    upload) are one JSON object each, and a photo's EXIF (GPS, camera maker) appears in none of them."""
    import os
    import re
    import signal
    import subprocess
    import sys

    photo = Path(sorted(_spark_predictions(trained["out"]))[0])
    proc = subprocess.Popen(
        [sys.executable, "-m", "fruitpipe.cli", "--log-format", "json", "serve", str(trained["out"]), "--port", "0"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        port = None
        for line in proc.stderr:  # uvicorn's "running on" line is the event that says it listens
            lines.append(line)
            found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
            if found:
                port = int(found.group(1))
                break
        assert port, "".join(lines)[-2000:]
        srv = _Client(port)
        assert srv.predict(_jpeg_with_gps(photo))[0] == 200
        assert srv.predict(b"just some text, not a photo")[0] == 415
    finally:
        proc.send_signal(signal.SIGINT)
        _, rest = proc.communicate(timeout=60)
    text = "".join(lines) + rest
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]  # each line is one JSON object
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    messages = [e["message"] for e in entries]
    assert any("POST /predict" in m and "200" in m for m in messages), messages
    assert any("upload refused: not_an_image (HTTP 415)" in m for m in messages), messages
    logged = json.dumps([{k: v for k, v in e.items() if k != "time"} for e in entries])  # a time can hold "48.0"
    assert "SecretPhoneMaker" not in logged and "GPS" not in logged and "24.12" not in logged
