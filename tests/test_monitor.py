"""Monitoring: JSON logs with the run id (Spark's lines included), Prometheus metrics to a textfile and to a real
Pushgateway-compatible HTTP endpoint on 127.0.0.1, run.json's bytes read and peak memory per stage."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from conftest import copy_classes, sample_classes

#: Printed by the JVM launcher itself (Spark 4 adds the module) before any logger exists: not a log line.
JVM_LAUNCHER_LINE = "WARNING: Using incubator modules: jdk.incubator.vector"


class _Gateway(BaseHTTPRequestHandler):
    """Accepts what a Pushgateway accepts (PUT/POST of the text format under /metrics/job/...), keeps it."""

    received: list[tuple[str, str, bytes]] = []

    def _store(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.received.append((self.command, self.path, body))
        self.send_response(200)
        self.end_headers()

    do_PUT = do_POST = _store

    def log_message(self, *args: object) -> None:
        pass


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_json_logs_metrics_file_pushgateway_and_resources(tmp_path: Path) -> None:
    """A real `fruitpipe run` process (its own JVM): every stderr line is one JSON object with the run's id,
    Spark's own lines included; the metrics reach the textfile and the gateway with the run's counts."""
    data = copy_classes(tmp_path / "in", sample_classes(2), splits=("Training",), per_split=10)
    (data / "Training" / sample_classes(2)[0] / "notes.jpg").write_text("not a photo")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out, prom = tmp_path / "out", tmp_path / "metrics" / "fruitpipe.prom"
    prom.parent.mkdir()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "fruitpipe.cli", "--log-format", "json", "run", str(data), str(out), "--master",
             "local[2]", "--k", "4", "--metrics-file", str(prom), "--pushgateway",
             f"http://127.0.0.1:{server.server_port}", "--spark-conf", "spark.ui.enabled=false"],
            capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "run.json").read_text())
    lines = [line for line in proc.stderr.splitlines() if line.strip() and line.strip() != JVM_LAUNCHER_LINE]
    entries = [json.loads(line) for line in lines]  # each line is one JSON object
    assert entries and all({"time", "level", "logger", "message", "run_id"} <= set(e) for e in entries)
    assert {e["run_id"] for e in entries} == {report["run_id"]}
    assert any(e["logger"] == "fruitpipe.pipeline.listing" and "listed 21" in e["message"] for e in entries)

    resources = report["resources"]
    assert resources["bytes_read"] == sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
    peaks = resources["peak_memory_bytes"]
    assert peaks["driver"] > 50e6
    for stage in ("embed", "reduce"):  # Spark's executor metrics (Linux process tree): JVM heap, RSS, Python RSS
        assert set(peaks[stage]) == {"jvm_heap", "jvm_rss", "python_rss"}, peaks
        assert peaks[stage]["jvm_rss"] > peaks[stage]["jvm_heap"] > 0 and peaks[stage]["python_rss"] > 10e6

    samples = _samples(prom.read_text())
    assert samples[("fruitpipe_last_run_success", (("command", "run"),))] == 1
    assert samples[("fruitpipe_images", (("state", "listed"),))] == 21
    assert samples[("fruitpipe_images", (("state", "embedded"),))] == 20
    assert samples[("fruitpipe_rejects_total", (("reason", "not_an_image"),))] == 1
    assert samples[("fruitpipe_read_bytes", ())] == resources["bytes_read"]
    assert samples[("fruitpipe_peak_memory_bytes", (("process", "python_rss"), ("stage", "embed")))] \
        == peaks["embed"]["python_rss"]
    assert samples[("fruitpipe_stage_duration_seconds", (("stage", "embed"),))] == report["timings_s"]["embed"]
    assert ("fruitpipe_run_info", (("command", "run"), ("model", "mobilenet_v2"), ("precision", "fp32"),
                                   ("run_id", report["run_id"]), ("version", report["fruitpipe_version"]))) in samples

    (method, path, body), = _Gateway.received
    encoded = base64.urlsafe_b64encode(str(out).encode()).decode()
    assert method == "PUT" and path == f"/metrics/job/fruitpipe/command/run/output@base64/{encoded}"
    assert _samples(body.decode()) == samples  # the same registry, pushed


def test_a_failed_command_is_in_the_metrics_and_its_error_is_a_json_line(tmp_path: Path, capfd) -> None:
    from fruitpipe.cli import main

    prom = tmp_path / "m.prom"
    rc = main(["reduce", str(tmp_path / "nothing-here"), "--log-format", "json", "--metrics-file", str(prom)])
    assert rc == 2
    err = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert err[-1]["level"] == "ERROR" and "holds no fruitpipe embeddings" in err[-1]["message"]
    assert _samples(prom.read_text())[("fruitpipe_last_run_success", (("command", "reduce"),))] == 0


def test_every_command_takes_log_format() -> None:
    from fruitpipe.cli import build_parser

    parser = build_parser()
    for argv in (["run", "a", "b"], ["embed", "a", "b"], ["reduce", "a"], ["train", "a"], ["serve", "a"],
                 ["drift", "a", "b"], ["models"], ["emr", "status", "j-1"], ["emr", "plan", "s3://a/b", "s3://c/d"]):
        assert parser.parse_args([*argv, "--log-format", "json"]).log_format == "json", argv
        assert parser.parse_args(["--log-format", "json", *argv]).log_format == "json", argv
        assert parser.parse_args(argv).log_format == "text", argv


def test_stage_peaks_leave_out_the_jobs_of_earlier_runs_in_a_shared_session(spark) -> None:
    """A notebook's session keeps every run's jobs in a stage's job group: a run's peaks are those of the jobs run
    after its stage began (group_jobs), not the highest of any run before it."""
    from fruitpipe.monitor.resources import group_jobs, stage_peaks

    sc, group = spark.sparkContext, "test-peaks-of-one-run"
    sc.setJobGroup(group, "an earlier run")
    try:
        spark.range(8, numPartitions=2).collect()
        earlier = group_jobs(spark, group)
        assert earlier, "the status tracker lists the group's jobs"
        spark.range(8, numPartitions=2).collect()
        this_run = group_jobs(spark, group) - earlier
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    assert len(this_run) == 1 and max(earlier) < min(this_run)
    assert stage_peaks(spark, group, earlier | this_run) == {}  # every job skipped: nothing of earlier runs counts
