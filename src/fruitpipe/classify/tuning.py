"""`fruitpipe train --finetune`: the photos of the fit read back by uri, the backbone's last blocks and the head
fine-tuned from the linear head the statistics chose (classify.finetune), and the fine-tuned classifier's
probabilities on the test rows and on the held-out photos, for the same metrics, export check and publish as the
linear one."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fruitpipe import download, storage
from fruitpipe.classify import export as export_mod
from fruitpipe.classify import finetune, metrics, openset
from fruitpipe.classify.sources import Relabel
from fruitpipe.errors import FruitpipeError
from fruitpipe.models import build_mobilenet_v2 as mnv2
from fruitpipe.models import registry
from fruitpipe.models.fetch import cache_dir
from fruitpipe.models.quantize import cpu_features

log = logging.getLogger(__name__)

#: Studio (main output) Training photos per class in the fine-tuning, the first by content id: enough to keep the
#: studio classes (Fruits-360 Test top-1 98.2 % with 20 on the shared sample) at a fraction of the time; every
#: photo of the other sources (the real photos) is used.
STUDIO_PER_CLASS = 20
#: Folds of the real photos when they come without near-copy groups (the threshold's fine-tuning holds one out).
THRESHOLD_FOLDS = 3


class FinetuneError(FruitpipeError):
    """The fine-tuning cannot run: its extra is missing, or the backbone is not one it can fine-tune."""


def require_jax() -> None:
    """One line saying how to install the extra, when JAX is missing."""
    try:
        import jax  # noqa: F401  (imported on use: an optional extra of several hundred MB)
    except ImportError:
        raise FinetuneError("--finetune needs JAX: pip install 'fruitpipe[finetune]'") from None


def weights_loader(model_name: str, opts_quiet: bool = False) -> mnv2.Loader:
    """The published weights of the registered MobileNetV2 (the files its ONNX graph is built from): from
    FRUITPIPE_MODELS/mobilenet_v2_keras_weights/weights when that folder has them, else fetched (pinned,
    sha256-checked) into the model cache."""
    if model_name != "mobilenet_v2":
        raise FinetuneError(f"--finetune fine-tunes mobilenet_v2 (the registered backbone), not {model_name!r}: "
                            "run with --model mobilenet_v2")
    source = registry.MOBILENET_V2_WEIGHTS
    files = source.files()
    local = os.environ.get("FRUITPIPE_MODELS")
    if local and all((Path(local) / "mobilenet_v2_keras_weights" / "weights" / f.dest).is_file() for f in files):
        return mnv2.folder_loader(Path(local) / "mobilenet_v2_keras_weights" / "weights")
    folder = cache_dir() / "weights" / f"mobilenet_v2-{source.digest[:16]}-finetune"
    download.fetch_all(files, folder, desc="mobilenet_v2 weights", quiet=opts_quiet)
    return mnv2.folder_loader(folder)


@dataclass
class Rows:
    """Photos by uri with their class index; `ids` are content ids."""

    ids: list[str] = field(default_factory=list)
    uris: list[str] = field(default_factory=list)
    y: list[int] = field(default_factory=list)


def training_rows(files: list[str], relabel: Relabel, classes: list[str],
                  test_uris: set[str], per_class: int = STUDIO_PER_CLASS) -> tuple[Rows, int, int]:
    """The fine-tuning's photos: every Training photo of the other sources, and the first `per_class` Training
    photos (by content id) of each class of the main output; never a test row. Returns them with the counts of
    studio and other-source photos."""
    index = {c: i for i, c in enumerate(classes)}
    studio: dict[str, list[tuple[str, str]]] = {}
    other = Rows()
    for uri in files:
        source = relabel.source_of(uri)
        for batch in relabel.batches(uri, ["id", "uri", "label", "split"]):
            for cid, u, lb, sp in zip(*(batch.column(i).to_pylist() for i in range(4))):
                if sp != "Training" or lb not in index or u in test_uris:
                    continue
                if source is None:
                    studio.setdefault(lb, []).append((cid, u))
                else:
                    other.ids.append(cid)
                    other.uris.append(u)
                    other.y.append(index[lb])
    rows = Rows()
    for lb in sorted(studio):
        for cid, u in sorted(studio[lb])[:per_class]:
            rows.ids.append(cid)
            rows.uris.append(u)
            rows.y.append(index[lb])
    n_studio = len(rows.ids)
    rows.ids += other.ids
    rows.uris += other.uris
    rows.y += other.y
    return rows, n_studio, len(other.ids)


def held_out_rows(files: list[str], relabel: Relabel) -> tuple[Rows, list[str]]:
    """The held-out photos (every row of the --also-val outputs: ids and uris) and their labels' classes."""
    rows, names = Rows(), []
    for uri in files:
        for batch in relabel.batches(uri, ["id", "uri", "label"]):
            for cid, u, lb in zip(*(batch.column(i).to_pylist() for i in range(3))):
                if lb is not None:
                    rows.ids.append(cid)
                    rows.uris.append(u)
                    names.append(lb)
    return rows, names


def _decode(rows: Rows) -> finetune.Photos:
    return finetune.decode([(cid, storage.read_bytes(u), y) for cid, u, y in zip(rows.ids, rows.uris, rows.y)])


def species_answers(proba: np.ndarray, labels: list[str], classes: list[str],
                    maps_to: dict[str, list[str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per photo (`labels`: each one's class): whether the top class stands for the label's class, whether the
    species answer (the app's) is right, and the top species' probability (what "not sure" compares)."""
    index = {c: i for i, c in enumerate(classes)}
    species, names = openset.species_of(classes)
    sp = openset.species_proba(proba, species, len(names))
    ok_top, ok_species = [], []
    for i, lb in enumerate(labels):
        right = {index[c] for c in (lb, *maps_to.get(lb, [])) if c in index}
        ok_top.append(int(np.argmax(proba[i])) in right)
        ok_species.append(any(species[c] == int(np.argmax(sp[i])) for c in right))
    return np.array(ok_top, bool), np.array(ok_species, bool), sp.max(axis=1) if len(sp) else np.zeros(0)


def held_out_report(proba: np.ndarray, labels: list[str], classes: list[str], maps_to: dict[str, list[str]],
                    folders: dict[str, str] | None = None, threshold: float | None = None) -> dict[str, Any]:
    """What source_scores reports of held-out photos, from the fine-tuned model's probabilities: top-1 (the top
    class stands for the label's class), the species answer's top-1, the coverage table and per label (`labels`:
    each photo's class; `folders`: class -> the folder label it was read from, the per-label keys), and with the
    model's "not sure" `threshold` the share answered and right of those answered."""
    ok_top_a, ok_sp_a, conf = species_answers(proba, labels, classes, maps_to)
    per: dict[str, Any] = {}
    n = len(labels)
    for lb in sorted(set(labels)):
        sel = np.array([x == lb for x in labels])
        per[(folders or {}).get(lb, lb)] = {"class": lb, "stands_for": maps_to.get(lb, []), "photos": int(sel.sum()),
                                            "top1": round(float(ok_top_a[sel].mean()), 5)}
    out: dict[str, Any] = {
        "photos": n, "top1": round(float(ok_top_a.mean()), 5) if n else None,
        "species_top1": round(float(ok_sp_a.mean()), 5) if n else None,
        "coverage": openset.coverage(conf, ok_sp_a),
        "per_label": per}
    if threshold is not None and n:
        sure = conf >= threshold
        out["not_sure"] = {"threshold": threshold, "answered": round(float(sure.mean()), 5),
                           "species_top1_of_answered": round(float(ok_sp_a[sure].mean()), 5) if sure.any() else None}
    return out


def threshold_fold(train: finetune.Photos, other: set[str], relabel: Relabel) -> np.ndarray:
    """The indices of `train`'s photos held out of the threshold's fine-tuning: the other sources' (real) photos of
    one fold of their near-copy groups (classify.groups: a burst of one shelf stays on one side), so that the
    photos the threshold is chosen on were not taken beside a photo that fine-tuning saw."""
    idx = [i for i, cid in enumerate(train.ids) if cid in other]
    if relabel.grouping is None:
        log.warning("fine-tuning: the real photos have no near-copy groups; their threshold fold is by content id")
    folds = relabel.grouping.folds if relabel.grouping is not None else THRESHOLD_FOLDS
    fold = relabel.fold_of([train.ids[i] for i in idx], folds)
    return np.array([i for i, f in zip(idx, fold.tolist()) if f == 0], np.int64)


def _not_sure(first: finetune.Result | None, trunk: Any, uris: list[str], labels: list[str], classes: list[str],
              maps_to: dict[str, list[str]], fit_photos: int) -> dict[str, Any]:
    """The fine-tuned model's "not sure" threshold (openset.choose_by_precision) from the first fine-tuning's
    answers on the held-out fold's photos (`uris`, their classes `labels`), centre view as `serve` feeds them; none
    when the fold was too small to run it."""
    if first is None:
        return {"threshold": None, "why": f"{len(uris)} real photos in the held-out fold: fewer than "
                                          f"{openset.MIN_JUDGED} to judge a share of right answers",
                "held_out": {"photos": len(uris), "fit_photos": 0, "seconds": 0.0}}
    acts, kept = finetune.center_views(trunk, [storage.read_bytes(u) for u in uris])
    _, right, conf = species_answers(finetune.predict(first, acts), [labels[i] for i in kept], classes, maps_to)
    not_sure = openset.choose_by_precision(conf, right)
    # The first fine-tuning's species top-1 on the fold. Not an accuracy to quote: the fold is of the same shops and
    # days as the fit's photos (95.8 % there against 83.6 % on photos taken apart, docs/real-photos.md).
    not_sure["held_out"].update({"species_top1": round(float(right.mean()), 5) if len(right) else None,
                                 "fit_photos": fit_photos, "seconds": round(first.seconds, 1)})
    return not_sure


@dataclass
class Tuned:
    """A fine-tuning's outcome: the fine-tuned backbone's bytes, the head, the test rows' and held-out photos'
    probabilities, and what metrics.json says of it."""

    backbone: bytes
    head: tuple[np.ndarray, np.ndarray]
    test_proba: np.ndarray
    held_out: dict[str, Any]
    report: dict[str, Any]


def run(settings: finetune.FinetuneSettings, model_name: str, files: list[str],
        relabel: Relabel, classes: list[str], head: tuple[np.ndarray, np.ndarray], test_uris: list[str],
        held_out: tuple[Relabel, list[str]] | None, maps_to: dict[str, list[str]], quiet: bool = False) -> Tuned:
    """Fine-tune from `head` (the linear head, calibrated) on the fit's photos, then score the test rows and the
    held-out photos with the fine-tuned model (centre view, as `serve`)."""
    import onnxruntime as ort
    from tqdm import tqdm

    require_jax()
    t0 = time.perf_counter()
    load = weights_loader(model_name, quiet)
    rows, n_studio, n_other = training_rows(files, relabel, classes, set(test_uris))
    if n_other == 0:
        raise FinetuneError("--finetune learns from real photos: pass --also OTHER_OUTPUT (e.g. `fruitpipe sample "
                            "DIR --real`'s train/, embedded by `fruitpipe run`)")
    train = _decode(rows)
    uri_of = dict(zip(rows.ids, rows.uris))
    held_idx = threshold_fold(train, set(rows.ids[n_studio:]), relabel)
    # a fold too small to judge a share of right answers is not worth a fine-tuning
    fit_idx = np.setdiff1d(np.arange(len(train.ids)), held_idx) if len(held_idx) >= openset.MIN_JUDGED \
        else np.zeros(0, np.int64)
    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1
    trunk = ort.InferenceSession(finetune.trunk_model(load, settings.blocks), so,
                                 providers=["CPUExecutionProvider"])
    work = len(train.ids) * (settings.views + settings.epochs) + len(fit_idx) * settings.epochs
    with tqdm(total=work, desc="fine-tune", unit="photo", disable=quiet, leave=False) as bar:
        views = finetune.make_views(trunk, train, settings.views, settings.seed, bar.update)
        t_views = time.perf_counter() - t0
        # First the threshold's fine-tuning, without a fold of the real photos, then the one that is exported,
        # with every photo and the same settings: "not sure" is chosen on photos the first never saw.
        first = finetune.fit(finetune.init_params(load, settings.blocks, len(classes), head), views[:, fit_idx],
                             train.y[fit_idx], len(classes), settings, progress=bar.update) if len(fit_idx) else None
        state = finetune.init_params(load, settings.blocks, len(classes), head)
        result = finetune.fit(state, views, train.y, len(classes), settings, progress=bar.update)
    del views
    not_sure = _not_sure(first, trunk, [uri_of[train.ids[i]] for i in held_idx],
                         [classes[train.y[i]] for i in held_idx], classes, maps_to, len(fit_idx))
    acts, kept = finetune.center_views(trunk, [storage.read_bytes(u) for u in test_uris])
    if len(kept) != len(test_uris):
        raise FinetuneError("a test photo could not be read again for the fine-tuned model: run `fruitpipe run` "
                            "again so that the output describes its photos")
    test_proba = finetune.predict(result, acts)
    held: dict[str, Any] = {}
    if held_out is not None:
        for source in held_out[0].sources:
            parts = [f for f in held_out[1] if held_out[0].source_of(f) is source]
            hrows, labels = held_out_rows(parts, held_out[0])
            acts, kept = finetune.center_views(trunk, [storage.read_bytes(u) for u in hrows.uris])
            labels = [labels[i] for i in kept]
            proba = finetune.predict(result, acts)
            # the held-out output's own label maps: its folders need not be named as the --also ones
            held[source.root] = held_out_report(proba, labels, classes, {**maps_to, **held_out[0].maps_to},
                                                {c: lb for lb, c in source.classes.items()}, not_sure["threshold"])
    backbone = finetune.export_backbone(load, result)
    report = {"blocks": settings.blocks, "epochs": settings.epochs, "views": settings.views,
              "learning_rate": settings.learning_rate, "seed": settings.seed,
              "photos": {"studio": n_studio, "other_sources": n_other, "studio_per_class": STUDIO_PER_CLASS},
              "losses": [round(x, 5) for x in result.losses], "framework": "jax (CPU)",
              # The same seed gives other weights on another instruction set (onnxruntime's and XLA's kernels
              # differ by ISA): 80.0 % on the val split on an AVX-512 VM, 84.5 % on an AVX2 one (docs/real-photos.md).
              "cpu": cpu_features(), "not_sure": not_sure,
              "seconds": {"views": round(t_views, 1), "threshold_fit": not_sure["held_out"]["seconds"],
                          "fit": round(result.seconds, 1),
                          "total": round(time.perf_counter() - t0, 1)}}
    log.info("fine-tuning: %d photos (%d studio, %d real), %d epochs in %.0f s", len(train.ids), n_studio, n_other,
             settings.epochs, time.perf_counter() - t0)
    return Tuned(backbone, (result.params["head_w"], result.params["head_b"]), test_proba, held, report)


def replace_head(fitted: Any, settings: finetune.FinetuneSettings, model_name: str, files: list[str],
                 relabel: Relabel, held_out: tuple[Relabel, list[str]] | None,
                 guard: Callable[[], None] | None, quiet: bool) -> None:
    """Fine-tune from train's fitted linear head (train._Fitted) and put the fine-tuned model in its place: the
    test rows' probabilities, the head, the backbone of the export and the held-out figures become the fine-tuned
    model's; the linear head's figures stay in `finetune.linear_head`."""
    (w, b), = fitted.head.layers
    tuned = run(settings, model_name, files, relabel, fitted.classes, (w, b), fitted.uris, held_out,
                relabel.maps_to, quiet)
    if guard is not None:
        guard()  # minutes have passed: a train that lost its lease stops here
    linear_top1 = metrics.top_k(fitted.proba, fitted.y, 1) if len(fitted.y) else None
    linear_open_set = fitted.extra.get("open_set", {})
    fitted.extra["finetune"] = {**tuned.report, "linear_head": {
        "test_top1": None if linear_top1 is None else round(linear_top1, 5),
        "held_out": fitted.extra.get("held_out", {}), "open_set": linear_open_set}}
    chosen = tuned.report["not_sure"]
    fitted.extra["open_set"] = dict(chosen) if chosen["threshold"] is not None else {
        **linear_open_set, "why_not_the_finetuned_models": chosen["why"],
        "note": "the linear head's threshold, on the fine-tuned model's probabilities"}
    if "held_out" in fitted.extra:
        fitted.extra["held_out"] = tuned.held_out
    fitted.proba = tuned.test_proba.astype(np.float64)
    fitted.head = export_mod.Head(None, [(tuned.head[0].astype(np.float64), tuned.head[1].astype(np.float64))],
                                  transform="sqrt_l2")
    fitted.backbone = tuned.backbone
