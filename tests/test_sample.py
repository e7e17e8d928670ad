"""`fruitpipe sample`: the shipped 150-photo sample, and the pinned 5,280-photo one from a loopback mirror of its
public host (same paths): sha256-checked, resumable, with its attribution."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fruitpipe import download, sample
from fruitpipe.cli import main
from fruitpipe.pipeline.listing import list_images
from conftest import SHARED
from mirror import GROCERY, REAL_DIR, SAMPLE_DIR, serve_mirror


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
    listing = list_images(str(dest))
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


def test_the_real_photos_list_matches_the_shared_copy() -> None:
    """The shipped list is the Grocery Store Dataset's 1,200 train and 110 val photos, each file's sha256 pinned."""
    rows = sample.pinned_real()
    assert [sum(r.split == s for r in rows) for s in sample.REAL_SPLITS] == [1200, 110]
    assert len({r.family for r in rows}) == 21 and len({r.dest for r in rows}) == 1310
    assert set(sample.real_families()) == {r.family for r in rows}
    for r in rows[::53]:
        data = (GROCERY / r.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r.sha256 and len(data) == r.size


def test_real_photos_are_fetched_pinned_and_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`sample --real` from the loopback mirror: every photo sha256-checked into <split>/<family>/, a corrupt copy
    on the host refused and not kept, a second run fetching only what is missing, licence and mapping beside."""
    dest = tmp_path / "real"
    rows = sample.pinned_real()
    with serve_mirror() as mirror:
        monkeypatch.setenv(download.BASE_ENV, mirror.url)
        victim = rows[700]
        good = (GROCERY / victim.path).read_bytes()
        mirror.fail(f"{REAL_DIR}/{victim.path}", (200, {}, good[:-10] + bytes(10)))  # same size, other bytes
        assert main(["sample", str(dest), "--real", "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "sha256" in err[0]
        assert not (dest / victim.dest).exists() and not list(dest.rglob(".*.part"))
        before = {p.relative_to(dest).as_posix() for p in _photos(dest)}
        assert before and len(before) < 1310
        served = dict(mirror.requests)
        assert main(["sample", str(dest), "--real"]) == 0
        out = capsys.readouterr().out
        assert f"1310 real shop photos of 21 fruit families ({1310 - len(before)} downloaded, {len(before)} " \
               "already there)" in out and "--also-val" in out
        again = {k for k, v in mirror.requests.items() if v - served.get(k, 0)}
        assert len(again) == 1310 - len(before) and f"{REAL_DIR}/{victim.path}" in again
        assert not any(f"{REAL_DIR}/{r.path}" in again for r in rows if r.dest in before)
    photos = _photos(dest)
    assert len(photos) == 1310
    pinned = {r.dest: r.sha256 for r in rows}
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == pinned[p.relative_to(dest).as_posix()] for p in photos)
    assert (dest / victim.dest).read_bytes() == good
    assert "MIT" in (dest / "ATTRIBUTION.md").read_text()
    assert "Permission is hereby granted" in (dest / "LICENSE-GroceryStoreDataset.txt").read_text()
    assert json.loads((dest / "families.json").read_text()) == sample.real_families()
    # `run` reads each split's family folders as labels
    listing = list_images(str(dest / "val"))
    assert listing.count == 110 and len(set(listing.manifest.column("label").to_pylist())) == 18
    # a folder holding the other set is refused before anything is written
    assert main(["sample", str(dest), "--mini"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds real shop photos" in err[0] and "choose another DIR" in err[0]
    assert not (dest / "Training").exists()


def test_a_dripping_mirror_is_given_up_by_the_rate_floor(tmp_path: Path) -> None:
    """A mirror that sends one byte every 0.05 s never trips the 5 s per-read timeout (100 drips: a loaded 2-core
    machine once stalled a 0.2 s drip past 1 s); the attempt's deadline (timeout + size / min_rate) ends it,
    nothing is kept (before: served for as long as it dripped)."""
    import time

    row = sample.pinned_real()[0]
    pinned = download.PinnedFile(f"{REAL_DIR}/{row.path}", row.dest, row.sha256, row.size)
    retry = download.Retry(attempts=1, timeout_s=5.0, min_rate=row.size / 1.0)  # 6 s for the whole file
    with serve_mirror() as mirror:
        mirror.drip = 0.05
        started = time.monotonic()
        with pytest.raises(download.DownloadError, match="slower than") as info:
            download.fetch(pinned, tmp_path / pinned.dest, mirror.url, retry)
        assert time.monotonic() - started < 30 and "\n" not in str(info.value)
    assert not list(tmp_path.rglob("*.jpg")) and not list(tmp_path.rglob(".*.part"))


def test_sample_stops_at_once_on_sigterm_while_a_mirror_drips(tmp_path: Path) -> None:
    """SIGTERM (and Ctrl-C) while every read is stuck on a dripping mirror: the reads in flight are ended, the
    command exits 130 with its one line, no partial file is left (before: it waited for the drips to finish)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    with serve_mirror() as mirror:
        mirror.drip = 1.0
        env = {**os.environ, download.BASE_ENV: mirror.url}
        proc = subprocess.Popen([sys.executable, "-m", "fruitpipe.cli", "sample", str(tmp_path / "real"), "--real",
                                 "-q"], env=env, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while not mirror.requests:  # a read in flight (the licence comes first)
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            stopping = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 130
            assert time.monotonic() - stopping < 15
            err = proc.stderr.read().strip().splitlines() if proc.stderr else []
            assert err and "interrupted" in err[-1]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert not list((tmp_path / "real").rglob(".*.part"))


def test_a_folder_of_other_files_is_refused_and_an_interrupted_copy_resumes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder of unrelated files (no MANIFEST) is refused before anything is written (before: photos mixed into
    it, its notes overwritten); a folder holding only this sample's photos (a copy interrupted before its
    MANIFEST) resumes."""
    mine = tmp_path / "my-photos"
    (mine / "holiday").mkdir(parents=True)
    (mine / "holiday" / "beach.jpg").write_bytes(b"not yours")
    assert main(["sample", str(mine), "--mini"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holiday/beach.jpg" in err[0] and "choose another DIR" in err[0]
    assert sorted(p.relative_to(mine).as_posix() for p in mine.rglob("*")) == ["holiday", "holiday/beach.jpg"]
    dest = tmp_path / "mini"
    assert main(["sample", str(dest), "--mini", "-q"]) == 0
    (dest / "MANIFEST.tsv").unlink()  # as if stopped before the notes were written
    for photo in sorted(dest.rglob("*.jpg"))[:5]:
        photo.unlink()
    assert main(["sample", str(dest), "--mini"]) == 0
    assert "(5 copied, 145 already there)" in capsys.readouterr().out
