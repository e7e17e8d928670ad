"""`fruitpipe evaluate`: the exported classifier on folders of labelled photos, class folders or families mapped
to classes, every photo accounted for (bad ones counted by reason, never fatal), the same answers as `serve`, and
the crops a photo that is not square is fed by."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fruitpipe import images
from fruitpipe.classify.export import FruitClassifier
from fruitpipe.cli import main
from conftest import SAMPLE, TRAINED_CLASSES

REAL = SAMPLE.parent / "real-photos-dev"


def _photos(dest: Path, per_class: int = 3) -> dict[str, list[Path]]:
    """Test photos of two trained classes and one unknown fruit, in class folders, plus a damaged and a non-image
    file."""
    got: dict[str, list[Path]] = {}
    for cls in (*TRAINED_CLASSES[:2], "Banana 1"):
        (dest / cls).mkdir(parents=True)
        for src in sorted((SAMPLE / "Test" / cls).iterdir())[:per_class]:
            shutil.copyfile(src, dest / cls / src.name)
        got[cls] = sorted((dest / cls).iterdir())
    good = got[TRAINED_CLASSES[0]][0].read_bytes()
    (dest / TRAINED_CLASSES[0] / "cut.jpg").write_bytes(good[: len(good) // 3])
    (dest / TRAINED_CLASSES[1] / "notes.jpg").write_text("not a photo")
    return got


def test_families_count_any_class_of_the_family_and_bad_photos_are_counted(trained: dict, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    got = _photos(photos)
    (photos / "Banana 1").rename(photos / "banana")
    (photos / TRAINED_CLASSES[0]).rename(photos / "apple")
    (photos / TRAINED_CLASSES[1]).rename(photos / "apple 2")
    families = tmp_path / "families.json"
    families.write_text(json.dumps({"apple": list(TRAINED_CLASSES), "apple 2": list(TRAINED_CLASSES),
                                    "banana": ["Banana 1", "Banana 3"]}))
    out = trained["out"]
    assert main(["evaluate", str(out), str(photos), "--families", str(families), "--name", "fam", "-q"]) == 0
    r = json.loads((out / "classifier" / "evaluations" / "fam.json").read_text())
    assert r["listed"] == 3 * 3 + 2 and r["photos_scored"] == 9
    assert r["rejected"] == {"not_an_image": 1, "truncated": 1} or r["rejected"] == {"corrupt": 1, "not_an_image": 1}
    # every apple photo counts right whichever apple variety is answered; the classifier knows no banana
    assert r["per_label"]["apple"] == {"support": 3, "top1": 1.0, "species_top1": 1.0, "top5": 1.0}
    assert r["per_label"]["apple 2"]["top1"] == 1.0
    assert r["per_label"]["banana"]["top1"] == 0.0 and r["per_label"]["banana"]["support"] == 3
    assert sum(r["confusion"]["banana"].values()) == 3 and all(k == "apple 2" or k == "apple"
                                                                for k in r["confusion"]["banana"])
    assert r["top1"] == pytest.approx(6 / 9, abs=1e-5)
    assert [c["threshold"] for c in r["coverage"]][0] == 0.0 and r["coverage"][0]["answered"] == 1.0
    assert r["coverage"][0]["species_top1_of_answered"] == pytest.approx(6 / 9, abs=1e-5)
    # not in the file: one line that says what to do
    (photos / "kiwi").mkdir()
    shutil.copyfile(got["Banana 1"][0].parents[1] / "banana" / got["Banana 1"][0].name, photos / "kiwi" / "k.jpg")
    capsys.readouterr()
    assert main(["evaluate", str(out), str(photos), "--families", str(families), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'kiwi' is not in --families" in err[0]


def test_class_folders_give_serves_answers(trained: dict, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    photos = tmp_path / "photos"
    got = _photos(photos)
    shutil.rmtree(photos / "Banana 1")
    out = trained["out"]
    capsys.readouterr()
    assert main(["evaluate", str(out), str(photos)]) == 0
    printed = capsys.readouterr().out
    assert "6 photos scored (2 rejected" in printed and "written: " in printed
    r = json.loads((out / "classifier" / "evaluations" / "photos.json").read_text())
    clf = FruitClassifier((out / "classifier" / "fruit_classifier.onnx").read_bytes())
    right = [clf.top(p.read_bytes(), 1)[0][0] == cls for cls in TRAINED_CLASSES[:2] for p in got[cls]]
    assert r["top1"] == pytest.approx(np.mean(right), abs=1e-5) and r["photos_scored"] == 6
    assert r["crop"] == images.DEFAULT_CROP and r["model_sha256"]
    # a folder that is not one of the classifier's classes needs --families
    (photos / "Banana 1").mkdir()
    shutil.copyfile(got[TRAINED_CLASSES[0]][0], photos / "Banana 1" / "b.jpg")
    assert main(["evaluate", str(out), str(photos), "-q"]) == 2
    assert "--families" in capsys.readouterr().err


def test_crops_of_a_photo_that_is_not_square() -> None:
    rng = np.random.default_rng(3)
    wide = rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)
    squash = images.square_views(wide, 64, "squash")
    center = images.square_views(wide, 64, "center")
    three = images.square_views(wide, 64, "three")
    assert len(squash) == len(center) == 1 and len(three) == 3
    np.testing.assert_array_equal(squash[0], images.resize_rgb(wide, 64))
    np.testing.assert_array_equal(center[0], images.resize_rgb(np.ascontiguousarray(wide[:, 40:160]), 64))
    np.testing.assert_array_equal(three[0], images.resize_rgb(np.ascontiguousarray(wide[:, :120]), 64))
    np.testing.assert_array_equal(three[1], center[0])
    np.testing.assert_array_equal(three[2], images.resize_rgb(np.ascontiguousarray(wide[:, 80:]), 64))
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))
    np.testing.assert_array_equal(images.square_views(tall, 64, "center")[0],
                                  images.resize_rgb(np.ascontiguousarray(tall[40:160]), 64))
    square = wide[:, :120]
    assert all(len(images.square_views(square, 64, c)) == 1 for c in images.CROPS)
    with pytest.raises(ValueError, match="one of squash, center, three"):
        images.square_views(wide, 64, "fill")


def test_evaluate_and_serve_feed_a_real_phone_photo_the_same_way(trained: dict, tmp_path: Path) -> None:
    """A real non-square phone photo: evaluate's probabilities (three crops) are the mean of the three views',
    and those of a file-level FruitClassifier with the same crop."""
    photo = next(p for p in sorted(REAL.glob("*/*.jpg")) if Image.open(p).size[0] != Image.open(p).size[1])
    (tmp_path / "p" / TRAINED_CLASSES[0]).mkdir(parents=True)
    shutil.copyfile(photo, tmp_path / "p" / TRAINED_CLASSES[0] / photo.name)
    data = (trained["out"] / "classifier" / "fruit_classifier.onnx").read_bytes()
    clf = FruitClassifier(data, crop="three")
    views = images.model_views(photo.read_bytes(), 224, 10**8, crop="three")
    assert views.shape == (3, 224, 224, 3)
    np.testing.assert_allclose(clf.photo_probabilities(photo.read_bytes()), clf.probabilities(views).mean(axis=0),
                               rtol=1e-6, atol=1e-7)
    assert main(["evaluate", str(trained["out"]), str(tmp_path / "p"), "--crop", "three", "-q"]) == 0
    r = json.loads((trained["out"] / "classifier" / "evaluations" / "p-three.json").read_text())
    best = clf.classes[int(np.argmax(clf.photo_probabilities(photo.read_bytes())))]
    assert r["confusion"][TRAINED_CLASSES[0]] == {best: 1}
