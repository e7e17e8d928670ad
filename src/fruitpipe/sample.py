"""Fruits-360 samples for a first run: the 150 photos shipped in the package, or a larger pinned sample fetched from
its public copy (sha256-checked, resumable), each with its CC BY-SA 4.0 attribution."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fruitpipe import download
from fruitpipe.errors import ConfigError, FruitpipeError

log = logging.getLogger(__name__)

#: The public copy of Fruits-360 2025.03.11.0 (100x100) the pinned sample is taken from, at a fixed commit.
HOST_DIR = "P-Swain/Fruits-Recognition-CSL2050-Project/b78d3e26c547cd841f67c5e54e4fe7233d4687f9/data/fruits-360"
#: Package resources: the pinned sample's list (path, sha256, bytes) and the shipped mini sample's folder.
SAMPLE_LIST = "fruits360-sample.tsv.gz"
MINI = "fruits360-mini"
ATTRIBUTION = "ATTRIBUTION.md"
MANIFEST = "MANIFEST.tsv"


class SampleError(FruitpipeError):
    """The sample folder cannot be written, or a shipped photo is not the pinned one."""


@dataclass(frozen=True)
class SampleResult:
    """What `fetch_sample` left in the folder."""

    folder: str
    photos: int
    classes: int
    fetched: int
    kept: int
    bytes: int


def _data() -> Path:
    return Path(str(resources.files("fruitpipe").joinpath("data")))


def mini_folder() -> Path:
    """The shipped 150-photo sample (10 classes x (10 Training + 5 Test)), inside the installed package."""
    return _data() / MINI


def _read_list(text: str) -> list[tuple[str, str, int]]:
    rows = [line.split("\t") for line in text.splitlines()[1:] if line.strip()]
    return [(path, sha, int(size)) for path, sha, size in rows]


def pinned_sample() -> list[tuple[str, str, int]]:
    """Every photo of the pinned sample: (Split/Class/file, sha256, bytes); 66 classes x (60 + 20)."""
    with gzip.open(_data() / SAMPLE_LIST, "rt", encoding="utf-8") as fh:
        return _read_list(fh.read())


def classes_of(rows: list[tuple[str, str, int]]) -> list[str]:
    """The classes of a list, sorted."""
    return sorted({path.split("/")[1] for path, _, _ in rows})


def choose_classes(all_classes: list[str], n: int | None) -> list[str]:
    """`n` classes spread evenly over the sorted list (not the first n: those are all apples); all when None."""
    if n is None or n >= len(all_classes):
        return list(all_classes)
    if n < 1:
        raise ConfigError(f"--classes {n}: pass a number from 1 to {len(all_classes)}")
    step = len(all_classes) / n
    return [all_classes[int(i * step)] for i in range(n)]


def _prepare(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".fruitpipe-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SampleError(f"cannot write to {folder} ({exc.strerror}): choose another DIR") from None
    for stale in folder.glob("*/*/.*.part"):  # a download killed before its cleanup ran
        stale.unlink(missing_ok=True)


def _write_notes(folder: Path, rows: list[tuple[str, str, int]], source: str) -> None:
    attribution = (mini_folder() / ATTRIBUTION).read_text(encoding="utf-8")
    (folder / ATTRIBUTION).write_text(attribution + f"\nThis folder: {source}.\n", encoding="utf-8")
    lines = ["path\tsha256\tbytes"] + [f"{p}\t{s}\t{b}" for p, s, b in sorted(rows)]
    (folder / MANIFEST).write_text("\n".join(lines) + "\n", encoding="utf-8")


def fetch_sample(dest: str, classes: int | None = None, quiet: bool = False, workers: int = 16) -> SampleResult:
    """Fetch the pinned sample (all 66 classes, or `classes` of them) into `dest` in the dataset's layout,
    resuming: photos already there with the pinned sha256 are kept."""
    rows = pinned_sample()
    chosen = set(choose_classes(classes_of(rows), classes))
    rows = [r for r in rows if r[0].split("/")[1] in chosen]
    folder = Path(dest)
    _prepare(folder)
    files = [download.PinnedFile(f"{HOST_DIR}/{path}", path, sha, size) for path, sha, size in rows]
    report = download.fetch_all(files, folder, workers=workers, desc="Fruits-360 sample", quiet=quiet)
    _write_notes(folder, rows, f"{len(rows)} photos of {len(chosen)} classes from "
                               f"{download.PUBLIC_HOST}/{HOST_DIR}")
    return SampleResult(str(folder), len(rows), len(chosen), report.fetched, report.kept, report.bytes)


def copy_mini(dest: str) -> SampleResult:
    """Copy the shipped 150-photo sample into `dest` (no network), each photo checked against its sha256."""
    src = mini_folder()
    rows = _read_list((src / MANIFEST).read_text(encoding="utf-8"))
    folder = Path(dest)
    _prepare(folder)
    copied = kept = 0
    for path, sha, size in rows:
        target = folder / path
        pinned = download.PinnedFile(path, path, sha, size)
        if download.is_done(target, pinned):
            kept += 1
            continue
        data = (src / path).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise SampleError(f"the installed package's {path} is not the pinned photo: reinstall fruitpipe")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        copied += 1
    _write_notes(folder, rows, "the 150-photo sample shipped with fruitpipe")
    return SampleResult(str(folder), len(rows), len(classes_of(rows)), copied, kept, sum(r[2] for r in rows))

