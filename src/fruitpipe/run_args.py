"""The flags of `run`, `embed` and `reduce`, below the CLI: `fruitpipe.cli` builds its commands from them, and the EMR
step check (cloud/artifacts.py) parses a step's `run` flags with the same parser without importing the CLI."""

from __future__ import annotations

import argparse
from typing import Any

from fruitpipe.cli_args import EPILOG, Parser, add_fields, add_metrics, add_storage, add_verbosity
from fruitpipe.config import Config

RUN = "List INPUT, embed new images, fit PCA, write everything under OUTPUT."


def add_common(p: argparse.ArgumentParser) -> None:
    """The flags every batch command has: config, logging, Spark, S3, metrics."""
    p.add_argument("--config", metavar="TOML", help="read settings from a TOML file (table [fruitpipe])")
    add_verbosity(p, "no progress bar, warnings only", quiet_default=None)  # None: TOML and env may set it
    add_fields(p, Config, sections=("common",), layered=True)
    p.add_argument("--spark-conf", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Spark setting, repeatable (e.g. spark.executor.memory=4g)")
    add_storage(p)
    add_metrics(p)


def add_embed(p: argparse.ArgumentParser) -> None:
    """INPUT, OUTPUT and the embedding flags of `run` and `embed` (Config's fields of section embed)."""
    p.add_argument("input", metavar="INPUT", nargs="?",
                   help="folder or s3:// prefix with Training/<Class>/, Test/<Class>/ or <Class>/")
    p.add_argument("output", metavar="OUTPUT", help="folder or s3:// prefix for the results")
    p.add_argument("--input-list", metavar="FILE",
                   help="instead of INPUT: a Parquet or CSV file (or a folder of them, e.g. an S3 Inventory) "
                        "with a uri column (or bucket and key) and optional label, split, size, mtime_ns")
    p.add_argument("--dry-run", action="store_true",
                   help="list INPUT, compare it with OUTPUT and print the plan (to embed, to drop, tasks); "
                        "write nothing")
    add_fields(p, Config, sections=("embed",), layered=True)


def add_reduce(p: argparse.ArgumentParser) -> None:
    """The PCA flags of `run` and `reduce` (Config's fields of section reduce)."""
    add_fields(p, Config, sections=("reduce",), layered=True)


def add_pipeline(sub: Any) -> None:
    """The commands `run`, `embed` and `reduce`."""
    add_run(sub.add_parser("run", help="list, embed and reduce: the whole pipeline", epilog=EPILOG,
                           description=RUN))
    p_embed = sub.add_parser("embed", help="list and embed only (embeddings/, rejects/)", epilog=EPILOG,
                             description="List INPUT and embed the images no earlier run has handled.")
    add_embed(p_embed)
    add_common(p_embed)
    p_reduce = sub.add_parser("reduce", help="PCA on the embeddings of an OUTPUT (pca/, reduced/)", epilog=EPILOG,
                              description="Fit PCA on OUTPUT/embeddings and write OUTPUT/pca and OUTPUT/reduced.")
    p_reduce.add_argument("output", metavar="OUTPUT", help="an OUTPUT written by `fruitpipe embed` or `run`")
    add_reduce(p_reduce)
    add_common(p_reduce)


def add_run(p: argparse.ArgumentParser) -> None:
    """`fruitpipe run`'s arguments."""
    add_embed(p)
    add_reduce(p)
    add_common(p)


def run_parser() -> argparse.ArgumentParser:
    """`fruitpipe run`'s own parser, as `fruitpipe run --help` shows it."""
    p = Parser(prog="fruitpipe run", epilog=EPILOG, description=RUN)
    add_run(p)
    return p
