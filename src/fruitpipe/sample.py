"""Photos for a first run: Fruits-360 (the 150 shipped in the package, or a larger pinned sample fetched from its
public copy, CC BY-SA 4.0) and real shop photos (the Grocery Store Dataset's train and val splits, MIT), every file
sha256-checked and resumable, each set with its attribution and licence."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from fruitpipe import download, storage
from fruitpipe.errors import ConfigError, FruitpipeError
from fruitpipe.options import option, whole_number

log = logging.getLogger(__name__)

#: The public copy of Fruits-360 2025.03.11.0 (100x100) the pinned sample is taken from, at a fixed commit.
HOST_DIR = "P-Swain/Fruits-Recognition-CSL2050-Project/b78d3e26c547cd841f67c5e54e4fe7233d4687f9/data/fruits-360"
#: Package resources: the pinned sample's list (path, sha256, bytes) and the shipped mini sample's folder.
SAMPLE_LIST = "fruits360-sample.tsv.gz"
MINI = "fruits360-mini"
ATTRIBUTION = "ATTRIBUTION.md"
MANIFEST = "MANIFEST.tsv"
#: The Grocery Store Dataset (Klasson et al., WACV 2019; MIT) at a fixed commit of its public repository: real phone
#: photos of 21 fruit families in shops, its own train split (1,200) and val split (110, photographed apart).
REAL_HOST_DIR = "marcusklasson/GroceryStoreDataset/fc80ba90f803d79d0383df52c5a4ac5de99ff6fc"
#: Package resources: the real photos' list (split, family, path in the repository, sha256, bytes) and the mapping
#: of their family folders to Fruits-360 classes (`train --also-families`, `evaluate --families`).
REAL_LIST = "grocery-store.tsv.gz"
REAL_FAMILIES = "grocery-store-families.json"
REAL_SPLITS = ("train", "val")
FAMILIES = "families.json"
REAL_LICENSE = download.PinnedFile(f"{REAL_HOST_DIR}/LICENSE", "LICENSE-GroceryStoreDataset.txt",
                                   "f43ce58159663a1c903cae5f2b4dfa3cc0e7431cf4406f5b84cd68f312f12e2d", 1071)
#: The manifests' first lines: a folder holding one set is never filled with the other.
_HEADER = "path\tsha256\tbytes"
_REAL_HEADER = "path\tsha256\tbytes\tsource"


@dataclass(frozen=True)
class SampleSettings:
    """`fruitpipe sample`'s settings: the folder, and which photos (one of --classes, --full, --mini, --real)."""

    dir: str = option(positional=True, metavar="DIR",
                      help="folder to fill (created; photos already there and intact are kept)")
    classes: int | None = option(None, exclusive="which", type=whole_number, metavar="N",
                                 help="only N of the 66 classes, spread over the alphabet (80 photos each)")
    full: bool = option(False, exclusive="which", help="all 66 classes, 5,280 photos (the default)")
    mini: bool = option(False, exclusive="which",
                        help="the 150 photos shipped with fruitpipe (10 classes x 15), copied: no network")
    real: bool = option(False, exclusive="which",
                        help="real shop photos instead: the Grocery Store Dataset's train (1,200) and val (110) "
                             "splits of 21 fruit families (MIT, 28 MB) into DIR/train/<family>/ and "
                             "DIR/val/<family>/, with DIR/families.json mapping the families to Fruits-360 classes "
                             "(for train --also)")
    quiet: bool = False


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


def _prepare(folder: Path, header: str = _HEADER) -> None:
    """Refuse a folder that holds another set (its MANIFEST says so, or, with none yet, files this set does not
    have: an unrelated folder would get photos mixed into it and its notes overwritten); check it is writable."""
    manifest = folder / MANIFEST
    if manifest.is_file():
        with manifest.open(encoding="utf-8", errors="replace") as fh:
            first = fh.readline().rstrip("\n")
        if first != header:
            other = "real shop photos (--real)" if first == _REAL_HEADER else (
                "a Fruits-360 sample" if first == _HEADER else "another set of files")
            raise SampleError(f"{folder} already holds {other}: choose another DIR (nothing was changed)")
    elif folder.is_dir():
        ours = _paths_of(header)
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            if path.is_file() and not path.name.startswith(".") and rel not in ours:
                raise SampleError(f"{folder} holds files that are not this sample's (e.g. {rel}): choose another "
                                  "DIR, an empty or new one (nothing was changed)")
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
    _write(folder / ATTRIBUTION, attribution + f"\nThis folder: {source}.\n")
    lines = ["path\tsha256\tbytes"] + [f"{p}\t{s}\t{b}" for p, s, b in sorted(rows)]
    _write(folder / MANIFEST, "\n".join(lines) + "\n")


def _write(path: Path, text: str | bytes) -> None:
    """Write a file whole or not at all (a full disk leaves neither a cut file nor a temporary one)."""
    storage.write_bytes(str(path), text.encode("utf-8") if isinstance(text, str) else text, storage.StorageOptions())


def _paths_of(header: str) -> set[str]:
    """Every file a folder of this set may hold: photos (of any class, so a second --classes adds to a first), notes,
    licence; the paths a download interrupted before its MANIFEST left are among them."""
    notes = {ATTRIBUTION, MANIFEST}
    if header == _REAL_HEADER:
        return {r.dest for r in pinned_real()} | notes | {FAMILIES, REAL_LICENSE.dest}
    mini = _read_list((mini_folder() / MANIFEST).read_text(encoding="utf-8"))
    return {p for p, _, _ in pinned_sample()} | {p for p, _, _ in mini} | notes


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
        _write(target, data)
        copied += 1
    _write_notes(folder, rows, "the 150-photo sample shipped with fruitpipe")
    return SampleResult(str(folder), len(rows), len(classes_of(rows)), copied, kept, sum(r[2] for r in rows))



@dataclass(frozen=True)
class RealPhoto:
    """One pinned real photo: its split and family, its path in the source repository, sha256 and size."""

    split: str
    family: str
    path: str
    sha256: str
    size: int

    @property
    def dest(self) -> str:
        """Where it lands: <split>/<family>/<file name> (the family folders `run` labels by)."""
        return f"{self.split}/{self.family}/{self.path.rsplit('/', 1)[-1]}"


def pinned_real() -> list[RealPhoto]:
    """Every real photo: the Grocery Store Dataset's 1,200 train and 110 val photos of 21 fruit families."""
    with gzip.open(_data() / REAL_LIST, "rt", encoding="utf-8") as fh:
        rows = [line.split("\t") for line in fh.read().splitlines()[1:] if line.strip()]
    return [RealPhoto(split, family, path, sha, int(size)) for split, family, path, sha, size in rows]


def real_families() -> dict[str, list[str]]:
    """The shipped mapping of the real photos' family folders to Fruits-360 classes."""
    with (_data() / REAL_FAMILIES).open(encoding="utf-8") as fh:
        mapping: dict[str, list[str]] = json.load(fh)
    return mapping


_REAL_ATTRIBUTION = """# Real shop photos: attribution and licence

The photos below `train/` and `val/` are unmodified, byte-for-byte copies of photos of the **Grocery Store
Dataset** by Marcus Klasson, Cheng Zhang and Hedvig Kjellström ("A Hierarchical Grocery Store Image Dataset with
Visual and Semantic Labels", IEEE WACV 2019), Copyright (c) 2019 Marcus Klasson, licensed under the **MIT licence**
(`LICENSE-GroceryStoreDataset.txt` beside this file: keep it with any copy). Official home:
https://github.com/marcusklasson/GroceryStoreDataset.

Source of the files: that repository at commit fc80ba90f803d79d0383df52c5a4ac5de99ff6fc, the natural photos of its
21 fruit classes (below `dataset/<train|val>/Fruit/`, and `Vegetables/Tomato`), regrouped into one folder per fruit
family (file names unchanged); `MANIFEST.tsv` gives each photo's path here, sha256, size and path in the source.

- `train/`: the dataset's training split, 1,200 photos. Photos of one shelf come in bursts taken minutes apart.
- `val/`: the dataset's validation split, 110 photos of 18 of the families, photographed apart from the training
  photos: the honest measure of a classifier trained on `train/` (`fruitpipe train ... --also-val`).
- `families.json`: each family folder -> the Fruits-360 classes it covers (`--also-families`, `--families`).
"""


def fetch_real(dest: str, quiet: bool = False, workers: int = 16) -> SampleResult:
    """Fetch the pinned real shop photos into `dest` (train/<family>/, val/<family>/) with their licence, attribution
    and family mapping, resuming: photos already there with the pinned sha256 are kept."""
    rows = pinned_real()
    folder = Path(dest)
    _prepare(folder, _REAL_HEADER)
    for split in REAL_SPLITS:
        for stale in (folder / split).glob("*/.*.part"):
            stale.unlink(missing_ok=True)
    files = [download.PinnedFile(f"{REAL_HOST_DIR}/{r.path}", r.dest, r.sha256, r.size) for r in rows]
    download.fetch_all([REAL_LICENSE], folder, desc="licence", quiet=True)  # first: never photos without it
    report = download.fetch_all(files, folder, workers=workers, desc="real shop photos", quiet=quiet)
    _write(folder / ATTRIBUTION, _REAL_ATTRIBUTION)
    _write(folder / FAMILIES, json.dumps(real_families(), indent=1) + "\n")
    lines = [_REAL_HEADER] + [f"{r.dest}\t{r.sha256}\t{r.size}\t{r.path}" for r in sorted(rows, key=lambda r: r.dest)]
    _write(folder / MANIFEST, "\n".join(lines) + "\n")
    return SampleResult(str(folder), len(rows), len({r.family for r in rows}), report.fetched, report.kept,
                        report.bytes)
