"""Command line: thin flags -> Config -> library call; bad arguments get one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import fruitpipe
from fruitpipe import cli_apps, cli_args, cli_emr, storage
from fruitpipe.cli_args import EPILOG, Parser, add_log_format, key_values
from fruitpipe.cli_layers import add_config, layered_defaults
from fruitpipe.config import COMMAND_TABLES, load_config
from fruitpipe.errors import ConfigError, FruitpipeError
from fruitpipe.logs import error_line, setup_logging
from fruitpipe.models import REGISTRY
from fruitpipe.pipeline.run import read_marker
from fruitpipe.pipeline.run import run as run_stages
from fruitpipe.run_args import add_pipeline
from fruitpipe.version import __version__

log = logging.getLogger("fruitpipe")


def build_parser() -> argparse.ArgumentParser:
    """The `fruitpipe` parser with its commands; --help of each is the reference documentation."""
    parser = Parser(prog="fruitpipe", description="Images -> ONNX embeddings -> PCA -> Parquet, on Spark.",
                     epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"fruitpipe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    add_pipeline(sub)
    cli_apps.add_train(sub)
    cli_apps.add_evaluate(sub)
    cli_apps.add_serve(sub)
    sub.add_parser("models", help="list the registered backbones", description="List the registered backbones.")
    cli_apps.add_drift(sub)
    cli_apps.add_sample(sub)
    cli_emr.add_emr(sub)
    for name, command in _layered_commands(parser):
        add_config(command, name)
    add_log_format(parser)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _layered_commands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    """(table, parser) of every command whose settings come from [fruitpipe.<table>] (cli_layers.py)."""
    found = []
    for name, command in _subparsers(parser).items():
        if name == "emr":
            found += [("emr", p) for p in _subparsers(command).values()]
        elif name in COMMAND_TABLES:
            found.append((name, command))
    return found


def _with_layers(parser: argparse.ArgumentParser, args: argparse.Namespace,
                 argv: Sequence[str] | None) -> argparse.Namespace:
    """`args` again, the command's TOML table and FRUITPIPE_* variables as its defaults (flags win)."""
    command = _subparsers(parser)[args.command]
    siblings = None
    if args.command == "emr":
        siblings = list(_subparsers(command).values())
        command = _subparsers(command)[args.emr_command]
    defaults = layered_defaults(command, args.command, args.config, os.environ, siblings)
    if not defaults:
        return args
    command.set_defaults(**defaults)
    return parser.parse_args(argv)


def _flags(args: argparse.Namespace) -> dict[str, Any]:
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in COMMAND_TABLES:
        try:
            args = _with_layers(parser, args, argv)
        except FruitpipeError as exc:
            error_line(f"fruitpipe {args.command}: error: {exc}")
            return 2
    setup_logging(bool(getattr(args, "quiet", False)), bool(getattr(args, "verbose", False)), args.log_format)
    # The command's storage context, set once: every storage call below reaches S3 with these options (`run`,
    # `embed` and `reduce` set their own from the merged Config, TOML and FRUITPIPE_* included).
    with storage.configured(cli_args.storage_options(args)):
        return HANDLERS[args.command](args)


def _models(args: argparse.Namespace) -> int:
    """`fruitpipe models`: the registered backbones, one per line."""
    for spec in REGISTRY.values():
        sys.stdout.write(f"{spec.name}\t{spec.dim}-d\t{spec.input_size}x{spec.input_size}\t{spec.filename}\t{spec.sha256}\n")
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    """`fruitpipe run`, `embed` and `reduce`: the settings merged (config.load_config), the stages, the summary."""
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
            marker = read_marker(args.output)
            flags.setdefault("input", marker["input"])
            flags["model"] = marker["model"]
        config = load_config(flags, toml_path=args.config)
        if dry_run:
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


#: The work of each command build_parser declares (a test checks that every command has one).
HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _pipeline, "embed": _pipeline, "reduce": _pipeline, "models": _models, "emr": cli_emr.main,
    **dict.fromkeys(("train", "evaluate", "serve", "drift", "sample"), cli_apps.main),
}


if __name__ == "__main__":
    sys.exit(main())
