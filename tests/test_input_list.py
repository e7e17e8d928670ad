"""--input-list (a Parquet or CSV list of URIs, or an S3 Inventory) and --dry-run: every listed row accounted for
once, labels from the list or from the URI's folders, re-runs compare the list with what is committed."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import fruitpipe
from conftest import REGION, copy_classes, sample_classes, upload_folder
from fruitpipe.cli import main
from fruitpipe.pipeline.run import run as run_stages

CLASSES = sample_classes(2)


def _photos(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.jpg"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_classes(tmp_path_factory.mktemp("list") / "in", CLASSES, per_split=4)


def _config(listing: Path | str, out: Path | str, **kw) -> fruitpipe.Config:
    return fruitpipe.Config(input=str(listing), input_list=True, output=str(out), quiet=True, **{"k": 3, **kw})


def test_parquet_list_labels_from_folders_and_every_row_accounted(spark, photos: Path, tmp_path: Path) -> None:
    files = _photos(photos)
    uris = [str(p) for p in files] + [str(photos / "Training" / CLASSES[0] / "gone.jpg"), str(files[0])]
    pq.write_table(pa.table({"uri": uris}), tmp_path / "list.parquet")  # one missing file, one URI twice
    result = fruitpipe.run(_config(tmp_path / "list.parquet", tmp_path / "out"))
    counts = result.counts
    assert counts["listed"] == len(files) + 1 and counts["accounted"]
    assert counts["embedded"] == len(files) and counts["rejects_by_reason"] == {"unreadable": 1}
    emb = pq.read_table(tmp_path / "out" / "embeddings", columns=["uri", "label", "split"]).to_pylist()
    by_uri = {r["uri"]: r for r in emb}
    for p in files:  # label and split read from <split>/<Class>/<file>, as for a listed folder
        assert (by_uri[str(p)]["label"], by_uri[str(p)]["split"]) == (p.parent.name, p.parent.parent.name)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["config"]["input_list"] is True

    # The list shrinks by one and grows by nothing: that row is dropped, nothing is embedded again.
    pq.write_table(pa.table({"uri": uris[1:-1]}), tmp_path / "list.parquet")
    again = fruitpipe.run(_config(tmp_path / "list.parquet", tmp_path / "out")).counts
    # files[0] left the list; the missing file's reject is retried (and missing again)
    assert again["dropped_before_embedding"] == {"deleted": 1, "retried": 1} and again["accounted"]
    assert again["embedded_this_run"] == 0 and again["listed"] == len(files)
    assert again["embedded"] == len(files) - 1 and again["rejects_by_reason"] == {"unreadable": 1}


def test_csv_list_with_labels_sizes_and_a_dry_run_that_writes_nothing(spark, photos: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    files = _photos(photos)[:6]
    table = pa.table({"uri": [str(p) for p in files], "label": ["apple"] * 3 + ["pear"] * 3,
                      "split": ["training", "TEST", None, "Training", "Test", None],
                      "size": [p.stat().st_size for p in files]})
    pacsv.write_csv(table, tmp_path / "list.csv")
    out = tmp_path / "out"
    assert main(["run", "--input-list", str(tmp_path / "list.csv"), str(out), "--dry-run", "--master", "local[2]",
                 "-q", "--k", "2"]) == 0
    assert not out.exists()  # a dry run writes nothing
    assert main(["run", "--input-list", str(tmp_path / "list.csv"), str(out), "--dry-run", "--master", "local[2]",
                 "--k", "2"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["listed"] == 6 and plan["to_embed"] == 6 and plan["already_done"] == 0 and plan["tasks"] >= 1
    assert not plan["committed"]["accounted"] and plan["committed"]["embedded"] == 0

    result = fruitpipe.run(_config(tmp_path / "list.csv", out, k=2))
    rows = pq.read_table(out / "embeddings", columns=["uri", "label", "split", "size"]).sort_by("uri").to_pylist()
    got = {r["uri"]: (r["label"], r["split"], r["size"]) for r in rows}
    assert got == {str(p): (lab, sp, p.stat().st_size) for p, lab, sp in zip(
        files, table.column("label").to_pylist(), ["Training", "Test", files[2].parent.parent.name, "Training",
                                                  "Test", files[5].parent.parent.name])}
    assert result.counts["accounted"] and result.report["resources"]["bytes_read"] == sum(
        p.stat().st_size for p in files)

    # After the run, the plan says there is nothing left to do.
    fruitpipe_plan = run_stages(_config(tmp_path / "list.csv", out, k=2), ("embed",), dry_run=True).report["plan"]
    assert fruitpipe_plan["to_embed"] == 0 and fruitpipe_plan["already_done"] == 6
    assert fruitpipe_plan["committed"]["accounted"] and fruitpipe_plan["committed"]["embedded"] == 6


def test_s3_inventory_parquet_on_s3(spark, s3_endpoint: str, photos: Path, tmp_path: Path) -> None:
    """An S3 Inventory report (bucket, key, size, last_modified_date) in a folder, read from S3 by the executors."""
    import boto3

    n = upload_folder(photos, s3_endpoint, "inv", "fruits")
    keys = sorted(f"fruits/{p.relative_to(photos).as_posix()}" for p in _photos(photos))
    inventory = pa.table({"bucket": ["inv"] * len(keys), "key": keys,
                          "size": [(photos / k[len("fruits/"):]).stat().st_size for k in keys],
                          "last_modified_date": pa.array([0] * len(keys), pa.timestamp("ms", "UTC"))})
    half = len(keys) // 2
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION)
    for i, part in enumerate((inventory.slice(0, half), inventory.slice(half))):
        pq.write_table(part, tmp_path / f"{i}.parquet")
        s3.upload_file(str(tmp_path / f"{i}.parquet"), "inv", f"inventory/data/{i}.parquet")
    result = fruitpipe.run(_config("s3://inv/inventory/data", "s3://inv/runs/1", s3_endpoint=s3_endpoint,
                                   region=REGION))
    assert n == len(keys) and result.counts["listed"] == len(keys) and result.counts["embedded"] == len(keys)
    assert result.counts["accounted"]


@pytest.mark.parametrize(("content", "needle"), [
    (None, "does not exist"),
    (b"path,label\n/x.jpg,a\n", "has no `uri` column"),
    (b"\x00\x01 not a table", "cannot be read"),
])
def test_a_bad_list_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, content: bytes | None,
                                needle: str) -> None:
    listing = tmp_path / ("list.parquet" if content and content.startswith(b"\x00") else "list.csv")
    if content is not None:
        listing.write_bytes(content)
    assert main(["run", "--input-list", str(listing), str(tmp_path / "out"), "-q"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and needle in err[0] and "--input-list" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists()


def test_input_and_input_list_are_exclusive(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for argv in (["run", str(tmp_path), str(tmp_path / "out"), "--input-list", str(tmp_path / "l.csv")],
                 ["run", str(tmp_path / "out")]):
        assert main([*argv, "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "either INPUT or --input-list" in err[0]


def test_a_list_broken_far_into_the_file_is_one_line(spark, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The driver reads the header only; a malformed row met by the executors is still one line, not a trace."""
    rows = "".join(f"/nowhere/Training/Apple/{i:07d}.jpg,Apple\n" for i in range(40_000))  # > 1 MB
    (tmp_path / "list.csv").write_text("uri,label\n" + rows + "/nowhere/x.jpg,Apple,extra,columns\n")
    assert main(["embed", "--input-list", str(tmp_path / "list.csv"), str(tmp_path / "out"), "-q"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "cannot be read" in err[0] and "list.csv" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out" / "_SUCCESS").exists()


# -- S3 Inventory as AWS writes it: manifest.json, headerless CSV with URL-encoded keys, ORC, Parquet ------------

_CSV_SCHEMA = ("Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag, StorageClass, "
               "IsMultipartUploaded, ReplicationStatus, EncryptionStatus")
_REPORT = "inventory/inv/daily"  # destination-prefix/source-bucket/config-ID


def _inventory_rows(photos: Path, bucket: str = "inv") -> list[dict]:
    """What an inventory of `bucket` lists: every photo (latest version), plus an older version and a delete
    marker that are no objects to read."""
    rows = [{"bucket": bucket, "key": f"fruits/{p.relative_to(photos).as_posix()}", "version_id": "v2",
             "is_latest": True, "is_delete_marker": False, "size": p.stat().st_size,
             "last_modified_date": "2026-11-06T21:32:00.000Z", "e_tag": "0" * 32} for p in _photos(photos)]
    first = rows[0]["key"]
    rows.append({**rows[0], "version_id": "v1", "is_latest": False})
    rows.append({**rows[0], "key": first.rsplit("/", 1)[0] + "/deleted.jpg", "is_delete_marker": True,
                 "size": None})
    return rows


def _manifest(fmt: str, schema: str, keys: list[str], bucket: str = "inv") -> bytes:
    return json.dumps({"sourceBucket": bucket, "destinationBucket": f"arn:aws:s3:::{bucket}", "version": "2016-11-30",
                       "creationTimestamp": "1762464720000", "fileFormat": fmt, "fileSchema": schema,
                       "files": [{"key": k, "size": 1, "MD5checksum": "0" * 32} for k in keys]}).encode()


def _csv_gz(rows: list[dict]) -> bytes:
    import csv
    import gzip
    import io
    from urllib.parse import quote_plus

    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL)
    for r in rows:  # no header; keys form-encoded as AWS writes CSV inventories ("Apple+10%2F0.jpg")
        w.writerow([r["bucket"], quote_plus(r["key"]), r["version_id"], str(r["is_latest"]).lower(),
                    str(r["is_delete_marker"]).lower(), "" if r["size"] is None else r["size"],
                    r["last_modified_date"], r["e_tag"], "STANDARD", "false", "", "SSE-S3"])
    return gzip.compress(buf.getvalue().encode())


def test_s3_inventory_csv_report_on_s3_as_aws_writes_it(spark, s3_endpoint: str, photos: Path) -> None:
    import boto3

    upload_folder(photos, s3_endpoint, "invcsv", "fruits")
    rows = _inventory_rows(photos, "invcsv")
    assert any(" " in r["key"] for r in rows)  # every Fruits-360 class folder has a space
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name=REGION)
    plus = rows[0]["key"].rsplit("/", 1)[0] + "/c++ 1.jpg"  # a literal "+" beside a space in one key
    s3.put_object(Bucket="invcsv", Key=plus, Body=_photos(photos)[0].read_bytes() + b"\0")  # other content
    rows.insert(0, {**rows[0], "key": plus})
    report = "inventory/invcsv/daily"  # in the source bucket itself: a destination may be any bucket
    half = len(rows) // 2
    keys = [f"{report}/data/{name}.csv.gz" for name in ("a1b2", "c3d4")]
    for key, part in zip(keys, (rows[:half], rows[half:])):
        s3.put_object(Bucket="invcsv", Key=key, Body=_csv_gz(part))
    s3.put_object(Bucket="invcsv", Key=f"{report}/2026-11-06T21-32Z/manifest.json",
                  Body=_manifest("CSV", _CSV_SCHEMA, keys, "invcsv"))
    n = len(_photos(photos)) + 1
    folder = f"s3://invcsv/{report}/2026-11-06T21-32Z"
    for i, listing in enumerate((f"{folder}/manifest.json", folder)):
        counts = fruitpipe.run(_config(listing, f"s3://invcsv/runs/{i}", s3_endpoint=s3_endpoint,
                                       region=REGION)).counts
        assert counts["listed"] == n and counts["embedded"] == n and counts["accounted"]
    table = pq.read_table("invcsv/runs/0/embeddings", filesystem=_s3fs(s3_endpoint), columns=["uri", "label"])
    assert set(table.column("label").to_pylist()) == set(CLASSES)  # decoded: "Apple 10", not "Apple%2010"
    uris = table.column("uri").to_pylist()
    assert all(u.startswith("s3://invcsv/fruits/") and "%" not in u for u in uris)
    assert f"s3://invcsv/{plus}" in uris and not any("+" in u for u in uris if u != f"s3://invcsv/{plus}")


def _s3fs(endpoint: str):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(endpoint_override=endpoint, region=REGION, scheme="http")


def test_a_downloaded_parquet_or_orc_inventory_reads_its_data_files_beside_it(photos: Path, tmp_path: Path) -> None:
    from pyarrow import orc

    from fruitpipe.pipeline import manifest

    rows = _inventory_rows(photos)
    table = pa.Table.from_pylist(rows).set_column(
        6, "last_modified_date", pa.array([1762464720000] * len(rows), pa.timestamp("ms", "UTC")))
    for fmt, schema in (("Parquet", "message s3.inventory { required binary bucket (UTF8); required binary key "
                                    "(UTF8); optional int64 size; }"),
                        ("ORC", "struct<bucket:string,key:string,size:bigint>")):
        report = tmp_path / fmt / "inv" / "daily"
        (report / "data").mkdir(parents=True)
        (report / "2026-11-06T21-32Z").mkdir()
        name = f"data/9f1e.{fmt.lower()}"
        (pq.write_table if fmt == "Parquet" else orc.write_table)(table, str(report / name))
        (report / "2026-11-06T21-32Z" / "manifest.json").write_bytes(
            _manifest(fmt, schema, [f"{_REPORT}/{name}"]))
        source = manifest.list_files(str(report / "2026-11-06T21-32Z"))
        assert source.files == (str(report / name),) and not source.url_encoded_keys
        manifest.check(source)
        got = pa.concat_tables(manifest.to_manifest(b, source)
                               for b in manifest._batches(source.files[0], source))
        assert got.column("uri").to_pylist() == [f"s3://inv/{r['key']}" for r in rows[:-2]]
        assert got.column("mtime_ns").to_pylist() == [1762464720000 * 1_000_000] * (len(rows) - 2)
        assert set(got.column("label").to_pylist()) == set(CLASSES)


def test_a_run_in_which_nothing_could_be_read_fails_in_one_line(spark, tmp_path: Path, capsys) -> None:
    gone = [f"/nowhere/Training/Apple/{i}.jpg" for i in range(5)]
    pq.write_table(pa.table({"uri": gone}), tmp_path / "list.parquet")
    out = tmp_path / "out"
    assert main(["embed", "--input-list", str(tmp_path / "list.parquet"), str(out), "-q"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "none of the 5 listed input(s) could be embedded: 5 unreadable" in err[0]
    assert any(f"e.g. {g} " in err[0] for g in gone) and not (out / "_SUCCESS").exists()


def test_relative_paths_in_a_list_are_stored_absolute(spark, photos: Path, tmp_path: Path, monkeypatch) -> None:
    files = _photos(photos)[:4]
    monkeypatch.chdir(photos.parent)
    relative = [f"./{p.relative_to(photos.parent).as_posix()}" for p in files]
    pacsv.write_csv(pa.table({"uri": relative}), tmp_path / "list.csv")
    fruitpipe.run(_config(tmp_path / "list.csv", tmp_path / "out", k=2))
    monkeypatch.chdir(tmp_path)  # another working directory: the output alone says where the photos are
    stored = pq.read_table(tmp_path / "out" / "embeddings", columns=["uri"]).column("uri").to_pylist()
    assert sorted(stored) == sorted(str(p) for p in files) and all(Path(u).is_file() for u in stored)
