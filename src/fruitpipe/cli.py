"""Command line: thin flags -> Config -> library call; bad arguments get one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from fruitpipe import cli_apps, cli_args, cli_emr
from fruitpipe.cli_args import EPILOG, Parser, add_log_format, add_metrics, key_values, share, whole_number
from fruitpipe.errors import ConfigError, FruitpipeError
from fruitpipe.monitor.logs import error_line, setup_logging

log = logging.getLogger("fruitpipe")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="TOML", help="read settings from a TOML file (table [fruitpipe])")
    p.add_argument("--quiet", "-q", action="store_true", default=None, help="no progress bar, warnings only")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    p.add_argument("--master", help="Spark master URL (default local[*]; spark://host:7077, yarn)")
    p.add_argument("--spark-conf", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Spark setting, repeatable (e.g. spark.executor.memory=4g)")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (default: AWS; env AWS_ENDPOINT_URL)")
    p.add_argument("--region", help="AWS region for s3:// URIs (default eu-west-3; env AWS_REGION)")
    add_metrics(p)


def _add_embed(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="INPUT", nargs="?",
                   help="folder or s3:// prefix with Training/<Class>/, Test/<Class>/ or <Class>/")
    p.add_argument("output", metavar="OUTPUT", help="folder or s3:// prefix for the results")
    p.add_argument("--input-list", metavar="FILE",
                   help="instead of INPUT: a Parquet or CSV file (or a folder of them, e.g. an S3 Inventory) "
                        "with a uri column (or bucket and key) and optional label, split, size, mtime_ns")
    p.add_argument("--dry-run", action="store_true",
                   help="list INPUT, compare it with OUTPUT and print the plan (to embed, to drop, tasks); "
                        "write nothing")
    p.add_argument("--model", help="backbone from the registry (default mobilenet_v2; see `fruitpipe models`)")
    p.add_argument("--model-path", metavar="FILE",
                   help="ONNX file to use instead of downloading: a local path or s3:// URI (read once, broadcast)")
    p.add_argument("--input-size", type=whole_number, metavar="N",
                   help="with --model-path: the model's square input size (default: the file's, else 224)")
    p.add_argument("--preprocess", choices=["tf", "torch", "raw"],
                   help="with --model-path: pixel scaling, tf = pixel/127.5-1 (default), torch = ImageNet mean/std, "
                        "raw = 0..255")
    p.add_argument("--layout", choices=["nhwc", "nchw"],
                   help="with --model-path: input layout (default: from the file's input shape, else nhwc)")
    p.add_argument("--output", dest="output_name", metavar="NAME",
                   help="with --model-path: the output tensor holding the embedding (default: the only output)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="inference device (default auto: CUDA if onnxruntime-gpu sees a GPU, else CPU)")
    p.add_argument("--precision", choices=["fp32", "int8"],
                   help="fp32 (default) or int8: embedding 1.7x faster, slightly less accurate")
    p.add_argument("--task-cpus", type=whole_number, help="onnxruntime threads per Spark task (default 1)")
    p.add_argument("--batch-size", type=whole_number, help="images per onnxruntime call (default 32)")
    p.add_argument("--partition-size", type=whole_number, help="images per Spark task (default 512)")
    p.add_argument("--read-ahead", type=whole_number, help="inputs read concurrently per task (default 8)")
    p.add_argument("--list-threads", type=whole_number,
                   help="threads listing an s3:// INPUT (default 1: flat; e.g. 16 for millions of objects)")
    p.add_argument("--max-pixels", type=whole_number, help="reject images larger than this (default 64000000)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an OUTPUT made with another input or model")


def _add_reduce(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--k", type=whole_number, help="number of PCA components (default 20)")
    group.add_argument("--variance", type=share,
                       help="keep the fewest components reaching this explained-variance share, e.g. 0.95")
    p.add_argument("--pca-from", metavar="OTHER_OUTPUT",
                   help="project with the PCA already fitted in OTHER_OUTPUT (same model) instead of refitting: "
                        "a stable basis across runs; k is that basis's")


def build_parser() -> argparse.ArgumentParser:
    """The `fruitpipe` parser with its commands; --help of each is the reference documentation."""
    parser = Parser(prog="fruitpipe", description="Images -> ONNX embeddings -> PCA -> Parquet, on Spark.",
                     epilog=EPILOG)
    from fruitpipe import __version__

    parser.add_argument("--version", action="version", version=f"fruitpipe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    p_run = sub.add_parser("run", help="list, embed and reduce: the whole pipeline", epilog=EPILOG,
                           description="List INPUT, embed new images, fit PCA, write everything under OUTPUT.")
    _add_embed(p_run)
    _add_reduce(p_run)
    _add_common(p_run)
    p_embed = sub.add_parser("embed", help="list and embed only (embeddings/, rejects/)", epilog=EPILOG,
                             description="List INPUT and embed the images no earlier run has handled.")
    _add_embed(p_embed)
    _add_common(p_embed)
    p_reduce = sub.add_parser("reduce", help="PCA on the embeddings of an OUTPUT (pca/, reduced/)", epilog=EPILOG,
                              description="Fit PCA on OUTPUT/embeddings and write OUTPUT/pca and OUTPUT/reduced.")
    p_reduce.add_argument("output", metavar="OUTPUT", help="an OUTPUT written by `fruitpipe embed` or `run`")
    _add_reduce(p_reduce)
    _add_common(p_reduce)
    cli_apps.add_train(sub)
    cli_apps.add_evaluate(sub)
    cli_apps.add_serve(sub)
    sub.add_parser("models", help="list the registered backbones", description="List the registered backbones.")
    cli_apps.add_drift(sub)
    cli_apps.add_sample(sub)
    cli_emr.add_emr(sub)
    add_log_format(parser)
    return parser


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    import os

    flags = {k: v for k, v in vars(args).items() if v is not None and k != "spark_conf"}
    conf = key_values(args.spark_conf, "--spark-conf", "spark.executor.memory=4g")
    if conf:
        flags["spark_conf"] = conf
    if os.environ.get("AWS_ENDPOINT_URL") and "s3_endpoint" not in flags:
        flags["s3_endpoint"] = os.environ["AWS_ENDPOINT_URL"]
    if os.environ.get("AWS_REGION") and "region" not in flags:
        flags["region"] = os.environ["AWS_REGION"]
    return flags


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fruitpipe` command."""
    args = build_parser().parse_args(argv)
    setup_logging(bool(getattr(args, "quiet", False)), bool(getattr(args, "verbose", False)), args.log_format)
    if args.command == "emr":
        return cli_emr.main(args)
    if args.command in ("train", "evaluate", "serve", "drift", "sample"):
        return cli_apps.main(args)
    if args.command == "models":
        from fruitpipe.models import REGISTRY

        for spec in REGISTRY.values():
            sys.stdout.write(f"{spec.name}\t{spec.dim}-d\t{spec.input_size}x{spec.input_size}\t{spec.filename}\t{spec.sha256}\n")
        return 0
    import time

    import fruitpipe
    from fruitpipe.config import load_config

    started = time.time()
    try:
        flags = _flags(args)
        dry_run = bool(flags.pop("dry_run", False))
        if args.command in ("run", "embed"):
            listed = flags.pop("input_list", None)
            if (listed is None) == (args.input is None):
                raise ConfigError("either INPUT or --input-list FILE is required (not both): e.g. fruitpipe run "
                                  "images/ out/, or fruitpipe run --input-list inventory.parquet out/")
            if listed is not None:
                flags.update(input=listed, input_list=True)
        if args.command == "reduce":
            from fruitpipe.pipeline.run import read_marker

            marker = read_marker(args.output, cli_args.storage_options(args))
            flags.setdefault("input", marker["input"])
            flags["model"] = marker["model"]
        config = load_config(flags, toml_path=args.config)
        if dry_run:
            from fruitpipe.pipeline.run import run as run_stages

            plan = run_stages(config, ("embed",), dry_run=True).report
            if not args.quiet:
                sys.stdout.write(json.dumps(plan, indent=2) + "\n")
            return 0
        result = {"run": fruitpipe.run, "embed": fruitpipe.embed, "reduce": fruitpipe.reduce}[args.command](config)
    except FruitpipeError as exc:
        log.debug("the cause, in full:", exc_info=exc)  # --verbose
        error_line(f"fruitpipe: error: {exc}")
        cli_args.export_metrics(args, args.command, started, None, args.output)
        return 2
    except KeyboardInterrupt:
        error_line("fruitpipe: interrupted; nothing was published as complete (no _SUCCESS); committed work is "
                   "kept, re-run the same command to finish")
        cli_args.export_metrics(args, args.command, started, None, args.output)
        return 130
    cli_args.export_metrics(args, args.command, started, result.report, result.output)
    counts = result.counts
    summary = {
        "output": result.output,
        "listed": counts.get("listed"),
        "embedded": counts.get("embedded"),
        "rejected": counts.get("rejected"),
        "embedded_this_run": counts.get("embedded_this_run"),
        "dropped_before_embedding": counts.get("dropped_before_embedding"),
        "ignored": counts.get("ignored"),
        "accounted": counts.get("accounted"),
        "pca": result.report.get("pca"),
        "timings_s": result.report.get("timings_s"),
    }
    if not args.quiet:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
