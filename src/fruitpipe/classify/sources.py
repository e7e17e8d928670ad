"""Training on several sources (`fruitpipe train OUT --also OTHER`): the other outputs' photos (a user's own real
photos, embedded by `fruitpipe run` with the same model) join the fit as classes of their own, each mapped to
the Fruits-360 classes it stands for; their labels are rewritten as the parts are read, never in the files."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from fruitpipe.classify.fruits import species_key
from fruitpipe.errors import ConfigError
from fruitpipe.storage import StorageOptions


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

    def source_of(self, uri: str) -> Source | None:
        for s in self.sources:
            if uri.startswith(s.root.rstrip("/") + "/"):
                return s
        return None

    def batches(self, uri: str, opts: StorageOptions, columns: list[str]) -> Iterator[pa.RecordBatch]:
        """part_batches(uri, columns) with the source's labels and split applied (columns unchanged)."""
        from fruitpipe.pipeline.frames import part_batches

        source = self.source_of(uri)
        for batch in part_batches(uri, opts, columns):
            if source is None:
                yield batch
                continue
            arrays = list(batch.columns)
            if "label" in columns:
                i = columns.index("label")
                arrays[i] = pa.array([source.classes.get(lb) for lb in arrays[i].to_pylist()], pa.string())
            if "split" in columns:
                arrays[columns.index("split")] = pa.array(["Training"] * batch.num_rows, pa.string())
            yield pa.RecordBatch.from_arrays(arrays, names=columns)

    def key(self) -> str:
        """What the kept statistics depend on (a changed map recomputes them)."""
        return hashlib.sha256(json.dumps([[s.root, sorted(s.classes.items())] for s in self.sources]).encode()
                              ).hexdigest()

    def describe(self) -> list[dict[str, Any]]:
        return [{"output": s.root, "labels": dict(sorted(s.classes.items()))} for s in self.sources]


def read_families(uri: str, opts: StorageOptions) -> dict[str, list[str]]:
    """A mapping file (folder -> Fruits-360 classes, the format of real-photos-dev/families.json), checked: a
    ConfigError saying what is wrong."""
    from fruitpipe import storage

    try:
        raw = json.loads(storage.read_bytes(uri, opts))
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


def source_scores(spark: Any, files: list[str], opts: StorageOptions, relabel: Relabel, classes: list[str],
                  fmap: Any, folds: int, fold_models: list[Any]) -> dict[str, Any]:
    """Each other source's photos scored by the fit without their fold (cross-validation: no photo is scored by
    a model that saw it): per label the photos and the share whose top-1 is the label's class or a class it
    stands for, and the same by species. One pass over the other sources' parts only."""
    from fruitpipe.classify.linear import softmax
    from fruitpipe.classify.openset import species_of
    from fruitpipe.classify.stats import fold_of, to_matrix
    from fruitpipe.pipeline.reduce import sum_over_parts

    index = {c: i for i, c in enumerate(classes)}
    added = [c for c in classes if c in relabel.maps_to]
    if not added or not files:
        return {}
    right = np.zeros((len(added), len(classes)), bool)
    for a, c in enumerate(added):
        for target in (c, *relabel.maps_to[c]):
            if target in index:
                right[a, index[target]] = True
    species, _ = species_of(classes)
    w = spark.sparkContext.broadcast(np.stack([m.w for m in fold_models]).astype(np.float32))
    b = spark.sparkContext.broadcast(np.stack([m.b for m in fold_models]))
    slot = {c: a for a, c in enumerate(added)}

    def partial(_pos: int, uri: str) -> np.ndarray:
        out = np.zeros((len(added), 3))  # photos, right, species right
        for batch in relabel.batches(uri, opts, ["id", "label", "features"]):
            lbs = batch.column(1).to_pylist()
            keep = np.array([lb in slot for lb in lbs], bool)
            if not keep.any():
                continue
            z = fmap.apply(to_matrix(batch.column(2))[keep]).astype(np.float32)
            a = np.array([slot[lb] for lb, k in zip(lbs, keep) if k])
            f = fold_of([i for i, k in zip(batch.column(0).to_pylist(), keep) if k], folds)
            for fold in np.unique(f):
                sel = f == fold
                pred = np.argmax(softmax((z[sel] @ w.value[fold]).astype(np.float64) + b.value[fold]), axis=1)
                rows = a[sel]
                np.add.at(out[:, 0], rows, 1)
                np.add.at(out[:, 1], rows, right[rows, pred])
                own = species[[index[added[r]] for r in rows]]
                np.add.at(out[:, 2], rows, species[pred] == own)
        return out.ravel()

    total = sum_over_parts(spark, files, len(added) * 3, partial).reshape(len(added), 3)
    w.unpersist()
    b.unpersist()
    report: dict[str, Any] = {}
    for s in relabel.sources:
        names = sorted(set(s.classes.values()) & set(added))
        t = total[[slot[c] for c in names]]
        n = float(t[:, 0].sum())
        report[s.root] = {
            "photos": int(n), "cross_validated_top1": round(float(t[:, 1].sum() / n), 5) if n else None,
            "cross_validated_species_top1": round(float(t[:, 2].sum() / n), 5) if n else None,
            "per_label": {lb: {"class": c, "stands_for": relabel.maps_to[c], "photos": int(total[slot[c], 0]),
                               "top1": round(float(total[slot[c], 1] / total[slot[c], 0]), 5)
                               if total[slot[c], 0] else None}
                          for lb, c in sorted(s.classes.items()) if c in slot}}
    return report
