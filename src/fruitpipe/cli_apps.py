"""Command line of the product commands: `fruitpipe train` and `fruitpipe serve`."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from fruitpipe.cli_args import EPILOG, key_values, share, storage_options, whole_number
from fruitpipe.errors import FruitpipeError

log = logging.getLogger("fruitpipe")


def add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="fit a classifier on OUTPUT's Training split, evaluate on Test, export ONNX",
                       epilog=EPILOG, description="Fit a classifier on the embeddings of a complete OUTPUT (Training), "
                       "evaluate it on Test, and write OUTPUT/classifier/: metrics.json, confusion.png, "
                       "test_predictions.parquet, the Spark model and fruit_classifier.onnx (photo -> probabilities).")
    p.add_argument("output", metavar="OUTPUT", help="an OUTPUT written to the end by `fruitpipe run`")
    p.add_argument("--features", choices=["embeddings", "reduced"], default="embeddings",
                   help="full embeddings (default) or OUTPUT's PCA-reduced vectors")
    p.add_argument("--classifier", choices=["logreg", "mlp"], default="logreg",
                   help="multinomial logistic regression (default) or a one-hidden-layer perceptron")
    p.add_argument("--folds", type=whole_number, default=3, help="cross-validation folds on Training (default 3)")
    p.add_argument("--seed", type=whole_number, default=7, help="seed of the folds and of a hold-out (default 7)")
    p.add_argument("--holdout", type=share, default=0.2,
                   help="share of Training held out as the test set when OUTPUT has no Test split (default 0.2)")
    p.add_argument("--no-pca-table", action="store_true",
                   help="skip the table of top-1 on full embeddings vs PCA at k = 20, 50 and 95 %% variance")
    p.add_argument("--model-path", metavar="FILE", help="the run's embedding model file, if not the registry's")
    p.add_argument("--quiet", "-q", action="store_true", help="warnings only, no table")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    p.add_argument("--master", default="local[*]", help="Spark master URL (default local[*])")
    p.add_argument("--spark-conf", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Spark setting, repeatable")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (default: AWS; env AWS_ENDPOINT_URL)")
    p.add_argument("--region", help="AWS region for s3:// URIs (default eu-west-3; env AWS_REGION)")


def add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="answer 'which fruit is this?' over HTTP with OUTPUT's trained classifier",
                       epilog=EPILOG, description="Serve OUTPUT/classifier/fruit_classifier.onnx: POST /predict "
                       "(multipart field 'image') -> top-5, GET /health, GET /metrics (Prometheus).")
    p.add_argument("output", metavar="OUTPUT", help="an OUTPUT with a classifier (`fruitpipe train OUTPUT`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for a LAN)")
    p.add_argument("--port", type=whole_number, default=8000, help="port (default 8000)")
    p.add_argument("--max-bytes", type=whole_number, default=15 * 1024 * 1024,
                   help="largest upload in bytes (default 15728640); larger ones get 413")
    p.add_argument("--max-pixels", type=whole_number, default=64_000_000,
                   help="largest decoded image (default 64000000; decompression-bomb guard)")
    p.add_argument("--threads", type=whole_number, default=0, help="onnxruntime threads (default: its own)")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (default: AWS; env AWS_ENDPOINT_URL)")
    p.add_argument("--region", help="AWS region for s3:// URIs (default eu-west-3; env AWS_REGION)")
    p.add_argument("--quiet", "-q", action="store_true", help="warnings only (no access log)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def _serve_main(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from fruitpipe.serve import ServeSettings, create_app
    except ImportError:
        raise FruitpipeError("fruitpipe serve needs its extra: pip install 'fruitpipe[serve]'") from None
    app = create_app(ServeSettings(output=args.output, storage=storage_options(args), max_bytes=args.max_bytes,
                                   max_pixels=args.max_pixels, threads=args.threads))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                access_log=not args.quiet)
    return 0


def _train_main(args: argparse.Namespace) -> int:
    from fruitpipe.classify import TrainSettings, train

    opts = storage_options(args)
    settings = TrainSettings(
        output=args.output, features=args.features, classifier=args.classifier, folds=args.folds, seed=args.seed,
        holdout=args.holdout, compare_pca=not args.no_pca_table, model_path=args.model_path, master=args.master,
        storage=opts, spark_conf=key_values(args.spark_conf, "--spark-conf", "spark.executor.memory=4g"))
    result = train(settings)
    if not args.quiet:
        lines = [f"{args.classifier} on {args.features}: top-1 {result['top1']:.2%}, top-5 {result['top5']:.2%}, "
                 f"macro-F1 {result['macro_f1']:.4f} on {result['n_test']} photos ({result['test_source']}); "
                 f"{result['cross_validation']['param']} = {result['cross_validation']['chosen']} by "
                 f"{args.folds}-fold cross-validation on Training"]
        if result["pca_table"]:
            lines.append(f"{'features':<28} {'k':>5} {'variance':>9} {'top-1':>8}")
            for row in result["pca_table"]:
                var = f"{row['explained_variance']:.3f}" if "explained_variance" in row else "1.000"
                lines.append(f"{row['features']:<28} {row['k']:>5} {var:>9} {row['top1']:>8.2%}")
        lines.append(f"written: {args.output.rstrip('/')}/classifier/ (fruit_classifier.onnx, metrics.json, "
                     "confusion.png)")
        sys.stdout.write("\n".join(lines) + "\n")
    return 0


def main(args: argparse.Namespace) -> int:
    """Run `train` or `serve`; errors are one line."""
    try:
        return _train_main(args) if args.command == "train" else _serve_main(args)
    except FruitpipeError as exc:
        log.debug("the cause, in full:", exc_info=exc)
        sys.stderr.write(f"fruitpipe {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        if args.command == "train":
            sys.stderr.write("fruitpipe train: interrupted; OUTPUT/classifier/ may hold files of an earlier "
                             "train\n")
        return 130
