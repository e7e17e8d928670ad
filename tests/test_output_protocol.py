"""The output protocol (issue 12, findings 1-4 and 9): an OUTPUT never touches its INPUT or foreign files, one
writer at a time (a lease), one commit record decides what is published, and committed rows follow the input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import fruitpipe
from conftest import ROOT, SAMPLE, copy_classes, sample_classes
from fruitpipe import lease, storage
from fruitpipe.errors import OutputError
from fruitpipe.output import RunDir
from fruitpipe.storage import StorageOptions

# Marked `nodes`: also run on the EMR nodes' packages (scripts/nodes-env.sh: PySpark 3.5, numpy 1.x, pyarrow 25), one
# test per kind of call the protocol makes there: a local commit, an S3 commit, the PCA replaced, the rows kept on
# the executors, the lease's conditional writes on S3. The rest of the fault matrix drives the same calls through
# fruitpipe's own logic; it runs on the laptop's packages only (the nodes run took 16 minutes of CI's 50 with it).
NODES = pytest.mark.nodes

GATE_DIR = ROOT / "tests" / "gate"


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fruitpipe.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, **kw)


def _one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, (proc.returncode, proc.stderr)
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _rows(out: Path, dataset: str) -> list[dict]:
    return pq.read_table(out / dataset).to_pylist()


def _check_complete(out: Path, listed: int) -> dict:
    """_SUCCESS means: every listed input exactly once, reduced rows = embeddings, dims = k."""
    report = json.loads((out / "run.json").read_text())
    counts = report["counts"]
    emb, rej = _rows(out, "embeddings"), _rows(out, "rejects")
    uris = [r["uri"] for r in emb] + [r["uri"] for r in rej]
    assert (out / "_SUCCESS").exists() and counts["accounted"]
    assert len(uris) == len(set(uris)) == listed == counts["listed"]
    red = _rows(out, "reduced")
    k = json.loads((out / "pca" / "explained_variance.json").read_text())["k"]
    assert sorted(r["id"] for r in red) == sorted(r["id"] for r in emb) and {len(r["pca"]) for r in red} == {k}
    return report


# -- 1 and 4: INPUT and OUTPUT kept apart; --overwrite deletes only what fruitpipe wrote --------------------------

@NODES
def test_output_never_overlaps_input_and_overwrite_spares_foreign_files(spark, tmp_path: Path) -> None:
    data = copy_classes(tmp_path / "in", sample_classes(2), per_split=5)
    photos = sorted(p for p in data.rglob("*") if p.is_file())
    for out in (data, data / "out", data / "Training"):  # same, inside, and a class-holding sub-folder
        _one_line(_cli("run", str(data), str(out), "--overwrite", "--quiet"), "INPUT", "outside")
    _one_line(_cli("run", str(data / "Training"), str(data), "--overwrite", "--quiet"), "a parent of")
    os.symlink(data, tmp_path / "in-link")  # the same folder under another name
    _one_line(_cli("run", str(data), str(tmp_path / "in-link" / "out"), "--quiet"), "INPUT", "outside")
    assert sorted(p for p in data.rglob("*") if p.is_file()) == photos  # nothing deleted, nothing written

    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.docx").write_text("precious")
    _one_line(_cli("run", str(data), str(foreign), "--overwrite", "--quiet"), "not a fruitpipe output",
              "never deletes")
    assert (foreign / "chapter1.docx").read_text() == "precious" and len(list(foreign.iterdir())) == 1

    out = tmp_path / "out"
    fruitpipe.run(fruitpipe.Config(input=str(data), output=str(out), k=3, quiet=True))
    (out / "notes.txt").write_text("mine")  # a user's file inside a fruitpipe output
    other = copy_classes(tmp_path / "other", sample_classes(3)[2:], per_split=4)
    result = fruitpipe.run(fruitpipe.Config(input=str(other), output=str(out), k=3, quiet=True, overwrite=True))
    assert result.counts["listed"] == 8 and (out / "notes.txt").read_text() == "mine"
    assert {r["label"] for r in _rows(out, "embeddings")} == set(sample_classes(3)[2:])


# -- 2: one writer at a time -------------------------------------------------------------------------------------

def test_second_run_on_one_output_is_refused_while_the_first_holds_the_lease(spark, tmp_path: Path) -> None:
    data = copy_classes(tmp_path / "in", sample_classes(3), per_split=15)
    out = tmp_path / "out"
    gate = tmp_path / "gate"
    gate.touch()
    env = {**os.environ, "PYTHONPATH": f"{GATE_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "FRUITPIPE_TEST_GATE": str(gate)}
    first = subprocess.Popen([sys.executable, "-m", "fruitpipe.cli", "run", str(data), str(out), "--k", "4",
                              "--quiet", "--master", "local[1]"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        while not list(tmp_path.glob("gate.held-*")):  # observable: a task of the first run is embedding
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            time.sleep(0.05)  # polling for the event, not a timed fault
        second = _cli("run", str(data), str(out), "--k", "4", "--quiet")
        _one_line(second, "being written by another run", f"pid {first.pid}", "wait for it")
        assert json.loads((out / "_lease.json").read_text())["pid"] == first.pid and not (out / "_SUCCESS").exists()
    finally:
        gate.unlink()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    _check_complete(out, 90)
    assert len(_rows(out, "embeddings")) == 90


def test_a_dead_owners_lease_is_taken_over(spark, tmp_path: Path) -> None:
    data = copy_classes(tmp_path / "in", sample_classes(1), per_split=4)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    # As a crashed run in this PID namespace left it (tests/test_lease.py: other namespaces wait for the TTL).
    (out / "_lease.json").write_text(json.dumps({"token": "crashed", **lease.identity(int(dead.stdout)),
                                                 "heartbeat_at": time.time(),
                                                 "acquired_at": time.time(), "ttl_s": 120}))
    result = fruitpipe.run(fruitpipe.Config(input=str(data), output=str(out), k=2, quiet=True))
    assert result.counts["accounted"] and (out / "_SUCCESS").exists()
    assert json.loads((out / "_lease.json").read_text())["released"] is True


@NODES
def test_lease_on_s3_uses_conditional_writes(s3_endpoint: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="eu-west-3")
    s3.create_bucket(Bucket="leases", CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
    opts = StorageOptions(s3_endpoint)
    with lease.hold("s3://leases/out", "run-a", opts):
        with pytest.raises(lease.LeaseHeldError, match="being written by another run"):
            with lease.hold("s3://leases/out", "run-b", opts):
                pass
    # A stalled owner on another host (heartbeat older than its TTL) is taken over...
    stalled = {"token": "stalled", "host": "elsewhere", "pid": 1, "heartbeat_at": time.time() - 1000,
               "acquired_at": time.time() - 2000, "ttl_s": 120}
    s3.put_object(Bucket="leases", Key="out/_lease.json", Body=json.dumps(stalled).encode())
    with lease.hold("s3://leases/out", "run-c", opts) as held:
        held.check()
        # ...and a run whose lease was taken over in turn may not publish.
        s3.put_object(Bucket="leases", Key="out/_lease.json", Body=json.dumps({**stalled, "token": "run-d",
                                                                              "heartbeat_at": time.time()}).encode())
        with pytest.raises(lease.LeaseLostError, match="lost its lease"):
            held.check()
    assert json.loads(s3.get_object(Bucket="leases", Key="out/_lease.json")["Body"].read())["token"] == "run-d"


@NODES
def test_duplicate_rows_left_by_older_concurrent_runs_are_repaired(spark, tmp_path: Path) -> None:
    data = copy_classes(tmp_path / "in", sample_classes(2), per_split=6)
    out = tmp_path / "out"
    fruitpipe.run(fruitpipe.Config(input=str(data), output=str(out), k=3, quiet=True))
    record = json.loads((out / "_commit.json").read_text())
    part = record["datasets"]["embeddings"][0]
    shutil.copyfile(out / "embeddings" / part, out / "embeddings" / f"dup-{part}")  # as two writers left it
    record["datasets"]["embeddings"].append(f"dup-{part}")
    (out / "_commit.json").write_text(json.dumps(record))
    assert len(_rows(out, "embeddings")) > 24
    result = fruitpipe.run(fruitpipe.Config(input=str(data), output=str(out), k=3, quiet=True))
    assert result.counts["dropped_before_embedding"]["duplicate_row"] > 0
    _check_complete(out, 24)


# -- 3: one commit record; a crash anywhere never publishes inconsistent directories ----------------------------

class _Crash(Exception):
    pass


@pytest.mark.parametrize("crash_after_moves", [1, 3, pytest.param(4, marks=NODES)])  # in pca/, between pca/ and reduced/, inside reduced/
def test_crash_while_replacing_the_pca_is_redone_not_trusted(spark, tmp_path: Path, monkeypatch,
                                                              crash_after_moves: int) -> None:
    data = copy_classes(tmp_path / "in", sample_classes(3), per_split=10)
    out = tmp_path / "out"
    fruitpipe.run(fruitpipe.Config(input=str(data), output=str(out), k=20, quiet=True, partition_size=8))
    from fruitpipe import output as output_mod

    moves = {"n": 0}
    real_move = storage.move

    def crashing_move(src: str, dst: str, opts: StorageOptions | None = None) -> None:
        if "/_staging/" in src and ("/pca/" in src or "/reduced/" in src):
            moves["n"] += 1
            if moves["n"] > crash_after_moves:
                raise _Crash("killed")
        real_move(src, dst, opts)

    monkeypatch.setattr(output_mod.storage, "move", crashing_move)
    with pytest.raises(_Crash):
        fruitpipe.reduce(fruitpipe.Config(input=str(data), output=str(out), k=5, quiet=True))
    monkeypatch.setattr(output_mod.storage, "move", real_move)
    assert not (out / "_SUCCESS").exists()
    assert RunDir(str(out), StorageOptions()).reduce_entry() is None  # the record no longer claims a PCA
    result = fruitpipe.run(fruitpipe.Config(input=str(data), output=str(out), k=5, quiet=True))
    assert result.report["pca"]["skipped"] is False and result.report["pca"]["k"] == 5
    _check_complete(out, 60)


def test_files_not_in_the_commit_record_are_never_published(spark, tmp_path: Path) -> None:
    data = copy_classes(tmp_path / "in", sample_classes(2), per_split=5)
    out = tmp_path / "out"
    fruitpipe.run(fruitpipe.Config(input=str(data), output=str(out), k=3, quiet=True))
    stray = out / "embeddings" / "part-from-a-killed-run.parquet"
    shutil.copyfile(next((out / "embeddings").glob("*.parquet")), stray)
    (out / "reduced" / "part-99999.parquet").write_bytes((out / "_commit.json").read_bytes())
    result = fruitpipe.run(fruitpipe.Config(input=str(data), output=str(out), k=3, quiet=True))
    assert not stray.exists() and not (out / "reduced" / "part-99999.parquet").exists()
    assert result.counts["embedded_this_run"] == 0
    _check_complete(out, 20)


def test_success_is_not_written_when_the_accounting_fails(spark, tmp_path: Path, monkeypatch) -> None:
    data = copy_classes(tmp_path / "in", sample_classes(1), per_split=5)
    out = tmp_path / "out"
    from fruitpipe.pipeline import bookkeeping

    real = bookkeeping.accounting
    monkeypatch.setattr(bookkeeping, "accounting", lambda *args: {**real(*args), "accounted": False})
    with pytest.raises(OutputError, match="accounting failed"):
        fruitpipe.run(fruitpipe.Config(input=str(data), output=str(out), k=2, quiet=True))
    assert (out / "run.json").exists() and not (out / "_SUCCESS").exists()


def test_an_accounting_error_beside_the_pca_commits_no_pca(spark, tmp_path: Path, monkeypatch) -> None:
    """The accounting runs while the PCA is fitted and the PCA's fingerprint needs its digest: when it fails, the
    run fails with its error, commits no PCA and writes no _SUCCESS; the next run completes."""
    data = copy_classes(tmp_path / "in", sample_classes(2), per_split=5)
    out = tmp_path / "out"
    from fruitpipe.pipeline import bookkeeping

    real = bookkeeping.accounting

    def failing(*args: object) -> dict:
        raise OutputError("the accounting lost its executor")

    monkeypatch.setattr(bookkeeping, "accounting", failing)
    with pytest.raises(OutputError, match="the accounting lost its executor"):
        fruitpipe.run(fruitpipe.Config(input=str(data), output=str(out), k=3, quiet=True))
    monkeypatch.setattr(bookkeeping, "accounting", real)
    rundir = RunDir(str(out), StorageOptions())
    assert not (out / "_SUCCESS").exists() and rundir.reduce_entry() is None
    assert len(rundir.files("embeddings")) >= 1  # the embeddings were committed before the accounting
    result = fruitpipe.run(fruitpipe.Config(input=str(data), output=str(out), k=3, quiet=True))
    assert result.counts["embedded_this_run"] == 0 and result.report["pca"]["skipped"] is False
    _check_complete(out, 20)


# -- 9: committed rows follow the input -------------------------------------------------------------------------

@NODES
def test_rows_follow_changed_moved_deleted_and_fixed_files(spark, tmp_path: Path) -> None:
    a, b = sample_classes(2)
    data = copy_classes(tmp_path / "in", [a, b], splits=("Training",), per_split=6)
    photos = sorted((data / "Training" / a).iterdir())
    good = sorted((SAMPLE / "Test" / a).iterdir())[1].read_bytes()  # a photo not otherwise in the input
    (data / "Training" / a / "copying.jpg").write_bytes(good[: len(good) // 4])  # still being copied
    (data / "Training" / a / "locked.jpg").write_bytes(good[::-1])
    (data / "Training" / a / "locked.jpg").write_bytes(photos[1].read_bytes() + b"x")
    os.chmod(data / "Training" / a / "locked.jpg", 0)
    out = tmp_path / "out"
    config = fruitpipe.Config(input=str(data), output=str(out), k=3, quiet=True)
    with pytest.raises(OutputError, match="could be embedded: 1[2-4] too_large"):  # a mistake: all too_large,
        fruitpipe.embed(config.replace(max_pixels=1))  # a failure rather than a complete output of nothing
    assert not (out / "_SUCCESS").exists()
    committed = pq.read_table(out / "rejects", columns=["reason"]).column("reason").to_pylist()
    assert committed.count("too_large") >= 12  # kept: the fixed re-run retries exactly these
    second = fruitpipe.run(config)  # the limit changed: too_large rejects are retried
    reasons = second.counts["rejects_by_reason"]
    if os.geteuid() != 0:  # root reads a mode-000 file anyway
        assert reasons.get("unreadable") == 1
    assert reasons.get("truncated") == 1 and "too_large" not in reasons
    # The copy completes, permissions are fixed, a photo is replaced, one moves class, one is deleted.
    (data / "Training" / a / "copying.jpg").write_bytes(good)
    os.chmod(data / "Training" / a / "locked.jpg", 0o644)
    replaced = data / "Training" / b / sorted(os.listdir(data / "Training" / b))[0]
    replaced.write_bytes(sorted((SAMPLE / "Test" / a).iterdir())[0].read_bytes())  # other bytes, same name
    os.utime(replaced, ns=(1, 1))
    moved = photos[3]
    shutil.move(moved, data / "Training" / b / moved.name)
    photos[4].unlink()
    third = fruitpipe.run(config)
    report = _check_complete(out, 12 + 2 - 1)  # 12 photos + 2 generated files - 1 deleted
    dropped = third.counts["dropped_before_embedding"]
    assert dropped.get("deleted") == 2 and dropped.get("changed", 0) >= 2, dropped  # moved away + deleted
    emb = {Path(r["uri"]).relative_to(data).as_posix(): r for r in _rows(out, "embeddings")}
    assert f"Training/{a}/copying.jpg" in emb and f"Training/{a}/locked.jpg" in emb
    assert emb[f"Training/{b}/{moved.name}"]["label"] == b  # the moved photo has its new label...
    assert f"Training/{a}/{moved.name}" not in emb  # ...and no stale row remains
    assert f"Training/{a}/{photos[4].name}" not in emb  # a deleted photo is gone before the PCA
    rel = replaced.relative_to(data).as_posix()
    fresh = fruitpipe.run(fruitpipe.Config(input=str(data), output=str(tmp_path / "fresh"), k=3, quiet=True))
    ref = {Path(r["uri"]).relative_to(data).as_posix(): r for r in _rows(tmp_path / "fresh", "embeddings")}
    np.testing.assert_allclose(emb[rel]["features"], ref[rel]["features"], atol=1e-5)  # not the stale features
    assert report["counts"]["embedded"] == fresh.counts["embedded"]
    assert json.loads((out / "pca" / "explained_variance.json").read_text())["n_samples"] == fresh.counts["embedded"]


def _stop_the_writer(monkeypatch, out: str, stop_at: str) -> None:
    """The next run stops at `stop_at`: "naming" (its lease lost when the record comes to name the hidden parts) or
    "renaming" (killed after making the first embeddings part visible)."""
    from fruitpipe import output as output_mod

    real_write, real_move = RunDir._write_record, storage.move

    def lost_when_naming(self, rec, token):
        if rec.get("pending") and any(rec["pending"].values()):
            raise lease.LeaseLostError(f"{out}: lease lost (test)")
        real_write(self, rec, token)

    def dies_while_renaming(src, dst, opts=None):
        if "/.pending-" in src and "/embeddings/" in src and dies_while_renaming.moved:
            raise _Crash("killed")
        dies_while_renaming.moved += "/.pending-" in src and "/embeddings/" in src
        real_move(src, dst, opts)

    dies_while_renaming.moved = 0
    if stop_at == "naming":
        monkeypatch.setattr(RunDir, "_write_record", lost_when_naming)
    else:
        monkeypatch.setattr(output_mod.storage, "move", dies_while_renaming)


@pytest.mark.parametrize("stop_at", ["naming", "renaming"])
def test_a_writer_stopped_at_any_step_of_the_commit_leaves_no_visible_rows(spark, tmp_path: Path, monkeypatch,
                                                                             stop_at: str) -> None:
    """Parts move in under hidden names, the record names them, then they become visible. A writer that lost its
    lease when it came to name them (the record write refused), or died while renaming them, leaves nothing a
    folder reader (pyarrow, pandas, Spark) counts; the next run finishes or discards the commit, every photo once."""
    data = copy_classes(tmp_path / "in", sample_classes(2), per_split=5)
    out = tmp_path / "out"
    fruitpipe.run(fruitpipe.Config(input=str(data), output=str(out), k=3, quiet=True))
    before = sorted(r["uri"] for r in _rows(out, "embeddings"))
    copy_classes(data, sample_classes(4)[2:], per_split=5)  # 20 more photos to commit
    _stop_the_writer(monkeypatch, str(out), stop_at)
    with pytest.raises((OutputError, _Crash)):
        fruitpipe.run(fruitpipe.Config(input=str(data), output=str(out), k=3, quiet=True))
    monkeypatch.undo()
    visible = [r["uri"] for r in _rows(out, "embeddings")]
    assert len(visible) == len(set(visible))  # never a photo twice
    if stop_at == "naming":
        assert sorted(visible) == before  # the unnamed parts stayed hidden
    assert list((out / "embeddings").glob(".pending-*"))  # what the stopped writer left is hidden
    result = fruitpipe.run(fruitpipe.Config(input=str(data), output=str(out), k=3, quiet=True))
    _check_complete(out, 40)
    assert not list((out / "embeddings").glob(".pending-*"))
    assert result.counts["embedded_this_run"] == (20 if stop_at == "naming" else 0)


def _s3_rows(endpoint: str, uri: str) -> list[dict]:
    """What a folder reader sees of an S3 dataset (pyarrow, like pandas and Spark, skips names starting with '.')."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=endpoint, region="eu-west-3", scheme="http")
    return pq.read_table(uri[len("s3://"):], filesystem=fs).to_pylist()


@pytest.mark.parametrize("stop_at", ["naming", pytest.param("renaming", marks=NODES)])
def test_a_writer_stopped_at_any_step_of_the_commit_on_s3_leaves_no_visible_rows(spark, s3_endpoint: str,
                                                                                   tmp_path: Path, monkeypatch,
                                                                                   stop_at: str) -> None:
    """The S3 variant: moves are copies and deletes there, the record a conditional PUT."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="eu-west-3")
    bucket = f"commit-stop-{stop_at}"
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
    data = copy_classes(tmp_path / "in", sample_classes(2), per_split=5)
    out = f"s3://{bucket}/out"

    def config() -> fruitpipe.Config:
        return fruitpipe.Config(input=str(data), output=out, k=3, quiet=True, s3_endpoint=s3_endpoint,
                                region="eu-west-3")

    fruitpipe.run(config())
    before = sorted(r["uri"] for r in _s3_rows(s3_endpoint, f"{out}/embeddings"))
    copy_classes(data, sample_classes(4)[2:], per_split=5)
    _stop_the_writer(monkeypatch, str(out), stop_at)
    with pytest.raises((OutputError, _Crash)):
        fruitpipe.run(config())
    monkeypatch.undo()
    visible = [r["uri"] for r in _s3_rows(s3_endpoint, f"{out}/embeddings")]
    assert len(visible) == len(set(visible))
    if stop_at == "naming":
        assert sorted(visible) == before
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/embeddings/")["Contents"]]
    assert any("/.pending-" in k for k in keys)
    result = fruitpipe.run(config())
    visible = [r["uri"] for r in _s3_rows(s3_endpoint, f"{out}/embeddings")]
    assert sorted(visible) == sorted(set(visible)) and len(visible) == 40 and result.counts["accounted"]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]]
    assert "out/_SUCCESS" in keys and not any("/.pending-" in k for k in keys)


@NODES
def test_a_record_write_cannot_follow_a_takeover(s3_endpoint: str, tmp_path: Path) -> None:
    """A writer that stalls between its lease check and its record write: on S3 the write is conditional on the
    record it read, so the run that took over keeps its record; locally the check and the write hold the lease's
    lock, which a takeover must take too."""
    import fcntl

    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="eu-west-3").create_bucket(
        Bucket="record-race", CreateBucketConfiguration={"LocationConstraint": "eu-west-3"})
    opts = StorageOptions(s3_endpoint, "eu-west-3")
    stalled, took_over = RunDir("s3://record-race/out", opts), RunDir("s3://record-race/out", opts)
    stalled._write_record(stalled.record(), "run-a")  # A's last write, then A stalls past the TTL
    took_over._write_record({**took_over.record(), "settings": {"by": "b"}}, "run-b")  # B took over and committed
    with pytest.raises(OutputError, match="changed by another run"):
        stalled._write_record({**stalled.record(), "settings": {"by": "a"}}, "run-a")  # A resumes
    fresh = RunDir("s3://record-race/out", opts).record()
    assert fresh["token"] == "run-b" and fresh["settings"] == {"by": "b"}

    out = tmp_path / "out"
    with lease.hold(str(out), "run-a", StorageOptions()) as held:
        seen = []

        def write() -> None:  # inside the publish: nobody else can take the lease's lock now
            fd = os.open(out / lease.LEASE, os.O_RDWR)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
            seen.append(True)

        held.publish(write)
        assert seen == [True]
        (out / lease.LEASE).write_text(json.dumps({"token": "run-b", "host": "elsewhere", "pid": 1,
                                                   "heartbeat_at": time.time(), "ttl_s": 120}))
        with pytest.raises(lease.LeaseLostError):
            held.publish(lambda: pytest.fail("written without the lease"))
