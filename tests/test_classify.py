"""`fruitpipe train`: fitted on Training, evaluated on Test, exported as one ONNX file that answers as Spark does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import fruitpipe
from conftest import TRAINED_CLASSES, copy_classes
from fruitpipe import images
from fruitpipe.classify.export import FruitClassifier
from fruitpipe.cli import main

CLASSES = TRAINED_CLASSES


def _run(root: Path, splits: tuple[str, ...] = ("Training", "Test")) -> Path:
    data = copy_classes(root / "in", CLASSES, splits=splits)
    fruitpipe.run(fruitpipe.Config(input=str(data), output=str(root / "out"), k=8, quiet=True))
    return root / "out"


def _test_photos(out: Path) -> list[str]:
    return sorted(str(p) for p in (out.parent / "in" / "Test").rglob("*.jpg"))


def test_train_writes_metrics_chosen_on_training_only(trained) -> None:
    m = trained["metrics"]
    assert m["n_train"] == 300 and m["n_test"] == 100 and m["test_source"] == "the Test split"
    assert m["classes"] == sorted(CLASSES) and m["top1"] >= 0.95 and m["top5"] == 1.0 and m["macro_f1"] >= 0.95
    assert set(m["per_class"]) == set(CLASSES) and all(c["support"] == 20 for c in m["per_class"].values())
    cv = m["cross_validation"]
    from fruitpipe.classify.linear import CANDIDATES

    assert cv["param"] == "model" and list(cv["tried"]) == [c.name for c in CANDIDATES] and cv["rows"] == 300
    assert cv["tried"][cv["chosen"]]["log_loss"] == min(t["log_loss"] for t in cv["tried"].values())
    calib = m["calibration"]
    assert calib["temperature"] == cv["tried"][cv["chosen"]]["temperature"]
    assert calib["test_after"]["rows"] == 100 and 0 <= calib["test_after"]["ece"] <= 1
    assert calib["test_after"]["log_loss"] <= calib["test_before"]["log_loss"] + 1e-9 or calib["temperature"] == 1
    assert m["statistics"]["mode"] == "full" and m["statistics"]["transform"] == "sqrt_l2"
    assert (trained["out"] / "classifier" / "stats.npz").is_file()
    assert [r["features"] for r in m["pca_table"]] == ["embeddings", "PCA-20", "PCA-50", "PCA variance 0.95"]
    assert m["pca_table"][0]["top1"] == m["top1"] and 0 < m["pca_table"][3]["k"] <= 1280
    report = json.loads((trained["out"] / "run.json").read_text())
    assert m["embedding_model"]["sha256"] == report["model"]["sha256"]
    assert (trained["out"] / "classifier" / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_onnx_file_answers_as_spark_on_every_test_photo(trained) -> None:
    """One file, photo -> probabilities, no Spark: its top-1 is Spark's on each of the 100 Test photos, through
    the batch pipeline's own decode and preprocessing."""
    out = trained["out"]
    clf = FruitClassifier((out / "classifier" / "fruit_classifier.onnx").read_bytes())
    assert clf.classes == sorted(CLASSES)
    assert clf.metadata["embedding_model_sha256"] == trained["metrics"]["embedding_model"]["sha256"]
    spark_pred = {r["uri"]: r["predicted"]
                  for r in pq.read_table(out / "classifier" / "test_predictions.parquet").to_pylist()}
    photos = _test_photos(out)
    assert set(spark_pred) == set(photos)
    batch = np.stack([images.model_input(Path(p).read_bytes(), 224, 64_000_000) for p in photos])
    onnx_pred = [clf.classes[i] for i in np.argmax(clf.probabilities(batch), axis=1)]
    assert onnx_pred == [spark_pred[p] for p in photos]
    first = photos[0]
    top = clf.top(Path(first).read_bytes())
    assert len(top) == 5 and top[0][0] == spark_pred[first] and abs(sum(p for _, p in top) - 1) < 1e-4


def test_spark_ml_logreg_stays_available_and_its_model_is_readable(trained, spark, tmp_path: Path) -> None:
    import shutil

    from pyspark.ml.classification import LogisticRegressionModel

    out = tmp_path / "out"
    shutil.copytree(trained["out"], out)
    assert main(["train", str(out), "--classifier", "logreg", "--folds", "2", "--no-pca-table",
                 "--master", "local[2]", "-q"]) == 0
    m = json.loads((out / "classifier" / "metrics.json").read_text())
    assert m["cross_validation"]["param"] == "regParam" and m["top1"] >= 0.95
    model = LogisticRegressionModel.load(str(out / "classifier" / "spark_model"))
    assert model.numClasses == 5 and model.numFeatures == 1280


def test_reduced_features_and_mlp_export_too(trained, tmp_path: Path) -> None:
    """The PCA-reduced vectors as features and the perceptron as classifier: the exported file (backbone, PCA
    projection, two dense layers) still answers as Spark does on every Test photo."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(trained["out"], out)
    (out / "classifier").rename(out / "classifier-logreg")
    assert main(["train", str(out), "--features", "reduced", "--classifier", "mlp", "--folds", "2",
                 "--no-pca-table", "--master", "local[2]", "-q"]) == 0
    m = json.loads((out / "classifier" / "metrics.json").read_text())
    assert m["settings"]["features"] == "reduced" and m["settings"]["feature_dim"] == 8 and m["pca_table"] == []
    assert m["cross_validation"]["param"] == "layers" and m["top1"] >= 0.8
    clf = FruitClassifier((out / "classifier" / "fruit_classifier.onnx").read_bytes())
    spark_pred = {r["uri"]: r["predicted"]
                  for r in pq.read_table(out / "classifier" / "test_predictions.parquet").to_pylist()}
    photos = sorted(spark_pred)
    batch = np.stack([images.model_input(Path(p).read_bytes(), 224, 64_000_000) for p in photos])
    assert [clf.classes[i] for i in np.argmax(clf.probabilities(batch), axis=1)] == [spark_pred[p] for p in photos]


def test_without_a_test_split_a_stratified_holdout_is_used_and_said(spark, tmp_path: Path) -> None:
    out = _run(tmp_path, splits=("Training",))
    assert main(["train", str(out), "--folds", "2", "--no-pca-table", "--master", "local[2]", "-q"]) == 0
    m = json.loads((out / "classifier" / "metrics.json").read_text())
    assert m["test_source"].startswith("no Test split: 20% of Training held out by content id")
    assert m["n_train"] + m["n_test"] == 300 and 30 <= m["n_test"] <= 90
    assert all(c["support"] > 0 for c in m["per_class"].values())  # every class is in the hold-out


def test_train_refuses_in_one_line(tmp_path: Path, capsys) -> None:
    assert main(["train", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no _SUCCESS" in err and "fruitpipe run" in err
    with pytest.raises(SystemExit):
        main(["train", str(tmp_path), "--classifier", "svm"])
    assert "invalid choice: 'svm'" in capsys.readouterr().err


def test_every_class_of_the_current_release_has_its_information() -> None:
    """The 160 folders of Fruits-360's current release: each gets a name and, except the one whose fruit is not
    known for sure, its species, family and a sentence; a class of another release falls back to its folder."""
    from conftest import SHARED
    from fruitpipe.classify.fruits import describe

    labels = [ln.strip() for ln in (SHARED / "data" / "fruits360-classes.txt").read_text().splitlines() if ln.strip()]
    assert len(labels) == 160
    unknown = [label for label in labels if describe(label)["scientific_name"] is None]
    assert unknown == ["Nut Forest 1"]
    for label in labels:
        info = describe(label)
        assert info["name"] and info["label"] == label
        if label not in unknown:
            assert info["family"].endswith("aceae") and info["about"].endswith("."), info
    assert describe("Apple Braeburn 1") | {} == {
        "label": "Apple Braeburn 1", "name": "Apple – Braeburn", "variety": "Braeburn",
        "scientific_name": "Malus domestica", "family": "Rosaceae", "about": describe("Apple 6")["about"],
        "source": "fruitpipe's species table"}
    assert describe("Potato Sweet 1")["scientific_name"] == "Ipomoea batatas"  # longest species name wins
    assert describe("Blackberrie not rippen 1")["name"] == "Blackberry – not ripe"
    assert describe("Durian 1") == {"label": "Durian 1", "name": "Durian", "variety": None, "scientific_name": None,
                                    "family": None, "about": None, "source": "derived from the folder name"}


def test_labels_that_look_like_math_are_drawn_literally() -> None:
    """A class folder named "Kiwi $\\frac$ 1" once crashed train at the confusion plot (matplotlib mathtext)."""
    from fruitpipe.classify.metrics import confusion_png

    png = confusion_png(np.array([0, 1, 1]), np.array([0, 1, 0]), ["Kiwi $\\frac$ 1", "Apple $x^"],
                        "logreg on $embeddings")
    assert png.startswith(b"\x89PNG")


def test_train_without_the_photos_refuses_before_fitting_and_checks_on_those_left(tmp_path: Path, capsys) -> None:
    """The output holds the embeddings, not the photos, yet the export check reads some: moved photos are one
    line before any fit; some of them back, the check runs on those and says how many were missing."""
    import shutil

    data = copy_classes(tmp_path / "in", TRAINED_CLASSES[:2], per_split=6)
    out = tmp_path / "out"
    fruitpipe.run(fruitpipe.Config(input=str(data), output=str(out), k=4, quiet=True))
    shutil.move(str(data), str(tmp_path / "moved"))
    capsys.readouterr()
    assert main(["train", str(out), "--master", "local[2]", "--no-pca-table", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not where `run` found them" in err[0]
    assert not (out / "classifier" / "fruit_classifier.onnx").exists()
    shutil.copytree(tmp_path / "moved", data)
    for photo in sorted((data / "Test" / TRAINED_CLASSES[0]).iterdir())[:3]:
        photo.unlink()
    assert main(["train", str(out), "--master", "local[2]", "--no-pca-table", "-q"]) == 0
    check = json.loads((out / "classifier" / "metrics.json").read_text())["onnx"]["agreement_with_spark"]
    assert check["photos_unreadable"] == 3 and check["images"] == 12 - 3 == check["same_top1"]


def _copy_trained(trained: dict, dest: Path) -> Path:
    import shutil

    shutil.copytree(trained["out"], dest)
    return dest


@pytest.mark.parametrize("dies", ["before_the_record", "after_the_record"])
def test_the_classifier_is_published_whole_and_something_whole_is_always_served(
        trained, tmp_path: Path, monkeypatch, capsys, dies: str) -> None:
    """The record names each classifier file's sha256. A train killed while publishing (the fault injected on a
    move: the second hidden one, before the record write; or the first rename over a published name, after it)
    leaves a whole classifier that serve takes and that the record names: the old one, or the new one from its
    hidden files. Before, the files were renamed over the old ones before the record named them: killed there, serve
    refused everything (and a first train's unrecorded file was served). The next train publishes whole again."""
    import hashlib

    from fruitpipe import storage
    from fruitpipe.classify.published import read_classifier
    from fruitpipe.output import RunDir

    out = _copy_trained(trained, tmp_path / "out")
    rec = json.loads((out / "_commit.json").read_text())["classifier"]
    onnx = out / "classifier" / "fruit_classifier.onnx"
    old_sha = hashlib.sha256(onnx.read_bytes()).hexdigest()
    assert rec["files"]["fruit_classifier.onnx"] == old_sha
    assert set(rec["files"]) == {"fruit_classifier.onnx", "confusion.png", "test_predictions.parquet",
                                 "metrics.json"}
    real_move = storage.move
    moved: list[str] = []

    def dies_on_cue(src: str, dst: str, opts=None) -> None:
        published_name = ".pending-" not in dst and "/classifier/" in dst
        if (dies == "before_the_record" and len(moved) == 1) or (dies == "after_the_record" and published_name):
            raise KeyboardInterrupt  # the process is gone: nothing after this point runs
        moved.append(dst)
        real_move(src, dst, opts)

    monkeypatch.setattr(storage, "move", dies_on_cue)
    # a different classifier: on the PCA vectors (its exported graph differs from the published one)
    assert main(["train", str(out), "--master", "local[2]", "--no-pca-table", "--features", "reduced", "-q"]) == 130
    monkeypatch.setattr(storage, "move", real_move)
    assert moved and ".pending-" in moved[0] and moved[0].endswith("fruit_classifier.onnx")
    assert hashlib.sha256(onnx.read_bytes()).hexdigest() == old_sha  # never overwritten before the record
    served = read_classifier(str(out))
    named = RunDir(str(out), storage.StorageOptions()).classifier_sha256("fruit_classifier.onnx")
    assert hashlib.sha256(served).hexdigest() == named
    assert (named == old_sha) == (dies == "before_the_record")
    capsys.readouterr()
    from fruitpipe.serve import ServeSettings, create_app

    assert create_app(ServeSettings(output=str(out))).state.classifier is not None
    assert main(["train", str(out), "--master", "local[2]", "--no-pca-table", "-q"]) == 0
    rec = json.loads((out / "_commit.json").read_text())["classifier"]
    assert rec["files"]["fruit_classifier.onnx"] == hashlib.sha256(onnx.read_bytes()).hexdigest()
    assert "pending" not in rec
    assert not [p for p in (out / "classifier").iterdir() if p.name.startswith(("_staging-", ".pending-"))]


def test_a_first_train_killed_while_publishing_leaves_no_unrecorded_classifier(
        trained, tmp_path: Path, monkeypatch, capsys) -> None:
    """No classifier yet; train killed at its record write: nothing under the published names, serve refuses in one
    line (before: the ONNX moved in first was served though no record named it)."""
    import shutil

    from fruitpipe.output import RunDir

    out = _copy_trained(trained, tmp_path / "out")
    shutil.rmtree(out / "classifier")
    rec = json.loads((out / "_commit.json").read_text())
    rec.pop("classifier")
    (out / "_commit.json").write_text(json.dumps(rec))

    def killed(self, rec: dict, token: str) -> None:
        if "classifier" in rec:
            raise KeyboardInterrupt
        return real(self, rec, token)

    real = RunDir._write_record
    monkeypatch.setattr(RunDir, "_write_record", killed)
    assert main(["train", str(out), "--master", "local[2]", "--no-pca-table", "-q"]) == 130
    monkeypatch.setattr(RunDir, "_write_record", real)
    assert not (out / "classifier" / "fruit_classifier.onnx").exists()
    capsys.readouterr()
    assert main(["serve", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_a_train_that_lost_its_lease_publishes_nothing(trained, tmp_path: Path, monkeypatch, capsys) -> None:
    from fruitpipe import lease

    out = _copy_trained(trained, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (out / "classifier").iterdir() if p.is_file()}

    def lost(self) -> None:
        raise lease.LeaseLostError(f"{out}: the lease was lost (test)")

    monkeypatch.setattr(lease.Lease, "check", lost)
    capsys.readouterr()
    assert main(["train", str(out), "--master", "local[2]", "--no-pca-table", "--folds", "4", "-q"]) == 2
    assert "lease" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in (out / "classifier").iterdir() if p.is_file()}
    assert after == before
    assert not [p for p in (out / "classifier").iterdir() if p.name.startswith("_staging-")]


def test_photos_changed_since_run_are_told_before_the_fit_and_skipped_by_the_export_check(
        tmp_path: Path, capsys) -> None:
    """Photos rewritten after `run` (other bytes under the same names): all of them, one line before any fit; some
    of them, the export check skips and counts them (before: the fit ran, then "disagrees with Spark ... a bug")."""
    import io

    from PIL import Image, ImageOps

    data = copy_classes(tmp_path / "in", TRAINED_CLASSES[:2], per_split=6)
    out = tmp_path / "out"
    fruitpipe.run(fruitpipe.Config(input=str(data), output=str(out), k=4, quiet=True))
    photos = sorted(data.rglob("*.jpg"))
    originals = {p: p.read_bytes() for p in photos}

    def rewrite(path: Path) -> None:  # the same photo, mirrored: other bytes, another answer possible
        buf = io.BytesIO()
        ImageOps.mirror(Image.open(io.BytesIO(originals[path])).convert("RGB")).rotate(90).save(buf, "JPEG")
        path.write_bytes(buf.getvalue())

    for p in photos:
        rewrite(p)
    capsys.readouterr()
    assert main(["train", str(out), "--master", "local[2]", "--no-pca-table", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "changed since `run`" in err[0] and "`fruitpipe run` again" in err[0]
    assert not (out / "classifier" / "fruit_classifier.onnx").exists()
    for p, data_ in originals.items():
        p.write_bytes(data_)
    test_photos = sorted((data / "Test").rglob("*.jpg"))
    for p in test_photos[:4]:
        rewrite(p)
    assert main(["train", str(out), "--master", "local[2]", "--no-pca-table", "-q"]) == 0
    check = json.loads((out / "classifier" / "metrics.json").read_text())["onnx"]["agreement_with_spark"]
    assert check["photos_changed"] == 4 and check["images"] == len(test_photos) - 4 == check["same_top1"]


class _FullDisk:
    """A local filesystem on which writes to paths `full(path)` says are on a full disk: 100 bytes land, then
    ENOSPC (the fault injected on the event of that write)."""

    def __init__(self, fs, full) -> None:
        self.fs, self.full = fs, full

    def __getattr__(self, name: str):
        return getattr(self.fs, name)

    def open_output_stream(self, path: str):
        import errno

        stream = self.fs.open_output_stream(path)
        if not self.full(path):
            return stream

        class Filling:
            def __enter__(self):
                return self

            def __exit__(self, *exc) -> bool:
                stream.close()
                return False

            def write(self, data: bytes) -> None:  # noqa: D401
                stream.write(data[:100])
                raise OSError(errno.ENOSPC, "No space left on device")

        return Filling()


def _full_disk(monkeypatch, full) -> None:
    from fruitpipe import storage

    real = storage.resolve
    def resolve(uri: str, opts=None):
        fs, path = real(uri, opts)
        return (_FullDisk(fs, full) if full(path) else fs), path

    monkeypatch.setattr(storage, "resolve", resolve)


def test_a_full_disk_is_one_line_and_leaves_nothing_behind(trained, tmp_path: Path, monkeypatch, capsys) -> None:
    """ENOSPC while train stages its classifier, and while sample writes its notes: exit 2, one line saying to free
    space, no .tmp- sibling or staging folder left, the published classifier untouched (before: a traceback, exit 1,
    .tmp-* files left)."""
    import hashlib

    out = _copy_trained(trained, tmp_path / "out")
    published = json.loads((out / "_commit.json").read_text())["classifier"]["files"]
    before = {n: hashlib.sha256((out / "classifier" / n).read_bytes()).hexdigest() for n in published}
    assert before == published
    _full_disk(monkeypatch, lambda path: "/_staging-" in path and path.rsplit("/", 1)[1].startswith("metrics.json"))
    capsys.readouterr()
    assert main(["train", str(out), "--master", "local[2]", "--no-pca-table", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left" in err[0] and "free space" in err[0] and "Traceback" not in err[0], err
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name or p.name.startswith(("_staging-", ".pending-"))]
    after = {n: hashlib.sha256((out / "classifier" / n).read_bytes()).hexdigest() for n in published}
    assert after == before == json.loads((out / "_commit.json").read_text())["classifier"]["files"]
    monkeypatch.undo()
    _full_disk(monkeypatch, lambda path: "MANIFEST.tsv" in path)
    assert main(["sample", str(tmp_path / "mini"), "--mini"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no space left" in err[0] and str(tmp_path / "mini") in err[0], err
    assert not [p for p in (tmp_path / "mini").rglob("*") if ".tmp-" in p.name or p.name == "MANIFEST.tsv"]
