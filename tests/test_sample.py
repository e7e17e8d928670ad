"""`fruitpipe sample`: the shipped 150-photo sample, and the pinned 5,280-photo one from a loopback mirror of its
public host (same paths): sha256-checked, resumable, with its attribution."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fruitpipe import download, sample
from fruitpipe.cli import main
from fruitpipe.pipeline.listing import list_images
from fruitpipe.storage import StorageOptions
from conftest import SHARED
from mirror import SAMPLE_DIR, serve_mirror


def _photos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*/*/*") if p.is_file())


def test_the_shipped_sample_is_the_pinned_mini_list() -> None:
    """The repository's photos are ../shared's fruits360-mini.tsv, byte for byte, with the attribution beside them."""
    pinned = [line.split("\t")[:3] for line in (SHARED / "data" / "fruits360-mini.tsv").read_text().splitlines()[1:]]
    folder = sample.mini_folder()
    assert len(pinned) == 150
    for path, sha, size in pinned:
        data = (folder / path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha and len(data) == int(size)
    assert len(_photos(folder)) == 150
    assert "CC BY-SA 4.0" in (folder / "ATTRIBUTION.md").read_text()


def test_mini_copies_150_photos_in_10_classes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "mini"
    assert main(["sample", str(dest), "--mini"]) == 0
    assert "150 photos of 10 classes (150 copied, 0 already there)" in capsys.readouterr().out
    listing = list_images(str(dest), StorageOptions())
    assert listing.count == 150  # ATTRIBUTION.md and MANIFEST.tsv at the root are not inputs
    labels = listing.manifest.column("label").to_pylist()
    splits = listing.manifest.column("split").to_pylist()
    assert len(set(labels)) == 10 and splits.count("Training") == 100 and splits.count("Test") == 50
    assert main(["sample", str(dest), "--mini", "-q"]) == 0  # again: nothing to copy


def test_choose_classes_spreads_over_the_list() -> None:
    classes = sample.classes_of(sample.pinned_sample())
    assert len(classes) == 66
    chosen = sample.choose_classes(classes, 6)
    assert len(chosen) == 6 == len(set(chosen)) and sum(c.startswith("Apple") for c in chosen) == 1


def test_download_checks_every_photo_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "sample"
    chosen = sample.choose_classes(sample.classes_of(sample.pinned_sample()), 3)
    with serve_mirror() as mirror:
        monkeypatch.setenv(download.BASE_ENV, mirror.url)
        # The first try is cut short: one photo is gone from the host (404), which stops the download.
        victim = f"{SAMPLE_DIR}/Training/{chosen[1]}/" + sorted((SHARED / "data" / "fruits360-sample" / "Training" /
                                                                  chosen[1]).iterdir())[0].name
        mirror.fail(victim, (404, {}, b"Not Found"))
        assert main(["sample", str(dest), "--classes", "3", "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "HTTP 404" in err[0]
        first = dict(mirror.requests)
        assert not list(dest.rglob(".*.part"))
        got_first = _photos(dest)
        assert 0 < len(got_first) < 240
        # The second try fetches only what is missing, and every photo is the pinned one.
        assert main(["sample", str(dest), "--classes", "3"]) == 0
        out = capsys.readouterr().out
        assert f"240 photos of 3 classes ({240 - len(got_first)} downloaded, {len(got_first)} already there)" in out
        second = {k: v - first.get(k, 0) for k, v in mirror.requests.items() if v - first.get(k, 0)}
        assert len(second) == 240 - len(got_first) and set(second.values()) == {1}
        # A photo damaged on disk is fetched again; a corrupt copy on the host is refused and not kept.
        damaged = got_first[0]
        damaged.write_bytes(b"not the photo")
        host_path = f"{SAMPLE_DIR}/{damaged.relative_to(dest).as_posix()}"
        original = (SHARED / "data" / "fruits360-sample" / damaged.relative_to(dest)).read_bytes()
        mirror.fail(host_path, (200, {}, original[:-10] + bytes(10)))
        assert main(["sample", str(dest), "--classes", "3", "-q"]) == 2
        assert "sha256" in capsys.readouterr().err
        assert damaged.read_bytes() == b"not the photo"  # the bad download did not replace it
        assert main(["sample", str(dest), "--classes", "3", "-q"]) == 0
    photos = _photos(dest)
    assert len(photos) == 240 and {p.parent.name for p in photos} == set(chosen)
    pinned = {p: s for p, s, _ in sample.pinned_sample()}
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == pinned[p.relative_to(dest).as_posix()] for p in photos)
    assert damaged.read_bytes() == original
    assert "Mihai Oltean" in (dest / "ATTRIBUTION.md").read_text()
    assert len((dest / "MANIFEST.tsv").read_text().splitlines()) == 241


def test_the_pinned_list_matches_the_shared_sample() -> None:
    rows = sample.pinned_sample()
    assert len(rows) == 5280
    root = SHARED / "data" / "fruits360-sample"
    for path, sha, size in rows[::97]:
        data = (root / path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha and len(data) == size


def test_an_unwritable_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["sample", str(blocker / "sub"), "--mini"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "choose another DIR" in err[0]
