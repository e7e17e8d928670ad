"""Training on several sources (`fruitpipe train OUT --also OTHER`): the other outputs' photos (a user's own real
photos, embedded by `fruitpipe run` with the same model) join the fit as classes of their own, each mapped to
the Fruits-360 classes it stands for; their labels are rewritten as the parts are read, never in the files."""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa

from fruitpipe import storage
from fruitpipe.classify.fruits import SPECIES, UNCERTAIN, display_name, species_key
from fruitpipe.classify.groups import GroupedFolds, fold_of
from fruitpipe.errors import ConfigError
from fruitpipe.pipeline.frames import part_batches


@dataclass(frozen=True)
class Source:
    """One other output: its root, its label -> class map (labels not in it are left out of the fit)."""

    root: str
    classes: dict[str, str]


@dataclass(frozen=True)
class Relabel:
    """How each part's rows are read: parts under another source's root have their labels mapped and every row
    counted as Training (cross-validated, never in the Test metrics); the main output's rows as they are."""

    sources: tuple[Source, ...] = ()
    #: Each added class -> the Fruits-360 classes it stands for (a prediction of it counts as one of them).
    maps_to: dict[str, list[str]] = field(default_factory=dict)
    #: The other sources' photos' folds (content id -> fold), near-copies on one side (classify.groups); the main
    #: output's rows keep their folds by content id.
    grouping: GroupedFolds | None = None
    #: Content ids of other sources' photos that are also photos of the main output's Test split: read without a
    #: label, so left out of every fit (a Test photo learned from would score itself).
    left_out: frozenset[str] = frozenset()

    def fold_of(self, ids: list[str], folds: int) -> np.ndarray:
        """Each row's cross-validation fold: its near-copy group's when grouped, else by content id."""
        plain = fold_of(ids, folds)
        if self.grouping is None or self.grouping.folds != folds:
            return plain
        got = self.grouping.fold_by_id
        return np.fromiter((got.get(i, f) for i, f in zip(ids, plain.tolist())), dtype=np.int64, count=len(ids))

    def source_of(self, uri: str) -> Source | None:
        for s in self.sources:
            if uri.startswith(s.root.rstrip("/") + "/"):
                return s
        return None

    def batches(self, uri: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """part_batches(uri, columns) with the source's labels and split applied (columns unchanged)."""
        source = self.source_of(uri)
        screen = source is not None and bool(self.left_out) and "label" in columns
        read = [*columns, "id"] if screen and "id" not in columns else columns
        for batch in part_batches(uri, read):
            if source is None:
                yield batch
                continue
            arrays = list(batch.columns)[:len(columns)]
            if "label" in columns:
                i = columns.index("label")
                got = [source.classes.get(lb) for lb in arrays[i].to_pylist()]
                if screen:
                    ids = batch.column(read.index("id")).to_pylist()
                    got = [None if cid in self.left_out else lb for lb, cid in zip(got, ids)]
                arrays[i] = pa.array(got, pa.string())
            if "split" in columns:
                arrays[columns.index("split")] = pa.array(["Training"] * batch.num_rows, pa.string())
            yield pa.RecordBatch.from_arrays(arrays, names=columns)

    def key(self) -> str:
        """What the kept statistics depend on (a changed map or grouping recomputes them)."""
        return hashlib.sha256(json.dumps([[s.root, sorted(s.classes.items())] for s in self.sources]
                                         + [self.grouping.key() if self.grouping else None]
                                         + ([sorted(self.left_out)] if self.left_out else [])).encode()).hexdigest()

    def describe(self) -> list[dict[str, Any]]:
        return [{"output": s.root, "labels": dict(sorted(s.classes.items()))} for s in self.sources]

    def linked_to(self, fitted: Relabel) -> Relabel:
        """These (held-out) labels standing also for the `fitted` sources' classes that stand for one of their
        Fruits-360 classes: a held-out folder named otherwise than the --also one of the same fruit ("bananas",
        "banana") is answered right by that class, and scored even when the fit has no studio class of it."""
        maps = {c: [*t, *sorted(f for f, ft in fitted.maps_to.items() if f != c and f not in t and set(ft) & set(t))]
                for c, t in self.maps_to.items()}
        return replace(self, maps_to=maps)


def read_families(uri: str) -> dict[str, list[str]]:
    """A mapping file (folder -> Fruits-360 classes, the format of real-photos-dev/families.json), checked: a
    ConfigError saying what is wrong."""
    try:
        raw = json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        raise ConfigError(f"{uri} does not exist: pass a JSON file mapping each folder to its Fruits-360 "
                          "classes") from None
    except ValueError as exc:
        raise ConfigError(f"{uri} is not JSON ({exc}): it maps each folder to a list of classes, e.g. "
                          "{\"apple\": [\"Apple Red 1\", ...]}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, list) and all(isinstance(c, str) for c in v)
                                            for v in raw.values()):
        raise ConfigError(f"{uri} must map each folder to a list of class names")
    return {str(k): list(v) for k, v in raw.items()}


def check_families(families: dict[str, list[str]], known: list[str], uri: str) -> None:
    """Refuse, in one line naming them and the closest classes the output has, a mapping's folders that map to no
    class, and class names that are typos: one of the output's classes spelled otherwise (case, a letter), or a
    name whose fruit fruitpipe's species table does not know. A Fruits-360 class the output lacks ("Banana 1" on an
    output of apples) is not a typo: its folder becomes a species of its own, as the shipped mapping needs."""
    have = set(known)
    lowered = {c.lower(): c for c in known}
    bad: list[str] = []
    for folder, names in families.items():
        if not names:
            bad.append(f"{folder!r} maps to no class")
        for name in names:
            if name in have:
                continue
            near = difflib.get_close_matches(name, known, n=2, cutoff=0.8)
            shown = display_name(name)
            typo = name.lower() in lowered or any(_misspelt(shown, display_name(n)) for n in near)
            if typo or (species_key(name) not in SPECIES and shown not in UNCERTAIN):
                hint = [lowered[name.lower()]] if name.lower() in lowered else near
                bad.append(f"{name!r} ({folder})" + (f", did you mean {' or '.join(map(repr, hint))}?" if hint
                                                     else ": not a class of this output nor a fruit fruitpipe knows"))
    if bad:
        raise ConfigError(f"{uri}: " + "; ".join(bad[:5]) + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
                          + ": fix the mapping (classes are named as the output's Training folders)")


def _misspelt(name: str, known: str) -> bool:
    """`name` is `known` with one word misspelt ("Apple Rde", "Bananna"), not another class: not another variant
    number ("Apple Red 2" beside "Apple Red 1": the display names are equal), another word ("Cactus fruit green"
    beside "Cactus fruit red"), a word more ("Cactus fruit" beside "Cactus fruit red") or another fruit ("Peach"
    beside "Pear")."""
    a, b = name.split(), known.split()
    differ = [(x, y) for x, y in zip(a, b) if x != y]
    return (len(a) == len(b) and len(differ) == 1
            and difflib.SequenceMatcher(None, *differ[0]).ratio() >= 0.6
            and difflib.SequenceMatcher(None, name, known).ratio() >= 0.85)


def class_name(label: str, families: dict[str, list[str]] | None, known: list[str]) -> tuple[str, list[str]]:
    """(the class an other source's label becomes, the Fruits-360 classes it stands for). A label that is a class
    of the main output: "<label> (photos)"; a family of the mapping file: named after its first class the main
    output has, so that its species is that class's ("apple" -> "Apple (apple photos)", species Apple)."""
    if families is not None and label in families:
        mapped = [c for c in families[label] if c in known]
        if not mapped:
            return f"{label} (photos)", list(families[label])
        return f"{species_key(mapped[0])} ({label} photos)", mapped
    if label in known:
        return f"{label} (photos)", [label]
    raise ConfigError(f"label {label!r} of an --also output is not a class of the output trained: name its folders "
                      "after Fruits-360 classes, or pass --also-families FILE mapping each folder to classes")


def relabel_for(others: list[tuple[str, set[str]]], families: dict[str, list[str]] | None,
                known: list[str]) -> Relabel:
    """The Relabel of the other outputs (root, Training-or-unsplit labels)."""
    sources, maps_to = [], {}
    for root, labels in others:
        mapping = {}
        for lb in sorted(labels):
            name, stands_for = class_name(lb, families, known)
            mapping[lb] = name
            maps_to[name] = stands_for
        sources.append(Source(root, mapping))
    return Relabel(tuple(sources), maps_to)
