"""Augmented Training rows for `fruitpipe train --augment N`: N phone-like variants (fruitpipe.augment) of each
Training photo, embedded on the executors with the run's backbone, kept under OUT/augmented/<set>/ with one part per
embeddings part (a later train makes only the parts still missing), joined to the fit as Training rows of their
source photo (its fold, its hold-out) at a weight below the photos', never counted as photos: not in the accounting,
the PCA, the test metrics or the open-set threshold."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from fruitpipe import augment, images, storage
from fruitpipe.layout import AUGMENTED
from fruitpipe.models import runner
from fruitpipe.models.registry import ModelSpec
from fruitpipe.pipeline.embed import read_input
from fruitpipe.pipeline.frames import output_errors, over_files
from fruitpipe.spark import JobProgress
from fruitpipe.vectors import to_list_array

log = logging.getLogger(__name__)

#: Bumped when fruitpipe.augment makes other images for the same seed: the kept variants are then made again.
AUGMENT_VERSION = 2  # 2: frame-filling bins of the fruit
#: The variants' weight in the statistics against 1 for a photo. Chosen on the shared sample's Fruits-360 Test
#: split only (docs/real-photos.md): of 0.1, 0.2, 0.3 and 1, the largest that kept Test top-1 at 98 % or more with
#: both versions of the augmentation and with 2 or 4 variants (98.18-98.33 %; 1 gave 95.8-96.4 %). The real
#: photos chose nothing.
DEFAULT_WEIGHT = 0.1
#: Spark job group of the variants' job (its progress bar).
JOB_GROUP = "fruitpipe-augment"
META = "_augment.json"
SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),  # the source photo's content id: its fold and its hold-out
    pa.field("uri", pa.string(), nullable=False),  # the source photo
    pa.field("label", pa.string()),
    pa.field("split", pa.string()),
    pa.field("variant", pa.int32(), nullable=False),
    pa.field("features", pa.list_(pa.float32()), nullable=False),
])
TASK_DDL = "part string, photos long, variants long, unreadable long, changed long, not_finite long"


@dataclass(frozen=True)
class Augmentation:
    """What --augment asks for: variants per Training photo, their weight, the seed of their randomness."""

    variants: int
    weight: float = DEFAULT_WEIGHT
    seed: int = 7

    def record(self, model_sha256: str, spec: ModelSpec) -> dict[str, Any]:
        """What the variants depend on (their folder's name is its digest)."""
        return {"version": AUGMENT_VERSION, "variants": self.variants, "seed": self.seed, "model": model_sha256,
                "input_size": spec.input_size, "preprocess": spec.preprocess, "layout": spec.layout,
                "crop": images.DEFAULT_CROP, "size": augment.SIZE}


@dataclass(frozen=True)
class Made:
    """The augmented parts of the current embeddings parts, and what this train made of them."""

    parts: list[str]
    report: dict[str, Any]


def folder(output_root: str, aug: Augmentation, model_sha256: str, spec: ModelSpec) -> str:
    """OUT/augmented/<n>x-seed<seed>-<digest>: one folder per set of variants (another N, seed or model: another)."""
    digest = hashlib.sha256(json.dumps(aug.record(model_sha256, spec), sort_keys=True).encode()).hexdigest()[:12]
    return storage.join(output_root, AUGMENTED, f"{aug.variants}x-seed{aug.seed}-{digest}")


def _inputs(rgb: np.ndarray, aug: Augmentation, cid: str, spec: ModelSpec) -> np.ndarray:
    """The model inputs of one photo's variants (variants x size x size x 3, or x 3 x size x size)."""
    views = [images.square_views(augment.phone_like(rgb, augment.variant_rng(aug.seed, cid, k)), spec.input_size)[0]
             for k in range(aug.variants)]
    x = images.preprocess(np.stack(views), spec.preprocess)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if spec.layout == "nchw" else x


def variants_of_part(uri: str, target: str, aug: Augmentation, spec: ModelSpec,
                     predict: Callable[[np.ndarray], np.ndarray], max_pixels: int) -> dict[str, int]:
    """Make, embed and write (atomically, to `target`) the variants of one embeddings part's Training photos; a
    photo gone or changed since it was embedded is counted and skipped. Returns the counts."""
    t = storage.read_parquet(uri, columns=["id", "uri", "label", "split"])
    out: dict[str, list[Any]] = {"id": [], "uri": [], "label": [], "split": [], "variant": []}
    feats: list[np.ndarray] = []
    counts = {"photos": 0, "variants": 0, "unreadable": 0, "changed": 0, "not_finite": 0}
    for cid, src, label, split in zip(*(t.column(c).to_pylist() for c in ("id", "uri", "label", "split"))):
        if split != "Training" or label is None:
            continue
        try:
            data = read_input(src)
            if images.content_id(data) != cid:
                counts["changed"] += 1
                continue
            rgb = images.decode_rgb(data, max_pixels, min_side=images.MIN_SIDE)
        except images.Rejected:
            counts["unreadable"] += 1
            continue
        got = predict(_inputs(rgb, aug, cid, spec))
        counts["photos"] += 1
        for k, vec in enumerate(got):
            if not np.isfinite(vec).all():
                counts["not_finite"] += 1
                continue
            for key, value in (("id", cid), ("uri", src), ("label", label), ("split", "Training"), ("variant", k)):
                out[key].append(value)
            feats.append(vec)
    counts["variants"] = len(feats)
    features = to_list_array(np.stack(feats) if feats else np.zeros((0, 1), np.float32))
    storage.write_parquet(pa.table({**out, "features": features}, schema=SCHEMA), target)
    return counts


def _job(spark: Any, todo: list[tuple[str, str]], aug: Augmentation, spec: ModelSpec, model_sha256: str,
         backbone: bytes, max_pixels: int, quiet: bool) -> list[Any]:
    """One task per missing part, on the executors, the backbone broadcast once."""
    bc = spark.sparkContext.broadcast(backbone)
    targets = dict(todo)

    def task(items: Iterator[tuple[int, str]]) -> Iterator[pa.RecordBatch]:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        threads = max(1, int(ctx.cpus())) if ctx is not None else 1
        predict = runner.make_predict_fn(model_sha256, lambda: bc.value, threads, spec.input_name,
                                         spec.output_name)
        for _pos, uri in items:
            counts = variants_of_part(uri, targets[uri], aug, spec, predict, max_pixels)
            yield pa.RecordBatch.from_pydict({"part": [uri], **{k: [v] for k, v in counts.items()}})

    try:
        with output_errors(), JobProgress(spark, JOB_GROUP, total=len(todo), unit="part", desc="augment",
                                          quiet=quiet, tasks=len(todo)):
            return list(over_files(spark, [u for u, _ in todo], len(todo), task, TASK_DDL).collect())
    finally:
        bc.destroy()


def ensure(spark: Any, output_root: str, files: list[str], aug: Augmentation, spec: ModelSpec, model_sha256: str,
           backbone: bytes, guard: Callable[[], None] | None = None,
           max_pixels: int = images.DEFAULT_MAX_PIXELS, quiet: bool = False) -> Made:
    """The augmented part of each embeddings part in `files`, made where missing (under the caller's lease:
    `guard` is checked before anything is written); parts of embeddings parts no longer committed are deleted."""
    root = folder(output_root, aug, model_sha256, spec)
    want = {f: storage.join(root, f.rsplit("/", 1)[-1]) for f in files}
    have = {u for u, _ in storage.list_files(root)} if storage.exists(root) else set()
    if guard is not None:
        guard()
    # Parts of embeddings parts no longer committed (`run` rewrote or dropped them) and what a killed task left
    # (`.tmp-` siblings): nobody else writes here while the lease is held.
    for stale in sorted(have - set(want.values()) - {storage.join(root, META)}):
        storage.delete(stale)
    todo = [(f, t) for f, t in want.items() if t not in have]
    t0 = time.perf_counter()
    made = {"photos": 0, "variants": 0, "unreadable": 0, "changed": 0, "not_finite": 0}
    if todo:
        storage.write_bytes(storage.join(root, META), (json.dumps(aug.record(model_sha256, spec), indent=1) + "\n"
                                                       ).encode())
        log.info("augment: %d variant(s) of the Training photos of %d part(s) to make (%d kept)", aug.variants,
                 len(todo), len(want) - len(todo))
        for row in _job(spark, todo, aug, spec, model_sha256, backbone, max_pixels, quiet):
            for key in made:
                made[key] += int(row[key])
        if made["unreadable"] or made["changed"]:
            log.warning("augment: %d Training photo(s) could not be read and %d changed since `run` embedded them: "
                        "no variants of them", made["unreadable"], made["changed"])
    report = {"variants_per_photo": aug.variants, "weight": aug.weight, "seed": aug.seed, "folder": root,
              "parts": len(want), "parts_kept": len(want) - len(todo), "parts_made": len(todo),
              "made_this_train": made, "seconds": round(time.perf_counter() - t0, 2)}
    return Made([want[f] for f in files], report)
