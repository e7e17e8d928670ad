"""A real standalone Spark cluster on 127.0.0.1 (master + 2 one-core workers): same outputs as local mode,
and a worker killed mid-embed loses nothing and duplicates nothing."""

from __future__ import annotations

import json
import os
import signal
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import fruitpipe
from conftest import REGION, copy_classes, sample_classes

# Marked `nodes`: also run on the EMR nodes' packages (scripts/nodes-env.sh: PySpark 3.5, numpy 1.x): the cluster run
# and spark-submit's defaults. The killed worker tests fruitpipe's commit under Spark's task retry, the same calls as
# the cluster run; it runs on the laptop's packages only.


def _spark_class() -> str:
    import pyspark

    return os.path.join(os.path.dirname(pyspark.__file__), "bin", "spark-class")


class Cluster:
    """Master and workers started from the pyspark wheel, each worker in its own process group."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # The executors' Python workers load tests/gate: while root/gate exists, each waits after 8 images.
        self.gate = root / "gate"
        self.env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
                    "SPARK_WORKER_DIR": str(root / "work"), "SPARK_LOG_DIR": str(root / "logs"),
                    "PYTHONPATH": str(Path(__file__).parent / "gate"), "FRUITPIPE_TEST_GATE": str(self.gate),
                    "FRUITPIPE_TEST_GATE_AFTER": "8"}
        self.procs: list[subprocess.Popen] = []
        # Port 0: the master binds a free port itself and logs its URL, which is read back (no pick-then-bind race).
        self.master = self._start("master", ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                             "--port", "0", "--webui-port", "0"])
        self._wait_log("master", "I have been elected leader")
        found = re.search(r"Starting Spark master at (spark://127\.0\.0\.1:\d+)",
                          (root / "master.log").read_text(errors="replace"))
        assert found, (root / "master.log").read_text()[-2000:]
        self.url = found.group(1)
        self.workers = [self._start(f"worker{i}", ["org.apache.spark.deploy.worker.Worker", self.url,
                                                   "--cores", "1", "--memory", "2g", "--host", "127.0.0.1",
                                                   "--webui-port", "0"]) for i in range(2)]
        self._wait_log("master", "Registering worker", count=2)

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "wb")
        proc = subprocess.Popen([_spark_class(), *args], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def _wait_log(self, name: str, text: str, count: int = 1, timeout: float = 90) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if (self.root / f"{name}.log").read_text(errors="replace").count(text) >= count:
                return
            time.sleep(0.3)
        raise RuntimeError(f"{name} never logged {text!r}: {(self.root / f'{name}.log').read_text()[-2000:]}")

    def kill_worker(self, i: int) -> None:
        """SIGKILL a worker with everything it started (its executor JVM and Python workers)."""
        os.killpg(self.workers[i].pid, signal.SIGKILL)

    def stop(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)


@pytest.fixture
def cluster(tmp_path: Path):
    c = Cluster(tmp_path)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def cluster_input(spark, tmp_path_factory: pytest.TempPathFactory):
    """4 classes x 80 photos and their local-mode run, the reference for the cluster runs."""
    root = tmp_path_factory.mktemp("cluster")
    data = copy_classes(root / "in", sample_classes(4))
    local = fruitpipe.run(fruitpipe.Config(input=str(data), output=str(root / "local"), k=8, quiet=True))
    return data, root / "local", local


def _cli_run(data: Path, out: Path | str, master: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fruitpipe.cli", "run", str(data), str(out), "--k", "8",
                             "--quiet", "--master", master, "--partition-size", "16", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _download(endpoint: str, bucket: str, prefix: str, dest: Path) -> list[str]:
    """Every object under s3://bucket/prefix/ copied below `dest`; their keys relative to the prefix."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
    names = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) + 1:]
            if not rel or rel.endswith("/"):  # a folder marker (pyarrow's create_dir), not a file
                continue
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(dest / rel))
            names.append(rel)
    return names


def _assert_same_outputs(out: Path, reference: Path) -> None:
    emb = {r["uri"]: np.asarray(r["features"]) for r in pq.read_table(out / "embeddings").to_pylist()}
    ref = {r["uri"]: np.asarray(r["features"]) for r in pq.read_table(reference / "embeddings").to_pylist()}
    assert emb.keys() == ref.keys()  # every input exactly once (a dict would hide a repeat: check rows too)
    assert pq.read_table(out / "embeddings").num_rows == len(ref)
    assert max(np.abs(emb[u] - ref[u]).max() for u in ref) < 1e-5
    got = json.loads((out / "pca" / "explained_variance.json").read_text())
    want = json.loads((reference / "pca" / "explained_variance.json").read_text())
    np.testing.assert_allclose(got["per_component"][:8], want["per_component"][:8], rtol=1e-6)
    red = {r["uri"]: np.asarray(r["pca"]) for r in pq.read_table(out / "reduced").to_pylist()}
    red_ref = {r["uri"]: np.asarray(r["pca"]) for r in pq.read_table(reference / "reduced").to_pylist()}
    a = np.array([red[u] for u in sorted(ref)])
    b = np.array([red_ref[u] for u in sorted(ref)])
    signs = np.sign((a * b).sum(axis=0))  # a principal axis is defined up to its sign
    np.testing.assert_allclose(a * signs, b, atol=1e-3)


@pytest.mark.nodes
def test_cluster_run_to_s3_equals_local(cluster: Cluster, cluster_input, s3_endpoint: str, spark,
                                       tmp_path: Path) -> None:
    """A standalone cluster writing to S3 (the loopback server): the same rows as local mode, and the Spark ML PCA
    model published through pyarrow.fs like every other file. This Spark has no Hadoop S3 connector, so a model
    written through Hadoop to s3:// (EMRFS on EMR, outside the instance role's prefix) would fail the run."""
    import boto3
    from pyspark.ml.feature import PCAModel

    data, reference, local = cluster_input
    boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION).create_bucket(
        Bucket="cluster-out", CreateBucketConfiguration={"LocationConstraint": REGION})
    started = time.time()
    proc = _cli_run(data, "s3://cluster-out/runs/1", cluster.url, "--s3-endpoint", s3_endpoint, "--region", REGION)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    print(f"clean cluster run: {time.time() - started:.1f} s")
    names = _download(s3_endpoint, "cluster-out", "runs/1", tmp_path / "out")
    assert any(n.startswith("pca/spark_model/metadata/") for n in names), names
    assert not any(n.endswith(".crc") or n.startswith("_staging") for n in names)
    report = json.loads((tmp_path / "out" / "run.json").read_text())
    assert report["counts"]["accounted"] and report["counts"]["embedded"] == local.counts["embedded"]
    inference = report["counts"]["inference"]
    assert inference["workers"] >= 2 and inference["max_sessions_per_worker"] == 1  # both executors worked
    assert report["config"]["master"] == cluster.url
    _assert_same_outputs(tmp_path / "out", reference)
    model = PCAModel.load(str(tmp_path / "out" / "pca" / "spark_model"))
    components = np.load(tmp_path / "out" / "pca" / "components.npy")
    np.testing.assert_allclose(model.pc.toArray(), components, atol=1e-9)
    assert not list(Path("/tmp").glob("fruitpipe-model-*"))  # the model's temporary folder is gone


def test_killed_worker_loses_and_duplicates_nothing(cluster: Cluster, cluster_input, tmp_path: Path) -> None:
    data, reference, local = cluster_input
    out = tmp_path / "out"
    started = time.time()
    cluster.gate.touch()  # executors pause mid-task once they have embedded 8 images: the run cannot finish
    proc = _cli_run(data, out, cluster.url)
    deadline = time.time() + 240
    while not list(cluster.root.glob("gate.held-*")):  # observable: an executor is inside a task
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.1)  # polling for the event, not a timed fault
    killed_at = time.time()
    cluster.kill_worker(0)
    cluster.gate.unlink()
    _, err = proc.communicate(timeout=400)
    finished = time.time()
    assert proc.returncode == 0, err
    report = json.loads((out / "run.json").read_text())
    assert report["counts"]["accounted"] and report["counts"]["listed"] == local.counts["listed"]
    _assert_same_outputs(out, reference)
    print(f"worker killed {killed_at - started:.1f} s into the run; run finished {finished - killed_at:.1f} s later "
          f"(total {finished - started:.1f} s)")


@pytest.mark.nodes
def test_spark_submit_defaults_are_appended_to_not_replaced(tmp_path: Path) -> None:
    """Under spark-submit (EMR's steps), spark-defaults.conf already carries extraJavaOptions (EMR's OutOfMemory
    and GC flags): fruitpipe's session keeps them and appends its own, then the user's --spark-conf."""
    script = tmp_path / "show_conf.py"
    script.write_text(
        "import json\n"
        "from fruitpipe.spark import spark_session\n"
        "with spark_session('local[1]', 'conf-test', conf={'spark.executor.extraJavaOptions': '-Duser.flag=3'})"
        " as s:\n"
        "    c = s.sparkContext.getConf()\n"
        "    print('CONF=' + json.dumps({k: c.get(k) for k in ('spark.driver.extraJavaOptions',"
        " 'spark.executor.extraJavaOptions')}))\n")
    defaults = tmp_path / "spark-defaults.conf"
    defaults.write_text("spark.driver.extraJavaOptions -Dfrom.cluster=1 -XX:+UseG1GC\n"
                        "spark.executor.extraJavaOptions -Dfrom.cluster=2 -XX:OnOutOfMemoryError='kill -9 %p'\n")
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
           "SPARK_LOCAL_IP": "127.0.0.1"}
    done = subprocess.run([str(Path(sys.executable).parent / "spark-submit"), "--master", "local[1]",
                           "--properties-file", str(defaults), str(script)],
                          capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    conf = json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("CONF="))[5:])
    driver, executor = conf["spark.driver.extraJavaOptions"], conf["spark.executor.extraJavaOptions"]
    # Spark puts its own module flags first; then the cluster's, ours, and the user's, in that order.
    assert "-Dfrom.cluster=1 -XX:+UseG1GC -Dlog4j2.configurationFile=" in driver
    assert "-Dfrom.cluster=2 -XX:OnOutOfMemoryError='kill -9 %p' -Dlog4j2.configurationFile=" in executor
    assert executor.endswith(" -Duser.flag=3")
