"""Command line: thin flags -> Config -> library call; bad arguments get one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from fruitpipe.errors import FruitpipeError

log = logging.getLogger("fruitpipe")

EPILOG = (
    "Paths are local folders or s3://bucket/prefix URIs. Settings merge as --config TOML < FRUITPIPE_* "
    "environment variables < flags. Model files: --model-path FILE, or FRUITPIPE_MODELS=DIR, or a verified "
    "download into FRUITPIPE_CACHE (default ~/.cache/fruitpipe/models)."
)


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (with the fix) and exit code 2, never a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _whole_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    return value


def _share(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number such as 0.95") from None


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="TOML", help="read settings from a TOML file (table [fruitpipe])")
    p.add_argument("--quiet", "-q", action="store_true", default=None, help="no progress bar, warnings only")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    p.add_argument("--master", help="Spark master URL (default local[*]; spark://host:7077, yarn)")
    p.add_argument("--spark-conf", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Spark setting, repeatable (e.g. spark.executor.memory=4g)")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (default: AWS; env AWS_ENDPOINT_URL)")
    p.add_argument("--region", help="AWS region for s3:// URIs (default eu-west-3; env AWS_REGION)")


def _add_embed(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="INPUT",
                   help="folder or s3:// prefix with Training/<Class>/, Test/<Class>/ or <Class>/")
    p.add_argument("output", metavar="OUTPUT", help="folder or s3:// prefix for the results")
    p.add_argument("--model", help="backbone from the registry (default mobilenet_v2; see `fruitpipe models`)")
    p.add_argument("--model-path", metavar="FILE",
                   help="ONNX file to use instead of downloading: a local path or s3:// URI (read once, broadcast)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="inference device (default auto: CUDA if onnxruntime-gpu sees a GPU, else CPU)")
    p.add_argument("--precision", choices=["fp32", "int8"],
                   help="fp32 (default) or int8: embedding 1.7x faster, slightly less accurate (needs fruitpipe[int8])")
    p.add_argument("--task-cpus", type=_whole_number, help="onnxruntime threads per Spark task (default 1)")
    p.add_argument("--batch-size", type=_whole_number, help="images per onnxruntime call (default 32)")
    p.add_argument("--partition-size", type=_whole_number, help="images per Spark task (default 512)")
    p.add_argument("--read-ahead", type=_whole_number, help="inputs read concurrently per task (default 8)")
    p.add_argument("--list-threads", type=_whole_number,
                   help="threads listing an s3:// INPUT (default 1: flat; e.g. 16 for millions of objects)")
    p.add_argument("--max-pixels", type=_whole_number, help="reject images larger than this (default 64000000)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace an OUTPUT made with another input or model")


def _add_reduce(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--k", type=_whole_number, help="number of PCA components (default 20)")
    group.add_argument("--variance", type=_share,
                       help="keep the fewest components reaching this explained-variance share, e.g. 0.95")


def build_parser() -> argparse.ArgumentParser:
    """The `fruitpipe` parser with its commands; --help of each is the reference documentation."""
    parser = _Parser(prog="fruitpipe", description="Images -> ONNX embeddings -> PCA -> Parquet, on Spark.",
                     epilog=EPILOG)
    from fruitpipe import __version__

    parser.add_argument("--version", action="version", version=f"fruitpipe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
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
    _add_train(sub)
    _add_serve(sub)
    sub.add_parser("models", help="list the registered backbones", description="List the registered backbones.")
    _add_emr(sub)
    return parser


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="fit a classifier on OUTPUT's Training split, evaluate on Test, export ONNX",
                       epilog=EPILOG, description="Fit a classifier on the embeddings of a complete OUTPUT (Training), "
                       "evaluate it on Test, and write OUTPUT/classifier/: metrics.json, confusion.png, "
                       "test_predictions.parquet, the Spark model and fruit_classifier.onnx (photo -> probabilities).")
    p.add_argument("output", metavar="OUTPUT", help="an OUTPUT written to the end by `fruitpipe run`")
    p.add_argument("--features", choices=["embeddings", "reduced"], default="embeddings",
                   help="full embeddings (default) or OUTPUT's PCA-reduced vectors")
    p.add_argument("--classifier", choices=["logreg", "mlp"], default="logreg",
                   help="multinomial logistic regression (default) or a one-hidden-layer perceptron")
    p.add_argument("--folds", type=_whole_number, default=3, help="cross-validation folds on Training (default 3)")
    p.add_argument("--seed", type=_whole_number, default=7, help="seed of the folds and of a hold-out (default 7)")
    p.add_argument("--holdout", type=_share, default=0.2,
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


def _add_serve(sub: Any) -> None:
    p = sub.add_parser("serve", help="answer 'which fruit is this?' over HTTP with OUTPUT's trained classifier",
                       epilog=EPILOG, description="Serve OUTPUT/classifier/fruit_classifier.onnx: POST /predict "
                       "(multipart field 'image') -> top-5, GET /health, GET /metrics (Prometheus).")
    p.add_argument("output", metavar="OUTPUT", help="an OUTPUT with a classifier (`fruitpipe train OUTPUT`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for a LAN)")
    p.add_argument("--port", type=_whole_number, default=8000, help="port (default 8000)")
    p.add_argument("--max-bytes", type=_whole_number, default=15 * 1024 * 1024,
                   help="largest upload in bytes (default 15728640); larger ones get 413")
    p.add_argument("--max-pixels", type=_whole_number, default=64_000_000,
                   help="largest decoded image (default 64000000; decompression-bomb guard)")
    p.add_argument("--threads", type=_whole_number, default=0, help="onnxruntime threads (default: its own)")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (default: AWS; env AWS_ENDPOINT_URL)")
    p.add_argument("--region", help="AWS region for s3:// URIs (default eu-west-3; env AWS_REGION)")
    p.add_argument("--quiet", "-q", action="store_true", help="warnings only (no access log)")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def _storage_options(args: argparse.Namespace) -> Any:
    import os

    from fruitpipe.storage import StorageOptions

    return StorageOptions(args.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL"),
                          args.region or os.environ.get("AWS_REGION") or "eu-west-3")


def _serve_main(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from fruitpipe.serve import ServeSettings, create_app
    except ImportError:
        raise FruitpipeError("fruitpipe serve needs its extra: pip install 'fruitpipe[serve]'") from None
    app = create_app(ServeSettings(output=args.output, storage=_storage_options(args), max_bytes=args.max_bytes,
                                   max_pixels=args.max_pixels, threads=args.threads))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info",
                access_log=not args.quiet)
    return 0


def _train_main(args: argparse.Namespace) -> int:
    from fruitpipe.classify import TrainSettings, train

    opts = _storage_options(args)
    settings = TrainSettings(
        output=args.output, features=args.features, classifier=args.classifier, folds=args.folds, seed=args.seed,
        holdout=args.holdout, compare_pca=not args.no_pca_table, model_path=args.model_path, master=args.master,
        storage=opts, spark_conf=_key_values(args.spark_conf, "--spark-conf", "spark.executor.memory=4g"))
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


EMR_EPILOG = (
    "Credentials come from the standard AWS chain (environment, profile, instance role); AWS_ENDPOINT_URL points "
    "every client at another endpoint. Typical use: `emr plan`, then `emr setup` once, then `emr run`."
)


def _positive_float(text: str) -> float:
    value = _share(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


def _add_emr_cluster(p: argparse.ArgumentParser) -> None:
    from fruitpipe.cloud.emr import DEFAULT_RELEASE, MEASURED_IMG_PER_VCPU_S

    p.add_argument("input", metavar="INPUT", help="s3://bucket/prefix of the images")
    p.add_argument("output", metavar="OUTPUT", help="s3://bucket/prefix for the results")
    p.add_argument("--region", default="eu-west-3", help="AWS region (default eu-west-3; non-EU needs --allow-non-eu)")
    p.add_argument("--allow-non-eu", action="store_true", help="accept a region outside the EU")
    p.add_argument("--artifacts", metavar="S3_PREFIX",
                   help="where the wheel, bootstrap script and model go "
                        "(default s3://<OUTPUT bucket>/fruitpipe-artifacts)")
    p.add_argument("--logs", metavar="S3_PREFIX", help="EMR log prefix (default s3://<OUTPUT bucket>/fruitpipe-logs)")
    p.add_argument("--release-label", default=DEFAULT_RELEASE, help=f"EMR release (default {DEFAULT_RELEASE})")
    p.add_argument("--master-type", default="m5.xlarge", help="master instance type (default m5.xlarge)")
    p.add_argument("--core-type", default="m5.xlarge", help="core instance type (default m5.xlarge)")
    p.add_argument("--core-nodes", type=_whole_number, default=2, help="number of core nodes (default 2)")
    p.add_argument("--ebs-gb", type=_whole_number, default=64, help="gp3 volume per node, GB (default 64)")
    p.add_argument("--name", default="fruitpipe", help="cluster name (default fruitpipe)")
    p.add_argument("--service-role", default="fruitpipe-emr-service", help="EMR service role name")
    p.add_argument("--instance-role", default="fruitpipe-emr-ec2", help="EC2 instance role and profile name")
    p.add_argument("--subnet-id", help="VPC subnet for the nodes (default: the account's default VPC)")
    p.add_argument("--model", default="mobilenet_v2", help="backbone (default mobilenet_v2)")
    p.add_argument("--model-path", metavar="FILE", help="local ONNX file to upload instead of the registry's")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="extra cluster tag, repeatable")
    p.add_argument("--run-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the step's `fruitpipe run`, repeatable (e.g. --run-arg=--k --run-arg=50)")
    p.add_argument("--images", type=_whole_number, default=138_704,
                   help="images expected, for the cost estimate (default 138704: Fruits-360)")
    p.add_argument("--img-per-vcpu-s", type=_positive_float, default=MEASURED_IMG_PER_VCPU_S,
                   help=f"throughput per vCPU for the estimate (default {MEASURED_IMG_PER_VCPU_S}, measured)")
    p.add_argument("--node-price", type=_positive_float, metavar="USD_PER_HOUR",
                   help="price per node-hour (EC2 + EMR) instead of the stated eu-west-3 list prices")
    p.add_argument("--step-timeout", type=_positive_float, metavar="MINUTES",
                   help="kill the step (and so the cluster) after this long (default: 3x the estimate, >= 30)")
    p.add_argument("--quiet", "-q", action="store_true", help="warnings only")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def _add_emr_cluster_id(p: argparse.ArgumentParser) -> None:
    p.add_argument("cluster_id", metavar="CLUSTER_ID", help="the j-... id printed by `emr up`")
    p.add_argument("--region", default="eu-west-3", help="AWS region (default eu-west-3)")
    p.add_argument("--quiet", "-q", action="store_true", help="warnings only")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def _add_emr(sub: Any) -> None:
    p_emr = sub.add_parser("emr", help="run on AWS EMR: plan, setup, upload, up, status, logs, down, run",
                           description="Run fruitpipe on an AWS EMR cluster (eu-west-3 by default).", epilog=EMR_EPILOG)
    emr = p_emr.add_subparsers(dest="emr_command", metavar="EMR_COMMAND", parser_class=_Parser)
    emr.required = True
    specs = (
        ("plan", "print the cluster request, its cost with S3 requests, and (with credentials, read-only) the "
                 "network and vCPU quota checks"),
        ("setup", "once per account and prefixes: KMS key, security configuration, least-privilege roles, "
                  "network tags, hardened buckets"),
        ("upload", "build the wheel and the nodes' wheelhouse; upload them, the bootstrap script and the model"),
        ("up", "start the cluster with its `fruitpipe run` step; prints the cluster id"),
        ("run", "upload + up + wait (progress shown) + fetch run.json + down"),
    )
    for name, help_text in specs:
        p = emr.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                           epilog=EMR_EPILOG)
        _add_emr_cluster(p)
        if name in ("upload", "run"):
            p.add_argument("--wheel", metavar="FILE", help="use this wheel instead of building one")
            p.add_argument("--wheelhouse-from", metavar="DIR",
                           help="take the nodes' wheels from this folder only (default: pip's index, as configured)")
        if name == "run":
            p.add_argument("--timeout", type=_positive_float,
                           help="seconds to wait before terminating the cluster (default: provisioning + the step "
                                "timeout + 15 minutes)")
            p.add_argument("--poll", type=_positive_float, default=30.0, help="seconds between polls (default 30)")
    for name, help_text in (("status", "cluster and step states, and why they ended"),
                            ("logs", "bootstrap, step and executor logs from S3"),
                            ("down", "terminate the cluster")):
        p = emr.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
                           epilog=EMR_EPILOG)
        _add_emr_cluster_id(p)
        if name == "logs":
            p.add_argument("--step", metavar="STEP_ID", help="step id (default: the cluster's last step)")
            p.add_argument("--tail", type=_whole_number, default=200,
                           help="last lines of each log (default 200; 0: whole logs)")


def _emr_settings(args: argparse.Namespace) -> Any:
    from fruitpipe.cloud.emr import EmrSettings

    tags = _key_values(args.tag, "--tag", "team=vision")
    return EmrSettings(
        input=args.input, output=args.output, region=args.region, allow_non_eu=args.allow_non_eu,
        artifacts=args.artifacts, logs=args.logs, release_label=args.release_label, master_type=args.master_type,
        core_type=args.core_type, core_nodes=args.core_nodes, ebs_gb=args.ebs_gb, name=args.name,
        service_role=args.service_role, instance_role=args.instance_role, subnet_id=args.subnet_id,
        model=args.model, model_path=args.model_path, run_args=tuple(args.run_arg), tags=tags, images=args.images,
        img_per_vcpu_s=args.img_per_vcpu_s, node_price=args.node_price, step_timeout_min=args.step_timeout,
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
        if cmd == "setup":
            show(aws.setup(settings))
        elif cmd == "upload":
            show(aws.upload(settings, args.wheel, args.wheelhouse_from))
        elif cmd == "up":
            show(aws.up(settings))
        else:
            def to_stderr(line: str) -> None:
                sys.stderr.write(line + "\n")

            report = None if args.quiet else to_stderr
            timeout = args.timeout or emr_mod.run_timeout_s(settings.validate())
            result = aws.run(settings, timeout, args.poll, args.wheel, report, args.wheelhouse_from)
            run = result["run"]
            show({"cluster_id": result["cluster_id"], "step": result["step_state"], "output": settings.output,
                  "counts": run.get("counts"), "timings_s": run.get("timings_s")})
    return 0


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    for noisy in ("py4j", "matplotlib"):
        # py4j logs the Java side of an interrupted or failed call as ERROR tracebacks; the CLI's one line says it.
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.CRITICAL)


def _key_values(items: Sequence[str], flag: str, example: str) -> dict[str, str]:
    """{KEY: VALUE} from repeated KEY=VALUE flags; a malformed one is a one-line error naming `flag`."""
    found: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FruitpipeError(f"{flag} {item!r} must look like KEY=VALUE, e.g. {flag} {example}")
        found[key] = value
    return found


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    import os

    flags = {k: v for k, v in vars(args).items() if v is not None and k != "spark_conf"}
    conf = _key_values(args.spark_conf, "--spark-conf", "spark.executor.memory=4g")
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
    if args.command == "emr":
        _setup_logging(args.quiet, args.verbose)
        try:
            return _emr_main(args)
        except FruitpipeError as exc:
            sys.stderr.write(f"fruitpipe emr: error: {exc}\n")
            return 2
        except KeyboardInterrupt:  # Emr.run terminates the cluster it started before this point
            started = " (any cluster this command had started was terminated)" if args.emr_command == "run" else ""
            sys.stderr.write(f"fruitpipe emr: interrupted{started}\n")
            return 130
        except Exception as exc:  # botocore: no credentials, access denied, throttling...
            if type(exc).__module__.startswith("botocore"):
                sys.stderr.write(f"fruitpipe emr: AWS error: {exc}\n")
                return 2
            raise
    if args.command in ("train", "serve"):
        _setup_logging(bool(args.quiet), args.verbose)
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
    if args.command == "models":
        from fruitpipe.models import REGISTRY

        for spec in REGISTRY.values():
            sys.stdout.write(f"{spec.name}\t{spec.dim}-d\t{spec.input_size}x{spec.input_size}\t{spec.filename}\t{spec.sha256}\n")
        return 0
    _setup_logging(bool(args.quiet), args.verbose)
    import fruitpipe
    from fruitpipe.config import load_config
    from fruitpipe.storage import StorageOptions

    try:
        flags = _flags(args)
        if args.command == "reduce":
            from fruitpipe.pipeline.run import read_marker

            opts = StorageOptions(flags.get("s3_endpoint"), flags.get("region", "eu-west-3"))
            marker = read_marker(args.output, opts)
            flags.setdefault("input", marker["input"])
            flags["model"] = marker["model"]
        config = load_config(flags, toml_path=args.config)
        result = {"run": fruitpipe.run, "embed": fruitpipe.embed, "reduce": fruitpipe.reduce}[args.command](config)
    except FruitpipeError as exc:
        log.debug("the cause, in full:", exc_info=exc)  # --verbose
        sys.stderr.write(f"fruitpipe: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("fruitpipe: interrupted; nothing was published as complete (no _SUCCESS); committed work is "
                         "kept, re-run the same command to finish\n")
        return 130
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
