"""Command line of `fruitpipe emr`: plan, setup, upload, up, status, logs, down, run, studio."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from fruitpipe.cli_args import Parser, add_verbosity, key_values, positive_float, whole_number
from fruitpipe.errors import FruitpipeError
from fruitpipe.logs import error_line
from fruitpipe.storage_options import DEFAULT_REGION

EMR_EPILOG = (
    "Credentials come from the standard AWS chain (environment, profile, instance role); AWS_ENDPOINT_URL points "
    "every client at another endpoint. Typical use: `emr plan`, then `emr setup` once, then `emr run`."
)


def _add_emr_cluster(p: argparse.ArgumentParser) -> None:
    from fruitpipe.cloud.emr import DEFAULT_RELEASE, MEASURED_IMG_PER_VCPU_S

    p.add_argument("input", metavar="INPUT", help="s3://bucket/prefix of the images")
    p.add_argument("output", metavar="OUTPUT", help="s3://bucket/prefix for the results")
    p.add_argument("--region", default=DEFAULT_REGION,
                   help=f"AWS region (default {DEFAULT_REGION}; non-EU needs --allow-non-eu)")
    p.add_argument("--allow-non-eu", action="store_true", help="accept a region outside the EU")
    p.add_argument("--artifacts", metavar="S3_PREFIX",
                   help="where the wheel, bootstrap script and model go "
                        "(default s3://<OUTPUT bucket>/fruitpipe-artifacts)")
    p.add_argument("--logs", metavar="S3_PREFIX", help="EMR log prefix (default s3://<OUTPUT bucket>/fruitpipe-logs)")
    p.add_argument("--output-root", metavar="S3_PREFIX",
                   help="with setup: let the instance role write every run below this prefix (e.g. s3://b/runs "
                        "for dated outputs), granted once; up checks OUTPUT is inside what was granted")
    p.add_argument("--release-label", default=DEFAULT_RELEASE, help=f"EMR release (default {DEFAULT_RELEASE})")
    p.add_argument("--master-type", default="m5.xlarge", help="master instance type (default m5.xlarge)")
    p.add_argument("--core-type", default="m5.xlarge", help="core instance type (default m5.xlarge)")
    p.add_argument("--core-nodes", type=whole_number, default=2, help="number of core nodes (default 2)")
    p.add_argument("--ebs-gb", type=whole_number, default=64, help="gp3 volume per node, GB (default 64)")
    p.add_argument("--name", default="fruitpipe", help="cluster name (default fruitpipe)")
    p.add_argument("--service-role", default="fruitpipe-emr-service", help="EMR service role name")
    p.add_argument("--instance-role", default="fruitpipe-emr-ec2", help="EC2 instance role and profile name")
    p.add_argument("--subnet-id", help="VPC subnet for the nodes (default: the account's default VPC)")
    p.add_argument("--model", default="mobilenet_v2", help="backbone (default mobilenet_v2)")
    p.add_argument("--model-path", metavar="FILE", help="local ONNX file to upload instead of the registry's")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="extra cluster tag, repeatable")
    p.add_argument("--run-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the step's `fruitpipe run`, repeatable (e.g. --run-arg=--k --run-arg=50)")
    p.add_argument("--images", type=whole_number, default=138_704,
                   help="images expected, for the cost estimate (default 138704: Fruits-360)")
    p.add_argument("--img-per-vcpu-s", type=positive_float, default=MEASURED_IMG_PER_VCPU_S,
                   help=f"throughput per vCPU for the estimate (default {MEASURED_IMG_PER_VCPU_S}, measured)")
    p.add_argument("--node-price", type=positive_float, metavar="USD_PER_HOUR",
                   help="price per node-hour (EC2 + EMR) instead of the stated eu-west-3 list prices")
    p.add_argument("--notebook-idle", type=positive_float, metavar="MINUTES",
                   help="a cluster for notebooks (EMR Studio): Livy and Jupyter Enterprise Gateway, no step, "
                        "terminated by EMR after MINUTES idle (up, plan)")
    p.add_argument("--ignore-quota", action="store_true",
                   help="up/run: launch even when the vCPU quota read is too small for the cluster (refused "
                        "otherwise)")
    p.add_argument("--skip-network-check", action="store_true",
                   help="up/run: launch into a subnet whose route to S3 fruitpipe cannot find (refused otherwise)")
    p.add_argument("--step-timeout", type=positive_float, metavar="MINUTES",
                   help="kill the step (and so the cluster) after this long (default: 3x the estimate, >= 30)")
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
    from fruitpipe.cloud.emr import EmrSettings

    tags = key_values(args.tag, "--tag", "team=vision")
    return EmrSettings(
        input=args.input, output=args.output, region=args.region, allow_non_eu=args.allow_non_eu,
        artifacts=args.artifacts, logs=args.logs, output_root=args.output_root, release_label=args.release_label,
        master_type=args.master_type,
        core_type=args.core_type, core_nodes=args.core_nodes, ebs_gb=args.ebs_gb, name=args.name,
        service_role=args.service_role, instance_role=args.instance_role, subnet_id=args.subnet_id,
        model=args.model, model_path=args.model_path, run_args=tuple(args.run_arg), tags=tags, images=args.images,
        img_per_vcpu_s=args.img_per_vcpu_s, node_price=args.node_price, step_timeout_min=args.step_timeout,
        notebook_idle_min=args.notebook_idle, ignore_quota=args.ignore_quota,
        skip_network_check=args.skip_network_check,
    )  # validated by each emr command it is handed to


def _emr_main(args: argparse.Namespace) -> int:
    from fruitpipe.cloud import emr as emr_mod

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
            from fruitpipe.cloud.studio import Studio

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
