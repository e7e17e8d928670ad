"""`fruitpipe train OUT`: fit on Training, evaluate on Test, write OUT/classifier/ (metrics, confusion plot,
predictions, the Spark model and the one ONNX file photo -> probabilities)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fruitpipe import jsonio, lease, storage
from fruitpipe.classify import augmented, fit, metrics, onepass, scoring, sources, tuning
from fruitpipe.classify import export as export_mod
from fruitpipe.classify.fruits import species_name
from fruitpipe.classify.published import (
    CLASSIFIER_DIR,
    ONNX_NAME,
    TrainError,
    check_export,
    probe_photos,
    recorded_ids,
)
from fruitpipe.classify.settings import TrainSettings
from fruitpipe.classify.stats import STATS_FILE, FeatureMap
from fruitpipe.models import resolve_model
from fruitpipe.models.custom import spec_of
from fruitpipe.models.registry import CUSTOM, ModelSpec
from fruitpipe.output import SUCCESS, RunDir
from fruitpipe.pipeline.frames import output_errors
from fruitpipe.pipeline.pca_files import load_components
from fruitpipe.pipeline.reduce import embeddings_df
from fruitpipe.report import write_report
from fruitpipe.spark import save_ml_model, spark_session

log = logging.getLogger(__name__)


def _backbone(report: dict[str, Any], model_path: str | None) -> tuple[bytes, ModelSpec]:
    """The embedding model the run used (its bytes, its spec), checked by sha256 against run.json."""
    spec = spec_of(report["model"])
    if spec.name == CUSTOM and not model_path:
        raise TrainError(f"the embeddings were made with a model given by file ({spec.filename}): pass the same "
                         "file with --model-path")
    model = resolve_model(spec, model_path)
    if model.sha256 != report["model"]["sha256"]:
        raise TrainError(f"the embeddings were made with a model of sha256 {report['model']['sha256'][:16]}..., "
                         f"not {model.sha256[:16]}... ({model.path}): pass --model-path to the run's model file")
    return model.read_bytes(), spec


def _test_frame(spark: Any, data: Any, classes: list[str], holdout: float, seed: int) -> tuple[Any, Any, str]:
    """(train, test, how the test set was made): the Test split of known classes, else a stratified, seeded
    hold-out of Training."""
    train = data.filter("split = 'Training'")
    test = data.filter("split = 'Test' AND y >= 0")
    if test.limit(1).count():
        return train, test, "the Test split"
    from pyspark.sql import functions as F

    # The one-pass classifier's rule (stats.Holdout), per class: by content id, each class keeping its last photo
    # in hold-out order when all of them would go.
    order = F.conv(F.substring("id", 9, 8), 16, 10).cast("double") / float(16**8)
    ranked = train.withColumn("_order", order)
    last = ranked.groupBy("label").agg(F.max("_order").alias("_last"))
    ranked = ranked.join(F.broadcast(last), "label")
    is_held = (F.col("_order") < holdout) & ~((F.col("_last") < holdout) & (F.col("_order") == F.col("_last")))
    kept = ranked.filter(~is_held).drop("_order", "_last")
    held = ranked.filter(is_held).drop("_order", "_last")
    return kept, held, (f"no Test split: {holdout:.0%} of Training held out by content id, each class keeping at "
                        "least one Training photo (the same photos on every train)")


@dataclass
class _Fitted:
    """What either kind of fit hands to the export and the metrics."""

    classes: list[str]
    head: export_mod.Head
    uris: list[str]
    y: np.ndarray
    proba: np.ndarray
    n_train: int
    unseen: int
    test_source: str
    cross_validation: dict[str, Any]
    pca_table: list[dict[str, Any]]
    dim: int
    extra: dict[str, Any] = field(default_factory=dict)
    #: The backbone of the exported file when it is not the run's (--finetune).
    backbone: bytes | None = None


def _other_outputs(settings: TrainSettings, model_sha256: str, flag: str = "--also") -> list[tuple[str, list[str]]]:
    """(root, embeddings parts) of each --also (or --also-val) output, checked: complete, and embedded with the
    same model."""
    out = []
    for other in settings.also if flag == "--also" else settings.also_val:
        rd = RunDir(other)
        if not storage.exists(rd.join(SUCCESS)):
            raise TrainError(f"{flag} {other} has no {SUCCESS}: run `fruitpipe run PHOTOS {other}` to the end first")
        sha = rd.previous_report().get("model", {}).get("sha256")
        if sha != model_sha256:
            raise TrainError(f"{flag} {other} was embedded with another model (sha256 {str(sha)[:16]}...) than "
                             f"{settings.output} ({model_sha256[:16]}...): run it again with the same --model")
        out.append((rd.uri, rd.files("embeddings")))
    return out


def _relabel(spark: Any, settings: TrainSettings, files: list[str], others: list[tuple[str, list[str]]],
             fitted: bool = True) -> Any:
    """The label maps of the other outputs (classify.sources), from their labels and the main output's classes."""
    known = sorted({lb for lb, sp in scoring.labels(spark, files) if sp == "Training"})
    families = None
    if settings.also_families:
        families = sources.read_families(settings.also_families)
        sources.check_families(families, known, settings.also_families)
    relabel = sources.relabel_for([(root, {lb for lb, _ in scoring.labels(spark, parts)})
                                   for root, parts in others], families, known)
    if not fitted:  # --also-val: scored only, never learned from
        return relabel
    # Photos of the main output's Test split (same bytes) are left out of the fit: learned from, a Test photo
    # would score itself (60 of 60 once did).
    other_parts = [f for _, parts in others for f in parts]
    shared = scoring.content_ids(spark, other_parts) & \
        scoring.content_ids(spark, files, "Test")
    if shared:
        log.warning("%d photo(s) of %s are also in %s's Test split: left out of the fit, so that Test stays photos "
                    "the fit never saw", len(shared), ", ".join(root for root, _ in others), settings.output)
    return dataclasses.replace(relabel, left_out=frozenset(shared))


def _fit_linear(spark: Any, settings: TrainSettings, rundir: RunDir, files: list[str], components: np.ndarray | None,
                spec: ModelSpec, model_sha256: str, timings: dict[str, float], backbone: bytes) -> _Fitted:
    """The default: the one-pass statistics classifier (classify.onepass)."""
    made = None
    if settings.augment:  # variants of this output's own Training photos (not of --also outputs' photos)
        t0 = time.perf_counter()
        made = augmented.ensure(spark, rundir.uri, files, augmented.Augmentation(
            settings.augment, settings.augment_weight, settings.seed), spec, model_sha256, backbone,
            guard=rundir.guard, quiet=settings.quiet)
        timings["augment"] = time.perf_counter() - t0
    others = _other_outputs(settings, model_sha256) if settings.also else []
    relabel = _relabel(spark, settings, files, others) if others else None
    vals = _other_outputs(settings, model_sha256, "--also-val") if settings.also_val else []
    held_out = (_relabel(spark, settings, files, vals, fitted=False), [f for _, parts in vals for f in parts]) \
        if vals else None
    if held_out is not None and relabel is not None:
        held_out = (held_out[0].linked_to(relabel), held_out[1])
    files = [*files, *(f for _, parts in others for f in parts)]

    fmap = FeatureMap(onepass.DEFAULT_TRANSFORM) if components is None else FeatureMap("none", components)
    dim = spec.dim if components is None else int(components.shape[1])
    got = onepass.fit(spark, onepass.FitData(files, relabel, made.parts if made else None, held_out),
                      onepass.FitPlan(settings.folds, settings.holdout, dim, fmap, settings.compare_pca,
                                      rundir.join(CLASSIFIER_DIR, STATS_FILE), model_sha256, settings.augment_weight),
                      rundir.guard)
    timings.update(got.timings)
    extra: dict[str, Any] = {"calibration": got.calibration, "statistics": got.statistics, "open_set": got.open_set}
    if made is not None:
        extra["augmentation"] = {**made.report, "rows_in_fit": got.statistics.get("augmented", {}).get("rows", 0)}
    if relabel is not None:
        extra.update(sources=got.sources, maps_to=relabel.maps_to, also_in_test_left_out=len(relabel.left_out))
    if held_out is not None:
        extra["held_out"] = got.held_out
    fitted = _Fitted(got.classes, got.head, got.uris, got.y, got.proba, got.n_train, got.unseen, got.test_source,
                     got.cross_validation, got.pca_table, dim, extra)
    if settings.finetune and relabel is not None:
        t0 = time.perf_counter()
        tuning.replace_head(fitted, settings.finetune_settings(), spec.name, files, got.relabel or relabel, held_out,
                            rundir.guard, settings.quiet)
        timings["finetune"] = time.perf_counter() - t0
    return fitted


def _fit_spark_ml(spark: Any, settings: TrainSettings, rundir: RunDir, files: list[str],
                  components: np.ndarray | None, timings: dict[str, float]) -> _Fitted:
    """Spark ML's logistic regression or perceptron with its CrossValidator (--classifier logreg / mlp)."""
    t0 = time.perf_counter()
    emb = embeddings_df(spark, files)
    training = scoring.survey(spark, files).training
    classes = sorted(training)
    folds = onepass.cap_folds(settings.folds, training)
    if len(classes) < 2:
        raise TrainError(f"{settings.output} has {len(classes)} class in Training: a classifier needs two or more")
    data_emb = fit.labelled(emb, classes).persist()
    cached = [data_emb]
    train_emb, test_emb, test_source = _test_frame(spark, data_emb, classes, settings.holdout, settings.seed)
    if components is not None:
        data = fit.labelled(fit.projected(emb, components), classes).persist()
        cached.append(data)
        train, test, _ = _test_frame(spark, data, classes, settings.holdout, settings.seed)
        train = train.join(train_emb.select("uri"), "uri", "left_semi")  # the same rows as the embeddings'
        test = test.join(test_emb.select("uri"), "uri", "left_semi")
    else:
        train, test = train_emb, test_emb
    train, test = train.persist(), test.persist()
    cached += [train, test]
    n_train = train.count()
    unseen = data_emb.filter("split = 'Test' AND y < 0").count()
    emb_dim = len(train_emb.first()["features"])
    dim = int(components.shape[1]) if components is not None else emb_dim
    timings["prepare"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    model, cv = fit.cross_validate(settings.classifier, train, dim, len(classes), folds, settings.seed)
    timings["cross_validate"] = time.perf_counter() - t1
    uris, y, proba = fit.predict(model, test)
    table = []
    if settings.compare_pca:
        t2 = time.perf_counter()
        full = metrics.top_k(proba, y, 1) if components is None else None
        table = fit.pca_table(settings.classifier, cv["chosen"], train_emb, test_emb, emb_dim, len(classes),
                              settings.seed, full)
        timings["pca_table"] = time.perf_counter() - t2
    cv["folds"] = folds
    if settings.classifier == "logreg":
        head = export_mod.logistic_head(model.coefficientMatrix.toArray(), model.interceptVector.toArray(),
                                        components)
    else:
        head = export_mod.mlp_head(list(model.getLayers()), model.weights.toArray(), components)
    if rundir.guard is not None:
        rundir.guard()  # the lease: a train that lost it writes nothing
    save_ml_model(spark, model, rundir.join(CLASSIFIER_DIR, "spark_model"))
    for frame in cached:
        frame.unpersist()  # a session shared with other work (tests, notebooks) gets its memory back
    return _Fitted(classes, head, uris, y, proba, int(n_train), int(unseen), test_source, cv, table, dim)


def train(settings: TrainSettings, spark: Any = None) -> dict[str, Any]:
    """Fit, evaluate, export; returns metrics.json's content. `spark`: an existing SparkSession to use (never
    stopped by train), else the active one, else one started for the call."""
    settings.validate()
    with storage.configured(settings.storage):  # every storage call of the fit, the executors' included
        return _train(settings, spark)


def _train(settings: TrainSettings, spark: Any) -> dict[str, Any]:
    rundir = RunDir(settings.output)
    if not storage.exists(rundir.join(SUCCESS)):
        raise TrainError(f"{settings.output} has no {SUCCESS}: run `fruitpipe run INPUT {settings.output}` to the "
                         "end first (train reads a complete output only)")
    report = rundir.previous_report()
    files = rundir.files("embeddings")
    components = None
    if settings.features == "reduced":
        if rundir.reduce_entry() is None:
            raise TrainError(f"{settings.output} has no PCA: run `fruitpipe reduce {settings.output}` first")
        components = load_components(rundir.join("pca"))
    backbone, spec = _backbone(report, settings.model_path)
    probe_photos(files)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    token = f"train-{uuid.uuid4().hex[:8]}"
    # The lease is held to the last write: a `run --overwrite` cannot start between the fit and the publish.
    with lease.hold(settings.output, token) as held:
        rundir.guard = held.check
        rundir.under_lease = held.publish
        # output_errors: a part the tasks cannot read is the one-line error `run` and `reduce` give.
        with (contextlib.nullcontext(spark) if spark is not None
              else spark_session(settings.master, "fruitpipe-train", conf=settings.spark_conf)) as spark, \
                output_errors():
            if settings.classifier == "linear":
                got = _fit_linear(spark, settings, rundir, files, components, spec, report["model"]["sha256"],
                                  timings, backbone)
            else:
                got = _fit_spark_ml(spark, settings, rundir, files, components, timings)
        return _evaluate_and_publish(settings, rundir, report, backbone, spec, got, timings, t0, token)


def _evaluate_and_publish(settings: TrainSettings, rundir: RunDir, report: dict[str, Any], backbone: bytes,
                          spec: ModelSpec, got: _Fitted, timings: dict[str, float], t0: float,
                          token: str) -> dict[str, Any]:
    """Metrics, export and its check, then every classifier file staged and published at once (under the
    caller's lease)."""
    classes, uris, y, proba = got.classes, got.uris, got.y, got.proba
    result = metrics.report(proba, y, classes, got.extra.get("maps_to"))
    open_set = got.extra.setdefault("open_set", {"threshold": None, "why": "chosen by --classifier linear only"})
    onnx_meta = {"classes": classes, "species": [species_name(c) for c in classes],
                 "not_sure_below": open_set["threshold"], "embedding_model": report["model"]["name"],
                 "embedding_model_sha256": report["model"]["sha256"], "features": settings.features,
                 "classifier": settings.classifier, "transform": got.head.transform,
                 # classes learned from other sources' photos -> the Fruits-360 classes they stand for (evaluate)
                 **({"maps_to": got.extra.pop("maps_to")} if "maps_to" in got.extra else {}),
                 **export_mod.input_metadata(spec)}
    untested = [c for i, c in enumerate(classes) if not np.any(y == i)]
    # the --also classes are never Test photos by design (their figures are in `sources` and `held_out`)
    unexpected = [c for c in untested if c not in onnx_meta.get("maps_to", {})]
    if unexpected:
        log.warning("%d class(es) have no test photo (too few photos for the hold-out, or none in Test): %s",
                    len(unexpected), ", ".join(unexpected[:10]) + (" ..." if len(unexpected) > 10 else ""))
    if got.backbone is not None:
        onnx_meta["finetuned"] = {k: got.extra["finetune"][k] for k in ("blocks", "epochs", "seed")}
    onnx_bytes = export_mod.export(got.backbone or backbone, spec.output_name, got.head, onnx_meta)
    agreement = check_export(onnx_bytes, uris, proba, recorded_ids(rundir.files("embeddings")))
    pred = np.argmax(proba, axis=1)
    out = {
        **result,
        "test_source": got.test_source, "n_train": got.n_train, "n_test": int(len(y)),
        "test_rows_of_unseen_classes": got.unseen, "n_classes": len(classes), "classes": classes,
        "classes_without_test_photos": untested,
        "settings": {"features": settings.features, "classifier": settings.classifier, "folds": settings.folds,
                     "seed": settings.seed, "feature_dim": got.dim, "also": list(settings.also),
                     "also_families": settings.also_families, "also_val": list(settings.also_val),
                     "augment": settings.augment, "finetune": settings.finetune,
                     "augment_weight": settings.augment_weight if settings.augment else None},
        "cross_validation": got.cross_validation, "pca_table": got.pca_table, **got.extra,
        "embedding_model": {"name": report["model"]["name"], "sha256": report["model"]["sha256"]},
        "onnx": {"file": ONNX_NAME, "sha256": hashlib.sha256(onnx_bytes).hexdigest(), "bytes": len(onnx_bytes),
                 "agreement_with_spark": agreement},
        "timings_s": {k: round(v, 2) for k, v in {**timings, "total": time.perf_counter() - t0}.items()},
    }
    blobs = {ONNX_NAME: onnx_bytes}
    try:
        blobs["confusion.png"] = metrics.confusion_png(y, pred, classes, f"{settings.classifier} on "
                                                       f"{settings.features}, {got.test_source}")
    except Exception as exc:  # a plot is a picture of metrics.json: never worth the whole train
        log.warning("confusion.png not written: %s: %s", type(exc).__name__, exc)
    table_out = pa.table({"uri": uris, "label": [classes[i] for i in y], "predicted": [classes[i] for i in pred],
                          "probability": proba[np.arange(len(pred)), pred].astype(np.float32)})
    buf = io.BytesIO()
    pq.write_table(table_out, buf)
    blobs["test_predictions.parquet"] = buf.getvalue()
    blobs["metrics.json"] = (jsonio.dumps(out, indent=1) + "\n").encode()
    staging = rundir.join(CLASSIFIER_DIR, f"_staging-{token}")
    for uri, _ in list(storage.list_files(rundir.join(CLASSIFIER_DIR))):
        if "/_staging-" in uri:  # what a killed train staged (this one holds the lease: nobody else writes here)
            storage.delete(uri)
    try:
        staged = {}
        for name, data in blobs.items():
            staged[name] = storage.join(staging, name)
            storage.write_bytes(staged[name], data)
        rundir.commit_classifier(staged, {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()},
                                 token)
    finally:
        storage.delete(staging)
    write_report(rundir)  # refreshed with the classifier's section
    return out
