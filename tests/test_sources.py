"""`fruitpipe train OUT --also OTHER`: real photos of another output join the fit as classes of their own that
stand for Fruits-360 classes; each is cross-validated (scored by a fit without its fold) and the figures equal
numpy's; they never enter the Test metrics; `evaluate` counts their class as the classes it stands for; bad
arguments are one line."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fruitpipe
from fruitpipe.classify import groups, linear, openset, stats
from fruitpipe.cli import main
from conftest import SAMPLE, TRAINED_CLASSES

REAL = SAMPLE.parent / "real-photos-dev"
FAMILIES = REAL / "families.json"
REAL_FAMILIES = ("apple", "banana", "lime")


@pytest.fixture(scope="module")
def both(trained: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The trained 5-apple output (a copy) trained again with 8 real photos each of apple, banana and lime."""
    root = tmp_path_factory.mktemp("sources")
    for family in REAL_FAMILIES:
        (root / "real" / family).mkdir(parents=True)
        for src in sorted((REAL / family).glob("*.jpg"))[:8]:
            shutil.copyfile(src, root / "real" / family / src.name)
        (root / "val" / family).mkdir(parents=True)
        for src in sorted((REAL / family).glob("*.jpg"))[8:11]:  # photos the fit never sees (--also-val)
            shutil.copyfile(src, root / "val" / family / src.name)
    fruitpipe.run(fruitpipe.Config(input=str(root / "real"), output=str(root / "real-out"), k=4, quiet=True))
    fruitpipe.run(fruitpipe.Config(input=str(root / "val"), output=str(root / "val-out"), k=4, quiet=True))
    out = root / "out"
    shutil.copytree(trained["out"], out)
    argv = ["train", str(out), "--also", str(root / "real-out"), "--also-families", str(FAMILIES),
            "--also-val", str(root / "val-out"), "--master", "local[2]", "--no-pca-table", "-q"]
    assert main(argv) == 0
    first = json.loads((out / "classifier" / "metrics.json").read_text())
    assert main(argv) == 0
    return {"root": root, "out": out, "real_out": root / "real-out", "val_out": root / "val-out",
            "metrics": first, "argv": argv,
            "again": json.loads((out / "classifier" / "metrics.json").read_text())}


def test_other_photos_become_classes_that_stand_for_fruits360_classes(both: dict, trained: dict) -> None:
    m = both["metrics"]
    assert set(m["classes"]) == {*TRAINED_CLASSES, "Apple (apple photos)", "banana (photos)", "lime (photos)"}
    assert m["n_train"] == trained["metrics"]["n_train"] + 24
    assert m["n_test"] == trained["metrics"]["n_test"]  # other sources' photos are never Test photos
    src = m["sources"]["cross_validation"][str(both["real_out"])]
    assert src["photos"] == 24 and {v["photos"] for v in src["per_label"].values()} == {8}
    assert src["per_label"]["apple"]["stands_for"] == sorted(TRAINED_CLASSES)  # the apples the output has
    assert src["per_label"]["banana"]["stands_for"][0] == "Banana 1"  # none in the output: its own fruit
    assert m["sources"]["also"] == [{"output": str(both["real_out"]), "labels": {
        "apple": "Apple (apple photos)", "banana": "banana (photos)", "lime": "lime (photos)"}}]
    # a second train reads no part again and gives the same figures
    assert both["again"]["statistics"]["mode"] == "incremental" and both["again"]["statistics"]["parts_read"] == 0
    assert both["again"]["sources"] == m["sources"]


def test_the_cross_validated_figures_equal_numpys(both: dict) -> None:
    """Each real photo scored by the chosen candidate fitted, by numpy, without its fold."""
    m = both["metrics"]
    main_rows = pd.read_parquet(both["out"] / "embeddings", columns=["id", "label", "split", "features"])
    main_rows = main_rows[main_rows.split == "Training"]
    real = pd.read_parquet(both["real_out"] / "embeddings", columns=["id", "label", "features"])
    names = m["sources"]["also"][0]["labels"]
    real = real.assign(label=real.label.map(names))
    df = pd.concat([main_rows[["id", "label", "features"]], real], ignore_index=True)
    classes = m["classes"]
    z = stats.transform(np.stack(df.features.to_numpy()), "sqrt_l2")
    y = np.array([classes.index(lb) for lb in df.label])
    f = stats.fold_of(list(df.id), 3)
    # the real photos' folds: their near-copy groups', dealt whole (classify.groups), not their content ids'
    n_main = len(main_rows)
    grouped = groups.grouped_folds(list(real.id), list(real.label), z[n_main:], 3)
    f[n_main:] = [grouped.fold_by_id[i] for i in real.id]
    assert m["sources"]["folds"]["photos"] == 24 and m["sources"]["folds"]["groups"] == grouped.groups
    family, reg = m["cross_validation"]["chosen"].rstrip(")").split("(")
    is_real = np.arange(len(df)) >= len(main_rows)
    report = m["sources"]["cross_validation"][str(both["real_out"])]
    per = report["per_label"]
    species, n_species = openset.species_of(classes)[0], len(openset.species_of(classes)[1])
    temperature = m["calibration"]["temperature"]
    models = []
    for fold in range(3):
        fit = f != fold
        onehot = np.eye(len(classes))[y[fit]]
        models.append(linear.solve(family, onehot.sum(0), onehot.T @ z[fit], z[fit].T @ z[fit], [float(reg)])[0])
    conf, ok = [], []
    for label, cls in names.items():
        right = total = 0
        stands = {cls, *per[label]["stands_for"]}
        for fold in range(3):
            sel = (f == fold) & is_real & (df.label.to_numpy() == cls)
            p = linear.softmax(models[fold].logits(z[sel]) / temperature)
            right += sum(classes[i] in stands for i in np.argmax(p, axis=1))
            total += int(sel.sum())
            sp = openset.species_proba(p, species, n_species)
            conf += list(sp.max(axis=1))
            ok += [any(classes[c] in stands for c in np.nonzero(species == s)[0]) for s in sp.argmax(axis=1)]
        assert per[label]["photos"] == total and per[label]["top1"] == pytest.approx(right / total, abs=1e-5)
    conf, ok = np.array(conf), np.array(ok)
    assert report["cross_validated_species_top1"] == pytest.approx(ok.mean(), abs=1e-5)
    # --also-val: the held-out photos scored by the final model (fitted on every row), calibrated
    onehot = np.eye(len(classes))[y]
    final = linear.solve(family, onehot.sum(0), onehot.T @ z, z.T @ z, [float(reg)])[0]
    val = pd.read_parquet(both["val_out"] / "embeddings", columns=["label", "features"])
    p = linear.softmax(final.logits(stats.transform(np.stack(val.features.to_numpy()), "sqrt_l2")) / temperature)
    sp = openset.species_proba(p, species, n_species)
    val_ok = [any(classes[c] in {names[lb], *per[lb]["stands_for"]} for c in np.nonzero(species == s)[0])
              for lb, s in zip(val.label, sp.argmax(axis=1))]
    held = m["held_out"][str(both["val_out"])]
    assert held["photos"] == len(val) == 9
    page = (both["out"] / "report.html").read_text()
    assert "<h3>Real photos</h3>" in page and "taken apart, never fitted" in page and "near-copies on one side" in page
    assert held["species_top1"] == pytest.approx(np.mean(val_ok), abs=1e-5)
    for row in report["coverage"]:
        answered = conf >= row["threshold"]
        assert row["answered"] == pytest.approx(answered.mean(), abs=1e-5)
        if answered.any():
            assert row["species_top1_of_answered"] == pytest.approx(ok[answered].mean(), abs=1e-5)


def test_evaluate_counts_a_class_of_photos_as_the_classes_it_stands_for(both: dict, tmp_path: Path) -> None:
    photos = tmp_path / "shop"
    for family in REAL_FAMILIES:
        (photos / family).mkdir(parents=True)
        for src in sorted((REAL / family).glob("*.jpg"))[8:11]:  # not trained on
            shutil.copyfile(src, photos / family / src.name)
    assert main(["evaluate", str(both["out"]), str(photos), "--families", str(FAMILIES), "-q"]) == 0
    r = json.loads((both["out"] / "classifier" / "evaluations" / "shop.json").read_text())
    from fruitpipe.classify.export import FruitClassifier

    clf = FruitClassifier((both["out"] / "classifier" / "fruit_classifier.onnx").read_bytes())
    assert clf.maps_to["Apple (apple photos)"] == sorted(TRAINED_CLASSES)
    for family in REAL_FAMILIES:
        stands = set(json.loads(FAMILIES.read_text())[family]) | {f"{family} (photos)"}
        answers = [clf.top(p.read_bytes(), 1)[0][0] for p in sorted((photos / family).iterdir())]
        want = np.mean([a in stands or bool(set(clf.maps_to.get(a, [])) & stands) for a in answers])
        assert r["per_label"][family]["top1"] == pytest.approx(want, abs=1e-5), (family, answers)


def test_bad_also_arguments_are_one_line(both: dict, trained: dict, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = str(both["out"])
    incomplete = tmp_path / "half"
    shutil.copytree(both["real_out"], incomplete)
    (incomplete / "_SUCCESS").unlink()
    cases = [
        (["--also", str(incomplete)], "has no _SUCCESS"),
        (["--also", str(both["real_out"]), "--also-families", str(FAMILIES), "--also-val", str(both["real_out"])],
         "--also-val names an output the fit learns from"),
        (["--also-val", str(incomplete)], "--also-val"),
        (["--also", str(both["real_out"])], "--also-families"),  # folders that are not classes
        (["--also", str(both["real_out"]), "--classifier", "logreg"], "--classifier linear"),
        (["--also-families", str(FAMILIES)], "pass --also"),
        (["--also", out], "names the output being trained"),
        (["--also", str(both["real_out"]), "--also-families", str(tmp_path / "none.json")], "does not exist"),
    ]
    for extra, says in cases:
        capsys.readouterr()
        assert main(["train", out, "--master", "local[2]", "-q", *extra]) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], (extra, err)


def test_test_photos_given_again_through_also_are_left_out_of_the_fit(trained: dict, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Three of the main output's Test photos among eight real apples of an --also output: left out of the fit by
    content id, said in the log and metrics.json; the fit learns from the eight (before: every Test photo given
    through --also was in the fit and the published Test figure scored photos it had learned)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(trained["out"] / "classifier" / "test_predictions.parquet").to_pylist()
    in_test = [Path(r["uri"]) for r in rows if r["label"] == TRAINED_CLASSES[0]][:3]
    assert len(in_test) == 3
    folder = tmp_path / "real" / "apple"
    folder.mkdir(parents=True)
    for src in [*sorted((REAL / "apple").glob("*.jpg"))[:8], *in_test]:
        shutil.copyfile(src, folder / src.name)
    fruitpipe.run(fruitpipe.Config(input=str(tmp_path / "real"), output=str(tmp_path / "real-out"), k=4, quiet=True))
    out = tmp_path / "out"
    shutil.copytree(trained["out"], out)
    with caplog.at_level("WARNING"):
        assert main(["train", str(out), "--also", str(tmp_path / "real-out"), "--also-families", str(FAMILIES),
                     "--master", "local[2]", "--no-pca-table", "-q"]) == 0
    m = json.loads((out / "classifier" / "metrics.json").read_text())
    assert m["also_in_test_left_out"] == 3
    assert m["n_train"] == trained["metrics"]["n_train"] + 8 and m["n_test"] == trained["metrics"]["n_test"]
    assert m["sources"]["cross_validation"][str(tmp_path / "real-out")]["photos"] == 8
    assert any("3 photo(s)" in r.getMessage() and "Test split" in r.getMessage() for r in caplog.records)


def test_train_counts_a_class_of_photos_right_for_the_classes_it_stands_for() -> None:
    """train's Test metrics count as `evaluate` does: predicting the class learned from apple photos is right for a
    photo of any apple it stands for (before: wrong, so Test top-1 0.00 % with species 100 %)."""
    from fruitpipe.classify import metrics

    classes = ["Apple Red 1", "Apple (apple photos)", "Banana 1"]
    maps_to = {"Apple (apple photos)": ["Apple Red 1"]}
    proba = np.array([[0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.1, 0.2, 0.7]])
    y = np.array([0, 0, 2, 2])
    r = metrics.report(proba, y, classes, maps_to)
    assert r["top1"] == pytest.approx(0.75) and r["per_class"]["Apple Red 1"]["recall"] == 1.0
    assert metrics.report(proba, y, classes)["top1"] == pytest.approx(0.5)  # without the map: as before


def test_a_mapping_with_typos_is_one_line_naming_them(both: dict, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """--also-families naming a class that is a typo: one line naming it and the closest class the output has
    (before: accepted, and the folder became a species of its own, splitting the app's answer)."""
    bad = tmp_path / "families.json"
    bad.write_text(json.dumps({"apple": ["Apple red 1"], "banana": ["Banana 1"], "lime": ["Limes 1"]}))
    capsys.readouterr()
    assert main(["train", str(both["out"]), "--also", str(both["real_out"]), "--also-families", str(bad),
                 "--master", "local[2]", "--no-pca-table", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'Apple Red 1'?" in err[0] and "families.json" in err[0], err


@pytest.mark.parametrize("mapping, says", [
    ({"apple": ["Apple Red 1"], "banana": ["Bananna 1"]}, "'Bananna 1' (banana): not a class of this output"),
    ({"apple": [], "banana": ["Banana 1"]}, "'apple' maps to no class"),
    ({"apple": ["Apple Brayburn 1"], "banana": ["Banana 1"]}, "did you mean 'Apple Braeburn 1'?"),
    ({"apple": ["Apple hit 1"], "banana": ["Banana 1"]}, ""),  # a real class the output lacks: valid
])
def test_the_mapping_check_names_each_typo(mapping: dict, says: str) -> None:
    from fruitpipe.classify.sources import check_families
    from fruitpipe.errors import ConfigError

    if not says:
        check_families(mapping, TRAINED_CLASSES, "families.json")
        return
    with pytest.raises(ConfigError, match=re.escape(says)):
        check_families(mapping, TRAINED_CLASSES, "families.json")


def test_no_real_fruits360_class_is_taken_for_a_typo() -> None:
    """The rule behind the check: each of the release's 160 classes, named by a mapping for an output that has
    every other class, is accepted; the shipped mapping is valid on the shipped, pinned and full class lists."""
    from fruitpipe.classify.sources import check_families
    from conftest import SHARED

    full = [ln.strip() for ln in (SHARED / "data" / "fruits360-classes.txt").read_text().splitlines() if ln.strip()]
    for name in full:
        check_families({"f": [name]}, [c for c in full if c != name], "f.json")
    shipped = json.loads((Path(fruitpipe.__file__).parent / "data" / "grocery-store-families.json").read_text())
    mini = sorted(p.name for p in (Path(fruitpipe.__file__).parent / "data" / "fruits360-mini" / "Training").iterdir())
    for known in (mini, sorted(p.name for p in (SAMPLE / "Training").iterdir()), full):
        check_families(shipped, known, "grocery-store-families.json")
