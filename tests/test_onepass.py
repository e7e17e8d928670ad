"""The one-pass classifier: its statistics equal a direct numpy computation, a retrain after `run` added photos
reads only the new parts and equals a fit from scratch, a class added later is learned, a dropped part makes one
full pass, and the solvers match their closed forms."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fruitpipe
from fruitpipe.classify import linear, openset, stats
from fruitpipe.cli import main
from fruitpipe.output import RunDir
from fruitpipe.storage import StorageOptions
from conftest import SAMPLE, copy_classes, sample_classes

# Every test but serve's is also run on the EMR nodes' packages (scripts/nodes-env.sh: PySpark 3.5, numpy 1.x),
# which have no serve extra.
CLASSES = sample_classes(12)[8:12]  # four classes the session's other outputs do not use


def _train(out: Path, capfd: pytest.CaptureFixture[str] | None = None) -> dict:
    assert main(["train", str(out), "--master", "local[2]", "--no-pca-table", "-q"]) == 0
    if capfd is not None:
        err = capfd.readouterr().err
        assert "netlib" not in err and "BLAS" not in err, err
    return json.loads((out / "classifier" / "metrics.json").read_text())


def _direct(out: Path, classes: list[str], folds: int = 3) -> stats.Stats:
    """The statistics computed by numpy from the Parquet files, as a reader of the output would."""
    df = pd.read_parquet(out / "embeddings", columns=["id", "label", "split", "features"])
    df = df[(df.split == "Training") & df.label.isin(classes)]
    z = stats.transform(np.stack(df.features.to_numpy()), "sqrt_l2")
    y = np.array([classes.index(lb) for lb in df.label])
    f = stats.fold_of(list(df.id), folds)
    k = openset.groups_of(classes)[y]
    st = stats.Stats.zeros(folds, len(classes), z.shape[1], openset.GROUPS)
    for i in range(len(y)):
        st.n[f[i], y[i]] += 1
        st.s[f[i], y[i]] += z[i]
    for fold in range(folds):
        st.g[fold] = z[f == fold].T @ z[f == fold]
    for group in range(openset.GROUPS):
        st.h[group] = z[k == group].T @ z[k == group]
    return st


def _kept(out: Path) -> tuple[stats.Stats, list[str], list[str]]:
    got = stats.load(str(out / "classifier" / stats.STATS_FILE))
    assert got is not None
    return got[0], got[1], got[2]


def _assert_equal(a: stats.Stats, b: stats.Stats) -> None:
    np.testing.assert_array_equal(a.n, b.n)
    np.testing.assert_allclose(a.s, b.s, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a.g, b.g, rtol=1e-12, atol=1e-11)
    np.testing.assert_allclose(a.h, b.h, rtol=1e-12, atol=1e-11)


@pytest.fixture(scope="module")
def grown(spark, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three classes run and trained, then more photos of them and a fourth class added, run and trained again."""
    root = tmp_path_factory.mktemp("onepass")
    data = root / "in"
    copy_classes(data, CLASSES[:3], per_split=15)
    out = root / "out"
    fruitpipe.run(fruitpipe.Config(input=str(data), output=str(out), k=4, quiet=True))
    first = _train(out)
    first_parts = RunDir(str(out), StorageOptions()).files("embeddings")
    for cls in CLASSES[:3]:  # 10 more Training photos each, the first 15 left untouched (same mtime)
        for src in sorted((SAMPLE / "Training" / cls).iterdir())[15:25]:
            shutil.copyfile(src, data / "Training" / cls / src.name)
    copy_classes(data, CLASSES[3:], per_split=15)  # and a new fruit
    fruitpipe.run(fruitpipe.Config(input=str(data), output=str(out), k=4, quiet=True))
    parts = RunDir(str(out), StorageOptions()).files("embeddings")
    second = _train(out)
    return {"root": root, "data": data, "out": out, "first": first, "second": second,
            "first_parts": first_parts, "parts": parts}


@pytest.mark.nodes
def test_statistics_equal_a_direct_computation(grown: dict) -> None:
    first = grown["first"]
    assert first["statistics"]["mode"] == "full" and first["n_train"] == 45
    st, classes, parts = _kept(grown["out"])
    assert classes == sorted(CLASSES) and sorted(parts) == sorted(grown["parts"])
    _assert_equal(st, _direct(grown["out"], classes))


@pytest.mark.nodes
def test_a_retrain_reads_only_the_new_parts_and_equals_a_fit_from_scratch(grown: dict, spark) -> None:
    second = grown["second"]
    new = sorted(set(grown["parts"]) - set(grown["first_parts"]))
    assert new and set(grown["first_parts"]) <= set(grown["parts"])
    assert second["statistics"] == {**second["statistics"], "mode": "incremental",
                                    "parts_reused": len(grown["first_parts"]), "parts_read": len(new)}
    incremental, classes, _ = _kept(grown["out"])
    scratch = stats.sum_stats(spark, grown["parts"], classes, 3, stats.FeatureMap("sqrt_l2"),
                              1280, None, openset.groups_of(classes), openset.GROUPS)
    _assert_equal(incremental, scratch)
    # the model solved from either is the same model
    a = linear.solve("ridge", *incremental.totals(), [0.01])[0]
    b = linear.solve("ridge", *scratch.totals(), [0.01])[0]
    np.testing.assert_allclose(a.w, b.w, rtol=1e-9, atol=1e-9)


@pytest.mark.nodes
def test_a_class_added_later_is_learned(grown: dict) -> None:
    second = grown["second"]
    assert second["classes"] == sorted(CLASSES) and second["n_train"] == 3 * 25 + 15
    assert second["per_class"][CLASSES[3]]["support"] == 15 and second["per_class"][CLASSES[3]]["recall"] >= 0.9
    assert second["top1"] >= 0.95


def _numpy_confidences(out: Path, metrics: dict) -> tuple[np.ndarray, np.ndarray]:
    """The top-species confidence of every Training row scored by the fit without its fold (known fruits) and by
    the fit without its species' group (fruits that fit never saw), by numpy from the Parquet files."""
    df = pd.read_parquet(out / "embeddings", columns=["id", "label", "split", "features"])
    df = df[df.split == "Training"]
    classes = sorted(df.label.unique())
    z = stats.transform(np.stack(df.features.to_numpy()), "sqrt_l2")
    y = np.array([classes.index(lb) for lb in df.label])
    family, reg = metrics["cross_validation"]["chosen"].rstrip(")").split("(")
    temperature = metrics["calibration"]["temperature"]
    species, names = openset.species_of(classes)
    group = openset.groups_of(classes)[y]
    folds = stats.fold_of(list(df.id), 3)

    def conf(fit: np.ndarray, score: np.ndarray) -> np.ndarray:
        onehot = np.eye(len(classes))[y[fit]]
        model = linear.solve(family, onehot.sum(0), onehot.T @ z[fit], z[fit].T @ z[fit], [float(reg)])[0]
        return openset.confidence(linear.softmax(model.logits(z[score]) / temperature), species, len(names))

    known = np.concatenate([conf(folds != f, folds == f) for f in range(3)])
    unknown = np.concatenate([conf(group != k, group == k) for k in np.unique(group)])
    return known, unknown


@pytest.mark.nodes
def test_the_open_set_shares_equal_a_direct_computation(grown: dict) -> None:
    """The cross-validated shares of known photos under, and of held-out-species photos above, each reported
    threshold equal numpy's; with two species per held-out fit (four classes, two groups) the photos of unknown
    fruits are as confident as known ones, and train says so instead of choosing a meaningless threshold."""
    m = grown["second"]
    o = m["open_set"]
    assert sorted(np.unique(openset.groups_of(sorted(CLASSES))).tolist()) == [0, 1]
    assert o["species_groups_held_out"] == 2
    assert o["cross_validation"] == {"known_rows": m["n_train"], "unknown_rows": m["n_train"]}
    known, unknown = _numpy_confidences(grown["out"], m)
    assert [t["threshold"] for t in o["by_threshold"]] == pytest.approx([0.9, 0.99, 0.999, 0.9999, 0.99999])
    for row in o["by_threshold"]:
        edge = row["threshold"]
        assert row["known_under"] == pytest.approx(np.mean(known < edge), abs=1e-5)
        assert row["unknown_above"] == pytest.approx(np.mean(unknown >= edge), abs=1e-5)
    assert o["threshold"] is None and "separates" in o["why"] and o["test"] == {}
    from fruitpipe.classify.export import FruitClassifier

    clf = FruitClassifier((grown["out"] / "classifier" / "fruit_classifier.onnx").read_bytes())
    assert clf.not_sure_below is None and clf.species_names == ["Beetroot", "Blackberry", "Blueberry", "Cabbage"]


def test_serve_says_not_sure_under_the_threshold_and_counts_it(grown: dict, tmp_path: Path) -> None:
    """With the model's threshold set to the median confidence of a set of photos (fruits it knows, and fruits
    it never saw), exactly the answers under it say "not sure", and /metrics counts them."""
    from fruitpipe.serve import ServeSettings, create_app
    from conftest import with_threshold
    from test_serve import _Server

    photos = [p for c in ("Banana 1", "Kiwi 1", "Lemon 1", *CLASSES) for p in sorted((SAMPLE / "Test" / c).iterdir())[:3]]

    def answers(out: Path) -> tuple[list[dict], list[str]]:
        srv = _Server(create_app(ServeSettings(output=str(out))))
        try:
            got = []
            for photo in photos:
                status, body = srv.predict(photo.read_bytes())
                assert status == 200, body
                got.append(body)
            _, raw = srv.request("GET", "/metrics")
        finally:
            srv.stop()
        return got, [ln for ln in raw.decode().splitlines() if ln.startswith("fruitpipe_not_sure_answers_total")]

    plain, counted = answers(grown["out"])
    assert not any(b["not_sure"] for b in plain) and counted == ["fruitpipe_not_sure_answers_total 0.0"]
    tops = sorted(b["species"][0]["probability"] for b in plain)
    threshold = (tops[len(tops) // 2 - 1] + tops[len(tops) // 2]) / 2
    if threshold == tops[-1]:  # saturated answers: every one equal; then all under a threshold above them
        threshold = 1.5
    got, counted = answers(with_threshold(grown["out"], tmp_path / "out", threshold))
    for body in got:
        top = body["species"][0]
        assert body["not_sure"] == (top["probability"] < threshold) and body["not_sure_below"] == threshold
        assert len(body["top5"]) == 4 and body["fruit"]["name"].startswith(top["name"])
        assert abs(sum(s["probability"] for s in body["species"]) - 1) < 1e-4  # 4 species, all listed
    unsure = sum(b["not_sure"] for b in got)
    assert unsure >= len(photos) // 2 and counted == [f"fruitpipe_not_sure_answers_total {float(unsure)}"]


@pytest.mark.nodes
def test_the_threshold_rule_on_known_histograms() -> None:
    """Known photos all sure above 0.9, unknown ones spread below: the threshold separates them; with no unknown
    rows there is none, and it never goes above MAX_THRESHOLD nor sends over MAX_KNOWN_UNSURE of the known."""
    known = openset.histogram(np.full(100, 0.95))
    unknown = openset.histogram(np.linspace(0.3, 0.8, 100))
    got = openset.choose(known, unknown)
    assert 0.8 < got["threshold"] <= 0.95 and got["cross_validation"]["unknown_above"] == 0
    assert got["cross_validation"]["known_under"] == 0
    assert openset.choose(known, np.zeros(openset.BINS))["threshold"] is None
    overlap = openset.choose(openset.histogram(np.linspace(0.5, 1.0, 1000)),
                             openset.histogram(np.linspace(0.5, 1.0, 1000) ** 8))
    assert overlap["threshold"] <= openset.MAX_THRESHOLD and overlap["cross_validation"]["known_under"] <= 0.05
    # bins on -log10(1 - p): 0.999 and 0.9999 are told apart
    assert openset.histogram(np.array([0.999])).argmax() != openset.histogram(np.array([0.9999])).argmax()


@pytest.mark.nodes
def test_a_dropped_part_makes_one_full_pass_equal_to_a_fit_from_scratch(grown: dict,
                                                                       capfd: pytest.CaptureFixture[str]) -> None:
    """Last of the tests on `grown`: it deletes photos from its input."""
    data, out = grown["data"], grown["out"]
    for p in sorted((data / "Training" / CLASSES[0]).iterdir())[:5]:
        p.unlink()
    fruitpipe.run(fruitpipe.Config(input=str(data), output=str(out), k=4, quiet=True))
    parts = RunDir(str(out), StorageOptions()).files("embeddings")
    assert not set(grown["parts"]) <= set(parts)  # the parts that held them were rewritten
    capfd.readouterr()
    m = _train(out, capfd)
    assert m["statistics"]["mode"] == "full" and "gone" in m["statistics"]["why"]
    assert m["n_train"] == 3 * 25 + 15 - 5
    st, classes, kept_parts = _kept(out)
    assert sorted(kept_parts) == sorted(parts)
    _assert_equal(st, _direct(out, classes))


@pytest.mark.nodes
def test_folds_by_subtraction_equal_a_fit_without_the_fold() -> None:
    rng = np.random.default_rng(3)
    st = stats.Stats.zeros(3, 4, 6, 2)
    group_of_class = np.array([0, 1, 1, 0])
    rows = []
    for _ in range(120):
        y, f = int(rng.integers(4)), int(rng.integers(3))
        z = rng.normal(size=6) + y
        st.n[f, y] += 1
        st.s[f, y] += z
        st.g[f] += np.outer(z, z)
        st.h[group_of_class[y]] += np.outer(z, z)
        rows.append((y, f, z))
    for group in range(2):  # a fit without a group's classes, by subtraction
        keep = [(y, z) for y, _, z in rows if group_of_class[y] != group]
        z = np.stack([r[1] for r in keep])
        n, s, g = st.without_group(group, group_of_class)
        np.testing.assert_array_equal(n, np.bincount([r[0] for r in keep], minlength=4))
        np.testing.assert_allclose(g, z.T @ z, atol=1e-9)
        np.testing.assert_allclose(s[group_of_class != group].sum(0), z.sum(0), atol=1e-9)
    for fold in range(3):
        keep = [(y, z) for y, f, z in rows if f != fold]
        z = np.stack([r[1] for r in keep])
        y = np.array([r[0] for r in keep])
        n, s, g = st.totals(without=fold)
        np.testing.assert_array_equal(n, np.bincount(y, minlength=4))
        np.testing.assert_allclose(g, z.T @ z, atol=1e-9)
        # ridge on the statistics = least squares on one-hot targets with an intercept, solved directly
        (model,) = linear.solve("ridge", n, s, g, [0.0])
        design = np.hstack([z, np.ones((len(z), 1))])
        direct = np.linalg.lstsq(design, np.eye(4)[y], rcond=None)[0]
        np.testing.assert_allclose(model.w, direct[:-1], atol=1e-8)
        np.testing.assert_allclose(model.b, direct[-1], atol=1e-8)


@pytest.mark.nodes
def test_lda_without_shrinkage_is_the_gaussian_discriminant() -> None:
    rng = np.random.default_rng(5)
    z = rng.normal(size=(200, 5))
    y = np.arange(200) % 3
    z += y[:, None]
    n = np.bincount(y).astype(float)
    s = np.stack([z[y == c].sum(0) for c in range(3)])
    (model,) = linear.solve("lda", n, s, z.T @ z, [0.0])
    mu = s / n[:, None]
    cov = sum((z[y == c] - mu[c]).T @ (z[y == c] - mu[c]) for c in range(3)) / (200 - 3)
    prec = np.linalg.inv(cov)
    np.testing.assert_allclose(model.w, prec @ mu.T, rtol=1e-8)
    np.testing.assert_allclose(model.b, -0.5 * np.einsum("cd,de,ce->c", mu, prec, mu), rtol=1e-8)


@pytest.mark.nodes
def test_a_class_missing_from_a_fit_is_never_predicted() -> None:
    n = np.array([3.0, 0.0, 4.0])
    s = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    for family in linear.GRIDS:
        (model,) = linear.solve(family, n, s, np.eye(2) * 7, [0.1])
        assert np.all(model.w[:, 1] == 0) and model.b[1] == linear.ABSENT
        assert np.all(np.isfinite(model.w)) and np.all(np.isfinite(model.b))


@pytest.mark.nodes
def test_the_exported_transform_matches_numpys(trained) -> None:
    """sqrt + L2 in the ONNX graph and in classify.stats give the same probabilities from the same features."""
    from fruitpipe.classify.export import read_head

    onnx = (trained["out"] / "classifier" / "fruit_classifier.onnx").read_bytes()
    head, classes = read_head(onnx)
    assert head.transform == "sqrt_l2" and classes == trained["metrics"]["classes"]
    df = pd.read_parquet(trained["out"] / "embeddings", columns=["label", "split", "features"])
    test = df[df.split == "Test"]
    proba = head.probabilities(np.stack(test.features.to_numpy()))
    assert np.mean(np.array(classes)[np.argmax(proba, axis=1)] == test.label.to_numpy()) == trained["metrics"]["top1"]

