"""`fruitpipe train OUT --augment N`: phone-like variants of the Training photos, embedded once with the run's
backbone and kept apart under OUT/augmented/, join the fit at their weight (the model equals numpy's fit of the
weighted statistics); they never enter the accounting, the PCA, the test rows or the photo counts; a photo gone
since the run is counted, not fatal; a re-train makes nothing again; a variant of a held-out photo stays out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest

import fruitpipe
from fruitpipe import augment, images
from fruitpipe.classify import linear, stats
from fruitpipe.cli import main
from fruitpipe.models import get_spec, resolve_model
from conftest import copy_classes, sample_classes

# The variants' job and the weighted fit are also run on the EMR nodes' packages (scripts/nodes-env.sh: PySpark
# 3.5, numpy 1.x): `make test-nodes`.
CLASSES = sample_classes(3)
N = 2


def _train(out: Path, *extra: str) -> dict:
    assert main(["train", str(out), "--augment", str(N), "--master", "local[2]", "--no-pca-table", "-q", *extra]) == 0
    return json.loads((out / "classifier" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def augmented(spark, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """3 classes of 12 Training and 4 Test photos, run; one Training photo deleted; trained twice with --augment."""
    root = tmp_path_factory.mktemp("augmented")
    data = copy_classes(root / "in", CLASSES, per_split=12)
    for cls in CLASSES:
        for extra in sorted((data / "Test" / cls).iterdir())[4:]:
            extra.unlink()
    out = root / "out"
    fruitpipe.run(fruitpipe.Config(input=str(data), output=str(out), k=4, quiet=True))
    run_before = json.loads((out / "run.json").read_text())
    pca_before = {p.name: p.read_bytes() for p in (out / "pca").rglob("*") if p.is_file()}
    gone = sorted((data / "Training" / CLASSES[0]).iterdir())[0]
    gone.unlink()
    first = _train(out)
    second = _train(out)
    return {"out": out, "first": first, "second": second, "run_before": run_before, "pca_before": pca_before,
            "gone": gone}


def _variants(out: Path) -> pd.DataFrame:
    return pd.read_parquet(next((out / "augmented").iterdir()))


@pytest.mark.nodes
def test_variants_are_kept_apart_and_counted(augmented: dict) -> None:
    m, out = augmented["first"], augmented["out"]
    a = m["augmentation"]
    assert a["variants_per_photo"] == N and a["weight"] == 0.1 and a["parts_made"] == a["parts"] >= 1
    assert a["made_this_train"]["photos"] == 35 and a["made_this_train"]["unreadable"] == 1  # the deleted photo
    assert a["made_this_train"]["variants"] == a["rows_in_fit"] == 35 * N
    v = _variants(out)
    assert len(v) == 35 * N and set(v.split) == {"Training"} and sorted(set(v.variant)) == list(range(N))
    assert str(augmented["gone"]) not in set(v.uri)
    # the photos' own figures: variants are not photos, not test rows, not in the run's accounting or its PCA
    assert m["n_train"] == 36 and m["n_test"] == 12
    preds = pd.read_parquet(out / "classifier" / "test_predictions.parquet")
    assert len(preds) == 12 and preds.uri.is_unique and all("/Test/" in u for u in preds.uri)
    assert json.loads((out / "run.json").read_text())["counts"] == augmented["run_before"]["counts"]
    assert {p.name: p.read_bytes() for p in (out / "pca").rglob("*") if p.is_file()} == augmented["pca_before"]
    emb = pd.read_parquet(out / "embeddings")
    assert len(emb) == 48 and not set(emb.columns) & {"variant"}


def test_a_variant_is_the_same_image_embedded_by_the_same_model(augmented: dict) -> None:
    """One stored variant made again here: fruitpipe.augment by seed, content id and variant, the backbone by
    onnxruntime on the driver."""
    v = _variants(augmented["out"]).sort_values(["uri", "variant"]).iloc[1]
    data = Path(v.uri).read_bytes()
    assert images.content_id(data) == v.id
    made = augment.phone_like(images.decode_rgb(data, 10**8), augment.variant_rng(7, v.id, int(v.variant)))
    spec = get_spec("mobilenet_v2")
    session = ort.InferenceSession(resolve_model(spec, None).read_bytes(), providers=["CPUExecutionProvider"])
    x = images.preprocess(images.square_views(made, 224)[0])[None]
    np.testing.assert_allclose(session.run(["features"], {"input": x})[0][0], v.features, atol=2e-4)


@pytest.mark.nodes
def test_the_fit_is_numpys_fit_of_the_weighted_statistics(augmented: dict) -> None:
    m, out = augmented["first"], augmented["out"]
    emb = pd.read_parquet(out / "embeddings", columns=["uri", "label", "split", "features"])
    tr, te = emb[emb.split == "Training"], emb[emb.split == "Test"]
    v = _variants(out)
    classes = m["classes"]
    z = stats.transform(np.stack([*tr.features, *v.features]), "sqrt_l2")
    y = np.array([classes.index(lb) for lb in [*tr.label, *v.label]])
    w = np.r_[np.ones(len(tr)), np.full(len(v), 0.1)]
    onehot = np.eye(len(classes))[y] * w[:, None]
    family, reg = m["cross_validation"]["chosen"].rstrip(")").split("(")
    model = linear.solve(family, onehot.sum(0), onehot.T @ z, (z * w[:, None]).T @ z, [float(reg)])[0]
    p = linear.softmax(model.logits(stats.transform(np.stack(te.features.to_numpy()), "sqrt_l2"))
                       / m["calibration"]["temperature"])
    preds = pd.read_parquet(out / "classifier" / "test_predictions.parquet").set_index("uri")
    got = preds.loc[list(te.uri)]
    assert list(got.predicted) == [classes[i] for i in np.argmax(p, axis=1)]
    np.testing.assert_allclose(got.probability, p.max(axis=1), atol=1e-4)
    assert m["statistics"]["augmented"]["rows"] == len(v) and m["statistics"]["augmented"]["weight"] == 0.1


def test_a_second_train_makes_and_reads_nothing_again(augmented: dict) -> None:
    a, b = augmented["first"], augmented["second"]
    assert b["augmentation"]["parts_made"] == 0 and b["augmentation"]["made_this_train"]["variants"] == 0
    assert b["augmentation"]["parts_kept"] == a["augmentation"]["parts"]
    assert b["statistics"]["augmented"]["mode"] == "incremental" and b["statistics"]["augmented"]["parts_read"] == 0
    assert (b["top1"], b["cross_validation"]["chosen"]) == (a["top1"], a["cross_validation"]["chosen"])


def test_a_variant_of_a_held_out_photo_never_joins_the_fit(spark, tmp_path: Path) -> None:
    data = copy_classes(tmp_path / "in", CLASSES[:2], splits=("Training",), per_split=15)
    out = tmp_path / "out"
    fruitpipe.run(fruitpipe.Config(input=str(data), output=str(out), k=4, quiet=True))
    m = _train(out)
    held = stats.Holdout(0.2).mask(list(pd.read_parquet(out / "embeddings").id))
    assert m["n_test"] == int(held.sum()) > 0 and m["n_train"] == 30 - int(held.sum())
    assert m["augmentation"]["made_this_train"]["variants"] == 30 * N  # made for all, held-out ones not used
    assert m["augmentation"]["rows_in_fit"] == m["n_train"] * N


@pytest.mark.parametrize("flags, says", [
    (["--augment", "2", "--classifier", "logreg"], "--augment works with the default --classifier linear"),
    (["--augment", "2", "--augment-weight", "0"], "--augment-weight 0.0 must be above 0"),
    (["--augment", "-1"], "--augment -1 must be between 0"),
])
def test_bad_augment_flags_are_one_line(tmp_path: Path, capsys, flags: list[str], says: str) -> None:
    assert main(["train", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1


def test_after_a_rerun_only_the_changed_part_is_made_again(augmented: dict, tmp_path: Path) -> None:
    """`run` again after the photo was deleted: its part is rewritten without it; the next train makes that
    part's variants again, deletes the stale ones and keeps the others."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(augmented["out"], out)
    marker = json.loads((out / "_fruitpipe.json").read_text())
    fruitpipe.run(fruitpipe.Config(input=marker["input"], output=str(out), k=4, quiet=True))
    folder = next((out / "augmented").iterdir())
    before = {p.name for p in folder.glob("*.parquet")}
    m = _train(out)
    a = m["augmentation"]
    after = {p.name for p in folder.glob("*.parquet")}
    assert a["parts_made"] == len(after - before) >= 1 and a["parts_kept"] == len(after & before)
    assert a["made_this_train"]["unreadable"] == 0 and len(before - after) >= 1
    assert len(pd.read_parquet(folder)) == 35 * N == m["augmentation"]["rows_in_fit"]


def test_the_report_says_the_fit_used_variants(augmented: dict) -> None:
    html = (augmented["out"] / "report.html").read_text()
    assert f"Also fitted on {35 * N} phone-like variants ({N} per Training photo, weight 0.1, seed 7" in html
