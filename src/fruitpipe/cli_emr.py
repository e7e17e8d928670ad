"""Command line of `fruitpipe emr`: plan, setup, upload, up, status, logs, down, run, studio."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fruitpipe.cli_args import Parser, add_fields, add_verbosity, from_args, key_values
from fruitpipe.cloud import emr as emr_mod
from fruitpipe.cloud.settings import EmrSettings
from fruitpipe.cloud.studio import Studio
from fruitpipe.errors import FruitpipeError
from fruitpipe.logs import error_line
from fruitpipe.options import positive_float, whole_number
from fruitpipe.storage_options import DEFAULT_REGION

EMR_EPILOG = (
    "Credentials come from the standard AWS chain (environment, profile, instance role); AWS_ENDPOINT_URL points "
    "every client at another endpoint. Typical use: `emr plan`, then `emr setup` once, then `emr run`."
)


def _add_emr_cluster(p: argparse.ArgumentParser) -> None:
    add_fields(p, EmrSettings)  # every cluster option but --tag: its field in cloud/settings.py
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="extra cluster tag, repeatable")
    add_verbosity(p)


def _add_emr_cluster_id(p: argparse.ArgumentParser) -> None:
    p.add_argument("cluster_id", metavar="CLUSTER_ID", help="the j-... id printed by `emr up`")
    p.add_argument("--region", default=DEFAULT_REGION, help=f"AWS region (default {DEFAULT_REGION})")
    add_verbosity(p)


def add_emr(sub: Any) -> None:
    p_emr = sub.add_parser("emr", help="run on AWS EMR: plan, setup, upload, up, status, logs, down, run",
                           description=f"Run fruitpipe on an AWS EMR cluster ({DEFAULT_REGION} by default).",
                           epilog=EMR_EPILOG)
    emr = p_emr.add_subparsers(dest="emr_command", metavar="EMR_COMMAND", parser_class=Parser)
    emr.required = True
    specs = (
        ("plan", "print the cluster request, its cost with S3 requests, and (with credentials, read-only) the "
                 "network and vCPU quota checks"),
        ("setup", "once per account and prefixes: KMS key, security configuration, least-privilege roles, "
                  "network tags, hardened buckets"),
        ("upload", "build the wheel and the nodes' wheelhouse; upload them, the bootstrap script and the model"),
        ("up", "start the cluster with its `fruitpipe run` step; prints the cluster id"),
        ("run", "upload + up + wait (progress shown) + fetch run.json + down"),
        ("studio", "the EMR Studio for notebook clusters (IAM auth mode, its roles and security groups): shows "
                   "the plan; --create makes what is missing, --down removes it"),
    )
    for name, help_text in specs:
        p = emr.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                           epilog=EMR_EPILOG)
        _add_emr_cluster(p)
        if name in ("upload", "run"):
            p.add_argument("--wheel", metavar="FILE", help="use this wheel instead of building one")
            p.add_argument("--wheelhouse-from", metavar="DIR",
                           help="take the nodes' wheels from this folder only (default: pip's index, as configured)")
        if name == "studio":
            what = p.add_mutually_exclusive_group()
            what.add_argument("--create", action="store_true", help="create what the plan shows (idempotent)")
            what.add_argument("--down", action="store_true", help="remove the Studio, its groups and its roles")
        if name == "run":
            p.add_argument("--timeout", type=positive_float,
                           help="seconds to wait before terminating the cluster (default: provisioning + the step "
                                "timeout + 15 minutes)")
            p.add_argument("--poll", type=positive_float, default=30.0, help="seconds between polls (default 30)")
    for name, help_text in (("status", "cluster and step states, and why they ended"),
                            ("logs", "bootstrap, step and executor logs from S3"),
                            ("down", "terminate the cluster")):
        p = emr.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                           epilog=EMR_EPILOG)
        _add_emr_cluster_id(p)
        if name == "logs":
            p.add_argument("--step", metavar="STEP_ID", help="step id (default: the cluster's last step)")
            p.add_argument("--tail", type=whole_number, default=200,
                           help="last lines of each log (default 200; 0: whole logs)")


def _emr_settings(args: argparse.Namespace) -> Any:
    # validated by each emr command it is handed to
    return from_args(EmrSettings, args, tags=key_values(args.tag, "--tag", "team=vision"))


def _emr_main(args: argparse.Namespace) -> int:
    def show(obj: Any) -> None:
        sys.stdout.write((obj if isinstance(obj, str) else json.dumps(obj, indent=2)) + "\n")

    cmd = args.emr_command
    aws = emr_mod.Emr(args.region)
    if cmd == "plan":
        show(emr_mod.plan(_emr_settings(args), aws if aws.has_credentials() else None))
        return 0
    if cmd == "status":
        show(aws.status(args.cluster_id))
    elif cmd == "logs":
        for name, text in aws.logs(args.cluster_id, args.step, args.tail).items():
            sys.stdout.write(f"==> {name} <==\n{text}\n")
    elif cmd == "down":
        show({"cluster_id": args.cluster_id, "state": aws.down(args.cluster_id)})
    else:
        settings = _emr_settings(args)
        if cmd == "studio":
            studio = Studio(aws)
            if args.down:
                show(studio.down(settings))
            elif args.create:
                show(studio.create(settings))
            else:
                show(studio.plan(settings, read=aws.has_credentials()))
        elif cmd == "setup":
            show(aws.setup(settings))
        elif cmd == "upload":
            show(aws.upload(settings, args.wheel, args.wheelhouse_from))
        elif cmd == "up":
            show(aws.up(settings))
        else:
            if settings.notebook_idle_min is not None:
                raise FruitpipeError("--notebook-idle starts a cluster without a step: use `fruitpipe emr up` for "
                                     "it (`emr run` runs one step and waits for it)")

            def to_stderr(line: str) -> None:
                sys.stderr.write(line + "\n")

            report = None if args.quiet else to_stderr
            timeout = args.timeout or emr_mod.run_timeout_s(settings.validate())
            result = aws.run(settings, timeout, args.poll, args.wheel, report, args.wheelhouse_from)
            run = result["run"]
            show({"cluster_id": result["cluster_id"], "step": result["step_state"], "output": settings.output,
                  "counts": run.get("counts"), "timings_s": run.get("timings_s")})
    return 0


def main(args: argparse.Namespace) -> int:
    """Run one `emr` command; errors are one line, AWS errors too."""
    try:
        return _emr_main(args)
    except FruitpipeError as exc:
        error_line(f"fruitpipe emr: error: {exc}")
        return 2
    except KeyboardInterrupt:  # Emr.run terminates the cluster it started before this point
        started = " (any cluster this command had started was terminated)" if args.emr_command == "run" else ""
        error_line(f"fruitpipe emr: interrupted{started}")
        return 130
    except Exception as exc:  # botocore: no credentials, access denied, throttling...
        if type(exc).__module__.startswith("botocore"):
            error_line(f"fruitpipe emr: AWS error: {exc}")
            return 2
        raise
