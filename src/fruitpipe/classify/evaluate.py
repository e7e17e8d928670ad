"""`fruitpipe evaluate`: an output's exported classifier (the file `serve` answers with, the same decode,
preprocessing and crop) on any folder of labelled photos, local or s3://: class folders, or family folders with a
mapping file; top-1 and top-5, per label, confusion, confidence of right and wrong answers, coverage by
threshold, bad photos counted by reason."""

from __future__ import annotations

import hashlib
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from fruitpipe import images, jsonio, storage
from fruitpipe.classify.export import FruitClassifier
from fruitpipe.classify.fruits import species_name
from fruitpipe.classify.openset import coverage, species_proba
from fruitpipe.classify.published import CLASSIFIER_DIR, ONNX_NAME, read_classifier
from fruitpipe.classify.sources import check_families, read_families
from fruitpipe.errors import ConfigError, FruitpipeError
from fruitpipe.options import classifier_output_option, max_pixels_option, option, threads_option
from fruitpipe.output import RunDir
from fruitpipe.pipeline.embed import read_input
from fruitpipe.pipeline.listing import list_images
from fruitpipe.report import write_report
from fruitpipe.storage import StorageOptions

log = logging.getLogger(__name__)

EVALUATIONS_DIR = "evaluations"
#: Photos decoded at once (decode in threads, one onnxruntime batch): bounds memory whatever the folder's size.
BATCH = 32


@dataclass(frozen=True)
class EvaluateSettings:
    """What to evaluate, on which photos, and how they are fed."""

    output: str = classifier_output_option()
    photos: str = option(positional=True, metavar="PHOTOS",
                         help="a folder (or s3:// prefix) of <label>/ folders of photos")
    families: str | None = option(
        None, metavar="FILE",
        help="JSON mapping each folder of PHOTOS to Fruits-360 classes (real-photos-dev/families.json's format): "
             "any class of the family counts as right; without it each folder must be a class of the classifier")
    name: str | None = option(None, help="name of the evaluation file (default: PHOTOS' folder name, with the crop "
                                         "if not the default)")
    #: How a photo that is not square is fed; its flag is serve's too (cli_apps).
    crop: str = images.DEFAULT_CROP
    storage: StorageOptions = StorageOptions()
    max_pixels: int = max_pixels_option()
    threads: int = threads_option()
    quiet: bool = False


def load_families(uri: str, classes: list[str]) -> dict[str, list[str]]:
    """The mapping file (family -> Fruits-360 classes), checked (sources.read_families). Classes the model was not
    trained on stay: a class learned from photos (train --also) may stand for them."""
    raw = read_families(uri)
    check_families(raw, classes, uri)
    unknown = sorted({c for v in raw.values() for c in v} - set(classes))
    if unknown:
        log.info("--families: %d class(es) are not classes of the classifier, e.g. %s", len(unknown), unknown[0])
    return raw


def _default_name(photos: str, crop: str) -> str:
    base = storage.normalize(photos).rstrip("/").rsplit("/", 1)[-1] or "photos"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-") or "photos"
    return name if crop == images.DEFAULT_CROP else f"{name}-{crop}"


def _score(clf: FruitClassifier, uris: list[str], settings: EvaluateSettings
           ) -> tuple[np.ndarray, list[int], dict[str, int], list[dict[str, str]]]:
    """(probabilities of the photos that could be used, their indices, reject counts by reason, examples)."""
    from tqdm import tqdm

    probs: list[np.ndarray] = []
    used: list[int] = []
    reasons: dict[str, int] = {}
    examples: list[dict[str, str]] = []

    def load(i: int) -> tuple[int, np.ndarray | None, images.Rejected | None]:
        try:  # the batch pipeline's read: a missing or forbidden photo is "unreadable", an outage raises
            data = read_input(uris[i])
            return i, images.model_views(data, clf.input_size, settings.max_pixels, clf.preprocess, clf.layout,
                                         clf.crop), None
        except images.Rejected as rj:
            return i, None, rj

    with ThreadPoolExecutor(max_workers=4) as pool, \
            tqdm(total=len(uris), unit="photo", desc="evaluate", disable=settings.quiet) as bar:
        for start in range(0, len(uris), BATCH):
            got = list(pool.map(load, range(start, min(start + BATCH, len(uris)))))
            ok = [(i, v) for i, v, _ in got if v is not None]
            for i, _, rj in got:
                if rj is not None:
                    reasons[rj.reason] = reasons.get(rj.reason, 0) + 1
                    if len(examples) < 10:
                        examples.append({"uri": uris[i], "reason": rj.reason, "detail": rj.detail})
            if ok:
                views = [v for _, v in ok]
                p = clf.probabilities(np.concatenate(views))
                bounds = np.cumsum([0] + [len(v) for v in views])
                probs += [p[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])]
                used += [i for i, _ in ok]
            bar.update(len(got))
    return (np.stack(probs) if probs else np.zeros((0, len(clf.classes)))), used, dict(sorted(reasons.items())), \
        examples


def _targets(labels: list[str], clf: FruitClassifier, families: dict[str, list[str]] | None
             ) -> tuple[list[str], np.ndarray, list[str]]:
    """(the groups reported, a boolean (photos x classes) of the classes that count as right, each class's group
    name for the confusion). Class folders: the class itself; with --families, every class of the family."""
    classes = clf.classes
    # a class learned from other photos (train --also) counts as the classes it stands for
    stands = {c: {c, *clf.maps_to.get(c, [])} for c in classes}
    if families is None:
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            raise ConfigError(f"{len(unknown)} folder(s) are not classes of this classifier (e.g. {unknown[0]!r}): "
                              "pass --families FILE mapping folder names to its classes")
        right = np.array([[lb in stands[c] for c in classes] for lb in labels], dtype=bool).reshape(len(labels), -1)
        return sorted(set(labels)), right, list(classes)
    missing = sorted(set(labels) - set(families))
    if missing:
        raise ConfigError(f"folder {missing[0]!r} is not in --families ({len(missing)} in all): add it to the file "
                          "with its classes")
    right = np.array([[bool(stands[c] & set(families[lb])) for c in classes] for lb in labels],
                     dtype=bool).reshape(len(labels), -1)
    group_of = {c: fam for fam, cs in sorted(families.items(), reverse=True) for c in cs}
    named = [next((group_of[t] for t in sorted(stands[c]) if t in group_of), None) for c in classes]
    return sorted(set(labels)), right, [g or f"(other: {species_name(c)})" for g, c in zip(named, classes)]


def summarise(proba: np.ndarray, labels: list[str], clf: FruitClassifier,
              families: dict[str, list[str]] | None) -> dict[str, Any]:
    """The figures of one evaluation from the photos' class probabilities and folder labels."""
    groups, right, group_of_class = _targets(labels, clf, families)
    n = len(labels)
    order = np.argsort(-proba, axis=1)[:, :5]
    rows = np.arange(n)
    top1: np.ndarray = right[rows, order[:, 0]] if n else np.zeros(0, bool)
    top5: np.ndarray = np.asarray(right[rows[:, None], order].any(axis=1)) if n else np.zeros(0, bool)
    # The app's answer: the species with the most probability (summed over its classes), right when one of its
    # classes counts as right.
    sp = species_proba(proba, clf.species, len(clf.species_names))
    best_species = sp.argmax(axis=1) if n else np.zeros(0, np.int64)
    in_species = clf.species[None, :] == best_species[:, None]
    species_right = (right & in_species).any(axis=1)
    conf = sp.max(axis=1) if n else np.zeros(0)
    per: dict[str, Any] = {}
    confusion: dict[str, dict[str, int]] = {}
    for g in groups:
        sel = np.array([lb == g for lb in labels])
        per[g] = {"support": int(sel.sum()), "top1": round(float(top1[sel].mean()), 5),
                  "species_top1": round(float(species_right[sel].mean()), 5),
                  "top5": round(float(top5[sel].mean()), 5)}
        counts: dict[str, int] = {}
        for j in order[sel, 0]:
            counts[group_of_class[j]] = counts.get(group_of_class[j], 0) + 1
        confusion[g] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def mean(x: np.ndarray) -> float | None:
        return round(float(x.mean()), 5) if len(x) else None

    return {"photos_scored": n, "top1": mean(top1), "species_top1": mean(species_right), "top5": mean(top5),
            "macro_top1": round(float(np.mean([v["top1"] for v in per.values()])), 5) if per else None,
            "per_label": per, "confusion": confusion,
            "confidence": {"right": mean(conf[species_right]), "wrong": mean(conf[~species_right])},
            "not_sure": {"threshold": clf.not_sure_below,
                         "answered": mean(conf >= clf.not_sure_below) if clf.not_sure_below is not None else None},
            "coverage": coverage(conf, species_right)}


def evaluate(settings: EvaluateSettings) -> dict[str, Any]:
    """Score OUTPUT's classifier on PHOTOS; writes OUTPUT/classifier/evaluations/<name>.json and returns it."""
    if settings.crop not in images.CROPS:
        raise ConfigError(f"--crop {settings.crop}: one of {', '.join(images.CROPS)}")
    with storage.configured(settings.storage):
        return _evaluate(settings)


def _evaluate(settings: EvaluateSettings) -> dict[str, Any]:
    t0 = time.perf_counter()
    uri = storage.join(settings.output, CLASSIFIER_DIR, ONNX_NAME)
    data = read_classifier(settings.output)
    try:
        clf = FruitClassifier(data, settings.threads, settings.crop)
    except Exception as exc:  # onnxruntime's own errors for a damaged file
        raise FruitpipeError(f"{uri} is not a usable ONNX classifier ({type(exc).__name__}): re-run `fruitpipe "
                             f"train {settings.output}`") from None
    families = load_families(settings.families, clf.classes) if settings.families else None
    listing = list_images(settings.photos)
    table = listing.manifest
    uris, labels = table.column("uri").to_pylist(), table.column("label").to_pylist()
    if not uris:
        raise ConfigError(f"{settings.photos} holds no photo in <label>/ folders: put each label's photos in a "
                          "folder named after it")
    proba, used, rejected, examples = _score(clf, uris, settings)
    for reason in listing.rejected.column("reason").to_pylist():  # what the listing itself rejected
        rejected[reason] = rejected.get(reason, 0) + 1
    result = {"name": settings.name or _default_name(settings.photos, settings.crop),
              "photos": settings.photos, "families": settings.families, "crop": settings.crop,
              "model_sha256": hashlib.sha256(data).hexdigest(),
              "listed": listing.count, "rejected": rejected, "reject_examples": examples,
              **summarise(proba, [labels[i] for i in used], clf, families),
              "seconds": round(time.perf_counter() - t0, 1)}
    assert result["photos_scored"] + sum(rejected.values()) == result["listed"], "every photo is accounted for"
    dest = storage.join(settings.output, CLASSIFIER_DIR, EVALUATIONS_DIR, f"{result['name']}.json")
    storage.write_bytes(dest, jsonio.dumps(result, indent=2).encode())
    result["written_to"] = dest
    write_report(RunDir(settings.output))
    log.info("evaluated %d photo(s) (%d rejected): top-1 %s, species top-1 %s -> %s", result["photos_scored"],
             sum(rejected.values()), result["top1"], result["species_top1"], dest)
    return result
