"""Command line of the product commands: `fruitpipe train`, `evaluate`, `serve`, `drift` and `sample`."""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import time
from typing import Any

from fruitpipe import images, sample
from fruitpipe.classify import train
from fruitpipe.classify.evaluate import EvaluateSettings, evaluate
from fruitpipe.classify.settings import TrainSettings
from fruitpipe.cli_args import (
    EPILOG,
    add_fields,
    add_metrics,
    add_storage,
    add_verbosity,
    export_metrics,
    from_args,
    key_values,
    sigterm_as_interrupt,
    storage_options,
)
from fruitpipe.drift.compare import DRIFT_EXIT_CODE, run_drift, summary
from fruitpipe.drift.stats import DriftSettings
from fruitpipe.errors import FruitpipeError, disk_full
from fruitpipe.logs import error_line, json_mode
from fruitpipe.serve.server import serve
from fruitpipe.serve.settings import ServeSettings

log = logging.getLogger("fruitpipe")


def add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="fit a classifier on OUTPUT's Training split, evaluate on Test, export ONNX",
                       epilog=EPILOG, description="Fit a classifier on the embeddings of a complete OUTPUT (Training), "
                       "evaluate it on Test, and write OUTPUT/classifier/: metrics.json, confusion.png, "
                       "test_predictions.parquet, the Spark model and fruit_classifier.onnx (photo -> probabilities).")
    add_fields(p, TrainSettings)  # every train option: its field in classify/settings.py
    add_verbosity(p, "warnings only, no table")
    p.add_argument("--spark-conf", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Spark setting, repeatable")
    add_storage(p)
    add_metrics(p)


def _add_crop(p: Any) -> None:
    p.add_argument("--crop", choices=images.CROPS, default=images.DEFAULT_CROP,
                   help=f"how a photo that is not square is fed: squash (the whole frame), center (its central "
                        f"square), three (three squares along the long side, averaged; 3x the work); default "
                        f"{images.DEFAULT_CROP}, measured on real phone photos (docs/real-photos.md)")


def add_evaluate(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="score OUTPUT's classifier on a folder of labelled photos (real ones)",
                       epilog=EPILOG, description="Run OUTPUT/classifier/fruit_classifier.onnx (what `serve` "
                       "answers with: same decode, preprocessing and crop) on PHOTOS/<label>/*, local or s3://, and "
                       "write OUTPUT/classifier/evaluations/NAME.json: top-1, top-5, species top-1, per label, "
                       "confusion, confidence of right and wrong answers, coverage by threshold, rejects by reason.")
    add_fields(p, EvaluateSettings)  # every evaluate option but --crop (serve's too): its field in classify/evaluate.py
    _add_crop(p)
    add_storage(p)
    add_verbosity(p, "no progress bar, no table")


def _evaluate_main(args: argparse.Namespace) -> int:
    r = evaluate(from_args(EvaluateSettings, args, crop=args.crop, storage=storage_options(args), quiet=args.quiet))
    if args.quiet:
        return 0

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    rejected = sum(r["rejected"].values())
    lines = [f"{r['photos_scored']} photos scored ({rejected} rejected: "
             f"{', '.join(f'{n} {k}' for k, n in r['rejected'].items()) or 'none'}), crop {r['crop']}: "
             f"top-1 {pct(r['top1'])}, species top-1 {pct(r['species_top1'])}, top-5 {pct(r['top5'])}; mean "
             f"confidence right {pct(r['confidence']['right'])}, wrong {pct(r['confidence']['wrong'])}",
             f"{'label':<24} {'photos':>6} {'top-1':>7} {'species':>8} {'top-5':>7}  most answered"]
    for label, v in r["per_label"].items():
        most = next(iter(r["confusion"][label].items()), ("-", 0))
        lines.append(f"{label[:24]:<24} {v['support']:>6} {pct(v['top1']):>7} {pct(v['species_top1']):>8} "
                     f"{pct(v['top5']):>7}  {most[0]} ({most[1]})")
    lines.append("threshold  answered  species top-1 of answered")
    lines += [f"{c['threshold']:>9}  {pct(c['answered']):>8}  {pct(c['species_top1_of_answered']):>8}"
              for c in r["coverage"]]
    lines.append(f"written: {r['written_to']}")
    if json_mode():
        log.info("\n".join(lines))
    else:
        sys.stdout.write("\n".join(lines) + "\n")
    return 0


def add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="answer 'which fruit is this?' over HTTP with OUTPUT's trained classifier",
                       epilog=EPILOG, description="Serve OUTPUT/classifier/fruit_classifier.onnx: POST /predict "
                       "(multipart field 'image') -> top-5, GET /health, GET /metrics (Prometheus).")
    add_fields(p, ServeSettings)  # every serve option but --crop (evaluate's too): its field in serve/app.py
    _add_crop(p)
    add_storage(p)
    add_verbosity(p, "warnings only (no access log)")


def add_sample(sub: Any) -> None:
    p = sub.add_parser("sample", help="get photos to try fruitpipe on: Fruits-360 (shipped, or a pinned download) or "
                       "real shop photos (--real)",
                       epilog=EPILOG, description="Put a Fruits-360 sample in DIR, in the dataset's layout "
                       "(Training/<Class>/, Test/<Class>/), with its CC BY-SA 4.0 attribution: by default the "
                       f"pinned 5,280-photo sample (66 classes x (60 Training + 20 Test), 25 MB) from "
                       f"{sample.HOST_DIR.split('/')[0]}'s public copy on raw.githubusercontent.com, every file "
                       "sha256-checked; an interrupted download resumes where it stopped. "
                       f"{sample.download.BASE_ENV} replaces the host (a mirror). With --real: the Grocery Store "
                       "Dataset's real shop photos instead, for `train --also` and `--also-val`.")
    add_fields(p, sample.SampleSettings)
    add_verbosity(p, "no progress bar, warnings only")


def _sample_main(args: argparse.Namespace) -> int:
    settings = from_args(sample.SampleSettings, args, quiet=args.quiet)
    if settings.real:
        result = sample.fetch_real(settings.dir, settings.quiet)
        if not settings.quiet:
            d = result.folder
            text = (f"{d}: {result.photos} real shop photos of {result.classes} fruit families ({result.fetched} "
                    f"downloaded, {result.kept} already there); next: fruitpipe run {d}/train OUT_REAL, fruitpipe "
                    f"run {d}/val OUT_VAL, then fruitpipe train OUTPUT --also OUT_REAL --also-families "
                    f"{d}/families.json --also-val OUT_VAL")
            log.info(text) if json_mode() else sys.stdout.write(text + "\n")
        return 0
    result = sample.copy_mini(settings.dir) if settings.mini else \
        sample.fetch_sample(settings.dir, settings.classes, settings.quiet)
    if not settings.quiet:
        text = (f"{result.folder}: {result.photos} photos of {result.classes} classes ({result.fetched} "
                f"{'copied' if settings.mini else 'downloaded'}, {result.kept} already there); next: fruitpipe run "
                f"{result.folder} OUTPUT")
        if json_mode():
            log.info(text)
        else:
            sys.stdout.write(text + "\n")
    return 0


def add_drift(sub: Any) -> None:
    p = sub.add_parser("drift", help="compare two outputs: has the incoming data (or the model's answers) drifted?",
                       epilog=EPILOG, description="Compare CURRENT_OUT with REFERENCE_OUT in the reference's PCA "
                       "basis (KS per component, MMD, reject rates, and the reference classifier's predictions and "
                       "confidence); write drift.json and drift.html; exit 0 without drift, "
                       f"{DRIFT_EXIT_CODE} with drift, 2 on an error.")
    p.add_argument("reference", metavar="REFERENCE_OUT", help="the output the model was built on (with its PCA)")
    p.add_argument("current", metavar="CURRENT_OUT", help="the output of the new photos (same embedding model)")
    add_fields(p, DriftSettings)  # the thresholds: their fields in drift/stats.py
    p.add_argument("--report-dir", metavar="DIR",
                   help="where to write drift.json and drift.html (default CURRENT_OUT/drift/)")
    add_storage(p)
    add_verbosity(p, "no summary, warnings only")
    add_metrics(p)


def _drift_main(args: argparse.Namespace, started: float) -> int:
    settings = from_args(DriftSettings, args)
    result = run_drift(args.reference, args.current, settings, args.report_dir)
    export_metrics(args, "drift", started, result, args.current)
    if not args.quiet:
        text = summary(result) + "\nwritten: " + ", ".join(result["written"])
        if json_mode():
            log.info(text)
        else:
            sys.stdout.write(text + "\n")
    return DRIFT_EXIT_CODE if result["drift"] else 0


def _serve_main(args: argparse.Namespace) -> int:
    try:  # before the classifier is loaded: a typo in --host is one line, not six of uvicorn's
        socket.getaddrinfo(args.host, args.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise FruitpipeError(f"--host {args.host!r} is not an address this machine can listen on "
                             f"({getattr(exc, 'strerror', None) or exc}): give an IP address such as 127.0.0.1 or "
                             "0.0.0.0, or a host name that resolves") from None
    try:
        from fruitpipe.serve.app import create_app
    except ImportError:
        raise FruitpipeError("fruitpipe serve needs its extra: pip install 'fruitpipe[serve]'") from None
    settings = from_args(ServeSettings, args, storage=storage_options(args), crop=args.crop)
    app = create_app(settings)
    # In json mode uvicorn's own log config is skipped: its lines go through ours, one JSON object each.
    extra: dict[str, Any] = {"log_config": None} if json_mode() else {}
    # Past --max-connections a new connection gets 503; headers must be complete within --header-timeout; kept-alive
    # connections that send nothing close after 5 s.
    return serve(app, host=settings.host, port=settings.port, header_timeout=settings.header_timeout,
                 max_connections=settings.max_connections, log_level="warning" if args.quiet else "info",
                 access_log=not args.quiet, timeout_keep_alive=5, **extra)


def _train_main(args: argparse.Namespace, started: float) -> int:
    opts = storage_options(args)
    conf = key_values(args.spark_conf, "--spark-conf", "spark.executor.memory=4g")
    settings = from_args(TrainSettings, args, quiet=args.quiet or json_mode(),  # no progress bar among JSON lines
                         storage=opts, spark_conf=conf)
    result = train(settings)
    export_metrics(args, "train", started, result, args.output)
    if not args.quiet:
        lines = [f"{args.classifier} on {args.features}: top-1 {result['top1']:.2%} "
                 f"(species {result['species_top1']:.2%}), top-5 {result['top5']:.2%}, "
                 f"macro-F1 {result['macro_f1']:.4f} on {result['n_test']} photos ({result['test_source']}); "
                 f"{result['cross_validation']['param']} = {result['cross_validation']['chosen']} by "
                 f"{args.folds}-fold cross-validation on Training"]
        for root, r in result.get("sources", {}).get("cross_validation", {}).items():
            lines.append(f"--also {root}: {r['photos']} photos, top-1 {r['cross_validated_top1']:.2%} (species "
                         f"{r['cross_validated_species_top1']:.2%}) by {args.folds}-fold cross-validation with "
                         "near-copies kept on one side")
        for root, r in result.get("held_out", {}).items():
            if r.get("photos"):
                lines.append(f"--also-val {root}: {r['photos']} photos taken apart, never fitted: top-1 "
                             f"{r['top1']:.2%}, species {r['species_top1']:.2%} (the honest real-photo figure)")
        if "finetune" in result:
            f = result["finetune"]
            lines.append(f"--finetune: {f['blocks']} blocks + Conv_1 and the head, {f['epochs']} epochs on "
                         f"{f['photos']['studio'] + f['photos']['other_sources']} photos in {f['seconds']['total']:.0f}"
                         f" s; the figures above and below are the fine-tuned model's (linear head: Test top-1 "
                         f"{f['linear_head']['test_top1']:.2%})")
        if "augmentation" in result:
            a = result["augmentation"]
            lines.append(f"--augment {a['variants_per_photo']}: {a['rows_in_fit']} variant rows in the fit at weight "
                         f"{a['weight']} ({a['made_this_train']['variants']} made now, {a['parts_kept']} of "
                         f"{a['parts']} parts kept from an earlier train)")
        if result["pca_table"]:
            lines.append(f"{'features':<28} {'k':>5} {'variance':>9} {'top-1':>8}")
            for row in result["pca_table"]:
                var = f"{row['explained_variance']:.3f}" if "explained_variance" in row else "1.000"
                lines.append(f"{row['features']:<28} {row['k']:>5} {var:>9} {row['top1']:>8.2%}")
        lines.append(f"written: {args.output.rstrip('/')}/classifier/ (fruit_classifier.onnx, metrics.json, "
                     "confusion.png)")
        if json_mode():
            log.info("\n".join(lines))
        else:
            sys.stdout.write("\n".join(lines) + "\n")
    return 0


def main(args: argparse.Namespace) -> int:
    """Run `train`, `serve`, `drift` or `sample`; errors are one line (and a failed run in the metrics)."""
    started = time.time()
    try:
        if args.command == "serve":  # uvicorn handles its signals: it finishes the requests in flight first
            return _serve_main(args)
        with sigterm_as_interrupt():  # SIGTERM exits 130 as Ctrl-C does, as in `run`
            if args.command == "train":
                return _train_main(args, started)
            if args.command == "drift":
                return _drift_main(args, started)
            if args.command == "sample":
                return _sample_main(args)
            return _evaluate_main(args)
    except FruitpipeError as exc:
        log.debug("the cause, in full:", exc_info=exc)
        error_line(f"fruitpipe {args.command}: error: {exc}")
        if args.command not in ("sample", "evaluate"):
            export_metrics(args, args.command, started, None, getattr(args, "current", None) or args.output)
        return 2
    except OSError as exc:
        if not disk_full(exc):
            raise
        where = getattr(args, "output", None) or getattr(args, "dir", None) or getattr(args, "current", None)
        error_line(f"fruitpipe {args.command}: error: no space left on the disk while writing ({exc.strerror or exc})"
                   f"; nothing half-written was kept: free space{f' where {where} is' if where else ''} and run "
                   "the same command again")
        return 2
    except KeyboardInterrupt:
        if args.command == "train":
            error_line("fruitpipe train: interrupted; OUTPUT/classifier/ holds the classifier its commit record names "
                       "(the one published before, or this one if its record was written)")
        if args.command == "sample":
            error_line("fruitpipe sample: interrupted; run the same command again to fetch the rest")
        return 130
