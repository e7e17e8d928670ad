"""EMR settings: one validated dataclass, the names fruitpipe gives its AWS resources, and the one error type."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from fruitpipe.errors import FruitpipeError
from fruitpipe.options import option, positive_float
from fruitpipe.storage_options import DEFAULT_REGION

log = logging.getLogger(__name__)

#: Newest EMR release in the EMR release guide when this was written: Spark 3.5.6, Python 3.11 on the nodes.
DEFAULT_RELEASE = "emr-7.13.0"
#: Where the bootstrap action installs fruitpipe on every node, and the .py file spark-submit runs.
VENV_PYTHON = "/opt/fruitpipe/venv/bin/python"
SUBMIT_SCRIPT = "/opt/fruitpipe/submit.py"
SECURITY_CONFIGURATION = "fruitpipe-at-rest"
KMS_ALIAS = "alias/fruitpipe-emr"
#: AWS's managed EMR service policy (v2): it only acts on resources tagged with this tag.
EMR_MANAGED_POLICY = "arn:aws:iam::aws:policy/service-role/AmazonEMRServicePolicy_v2"
EMR_MANAGED_TAG = "for-use-with-amazon-emr-managed-policies"

#: On-demand Linux prices in eu-west-3 (USD per hour per node; gp3 per GB-month; S3 GET per 1,000 requests), from
#: the AWS EC2, EMR, EBS and S3 public price pages as of PRICES_DATE. This machine is offline: they were not
#: fetched live; pass --node-price to use a current or negotiated figure.
PRICES_DATE = "2026-11-25"
#: The region those prices are for (the default region happens to be the same; see storage_options).
PRICES_REGION = "eu-west-3"
NODE_PRICES_EU_WEST_3 = {  # instance type: (EC2 on-demand, EMR fee)
    "m5.xlarge": (0.224, 0.048),
    "m5.2xlarge": (0.448, 0.096),
    "m5.4xlarge": (0.896, 0.192),
    "c5.xlarge": (0.202, 0.043),
    "c5.2xlarge": (0.404, 0.085),
    "c5.4xlarge": (0.808, 0.170),  # twice c5.2xlarge: prices are linear in size within a family
}


@dataclass(frozen=True)
class InstanceType:
    """What sizing needs of one EC2 type: vCPUs, and the memory EMR gives YARN on it."""

    vcpus: int
    #: yarn.nodemanager.resource.memory-mb that EMR sets for this type (EMR Release Guide, "Task configuration":
    #: https://docs.aws.amazon.com/emr/latest/ReleaseGuide/emr-hadoop-task-config.html). An executor bigger than
    #: this is never granted: YARN waits for it forever.
    yarn_mb: int


INSTANCE_TYPES = {
    "m5.xlarge": InstanceType(4, 12288),
    "m5.2xlarge": InstanceType(8, 24576),
    "m5.4xlarge": InstanceType(16, 57344),
    "c5.xlarge": InstanceType(4, 6144),
    "c5.2xlarge": InstanceType(8, 12288),
    "c5.4xlarge": InstanceType(16, 24576),
    "r5.xlarge": InstanceType(4, 24576),
    "r5.2xlarge": InstanceType(8, 57344),
}
VCPUS = {name: t.vcpus for name, t in INSTANCE_TYPES.items()}
#: The EC2 quota that on-demand m5/c5/r5 nodes count against: "Running On-Demand Standard (A, C, D, H, I, M, R, T,
#: Z) instances", in vCPUs (Service Quotas code).
VCPU_QUOTA = ("ec2", "L-1216C47A")
GP3_GB_MONTH = 0.0928
#: S3 Standard request prices in eu-west-3 (USD per 1,000): GET/HEAD, and PUT/COPY/POST/LIST.
S3_GET_PER_1000 = 0.00042
S3_PUT_LIST_PER_1000 = 0.0053
#: Measured with the images read from S3, as on EMR (bench/s3_run.py, bench/results/s3-run-2026-11-26.json): the
#: embed stage (GET, decode, infer, write) of the 5,280 sample photos from a loopback S3 server with 30 ms added
#: to every request, on 2 vCPUs that the server shared: 94.8 img/s, i.e. 47.4 per vCPU (local files: 164 img/s).
#: JVM start and PCA are in FIXED_MINUTES. EMR's vCPUs are not these: treat the estimate as +-30 % until measured.
MEASURED_IMG_PER_VCPU_S = 47.4
#: Where MEASURED_IMG_PER_VCPU_S comes from, as the plan states it.
THROUGHPUT_BASIS = ("embed stage measured reading from S3 (a loopback S3 server, +30 ms per request) on a 2-vCPU "
                    "VM: 47.4 img/s per vCPU (bench/s3_run.py, docs/emr.md); +-30 % until measured on EMR")
#: Cluster start (EC2 provisioning + EMR set-up + this bootstrap's pip install), and JVM start + PCA: assumptions
#: from EMR's usual 7-10 min start, stated in the plan so nobody mistakes them for measurements.
FIXED_MINUTES = {"provisioning_and_bootstrap": 10.0, "spark_start_and_pca": 2.0}



class EmrError(FruitpipeError):
    """An EMR request that could not be planned or carried out; the message says what to do."""


def split_s3(uri: str, what: str) -> tuple[str, str]:
    """('bucket', 'key/prefix') of an s3:// URI, or an EmrError naming the flag."""
    m = re.fullmatch(r"s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(.*))?", uri.rstrip("/"))
    if not m:
        raise EmrError(f"{what} {uri!r} must be an s3://bucket/prefix URI: EMR reads and writes S3")
    return m.group(1), (m.group(2) or "").strip("/")


@dataclass(frozen=True)
class EmrSettings:
    """One EMR run: where data and artifacts live, the cluster shape, and the `fruitpipe run` arguments."""

    input: str = option(positional=True, metavar="INPUT", help="s3://bucket/prefix of the images")
    output: str = option(positional=True, metavar="OUTPUT", help="s3://bucket/prefix for the results")
    region: str = option(DEFAULT_REGION, help="AWS region (default %(default)s; non-EU needs --allow-non-eu)")
    allow_non_eu: bool = option(False, help="accept a region outside the EU")
    #: s3:// prefix for the wheel, bootstrap script and model (default: s3://<output bucket>/fruitpipe-artifacts).
    artifacts: str | None = option(None, metavar="S3_PREFIX",
                                   help="where the wheel, bootstrap script and model go (default s3://<OUTPUT "
                                        "bucket>/fruitpipe-artifacts)")
    #: s3:// prefix for EMR's logs (default: s3://<output bucket>/fruitpipe-logs).
    logs: str | None = option(None, metavar="S3_PREFIX",
                              help="EMR log prefix (default s3://<OUTPUT bucket>/fruitpipe-logs)")
    #: s3:// prefix the instance role may write (OUTPUT inside it): granted once by `setup`, for every run below it
    #: (dated outputs). Default: OUTPUT itself.
    output_root: str | None = option(None, metavar="S3_PREFIX",
                                     help="with setup: let the instance role write every run below this prefix "
                                          "(e.g. s3://b/runs for dated outputs), granted once; up checks OUTPUT is "
                                          "inside what was granted")
    release_label: str = option(DEFAULT_RELEASE, help="EMR release (default %(default)s)")
    master_type: str = option("m5.xlarge", help="master instance type (default %(default)s)")
    core_type: str = option("m5.xlarge", help="core instance type (default %(default)s)")
    core_nodes: int = option(2, help="number of core nodes (default %(default)s)")
    ebs_gb: int = option(64, help="gp3 volume per node, GB (default %(default)s)")
    name: str = option("fruitpipe", help="cluster name (default %(default)s)")
    service_role: str = option("fruitpipe-emr-service", help="EMR service role name")
    instance_role: str = option("fruitpipe-emr-ec2", help="EC2 instance role and profile name")
    subnet_id: str | None = option(None, help="VPC subnet for the nodes (default: the account's default VPC)")
    model: str = option("mobilenet_v2", help="backbone (default %(default)s)")
    model_path: str | None = option(None, metavar="FILE", help="local ONNX file to upload instead of the registry's")
    #: Extra `fruitpipe run` flags for the step (e.g. ["--k", "50"]).
    run_args: tuple[str, ...] = option((), flag="--run-arg", metavar="ARG",
                                       help="extra argument for the step's `fruitpipe run`, repeatable (e.g. "
                                            "--run-arg=--k --run-arg=50)")
    #: Extra cluster tags; its flag --tag KEY=VALUE is read by the command (cli_emr).
    tags: Mapping[str, str] = field(default_factory=dict)
    #: For the cost estimate only.
    images: int = option(138_704, help="images expected, for the cost estimate (default %(default)s: Fruits-360)")
    img_per_vcpu_s: float = option(MEASURED_IMG_PER_VCPU_S, type=positive_float,
                                   help="throughput per vCPU for the estimate (default %(default)s, measured)")
    node_price: float | None = option(None, type=positive_float, metavar="USD_PER_HOUR",
                                      help="price per node-hour (EC2 + EMR) instead of the stated eu-west-3 list "
                                           "prices")
    #: Minutes after which the step is killed (and the cluster with it); None: derived from the estimate.
    step_timeout_min: float | None = option(None, flag="--step-timeout", type=positive_float, metavar="MINUTES",
                                            help="kill the step (and so the cluster) after this long (default: 3x "
                                                 "the estimate, >= 30)")
    #: A cluster for notebooks (EMR Studio) instead of a step: Livy and Jupyter Enterprise Gateway, no step, and
    #: terminated by EMR once idle for this many minutes.
    notebook_idle_min: float | None = option(
        None, flag="--notebook-idle", type=positive_float, metavar="MINUTES",
        help="a cluster for notebooks (EMR Studio): Livy and Jupyter Enterprise Gateway, no step, terminated by EMR "
             "after MINUTES idle (up, plan)")
    #: Launch even when the vCPU quota read is too small for the plan (`up` refuses otherwise).
    ignore_quota: bool = option(False, help="up/run: launch even when the vCPU quota read is too small for the "
                                            "cluster (refused otherwise)")
    #: Launch into a subnet whose route to S3 fruitpipe cannot find (a proxy, a route it does not know).
    skip_network_check: bool = option(False, help="up/run: launch into a subnet whose route to S3 fruitpipe cannot "
                                                  "find (refused otherwise)")

    def validate(self) -> EmrSettings:
        """Refuse what would fail on AWS or break the EU-only rule; messages say which flag to change."""
        if not self.region.startswith("eu-") and not self.allow_non_eu:
            raise EmrError(f"--region {self.region} is outside the EU: the data must stay in the EU (GDPR); "
                           "use eu-west-3, or pass --allow-non-eu if this data may leave it")
        split_s3(self.input, "INPUT")
        split_s3(self.output, "OUTPUT")
        if self.output_root is not None:
            root = self.output_root.rstrip("/")
            split_s3(root, "--output-root")
            if not (self.output.rstrip("/") == root or self.output.startswith(root + "/")):
                raise EmrError(f"OUTPUT {self.output} is not under --output-root {self.output_root}: put the run "
                               "below the root, or grant its own prefix with `fruitpipe emr setup INPUT OUTPUT`")
        split_s3(self.artifacts_uri, "--artifacts")
        split_s3(self.logs_uri, "--logs")
        if self.notebook_idle_min is not None and not 1 <= self.notebook_idle_min <= 7 * 24 * 60:
            raise EmrError(f"--notebook-idle {self.notebook_idle_min:g} must be between 1 and 10080 minutes (EMR's "
                           "idle timeout: 60 s to 7 days)")
        fixed = {"project": "fruitpipe", EMR_MANAGED_TAG: "true"}
        for key, value in self.tags.items():
            if key in fixed and value != fixed[key]:
                raise EmrError(f"--tag {key}={value}: fruitpipe tags its clusters {key}={fixed[key]} (the operator "
                               "policy starts and terminates only those); drop this --tag")
        if self.core_nodes < 1:
            raise EmrError(f"--core-nodes {self.core_nodes} must be at least 1")
        if self.ebs_gb < 16:
            raise EmrError(f"--ebs-gb {self.ebs_gb} is below 16 GB: EMR nodes need room for Spark's local disk")
        if not re.fullmatch(r"emr-\d+\.\d+\.\d+", self.release_label):
            raise EmrError(f"--release-label {self.release_label!r} must look like {DEFAULT_RELEASE}")
        major, minor, _ = (int(x) for x in self.release_label.split("-")[1].split("."))
        if (major, minor) < (7, 1):
            raise EmrError(f"--release-label {self.release_label} predates emr-7.1.0, the first release whose nodes "
                           f"ship Python 3.11; use {DEFAULT_RELEASE}")
        if self.node_price is None:
            for kind in (self.master_type, self.core_type):
                if kind not in NODE_PRICES_EU_WEST_3:
                    raise EmrError(f"no price known for {kind}: pass --node-price USD_PER_HOUR "
                                   f"(known: {', '.join(NODE_PRICES_EU_WEST_3)})")
        for flag, kind in (("--master-type", self.master_type), ("--core-type", self.core_type)):
            if kind not in INSTANCE_TYPES:
                raise EmrError(f"{flag} {kind}: its vCPUs and YARN memory are not known to fruitpipe, so executors "
                               f"cannot be sized for it; use one of {', '.join(INSTANCE_TYPES)}")
        if self.step_timeout_min is not None and self.step_timeout_min <= 0:
            raise EmrError(f"--step-timeout {self.step_timeout_min} must be a positive number of minutes")
        if self.images < 1 or self.img_per_vcpu_s <= 0:
            raise EmrError("--images and --img-per-vcpu-s must be positive (they only feed the cost estimate)")
        return self

    @property
    def artifacts_uri(self) -> str:
        """s3:// prefix of the artifacts."""
        return (self.artifacts or f"s3://{split_s3(self.output, 'OUTPUT')[0]}/fruitpipe-artifacts").rstrip("/")

    @property
    def output_grant(self) -> str:
        """The s3:// prefix the instance role may write for this run: --output-root, else OUTPUT."""
        return (self.output_root or self.output).rstrip("/")

    @property
    def logs_uri(self) -> str:
        """s3:// prefix of EMR's logs."""
        return (self.logs or f"s3://{split_s3(self.output, 'OUTPUT')[0]}/fruitpipe-logs").rstrip("/")


