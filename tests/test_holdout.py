"""Small classes and the hold-out: without a Test split every class keeps at least one Training photo (one
deterministic rule for both classifiers), the exported file has one output per listed class, --folds above the
smallest class is capped with a warning, and every JSON file fruitpipe writes is strict (no bare NaN)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import fruitpipe
from conftest import SAMPLE, sample_classes
from fruitpipe import images, jsonio
from fruitpipe.classify.export import FruitClassifier
from fruitpipe.classify.stats import Holdout, holdout_order
from fruitpipe.cli import main

SHARE = 0.2  # train's default --holdout


def _strict(text: str) -> object:
    def refuse(token: str) -> None:
        raise AssertionError(f"bare {token} in a JSON file")

    return json.loads(text, parse_constant=refuse)


def test_the_rule_keeps_each_class_its_last_photo_when_all_would_go() -> None:
    ids = {"a": ["00000000" + "00000001" + "0" * 48, "00000000" + "20000000" + "0" * 48],  # orders 0.0, 0.125
           "b": ["00000000" + "10000000" + "0" * 48, "00000000" + "f0000000" + "0" * 48]}   # 0.0625, 0.9375
    last = {c: max(v, key=holdout_order) for c, v in ids.items()}
    rule = Holdout.of(SHARE, last)
    assert rule.kept == {ids["a"][1]}  # class b keeps a photo anyway: nothing to exempt
    assert rule.mask(ids["a"]).tolist() == [True, False] and rule.mask(ids["b"]).tolist() == [True, False]
    assert Holdout(SHARE).mask(ids["a"]).tolist() == [True, True]  # without the exemption: a would be gone


def test_strict_json_writes_null_for_non_finite_numbers() -> None:
    text = jsonio.dumps({"a": float("nan"), "b": [np.float64("inf"), 1.5], "c": np.float32(2.0)})
    assert _strict(text) == {"a": None, "b": [None, 1.5], "c": 2.0}


@pytest.fixture(scope="module")
def small(spark, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two classes of 10 Training photos, and a class sorted last with one photo that the hold-out takes: no
    Test split."""
    root = tmp_path_factory.mktemp("small")
    for cls in sample_classes(2):
        (root / "in" / "Training" / cls).mkdir(parents=True)
        for f in sorted((SAMPLE / "Training" / cls).iterdir())[:10]:
            shutil.copyfile(f, root / "in" / "Training" / cls / f.name)
    lone = next(f for f in sorted((SAMPLE / "Training" / sample_classes(3)[2]).iterdir())
                if holdout_order(images.content_id(f.read_bytes())) < SHARE)
    (root / "in" / "Training" / "Zz lone").mkdir()
    shutil.copyfile(lone, root / "in" / "Training" / "Zz lone" / lone.name)
    fruitpipe.run(fruitpipe.Config(input=str(root / "in"), output=str(root / "out"), k=4, quiet=True))
    return root / "out"


def _outputs(out: Path, photos: Path) -> int:
    clf = FruitClassifier((out / "classifier" / "fruit_classifier.onnx").read_bytes())
    photo = next((photos / "Training" / "Zz lone").iterdir()).read_bytes()
    return len(clf.photo_probabilities(photo, 10_000_000))


@pytest.mark.parametrize("classifier", ["linear", "logreg"])
def test_a_one_photo_class_is_learned_and_answerable(small: Path, tmp_path: Path, classifier: str, caplog) -> None:
    out = tmp_path / "out"
    shutil.copytree(small, out)
    # --folds 4 is more than the lone class's one photo: capped, with a warning, instead of NaN scores.
    assert main(["train", str(out), "--classifier", classifier, "--folds", "4", "--no-pca-table",
                 "--master", "local[2]", "-q"]) == 0
    metrics = _strict((out / "classifier" / "metrics.json").read_text())
    assert metrics["classes"][-1] == "Zz lone" and metrics["n_classes"] == 3 and _outputs(out, small.parent / "in") == 3
    assert metrics["n_train"] + metrics["n_test"] == 21 and "Zz lone" in metrics["classes_without_test_photos"]
    assert "each class keeping at least one Training photo" in metrics["test_source"]
    assert "cross-validating with 2 folds" in caplog.text
    assert all(math.isfinite(v["accuracy"]) for v in metrics["cross_validation"]["tried"].values()) \
        if classifier == "linear" else metrics["cross_validation"]["folds"] == 2
    for name in ("run.json", "_commit.json", "classifier/metrics.json"):
        _strict((out / name).read_text())
