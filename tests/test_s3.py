"""S3 to S3 on a real S3 API (moto server on 127.0.0.1): same outputs as a local run on the same images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

import fruitpipe
from fruitpipe import storage
from conftest import REGION, copy_classes, sample_classes, upload_folder

# Also run on the EMR nodes' packages (scripts/nodes-env.sh: PySpark 3.5, numpy 1.x).
pytestmark = pytest.mark.nodes

def _read(endpoint: str, uri: str):
    fs = pafs.S3FileSystem(region=REGION, endpoint_override=endpoint, scheme="http")
    return pq.read_table(uri[len("s3://"):], filesystem=fs)


def _by_relpath(table, root: str, column: str) -> dict[str, np.ndarray]:
    return {u[len(root):].lstrip("/"): np.asarray(v) for u, v in zip(table.column("uri").to_pylist(),
                                                                      table.column(column).to_pylist())}


def test_s3_to_s3_equals_local(spark, s3_endpoint: str, tmp_path: Path) -> None:
    data = copy_classes(tmp_path / "in", sample_classes(4), per_split=15)
    (data / "Test" / sample_classes(1)[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert upload_folder(data, s3_endpoint, "fruits", "fruits360") == 4 * 2 * 15 + 1
    local = fruitpipe.run(fruitpipe.Config(input=str(data), output=str(tmp_path / "out"), k=5, quiet=True))
    remote = fruitpipe.run(fruitpipe.Config(input="s3://fruits/fruits360", output="s3://fruits/runs/1", k=5,
                                            quiet=True, s3_endpoint=s3_endpoint, region=REGION))
    for key in ("listed", "embedded", "rejected", "accounted", "rejects_by_reason"):
        assert remote.counts[key] == local.counts[key], key
    assert remote.counts["embedded"] == 120 and remote.counts["rejects_by_reason"] == {"truncated": 1}

    emb_l = _by_relpath(pq.read_table(tmp_path / "out" / "embeddings"), str(data), "features")
    emb_r = _by_relpath(_read(s3_endpoint, "s3://fruits/runs/1/embeddings"), "s3://fruits/fruits360", "features")
    assert emb_l.keys() == emb_r.keys()
    assert max(np.abs(emb_l[k] - emb_r[k]).max() for k in emb_l) < 1e-6
    red_l = _by_relpath(pq.read_table(tmp_path / "out" / "reduced"), str(data), "pca")
    red_r = _by_relpath(_read(s3_endpoint, "s3://fruits/runs/1/reduced"), "s3://fruits/fruits360", "pca")
    assert red_l.keys() == red_r.keys()
    assert max(np.abs(red_l[k] - red_r[k]).max() for k in red_l) < 1e-3

    fs = pafs.S3FileSystem(region=REGION, endpoint_override=s3_endpoint, scheme="http")
    names = {i.path.split("/", 3)[3] for i in fs.get_file_info(pafs.FileSelector("fruits/runs/1", recursive=True))
             if i.type == pafs.FileType.File}
    assert {"run.json", "_SUCCESS", "_fruitpipe.json", "pca/explained_variance.json", "pca/scree.png",
            "pca/components.npy"} <= names
    assert not any(n.startswith("_staging") for n in names)
    with fs.open_input_stream("fruits/runs/1/run.json") as fh:
        report = json.loads(fh.read())
    assert report["config"]["region"] == REGION and report["counts"]["accounted"] is True

    again = fruitpipe.run(fruitpipe.Config(input="s3://fruits/fruits360", output="s3://fruits/runs/1", k=5,
                                           quiet=True, s3_endpoint=s3_endpoint, region=REGION))
    assert again.counts["embedded_this_run"] == 0 and again.report["pca"]["skipped"] is True


def test_s3_outage_fails_cleanly_and_resume_completes(spark, tmp_path: Path) -> None:
    """The S3 server goes away after listing: the run fails with one clear error and publishes nothing; once the
    server is back (same port, same data), the same command completes with every image exactly once."""
    from moto.server import ThreadedMotoServer

    from fruitpipe.pipeline.listing import list_images
    from fruitpipe.pipeline.failures import JobFailedError
    from fruitpipe.pipeline.run import run as run_stages
    from fruitpipe.storage import StorageOptions

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # the server picks its port
    server.start()
    _, port = server.get_host_and_port()
    endpoint = f"http://127.0.0.1:{port}"
    data = copy_classes(tmp_path / "in", sample_classes(2), splits=("Test",))
    upload_folder(data, endpoint, "outage", "fruits")
    config = fruitpipe.Config(input="s3://outage/fruits", output=str(tmp_path / "out"), k=3, quiet=True,
                              s3_endpoint=endpoint, region=REGION)
    with storage.configured(StorageOptions(endpoint, REGION)):
        listing = list_images(config.input)
    server.stop()  # gone between listing and reading
    with pytest.raises(JobFailedError) as info:
        run_stages(config, listing=listing)
    message = str(info.value)
    assert "\n" not in message and "re-run the same command" in message
    assert message.startswith("a Spark job failed") and "Could not connect" in message  # the executors' reads
    assert not (tmp_path / "out" / "_SUCCESS").exists() and not (tmp_path / "out" / "embeddings").exists()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)  # moto keeps its data in-process
    server.start()
    try:
        result = fruitpipe.run(config)
    finally:
        server.stop()
    assert result.counts["embedded"] == 40 and result.counts["accounted"]
    uris = pq.read_table(tmp_path / "out" / "embeddings").column("uri").to_pylist()
    assert len(uris) == len(set(uris)) == 40


def test_object_deleted_after_listing_is_rejected_unreadable(spark, s3_endpoint: str, tmp_path: Path) -> None:
    """An object listed, then deleted before the executors read it: one `unreadable` reject, the rest embedded."""
    import boto3

    from fruitpipe.pipeline.listing import list_images
    from fruitpipe.pipeline.run import run as run_stages
    from fruitpipe.storage import StorageOptions

    data = copy_classes(tmp_path / "in", sample_classes(2), splits=("Test",), per_split=5)
    upload_folder(data, s3_endpoint, "vanishing", "fruits")
    config = fruitpipe.Config(input="s3://vanishing/fruits", output="s3://vanishing/out", k=2, quiet=True,
                              s3_endpoint=s3_endpoint, region=REGION)
    with storage.configured(StorageOptions(s3_endpoint, REGION)):
        listing = list_images(config.input)
    gone = listing.manifest.column("uri")[3].as_py()
    boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION).delete_object(
        Bucket="vanishing", Key=gone[len("s3://vanishing/"):])
    result = run_stages(config, listing=listing)
    assert result.counts["listed"] == 10 and result.counts["embedded"] == 9 and result.counts["accounted"]
    assert result.counts["rejects_by_reason"] == {"unreadable": 1}
    rejects = _read(s3_endpoint, "s3://vanishing/out/rejects")
    assert rejects.column("uri").to_pylist() == [gone]


def test_fanned_out_listing_equals_flat_listing(s3_endpoint: str, tmp_path: Path) -> None:
    """The parallel S3 listing finds exactly what one flat listing finds, at every depth."""
    from fruitpipe.storage import StorageOptions, list_files

    root = tmp_path / "tree"
    for rel in ("README.txt", "Training/loose.jpg", "Training/Apple/a.jpg", "Training/Apple/deep/b.jpg",
                "Test/Pear/c.jpg", "Banana/d.jpg", "Banana/.hidden.jpg", "Empty class/e.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    assert upload_folder(root, s3_endpoint, "listing-tree", "data") == 8
    opts = StorageOptions(s3_endpoint, REGION)
    flat = sorted(list_files("s3://listing-tree/data", opts, threads=1))
    fanned = sorted(list_files("s3://listing-tree/data", opts, threads=16))
    assert fanned == flat and len(flat) == 8
    assert ("s3://listing-tree/data/Training/Apple/deep/b.jpg", len("Training/Apple/deep/b.jpg")) in fanned


def test_a_key_with_an_empty_folder_name_is_a_reject_with_its_reason(s3_endpoint: str) -> None:
    """`odd/Training//empty/4.jpg` (S3 keys may hold "//") has no class to read: a reject with its reason, not an
    input labelled ''; its neighbours are listed as usual."""
    import boto3

    from fruitpipe.pipeline.listing import list_images
    from fruitpipe.storage import StorageOptions

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION)
    s3.create_bucket(Bucket="odd", CreateBucketConfiguration={"LocationConstraint": REGION})
    for key in ("odd/Training//empty/4.jpg", "odd/Training/Kiwi/1.jpg", "odd//2.jpg"):
        s3.put_object(Bucket="odd", Key=key, Body=b"x")
    with storage.configured(StorageOptions(s3_endpoint, REGION)):
        listing = list_images("s3://odd/odd")
    assert listing.manifest.column("uri").to_pylist() == ["s3://odd/odd/Training/Kiwi/1.jpg"]
    assert "" not in listing.manifest.column("label").to_pylist()
    rejected = listing.rejected.to_pylist()
    assert [r["uri"] for r in rejected] == ["s3://odd/odd/Training//empty/4.jpg"]
    assert rejected[0]["reason"] == "empty_folder" and "'//'" in rejected[0]["detail"]
    assert listing.count == 2 and listing.ignored == ["s3://odd/odd//2.jpg"]  # a file at the root, as elsewhere


def test_the_storage_context_reaches_threads_and_spark_tasks_and_is_restored(spark, s3_endpoint: str) -> None:
    """No function between a command and storage.py takes the storage options: they are set once
    (storage.configured) and read by every call, in the driver's threads and in the Spark tasks."""
    import boto3
    import pyarrow as pa
    from concurrent.futures import ThreadPoolExecutor

    from fruitpipe.output import RunDir
    from fruitpipe.pipeline.frames import files_frame

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION)
    s3.create_bucket(Bucket="context", CreateBucketConfiguration={"LocationConstraint": REGION})
    opts = storage.StorageOptions(s3_endpoint, REGION)
    before = storage.current()
    table = pa.table({"n": list(range(7))})
    with storage.configured(opts):
        parts = [f"s3://context/parts/part-{i}.parquet" for i in range(3)]
        for uri in parts:
            storage.write_parquet(table, uri)  # no options passed: the context's endpoint
        with ThreadPoolExecutor(2) as pool:
            assert list(pool.map(lambda u: storage.read_parquet(u).num_rows, parts)) == [7, 7, 7]
        assert RunDir("s3://context/out").opts == opts
        read = files_frame(spark, parts, lambda _pos, uri: [storage.read_parquet(uri)], table.schema)
        assert read.count() == 21  # each task read its part from the loopback server, not from AWS
    assert storage.current() == before
