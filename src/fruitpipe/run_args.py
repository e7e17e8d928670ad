"""The flags of `run`, `embed` and `reduce`, below the CLI: `fruitpipe.cli` builds its commands from them, and the EMR
step check (cloud/artifacts.py) parses a step's `run` flags with the same parser without importing the CLI."""

from __future__ import annotations

import argparse

from fruitpipe.cli_args import EPILOG, Parser, add_metrics, add_storage, add_verbosity
from fruitpipe.images import DEFAULT_MAX_PIXELS
from fruitpipe.options import share, whole_number


def add_common(p: argparse.ArgumentParser) -> None:
    """The flags every batch command has: config, logging, Spark, S3, metrics."""
    p.add_argument("--config", metavar="TOML", help="read settings from a TOML file (table [fruitpipe])")
    add_verbosity(p, "no progress bar, warnings only", quiet_default=None)  # None: TOML and env may set it
    p.add_argument("--master", help="Spark master URL (default local[*]; spark://host:7077, yarn)")
    p.add_argument("--spark-conf", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Spark setting, repeatable (e.g. spark.executor.memory=4g)")
    add_storage(p)
    add_metrics(p)


def add_embed(p: argparse.ArgumentParser) -> None:
    """INPUT, OUTPUT and the embedding flags of `run` and `embed`."""
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
    p.add_argument("--max-pixels", type=whole_number,
                   help=f"reject images larger than this (default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an OUTPUT made with another input or model")


def add_reduce(p: argparse.ArgumentParser) -> None:
    """The PCA flags of `run` and `reduce`."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--k", type=whole_number, help="number of PCA components (default 20)")
    group.add_argument("--variance", type=share,
                       help="keep the fewest components reaching this explained-variance share, e.g. 0.95")
    p.add_argument("--pca-from", metavar="OTHER_OUTPUT",
                   help="project with the PCA already fitted in OTHER_OUTPUT (same model) instead of refitting: "
                        "a stable basis across runs; k is that basis's")


def run_parser() -> argparse.ArgumentParser:
    """`fruitpipe run`'s own parser, as `fruitpipe run --help` shows it."""
    p = Parser(prog="fruitpipe run", epilog=EPILOG,
               description="List INPUT, embed new images, fit PCA, write everything under OUTPUT.")
    add_embed(p)
    add_reduce(p)
    add_common(p)
    return p
