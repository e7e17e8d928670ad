"""Shared fixtures: the ../shared data and models, one local[2] Spark session, small real subsets."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FRUITPIPE_SHARED", ROOT.parent / "shared"))
SAMPLE = SHARED / "data" / "fruits360-sample"
MODELS = SHARED / "models"


def pytest_configure(config: pytest.Config) -> None:
    if not (SAMPLE / "Training").is_dir() or not (MODELS / "mobilenet_v2_features.onnx").is_file():
        raise pytest.UsageError(f"shared data not found under {SHARED}: set FRUITPIPE_SHARED")


@pytest.fixture(scope="session", autouse=True)
def _env(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Models from ../shared, a private download cache, no progress bar noise from tqdm."""
    os.environ["FRUITPIPE_MODELS"] = str(MODELS)
    os.environ["FRUITPIPE_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))
    # Credentials for the loopback S3 server only, set before Spark starts so its Python workers inherit them;
    # no instance-metadata look-ups.
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_EC2_METADATA_DISABLED": "true",
                       # AWS's managed policies, as a real account has them. moto's backends live in this process
                       # for the whole session and IAM's reads this when first built, which the first S3 request
                       # of any module does: set per module (test_emr), it came too late once test_cluster used S3.
                       "MOTO_IAM_LOAD_MANAGED_POLICIES": "true"})
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        os.environ.pop(var, None)
    archive = _spark_class_archive()
    if archive:
        os.environ["SPARK_SUBMIT_OPTS"] = " ".join(
            [os.environ.get("SPARK_SUBMIT_OPTS", ""), f"-XX:SharedArchiveFile={archive}", *SHORT_JVM]).strip()


# The suite starts about a hundred Spark drivers (each `fruitpipe` command a test runs is a JVM of its own). On a
# 2-vCPU VM a `fruitpipe reduce` of 6 photos took 27 s, 11.6 s of it starting Spark. Two JVM options of the tests'
# own, neither of which changes what Spark computes, took it to 16 s (start 4.5 s):
# - a class-data-sharing archive of the classes a Spark session loads (JDK 17's dynamic CDS archive), dumped once per
#   virtual environment by a bare session (about 50 s): the drivers map it instead of reading the jars again;
# - C1 only (`TieredStopAtLevel=1`): no C2 compilation, which a driver that lives seconds never profits from.
#   The session's own long-lived Spark (`spark` below) keeps C2.
# `fruitpipe` itself sets neither: a real run lives long enough for C2 to pay, and it is not a test's to cache.
SHORT_JVM = ("-XX:TieredStopAtLevel=1",)

_ARCHIVE_RUN = """
from pyspark.sql import SparkSession
spark = SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false").getOrCreate()
assert spark.range(100).count() == 100
"""


def _spark_class_archive() -> Path | None:
    """The archive of a bare Spark session's classes, in this virtual environment and named by the JVM's and
    PySpark's versions (a JVM or Spark changed makes a new one); None when this JVM cannot make one (the suite then
    runs without it, only slower)."""
    import hashlib
    import subprocess
    import sys
    import tempfile

    import pyspark

    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr
    key = hashlib.sha256(f"{java}{pyspark.__version__}{pyspark.__file__}".encode()).hexdigest()[:16]
    path = Path(sys.prefix) / f"spark-classes-{key}.jsa"
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory() as tmp:
        dump, script = Path(tmp) / "spark.jsa", Path(tmp) / "session.py"
        script.write_text(_ARCHIVE_RUN)
        # spark-submit, not a session started from this process: the JVM is the parent here, so the run ends when
        # the JVM has written the archive at its exit (a gateway's JVM outlives its Python and would still be
        # writing).
        env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_SUBMIT_OPTS": f"-XX:ArchiveClassesAtExit={dump}"}
        try:
            proc = subprocess.run([str(Path(pyspark.__file__).parent / "bin" / "spark-submit"), "--master", "local[2]",
                                   str(script)], env=env, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            return None
        if proc.returncode != 0 or not dump.is_file():
            return None
        for old in Path(sys.prefix).glob("spark-classes-*.jsa"):
            old.unlink()
        part = path.with_suffix(f".{os.getpid()}.part")
        shutil.move(dump, part)
        os.replace(part, path)  # whole or absent, for a session beside this one
    return path


@pytest.fixture(autouse=True)
def _cli_logging_stays_in_its_test():
    """`main()` configures the root logger as a command does once per process (its stderr handler, JSON or text,
    and the level); in this one test process that outlived the test, so a later test's library call logged INFO
    lines in JSON. Each test starts from the root logger as it found it."""
    import logging

    from fruitpipe import logs

    root = logging.getLogger()
    handlers, level, json_mode = list(root.handlers), root.level, logs._json_mode
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    logs._json_mode = json_mode


@pytest.fixture
def no_local_models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No FRUITPIPE_MODELS and a private, empty model cache: what a new user has; yields the cache folder."""
    monkeypatch.delenv("FRUITPIPE_MODELS", raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("FRUITPIPE_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def spark():
    """One real Spark for the whole session: local[2], no UI, few shuffle partitions."""
    from fruitpipe.spark import spark_session

    with contextlib.ExitStack() as stack:
        # This JVM lives for the whole session: C2 pays here (SHORT_JVM). The drivers started after keep C1: the
        # variable is restored once this one has started.
        with pytest.MonkeyPatch.context() as env:
            opts = os.environ.get("SPARK_SUBMIT_OPTS", "")
            env.setenv("SPARK_SUBMIT_OPTS", " ".join(o for o in opts.split() if o not in SHORT_JVM))
            session = stack.enter_context(
                spark_session("local[2]", "fruitpipe-tests", conf={"spark.ui.enabled": "false"}))
        yield session


def copy_classes(dest: Path, classes: list[str], splits: tuple[str, ...] = ("Training", "Test"),
                 per_split: int | None = None) -> Path:
    """Copy some classes of the shared sample into `dest` (tests may add or break files there)."""
    for split in splits:
        for cls in classes:
            src = SAMPLE / split / cls
            files = sorted(src.iterdir())[:per_split]
            (dest / split / cls).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copyfile(f, dest / split / cls / f.name)
    return dest


def with_threshold(out: Path, dest: Path, threshold: float) -> Path:
    """A copy of `out`'s classifier whose exported file says "not sure" under `threshold` (its metadata
    rewritten): serve and the page behave as if train had chosen it."""
    import json

    import onnx

    shutil.copytree(out / "classifier", dest / "classifier")
    path = dest / "classifier" / "fruit_classifier.onnx"
    model = onnx.load(str(path))
    for prop in model.metadata_props:
        if prop.key == "not_sure_below":
            prop.value = json.dumps(threshold)
    onnx.save(model, str(path))
    return dest


def sample_classes(n: int) -> list[str]:
    """The first n classes of the shared sample, sorted by name."""
    return sorted(p.name for p in (SAMPLE / "Training").iterdir())[:n]


REGION = "eu-west-3"


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto server (S3, EMR, IAM, STS, KMS APIs) on a free loopback port, for one test module."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def upload_folder(folder: Path, endpoint: str, bucket: str, prefix: str) -> int:
    """Create `bucket` in eu-west-3 and upload every file under `folder` below `prefix`; returns the count."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=REGION)
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    n = 0
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
            n += 1
    return n


TRAINED_CLASSES = sample_classes(5)


@pytest.fixture(scope="session")
def trained(spark, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """5 real classes of the sample (300 Training, 100 Test photos), run, then `fruitpipe train` with defaults."""
    import json

    import fruitpipe
    from fruitpipe.cli import main

    root = tmp_path_factory.mktemp("classify")
    data = copy_classes(root / "in", TRAINED_CLASSES)
    fruitpipe.run(fruitpipe.Config(input=str(data), output=str(root / "out"), k=8, quiet=True))
    out = root / "out"
    assert main(["train", str(out), "--master", "local[2]", "-q"]) == 0
    return {"out": out, "metrics": json.loads((out / "classifier" / "metrics.json").read_text())}
