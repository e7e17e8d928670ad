"""Prometheus metrics of the batch commands: a textfile (node-exporter style) and/or a push to a Pushgateway.

Names and units follow `fruitpipe serve`'s /metrics where they mean the same thing: `fruitpipe_rejects_total`
(images refused, by the reasons of rejects/), durations in seconds, sizes in bytes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from fruitpipe.errors import FruitpipeError

log = logging.getLogger(__name__)


def _registry() -> Any:
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:  # a core dependency; only a broken install lacks it
        raise FruitpipeError("--metrics-file/--pushgateway need prometheus_client: pip install prometheus_client") \
            from None
    return CollectorRegistry()


def command_metrics(command: str, ok: bool, started: float, report: Mapping[str, Any] | None) -> Any:
    """A registry holding one command's outcome and, for a finished run/embed/reduce, what its run.json says;
    `train` and `drift` results add their own figures."""
    from prometheus_client import Gauge

    reg = _registry()
    labels = ["command"]
    Gauge("fruitpipe_last_run_success", "1 if the command's last run finished, 0 if it failed", labels,
          registry=reg).labels(command).set(1 if ok else 0)
    Gauge("fruitpipe_last_run_timestamp_seconds", "Unix time at which the command's last run ended", labels,
          registry=reg).labels(command).set(time.time())
    Gauge("fruitpipe_last_run_duration_seconds", "Wall time of the command's last run", labels,
          registry=reg).labels(command).set(time.time() - started)
    if report:
        if "counts" in report:
            _pipeline(reg, command, report)
        if "top1" in report:
            _train(reg, report)
        if "drift" in report:
            _drift(reg, report)
    return reg


def _pipeline(reg: Any, command: str, report: Mapping[str, Any]) -> None:
    from prometheus_client import Gauge

    counts = report["counts"]
    info = Gauge("fruitpipe_run_info", "The last run: id, model, precision, fruitpipe version (value 1)",
                 ["command", "run_id", "model", "precision", "version"], registry=reg)
    model = report.get("model") or {}
    info.labels(command, str(report.get("run_id")), str(model.get("name")), str(model.get("precision")),
                str(report.get("fruitpipe_version"))).set(1)
    images = Gauge("fruitpipe_images", "Inputs of the output by state (listed, embedded, rejected) and those this "
                   "run embedded or rejected", ["state"], registry=reg)
    for state, key in (("listed", "listed"), ("embedded", "embedded"), ("rejected", "rejected"),
                       ("embedded_this_run", "embedded_this_run"), ("rejected_this_run", "rejected_this_run"),
                       ("skipped_already_done", "skipped_already_done")):
        if isinstance(counts.get(key), int):
            images.labels(state).set(counts[key])
    Gauge("fruitpipe_accounted", "1 when every listed input is in exactly one of embeddings or rejects",
          registry=reg).set(1 if counts.get("accounted") else 0)
    # A gauge under the serve counter's name: the output's total rejects by reason, which only grows as inputs do.
    rejects = Gauge("fruitpipe_rejects_total", "Images refused, by reason (rejects/ names)", ["reason"], registry=reg)
    for reason, n in (counts.get("rejects_by_reason") or {}).items():
        rejects.labels(reason).set(n)
    stage = Gauge("fruitpipe_stage_duration_seconds", "Wall time of each stage of the last run", ["stage"],
                  registry=reg)
    for name, seconds in (report.get("timings_s") or {}).items():
        stage.labels(name).set(seconds)
    throughput = (report.get("throughput_img_s") or {}).get("embed")
    if throughput:
        Gauge("fruitpipe_embed_images_per_second", "Embed stage throughput of the last run", registry=reg) \
            .set(throughput)
    resources = report.get("resources") or {}
    if "bytes_read" in resources:
        Gauge("fruitpipe_read_bytes", "Bytes of input images the last run read", registry=reg) \
            .set(resources["bytes_read"])
    peak = Gauge("fruitpipe_peak_memory_bytes", "Peak memory of the last run by stage and process (driver, jvm_heap, "
                 "jvm_rss, python_rss: Spark executor metrics)", ["stage", "process"], registry=reg)
    for stage_name, by_process in (resources.get("peak_memory_bytes") or {}).items():
        if isinstance(by_process, int):
            peak.labels("all", stage_name).set(by_process)
            continue
        for process, value in by_process.items():
            peak.labels(stage_name, process).set(value)
    pca = report.get("pca") or {}
    if pca.get("explained_at_k") is not None:
        Gauge("fruitpipe_pca_explained_variance_ratio", "Share of the variance the kept components explain",
              registry=reg).set(pca["explained_at_k"])
        Gauge("fruitpipe_pca_components", "Number of PCA components kept", registry=reg).set(pca["k"])


def _train(reg: Any, result: Mapping[str, Any]) -> None:
    from prometheus_client import Gauge

    quality = Gauge("fruitpipe_classifier_score_ratio", "Classifier quality on the test photos", ["metric"],
                    registry=reg)
    for metric in ("top1", "top5", "macro_f1"):
        if isinstance(result.get(metric), (int, float)):
            quality.labels(metric).set(result[metric])
    if isinstance(result.get("n_test"), int):
        Gauge("fruitpipe_classifier_test_images", "Photos the classifier was evaluated on", registry=reg) \
            .set(result["n_test"])


def _drift(reg: Any, result: Mapping[str, Any]) -> None:
    from prometheus_client import Gauge

    Gauge("fruitpipe_drift_detected", "1 when the last drift check passed its threshold", registry=reg) \
        .set(1 if result["drift"] else 0)
    tests = Gauge("fruitpipe_drift_p_value", "p-value of each drift test (lower = more drift)", ["test"], registry=reg)
    for name, test in (result.get("tests") or {}).items():
        if isinstance(test, Mapping) and isinstance(test.get("p_value"), (int, float)):
            tests.labels(name).set(test["p_value"])


def export(registry: Any, metrics_file: str | None, pushgateway: str | None, command: str, output: str) -> None:
    """Write `registry` to `metrics_file` (atomically, for node-exporter's textfile collector) and/or push it to
    `pushgateway` under job "fruitpipe", grouped by command and output. A failed export is a warning: the run's own
    result stands."""
    if metrics_file:
        from prometheus_client import write_to_textfile

        try:
            write_to_textfile(metrics_file, registry)
        except OSError as exc:
            log.warning("could not write --metrics-file %s: %s", metrics_file, exc)
    if pushgateway:
        from prometheus_client import push_to_gateway

        try:
            push_to_gateway(pushgateway, job="fruitpipe", registry=registry,
                            grouping_key={"command": command, "output": output}, timeout=10)
        except Exception as exc:  # URLError, HTTPError, timeouts: the gateway's problem, not the run's
            log.warning("could not push metrics to --pushgateway %s: %s", pushgateway, exc)
