"""End to end on real Spark (local[2]): layout, schemas, accounting, bad inputs, equality with raw
onnxruntime, PCA against numpy, one ONNX session per worker, resume and incremental runs."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
from PIL import Image

import fruitpipe
from fruitpipe.pipeline.listing import list_images
from fruitpipe.pipeline.run import run as run_stages
from fruitpipe.storage import StorageOptions
from conftest import MODELS, copy_classes, sample_classes

# Also run on the EMR nodes' packages (scripts/nodes-env.sh: PySpark 3.5, numpy 1.x).
pytestmark = pytest.mark.nodes

CLASSES = sample_classes(9)
BASE_CLASSES, EXTRA_CLASS = CLASSES[:8], CLASSES[8]

# file name -> expected reason, written into a class folder of the input
BAD = {
    "empty.jpg": "empty",
    "truncated.jpg": "truncated",
    "random.jpg": "not_an_image",
    "notes.jpg": "not_an_image",
    "bomb.png": "too_large",
    "deleted-after-listing.jpg": "unreadable",
}
ODD_BUT_VALID = ["gray.jpg", "cmyk.jpg", "rgba.png", "palette.png", "sixteen.png", "rotated.jpg", "photo.webp"]


def _write_bad_and_odd(folder: Path, jpeg: bytes) -> None:
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (folder / "random.jpg").write_bytes(bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8)))
    (folder / "notes.jpg").write_text("this is a text file named like a photo\n" * 10)
    Image.new("1", (20_000, 20_000)).save(folder / "bomb.png")
    (folder / "deleted-after-listing.jpg").write_bytes(jpeg)
    src = Image.open(io.BytesIO(jpeg)).convert("RGB")
    src.convert("L").save(folder / "gray.jpg")
    src.convert("CMYK").save(folder / "cmyk.jpg")
    rgba = src.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    src.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png", transparency=0)
    Image.fromarray((np.asarray(src.convert("L"), dtype=np.uint16) * 257)).save(folder / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 3
    src.save(folder / "rotated.jpg", exif=exif)
    src.save(folder / "photo.webp")


@pytest.fixture(scope="module")
def e2e(spark, tmp_path_factory: pytest.TempPathFactory):
    """One full run on 8 classes (640 real photos) plus generated bad and odd inputs and a duplicate."""
    root = tmp_path_factory.mktemp("e2e")
    data = copy_classes(root / "input", BASE_CLASSES)
    odd_dir = data / "Training" / BASE_CLASSES[0]
    jpeg = sorted(odd_dir.iterdir())[0].read_bytes()
    _write_bad_and_odd(odd_dir, jpeg)
    dup_of = sorted((data / "Test" / BASE_CLASSES[1]).iterdir())[0]
    shutil.copyfile(dup_of, data / "Test" / BASE_CLASSES[1] / "zz-copy.jpg")  # same bytes, sorts after
    (data / "README.txt").write_text("not in a class folder: ignored by the layout\n")
    listing = list_images(str(data))
    (odd_dir / "deleted-after-listing.jpg").unlink()  # gone between listing and reading
    config = fruitpipe.Config(input=str(data), output=str(root / "out"), k=10, partition_size=64, quiet=True)
    result = run_stages(config, listing=listing)
    return {"input": data, "out": root / "out", "result": result, "config": config, "odd_dir": odd_dir,
            "listing": listing, "dup": (dup_of, data / "Test" / BASE_CLASSES[1] / "zz-copy.jpg")}


def _table(path: Path):
    return pq.read_table(path)  # a directory of part files reads as one table


def test_output_layout_and_schemas(e2e) -> None:
    out: Path = e2e["out"]
    for name in ("run.json", "_SUCCESS", "embeddings", "rejects", "reduced", "pca/explained_variance.json",
                 "pca/scree.png", "pca/components.npy", "report.html"):
        assert (out / name).exists(), name
    report = (out / "report.html").read_text()
    for reason in e2e["result"].counts["rejects_by_reason"]:  # each reason, with an example uri
        assert f"<td>{reason}</td>" in report
    assert "Example rejects" in report and "http://" not in report and "https://" not in report
    assert not (out / "_staging").exists()
    emb = _table(out / "embeddings")
    assert emb.schema.names == ["id", "uri", "label", "split", "features", "size", "mtime_ns"]
    assert str(emb.schema.field("features").type) == "list<element: float>"
    assert set(len(v) for v in emb.column("features").to_pylist()[:50]) == {1280}
    rej = _table(out / "rejects")
    assert rej.schema.names == ["id", "uri", "label", "split", "reason", "detail", "size", "mtime_ns"]
    red = _table(out / "reduced")
    assert red.schema.names == ["id", "uri", "label", "split", "pca"]
    assert {len(v) for v in red.column("pca").to_pylist()} == {10}
    assert sorted(red.column("id").to_pylist()) == sorted(emb.column("id").to_pylist())
    assert set(emb.column("split").to_pylist()) == {"Training", "Test"}
    assert set(emb.column("label").to_pylist()) == set(BASE_CLASSES)
    png = (out / "pca" / "scree.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(io.BytesIO(png)).size[0] >= 600


def test_every_input_accounted_for_once(e2e) -> None:
    out: Path = e2e["out"]
    listed = set(e2e["listing"].manifest.column("uri").to_pylist())
    emb, rej = _table(out / "embeddings"), _table(out / "rejects")
    emb_uris, rej_uris = emb.column("uri").to_pylist(), rej.column("uri").to_pylist()
    assert len(emb_uris) + len(rej_uris) == len(listed) == 8 * 80 + len(BAD) + len(ODD_BUT_VALID) + 1
    assert set(emb_uris) | set(rej_uris) == listed and not set(emb_uris) & set(rej_uris)
    ids = emb.column("id").to_pylist()
    assert len(ids) == len(set(ids))
    counts = e2e["result"].counts
    assert counts["listed"] == len(listed) and counts["accounted"] is True
    assert counts["embedded"] == len(emb_uris) and counts["rejected"] == len(rej_uris)
    assert counts["ignored_outside_class_folders"] == 1
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["counts"] == counts
    assert run_json["model"]["sha256"] == "ad116e43570b0c581f3d87b9b0797648f0920f3a978b9ed3b052533afc91aa04"
    # The listing was made by the test and handed in, so there is no "list" timing of fruitpipe's own.
    timings = run_json["timings_s"]
    assert {"embed", "embed_job", "reduce", "reduce_fit", "spark_start", "total"} <= set(timings)
    assert 0 < timings["embed_job"] <= timings["embed"] and 0 < timings["reduce_fit"] <= timings["reduce"]
    assert "list" not in run_json["timings_s"]
    import pyspark

    assert run_json["versions"]["pyspark"] == pyspark.__version__ and run_json["versions"]["java"]
    from fruitpipe.version import code_sha256

    # The code that ran, by digest: the key of the EMR code artifacts (a cluster's run.json names what it ran).
    assert run_json["versions"]["fruitpipe_code_sha256"] == code_sha256() and len(code_sha256()) == 64


def test_bad_inputs_get_their_reason_and_odd_images_are_embedded(e2e) -> None:
    rej = _table(e2e["out"] / "rejects").to_pylist()
    by_name = {Path(r["uri"]).name: r for r in rej}
    for name, reason in BAD.items():
        assert by_name[name]["reason"] == reason, (name, by_name[name])
        assert by_name[name]["detail"]
        assert by_name[name]["label"] == BASE_CLASSES[0]
    dup_of, copy = e2e["dup"]
    assert by_name[copy.name]["reason"] == "duplicate" and str(dup_of) in by_name[copy.name]["detail"]
    assert len(rej) == len(BAD) + 1
    embedded = {Path(u).name for u in _table(e2e["out"] / "embeddings").column("uri").to_pylist()}
    assert set(ODD_BUT_VALID) <= embedded and dup_of.name in embedded


def test_one_onnx_session_per_worker(e2e) -> None:
    inference = e2e["result"].counts["inference"]
    assert inference["tasks"] >= 10  # 660 images / 64 per task, rounded to whole waves
    # Python workers are reused across tasks (Spark may retire an idle one and fork another, so the
    # count of workers is not pinned to the 2 slots), and no worker ever built a second session.
    assert 1 <= inference["workers"] < inference["tasks"]
    assert inference["max_sessions_per_worker"] == 1
    assert inference["sessions_built"] == inference["workers"]


def _direct_features(paths: list[Path]) -> np.ndarray:
    """Raw onnxruntime with its own preprocessing (PIL RGB, bilinear 224, pixel/127.5-1)."""
    session = ort.InferenceSession(str(MODELS / "mobilenet_v2_features.onnx"), providers=["CPUExecutionProvider"])
    batch = np.stack([
        np.asarray(Image.open(p).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR), np.float32) / 127.5 - 1
        for p in paths
    ])
    return session.run(["features"], {"input": batch})[0]


def test_features_equal_direct_onnxruntime(e2e) -> None:
    emb = _table(e2e["out"] / "embeddings")
    rows = {r["uri"]: r["features"] for r in emb.select(["uri", "features"]).to_pylist()}
    paths = [p for p in sorted((e2e["input"] / "Test" / BASE_CLASSES[2]).iterdir())[:6]]
    paths += [sorted((e2e["input"] / "Training" / BASE_CLASSES[5]).iterdir())[0]]
    expected = _direct_features(paths)
    got = np.array([rows[str(p)] for p in paths], dtype=np.float32)
    assert np.abs(got - expected).max() < 1e-4


def test_pca_matches_numpy_and_spark_transform(e2e, spark) -> None:
    out = e2e["out"]
    emb = _table(out / "embeddings")
    x = np.array(emb.column("features").to_pylist(), dtype=np.float64)
    eig = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
    share = eig / eig.sum()
    report = json.loads((out / "pca" / "explained_variance.json").read_text())
    spark_share = np.array(report["per_component"])
    assert len(spark_share) == 1280 and report["k"] == 10
    np.testing.assert_allclose(spark_share[:50], share[:50], rtol=1e-6)
    np.testing.assert_allclose(report["cumulative"][9], share[:10].sum(), rtol=1e-6)
    assert report["explained_at_k"] == pytest.approx(share[:10].sum(), rel=1e-6)
    components = np.load(out / "pca" / "components.npy")
    assert components.shape == (1280, 10)
    from fruitpipe.pipeline.pca_files import load_components  # what the serving path will load

    np.testing.assert_array_equal(load_components(str(out / "pca")), components)
    red = {r["id"]: r["pca"] for r in _table(out / "reduced").select(["id", "pca"]).to_pylist()}
    ids = emb.column("id").to_pylist()
    got = np.array([red[i] for i in ids])
    np.testing.assert_allclose(got, x @ components, rtol=1e-4, atol=1e-4)
    from pyspark.ml.feature import PCA
    from pyspark.ml.functions import array_to_vector, vector_to_array

    # fruitpipe fixes each axis's sign (largest loading positive); Spark's own choice of sign is arbitrary.
    rows = np.arange(components.shape[1])
    assert (components[np.argmax(np.abs(components), axis=0), rows] > 0).all()
    df = spark.createDataFrame([(i, [float(v) for v in row]) for i, row in zip(ids, x)], "id string, f array<double>")
    # Spark ML's own PCA fit agrees where Spark has native LAPACK (its pure-Java fallback got this spectrum wrong,
    # which is why the fit is numpy's; CI machines have no system LAPACK since then).
    if "JNI" in spark._jvm.dev.ludovic.netlib.lapack.LAPACK.getInstance().getClass().getName():
        model = PCA(k=10, inputCol="v", outputCol="p").fit(df.select("id", array_to_vector("f").alias("v")))
        sp = {r["id"]: r["p"] for r in model.transform(df.select("id", array_to_vector("f").alias("v")))
              .select("id", vector_to_array("p").alias("p")).collect()}
        spark_reduced = np.array([sp[i] for i in ids])
        signs = np.sign((spark_reduced * got).sum(axis=0))
        np.testing.assert_allclose(spark_reduced * signs, got, rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(model.explainedVariance.toArray(), share[:10], rtol=1e-6)
    # The published pca/spark_model/ is a PCAModel: Spark users load it and get the same reduced vectors.
    from pyspark.ml.feature import PCAModel

    loaded = PCAModel.load(str(out / "pca" / "spark_model"))
    np.testing.assert_allclose(loaded.pc.toArray(), components, rtol=0, atol=0)
    np.testing.assert_allclose(loaded.explainedVariance.toArray(), share[:10], rtol=1e-6)
    mine = {r["id"]: r["pca"] for r in loaded.transform(df.select("id", array_to_vector("f").alias("features")))
            .select("id", vector_to_array("pca").alias("pca")).collect()}
    np.testing.assert_allclose(np.array([mine[i] for i in ids]), got, rtol=1e-4, atol=1e-4)


def test_a_sample_of_the_reduced_vectors_reads_only_the_parts_it_keeps(e2e, monkeypatch) -> None:
    """What the notebook plots: at most max_rows rows, from whole parts in a seeded order, the same each time."""
    from fruitpipe import storage
    from fruitpipe.output import RunDir

    rundir = RunDir(str(e2e["out"]), StorageOptions())
    files = rundir.reduced_files()
    whole = rundir.read_reduced(["id", "pca"])
    sizes = [pq.read_metadata(f).num_rows for f in files]
    assert len(files) >= 2 and whole is not None and whole.num_rows == sum(sizes)
    reads: list[str] = []
    real = storage.read_parquet
    monkeypatch.setattr(storage, "read_parquet", lambda uri, *a, **k: reads.append(uri) or real(uri, *a, **k))
    one = rundir.read_reduced(["id", "pca"], max_rows=min(sizes) - 1)
    assert one is not None and one.num_rows == min(sizes) - 1 and len(reads) == 1  # one part, cut at random
    assert set(one.column("id").to_pylist()) <= set(pq.read_table(reads[0], columns=["id"]).column("id").to_pylist())
    reads.clear()
    more = rundir.read_reduced(["id", "pca"], max_rows=max(sizes) + 1)
    assert more is not None and more.num_rows == max(sizes) + 1 and 2 <= len(reads) <= len(files)
    ids = more.column("id").to_pylist()
    assert len(set(ids)) == len(ids) and set(ids) <= set(whole.column("id").to_pylist())
    again = rundir.read_reduced(["id", "pca"], max_rows=max(sizes) + 1)
    assert again is not None and again.column("id").to_pylist() == ids  # seeded: the same plot each time
    everything = rundir.read_reduced(["id"], max_rows=whole.num_rows + 10)
    assert everything is not None and sorted(everything.column("id").to_pylist()) == sorted(
        whole.column("id").to_pylist())


def _parquet_digest(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*.parquet"))}


def test_rerun_does_no_work_and_changes_nothing(e2e) -> None:
    out = e2e["out"]
    listing = list_images(str(e2e["input"]))
    # The first re-run drops the reject row of the file deleted after the first listing (it is no longer listed)
    first = run_stages(e2e["config"], listing=listing).counts
    assert first["dropped_before_embedding"] == {"deleted": 1} and first["not_listed_anymore"] == 0
    assert first["embedded_this_run"] == 0 and first["accounted"] and first["listed"] == e2e["listing"].count - 1
    before = _parquet_digest(out)
    record = (out / "_commit.json").read_bytes()
    result = run_stages(e2e["config"], listing=listing)
    counts = result.counts
    assert counts["dropped_before_embedding"] == {}
    assert counts["embedded_this_run"] == 0 and counts["rejected_this_run"] == 0
    assert counts["inference"]["sessions_built"] == 0
    assert counts["skipped_already_done"] == counts["listed"] - 0
    assert result.report["pca"]["skipped"] is True
    # Nothing to do, and the listing is the one the last run was made from: answered from the listing alone
    # (issue 37 item 18: the comparison with the committed rows, on the executors, no longer runs), no embed job
    assert result.report["up_to_date"] and "embed_job" not in result.report["timings_s"]
    assert _parquet_digest(out) == before
    assert (out / "_commit.json").read_bytes() == record  # nothing committed, so no new record version
    assert (out / "_SUCCESS").exists()


def test_adding_images_embeds_only_the_new_ones(e2e) -> None:
    """It grows the shared input: tests after it see 9 classes."""
    out, data = e2e["out"], e2e["input"]
    old = e2e["result"].counts
    copy_classes(data, [EXTRA_CLASS])
    result = fruitpipe.run(e2e["config"].replace(variance=0.9))
    counts = result.counts
    assert counts["embedded_this_run"] == 80 and counts["rejected_this_run"] == 0  # the new class only
    assert counts["listed"] == old["listed"] - 1 + 80  # the deleted file is no longer listed...
    assert counts["not_listed_anymore"] == 0  # ...and its reject row was dropped by the re-run before
    assert counts["embedded"] == old["embedded"] + 80 and counts["accounted"] is True
    assert result.report["pca"]["skipped"] is False
    report = json.loads((out / "pca" / "explained_variance.json").read_text())
    k = report["k"]
    assert report["selected_by"] == "variance" and report["n_samples"] == old["embedded"] + 80
    assert report["cumulative"][k - 1] >= 0.9 > report["cumulative"][k - 2]
    assert {len(v) for v in _table(out / "reduced").column("pca").to_pylist()} == {k}
    ids = _table(out / "embeddings").column("id").to_pylist()
    assert len(ids) == len(set(ids)) == old["embedded"] + 80


def test_pca_guard_rejects_a_wrong_decomposition(e2e, spark) -> None:
    """The check behind every fit: components that are not the data's principal axes are refused; the pass that
    measures them reads every committed row."""
    from fruitpipe.pipeline import reduce as reduce_mod

    out = e2e["out"]
    files = sorted(str(p) for p in (out / "embeddings").glob("*.parquet"))
    components = np.load(out / "pca" / "components.npy")
    report = json.loads((out / "pca" / "explained_variance.json").read_text())
    claimed = np.array(report["per_component"][: components.shape[1]])
    n, measured = reduce_mod.project_parts(spark, files, components)
    assert n == report["n_samples"]
    reduce_mod.check_pca(measured, claimed)  # the published fit passes
    wrong, _ = np.linalg.qr(np.random.default_rng(0).normal(size=components.shape))  # orthonormal, arbitrary
    _, measured_wrong = reduce_mod.project_parts(spark, files, wrong)
    with pytest.raises(reduce_mod.PcaCheckError, match="the PCA is inconsistent"):
        reduce_mod.check_pca(measured_wrong, claimed)


def test_report_scatter_sample_is_bounded_and_drawn_from_the_rows(e2e) -> None:
    """The report's scatter reads the reduced parts one at a time and keeps at most N points per class."""
    from collections import Counter

    from fruitpipe.output import RunDir
    from fruitpipe.report.html import scatter_sample

    rundir = RunDir(str(e2e["out"]), StorageOptions())
    table = pq.read_table(e2e["out"] / "reduced", columns=["label", "pca"]).to_pylist()
    rows: dict[str, set] = {}
    for r in table:
        rows.setdefault(r["label"], set()).add((np.float32(r["pca"][0]), np.float32(r["pca"][1])))
    counts, points = scatter_sample(rundir, per_class=5)
    assert counts == dict(Counter(r["label"] for r in table))
    for label, pts in points.items():
        assert len(pts) == min(5, counts[label]) and {tuple(p) for p in pts} <= rows[label]
    _, every = scatter_sample(rundir, per_class=10**6)
    assert {label: {tuple(p) for p in pts} for label, pts in every.items()} == rows


def test_a_rerun_with_nothing_changed_answers_without_starting_spark(tmp_path: Path, monkeypatch) -> None:
    """The same listing (uri, size, mtime of every input) and settings as the last complete run, and the output's
    rows as it left them: no Spark, no Parquet file or record written, run.json says so (issue 37 item 18: 56 s on
    the full release, 8 of them Spark's start). A photo touched, another k or --overwrite: the run goes on as before."""
    import os

    from fruitpipe.pipeline.stages import LazySpark

    data = copy_classes(tmp_path / "in", sample_classes(2), per_split=3)
    out = tmp_path / "out"
    config = fruitpipe.Config(input=str(data), output=str(out), k=2, quiet=True)
    first = fruitpipe.run(config)
    assert "up_to_date" not in first.report
    parts, record = _parquet_digest(out), (out / "_commit.json").read_bytes()
    real_get = LazySpark.get
    monkeypatch.setattr(LazySpark, "get", lambda self: pytest.fail("Spark was started for a run with nothing to do"))
    again = fruitpipe.run(config)
    assert again.report["up_to_date"]["since_run"] == first.report["run_id"]
    assert again.report["counts"]["embedded"] == first.report["counts"]["embedded"] == 12
    assert again.report["counts"]["embedded_this_run"] == 0 and set(again.report["timings_s"]) == {"list", "total"}
    assert again.report["pca"]["skipped"] is True and (out / "_SUCCESS").exists()
    assert json.loads((out / "run.json").read_text())["run_id"] == again.report["run_id"] != first.report["run_id"]
    assert _parquet_digest(out) == parts and (out / "_commit.json").read_bytes() == record
    monkeypatch.setattr(LazySpark, "get", real_get)
    photo = sorted(data.rglob("*.jpg"))[0]
    st = photo.stat()
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: its row is checked again
    assert "up_to_date" not in fruitpipe.run(config).report
    assert "up_to_date" in fruitpipe.run(config).report
    other_k = fruitpipe.run(config.replace(k=3))
    assert "up_to_date" not in other_k.report and other_k.report["pca"]["k"] == 3
