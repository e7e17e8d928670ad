"""AWS EMR launcher (boto3): the cluster request, IAM and encryption setup, artifacts upload, cluster lifecycle."""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from fruitpipe.errors import FruitpipeError

log = logging.getLogger(__name__)

#: Newest EMR release in the EMR release guide when this was written: Spark 3.5.6, Python 3.11 on the nodes.
DEFAULT_RELEASE = "emr-7.13.0"
DEFAULT_REGION = "eu-west-3"
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
NODE_PRICES_EU_WEST_3 = {  # instance type: (EC2 on-demand, EMR fee)
    "m5.xlarge": (0.224, 0.048),
    "m5.2xlarge": (0.448, 0.096),
    "m5.4xlarge": (0.896, 0.192),
    "c5.xlarge": (0.202, 0.043),
    "c5.2xlarge": (0.404, 0.085),
}
VCPUS = {"m5.xlarge": 4, "m5.2xlarge": 8, "m5.4xlarge": 16, "c5.xlarge": 4, "c5.2xlarge": 8}
GP3_GB_MONTH = 0.0928
S3_GET_PER_1000 = 0.00042
#: Measured end to end (list + embed + PCA + write) on 105,600 images, 2 vCPUs: 185.3 img/s, i.e. 92.6 per vCPU
#: (docs/performance.md). EMR's vCPUs are not these: treat the estimate as +-30 % until measured there.
MEASURED_IMG_PER_VCPU_S = 92.6
#: Cluster start (EC2 provisioning + EMR set-up + this bootstrap's pip install), and JVM start + PCA: assumptions
#: from EMR's usual 7-10 min start, stated in the plan so nobody mistakes them for measurements.
FIXED_MINUTES = {"provisioning_and_bootstrap": 10.0, "spark_start_and_pca": 2.0}

_STEP_DONE = {"COMPLETED", "CANCELLED", "FAILED", "INTERRUPTED"}
_CLUSTER_DONE = {"TERMINATED", "TERMINATED_WITH_ERRORS"}


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

    input: str
    output: str
    region: str = DEFAULT_REGION
    allow_non_eu: bool = False
    #: s3:// prefix for the wheel, bootstrap script and model (default: s3://<output bucket>/fruitpipe-artifacts).
    artifacts: str | None = None
    #: s3:// prefix for EMR's logs (default: s3://<output bucket>/fruitpipe-logs).
    logs: str | None = None
    release_label: str = DEFAULT_RELEASE
    master_type: str = "m5.xlarge"
    core_type: str = "m5.xlarge"
    core_nodes: int = 2
    ebs_gb: int = 64
    name: str = "fruitpipe"
    service_role: str = "fruitpipe-emr-service"
    instance_role: str = "fruitpipe-emr-ec2"
    subnet_id: str | None = None
    model: str = "mobilenet_v2"
    model_path: str | None = None
    #: Extra `fruitpipe run` flags for the step (e.g. ["--k", "50"]).
    run_args: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    #: For the cost estimate only.
    images: int = 138_704
    img_per_vcpu_s: float = MEASURED_IMG_PER_VCPU_S
    node_price: float | None = None

    def validate(self) -> EmrSettings:
        """Refuse what would fail on AWS or break the EU-only rule; messages say which flag to change."""
        if not self.region.startswith("eu-") and not self.allow_non_eu:
            raise EmrError(f"--region {self.region} is outside the EU: the data must stay in the EU (GDPR); "
                           "use eu-west-3, or pass --allow-non-eu if this data may leave it")
        split_s3(self.input, "INPUT")
        split_s3(self.output, "OUTPUT")
        split_s3(self.artifacts_uri, "--artifacts")
        split_s3(self.logs_uri, "--logs")
        if self.core_nodes < 1:
            raise EmrError(f"--core-nodes {self.core_nodes} must be at least 1")
        if self.ebs_gb < 16:
            raise EmrError(f"--ebs-gb {self.ebs_gb} is below 16 GB: EMR nodes need room for Spark's local disk")
        if not re.fullmatch(r"emr-\d+\.\d+\.\d+", self.release_label):
            raise EmrError(f"--release-label {self.release_label!r} must look like {DEFAULT_RELEASE}")
        if int(self.release_label.split("-")[1].split(".")[0]) < 7:
            raise EmrError(f"--release-label {self.release_label} predates EMR 7, which first offers Python 3.11")
        if self.node_price is None:
            for kind in (self.master_type, self.core_type):
                if kind not in NODE_PRICES_EU_WEST_3:
                    raise EmrError(f"no price known for {kind}: pass --node-price USD_PER_HOUR "
                                   f"(known: {', '.join(NODE_PRICES_EU_WEST_3)})")
        if self.core_type not in VCPUS:
            raise EmrError(f"vCPU count of {self.core_type} unknown: use one of {', '.join(VCPUS)}")
        if self.images < 1 or self.img_per_vcpu_s <= 0:
            raise EmrError("--images and --img-per-vcpu-s must be positive (they only feed the cost estimate)")
        return self

    @property
    def artifacts_uri(self) -> str:
        """s3:// prefix of the artifacts."""
        return (self.artifacts or f"s3://{split_s3(self.output, 'OUTPUT')[0]}/fruitpipe-artifacts").rstrip("/")

    @property
    def logs_uri(self) -> str:
        """s3:// prefix of EMR's logs."""
        return (self.logs or f"s3://{split_s3(self.output, 'OUTPUT')[0]}/fruitpipe-logs").rstrip("/")


def _version() -> str:
    from fruitpipe import __version__

    return __version__


def wheel_name() -> str:
    """File name of this version's wheel."""
    return f"fruitpipe-{_version()}-py3-none-any.whl"


def model_file(settings: EmrSettings) -> tuple[str, str]:
    """(file name, sha256) of the model the step will use: the registry's, or the --model-path file's."""
    from fruitpipe.models import get_spec
    from fruitpipe.models.fetch import sha256_file

    spec = get_spec(settings.model)
    if settings.model_path:
        if not os.path.isfile(settings.model_path):
            raise EmrError(f"--model-path {settings.model_path} is not a local file")
        return spec.filename, sha256_file(settings.model_path)
    return spec.filename, spec.sha256


def artifact_uris(settings: EmrSettings) -> dict[str, str]:
    """Where each artifact lives in S3; code under the version, the model under its sha256 (uploaded once)."""
    base = settings.artifacts_uri
    filename, sha = model_file(settings)
    code = f"{base}/{_version()}"
    return {
        "prefix": code,
        "wheel": f"{code}/{wheel_name()}",
        "requirements": f"{code}/requirements.txt",
        "bootstrap": f"{code}/bootstrap.sh",
        "model": f"{base}/models/{sha[:16]}/{filename}",
    }


def step_args(settings: EmrSettings) -> list[str]:
    """The step's command line: spark-submit in client mode on YARN, running `fruitpipe run` S3 to S3."""
    return [
        "spark-submit", "--master", "yarn", "--deploy-mode", "client",
        "--conf", f"spark.pyspark.python={VENV_PYTHON}",
        "--conf", f"spark.pyspark.driver.python={VENV_PYTHON}",
        SUBMIT_SCRIPT, "run", settings.input.rstrip("/"), settings.output.rstrip("/"),
        "--model", settings.model, "--model-path", artifact_uris(settings)["model"],
        "--master", "yarn", "--region", settings.region, *settings.run_args,
    ]


def _tags(settings: EmrSettings) -> list[dict[str, str]]:
    tags = {"project": "fruitpipe", "fruitpipe-version": _version(), "data-classification": "no-personal-data",
            EMR_MANAGED_TAG: "true", **settings.tags}
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def job_flow_request(settings: EmrSettings) -> dict[str, Any]:
    """The exact keyword arguments of emr.run_job_flow for this run."""
    uris = artifact_uris(settings)
    ebs = {"EbsBlockDeviceConfigs": [{"VolumeSpecification": {"VolumeType": "gp3", "SizeInGB": settings.ebs_gb},
                                      "VolumesPerInstance": 1}], "EbsOptimized": True}
    instances: dict[str, Any] = {
        "InstanceGroups": [
            {"Name": "master", "InstanceRole": "MASTER", "Market": "ON_DEMAND",
             "InstanceType": settings.master_type, "InstanceCount": 1, "EbsConfiguration": ebs},
            {"Name": "core", "InstanceRole": "CORE", "Market": "ON_DEMAND",
             "InstanceType": settings.core_type, "InstanceCount": settings.core_nodes, "EbsConfiguration": ebs},
        ],
        # Auto-termination: the cluster shuts down once its step ends (success or failure).
        "KeepJobFlowAliveWhenNoSteps": False,
        "TerminationProtected": False,
    }
    if settings.subnet_id:
        instances["Ec2SubnetId"] = settings.subnet_id
    return {
        "Name": settings.name,
        "ReleaseLabel": settings.release_label,
        "LogUri": settings.logs_uri + "/",
        "Applications": [{"Name": "Spark"}],
        "Instances": instances,
        "BootstrapActions": [{
            "Name": "install fruitpipe",
            "ScriptBootstrapAction": {"Path": uris["bootstrap"], "Args": [uris["prefix"], wheel_name()]},
        }],
        "Steps": [{
            "Name": "fruitpipe run",
            "ActionOnFailure": "TERMINATE_CLUSTER",
            "HadoopJarStep": {"Jar": "command-runner.jar", "Args": step_args(settings)},
        }],
        "Configurations": [
            {"Classification": "spark-defaults", "Properties": {
                "spark.pyspark.python": VENV_PYTHON,
                "spark.pyspark.driver.python": VENV_PYTHON,
                # 4 Python workers per m5.xlarge executor hold an ONNX session each (~0.3 GB): room outside
                # the JVM heap, or YARN kills the container.
                "spark.executor.memoryOverhead": "2g",
                "spark.python.worker.reuse": "true",
            }},
            {"Classification": "spark-env", "Configurations": [{"Classification": "export", "Properties": {
                "PYSPARK_PYTHON": VENV_PYTHON,
                # The step log is a file, not a terminal: one progress line a minute.
                "TQDM_MININTERVAL": "60",
            }}]},
        ],
        "SecurityConfiguration": SECURITY_CONFIGURATION,
        "ServiceRole": settings.service_role,
        "JobFlowRole": settings.instance_role,
        "VisibleToAllUsers": True,
        "EbsRootVolumeSize": 32,
        "Tags": _tags(settings),
    }


def security_configuration(kms_key_arn: str) -> dict[str, Any]:
    """EMR security configuration: EBS and local disks encrypted with the fruitpipe KMS key, S3 with SSE-S3."""
    return {"EncryptionConfiguration": {
        "EnableAtRestEncryption": True,
        "EnableInTransitEncryption": False,
        "AtRestEncryptionConfiguration": {
            "S3EncryptionConfiguration": {"EncryptionMode": "SSE-S3"},
            "LocalDiskEncryptionConfiguration": {"EncryptionKeyProviderType": "AwsKms", "AwsKmsKey": kms_key_arn,
                                                 "EnableEbsEncryption": True},
        },
    }}


def estimate(settings: EmrSettings) -> dict[str, Any]:
    """Time and cost of the run from the measured per-vCPU throughput and the stated prices."""
    nodes = 1 + settings.core_nodes
    vcpus = settings.core_nodes * VCPUS[settings.core_type]
    img_s = vcpus * settings.img_per_vcpu_s
    work_min = settings.images / img_s / 60
    minutes = work_min + sum(FIXED_MINUTES.values())
    if settings.node_price is not None:
        master_h = core_h = settings.node_price
    else:
        master_h = sum(NODE_PRICES_EU_WEST_3[settings.master_type])
        core_h = sum(NODE_PRICES_EU_WEST_3[settings.core_type])
    hours = minutes / 60
    compute = hours * (master_h + settings.core_nodes * core_h)
    ebs = nodes * settings.ebs_gb * GP3_GB_MONTH * hours / 730
    gets = settings.images / 1000 * S3_GET_PER_1000
    return {
        "images": settings.images,
        "core_vcpus": vcpus,
        "img_per_vcpu_s": settings.img_per_vcpu_s,
        "expected_img_s": round(img_s, 1),
        "work_minutes": round(work_min, 1),
        "fixed_minutes": FIXED_MINUTES,
        "total_minutes": round(minutes, 1),
        "usd": {"nodes": round(compute, 3), "ebs": round(ebs, 4), "s3_get": round(gets, 4),
                "total": round(compute + ebs + gets, 2)},
        "prices": {"region": "eu-west-3", "stated_on": PRICES_DATE,
                   "node_usd_per_hour": {"master": round(master_h, 4), "core": round(core_h, 4)},
                   "source": "--node-price" if settings.node_price is not None else
                   "AWS public on-demand price pages (EC2 + EMR fee), written down offline, not fetched live: "
                   "check them before quoting",
                   "gp3_usd_per_gb_month": GP3_GB_MONTH, "s3_get_usd_per_1000": S3_GET_PER_1000},
        "basis": "measured end-to-end throughput on a 2-vCPU VM (docs/performance.md); +-30 % until measured "
                 "on EMR",
    }


def render_policy(name: str, **values: str) -> dict[str, Any]:
    """A policy document shipped in fruitpipe/cloud/policies, with its ${placeholders} filled in."""
    text = resources.files("fruitpipe.cloud").joinpath("policies", f"{name}.json").read_text()
    try:
        return json.loads(string.Template(text).substitute(values))
    except KeyError as exc:
        raise EmrError(f"policy {name} needs a value for {exc}") from None


def policy_values(settings: EmrSettings, account_id: str, kms_key_arn: str) -> dict[str, str]:
    """Placeholder values of the shipped policies for one run."""
    in_b, in_p = split_s3(settings.input, "INPUT")
    out_b, out_p = split_s3(settings.output, "OUTPUT")
    art_b, art_p = split_s3(settings.artifacts_uri, "--artifacts")
    log_b, log_p = split_s3(settings.logs_uri, "--logs")
    for what, prefix in (("INPUT", in_p), ("OUTPUT", out_p), ("--artifacts", art_p), ("--logs", log_p)):
        if not prefix:
            raise EmrError(f"{what} needs a prefix (s3://bucket/prefix): the IAM policy grants that prefix only, "
                           "never a whole bucket")
    return {"input_bucket": in_b, "input_prefix": in_p, "output_bucket": out_b, "output_prefix": out_p,
            "artifacts_bucket": art_b, "artifacts_prefix": art_p, "logs_bucket": log_b, "logs_prefix": log_p,
            "account_id": account_id, "region": settings.region, "instance_role": settings.instance_role,
            "kms_key_arn": kms_key_arn}


def plan(settings: EmrSettings) -> dict[str, Any]:
    """Everything `emr up` would send, and what it costs; no AWS call."""
    settings.validate()
    policy_values(settings, "ACCOUNT_ID", "KMS_KEY_ARN")  # the prefixes must be grantable
    return {
        "region": settings.region,
        "run_job_flow": job_flow_request(settings),
        "artifacts": artifact_uris(settings),
        "setup": {"service_role": settings.service_role, "instance_profile": settings.instance_role,
                  "kms_alias": KMS_ALIAS, "security_configuration": SECURITY_CONFIGURATION},
        "estimate": estimate(settings),
    }


def runtime_requirements(extras: tuple[str, ...] = ()) -> list[str]:
    """fruitpipe's runtime dependencies (and those of `extras`) pinned to the versions installed here (the ones
    tested), without pyspark: the nodes use EMR's own Spark."""
    reqs = []
    for req in importlib.metadata.requires("fruitpipe") or []:
        extra = re.search(r"""extra == ['"]([^'"]+)['"]""", req)
        if extra and extra.group(1) not in extras:
            continue
        name = re.split(r"[ <>=!~;\[]", req, maxsplit=1)[0]
        if name.lower() == "pyspark":
            continue
        reqs.append(f"{name}=={importlib.metadata.version(name)}")
    return sorted(reqs)


def build_wheel(dest: Path) -> Path:
    """Build this checkout's wheel into `dest` with pip (its isolated build fetches setuptools from the index)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "pyproject.toml").is_file():
        raise EmrError("fruitpipe is not installed from a source checkout, so no wheel can be built: "
                       "pass --wheel FILE")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dest), str(root)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / wheel_name()
    if done.returncode != 0 or not wheel.is_file():
        raise EmrError(f"building the wheel failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return wheel


class Emr:
    """boto3 clients for one region; endpoints come from the standard AWS settings (AWS_ENDPOINT_URL, profiles)."""

    def __init__(self, region: str) -> None:
        try:
            import boto3
        except ImportError:
            raise EmrError("the emr commands need boto3: pip install 'fruitpipe[aws]'") from None
        self.region = region
        self._session = boto3.session.Session(region_name=region)
        self.emr = self._session.client("emr")
        self.s3 = self._session.client("s3")

    def client(self, name: str) -> Any:
        """Another boto3 client of the same session (iam, sts, kms)."""
        return self._session.client(name)

    # -- S3 -----------------------------------------------------------------------------------------------
    def ensure_bucket(self, bucket: str) -> list[str]:
        """Create `bucket` in the region if needed, then make sure public access is blocked, objects are encrypted
        by default and non-TLS requests are denied, never weakening what the bucket already has: an SSE-KMS
        default stays, public-access flags already on stay on. Returns what was changed, in words."""
        from botocore.exceptions import ClientError

        changed: list[str] = []
        try:
            self.s3.head_bucket(Bucket=bucket)
        except ClientError:
            log.info("creating bucket s3://%s in %s", bucket, self.region)
            self.s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": self.region})
            changed.append(f"s3://{bucket}: created in {self.region}")
        try:
            block = self.s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
        except ClientError:
            block = {}
        flags = ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets")
        off = [f for f in flags if not block.get(f)]
        if off:  # only ever turned on, never off
            self.s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration={f: True for f in flags})
            changed.append(f"s3://{bucket}: public access block turned on ({', '.join(off)})")
        try:
            rules = self.s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
        except ClientError:
            rules = []
        algorithms = {r.get("ApplyServerSideEncryptionByDefault", {}).get("SSEAlgorithm") for r in rules}
        if not algorithms & {"AES256", "aws:kms", "aws:kms:dsse"}:  # an existing default (SSE-KMS above all) stays
            self.s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": [
                {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}, "BucketKeyEnabled": True}]})
            changed.append(f"s3://{bucket}: default encryption SSE-S3 (AES256) set")
        deny_http = {"Sid": "DenyInsecureTransport", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
                     "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
                     "Condition": {"Bool": {"aws:SecureTransport": "false"}}}
        try:
            policy = json.loads(self.s3.get_bucket_policy(Bucket=bucket)["Policy"])
        except ClientError:
            policy = {"Version": "2012-10-17", "Statement": []}
        if not any(s.get("Sid") == deny_http["Sid"] for s in policy["Statement"]):
            policy["Statement"].append(deny_http)  # merged: the bucket's other statements are kept
            self.s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
            changed.append(f"s3://{bucket}: bucket policy statement DenyInsecureTransport added")
        return changed

    def bucket_region(self, bucket: str) -> str:
        """The region a bucket lives in (GetBucketLocation; us-east-1 answers with no constraint)."""
        from botocore.exceptions import ClientError

        try:
            location = self.s3.get_bucket_location(Bucket=bucket).get("LocationConstraint")
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            raise EmrError(f"cannot read the region of bucket s3://{bucket} ({code}): check the bucket name and that "
                           "these credentials may call s3:GetBucketLocation on it") from None
        return {None: "us-east-1", "": "us-east-1", "EU": "eu-west-1"}.get(location, location)

    def check_data_regions(self, settings: EmrSettings, buckets_may_be_missing: bool = False) -> dict[str, str]:
        """GDPR: the buckets of INPUT, OUTPUT, artifacts and logs must be in the chosen region (not only the
        cluster), unless --allow-non-eu. Returns {bucket: region}. With `buckets_may_be_missing` (setup, which
        creates them in the region), missing buckets other than the input's are skipped."""
        from botocore.exceptions import ClientError

        found: dict[str, str] = {}
        roles = {"input": settings.input, "output": settings.output, "artifacts": settings.artifacts_uri,
                 "logs": settings.logs_uri}
        for role, uri in roles.items():
            bucket = split_s3(uri, role)[0]
            if bucket in found:
                continue
            if buckets_may_be_missing and role != "input":
                try:
                    self.s3.head_bucket(Bucket=bucket)
                except ClientError:
                    continue
            found[bucket] = region = self.bucket_region(bucket)
            if region != settings.region and not settings.allow_non_eu:
                raise EmrError(f"the {role} bucket s3://{bucket} is in {region}, not in {settings.region}: the data "
                               f"must stay where the cluster runs (GDPR); use a bucket in {settings.region}, or pass "
                               "--allow-non-eu to accept it")
        return found

    def _exists(self, uri: str) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri, "URI")
        try:
            self.s3.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError:
            return False

    def _put(self, uri: str, body: bytes) -> None:
        bucket, key = split_s3(uri, "URI")
        self.s3.put_object(Bucket=bucket, Key=key, Body=body, ServerSideEncryption="AES256")
        log.info("uploaded %s (%d bytes)", uri, len(body))

    def read(self, uri: str) -> bytes | None:
        """An object's bytes, or None if it does not exist."""
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri, "URI")
        try:
            return self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    # -- setup and upload ----------------------------------------------------------------------------------
    def setup(self, settings: EmrSettings) -> dict[str, str]:
        """Create (or update) the KMS key, the security configuration and the two least-privilege roles."""
        from botocore.exceptions import ClientError

        settings.validate()
        self.check_data_regions(settings, buckets_may_be_missing=True)
        account = self.client("sts").get_caller_identity()["Account"]
        kms = self.client("kms")
        try:
            key_arn = kms.describe_key(KeyId=KMS_ALIAS)["KeyMetadata"]["Arn"]
        except ClientError:
            key_arn = kms.create_key(Description="fruitpipe EMR: EBS and local disk encryption",
                                     Tags=[{"TagKey": "project", "TagValue": "fruitpipe"}])["KeyMetadata"]["Arn"]
            kms.create_alias(AliasName=KMS_ALIAS, TargetKeyId=key_arn)
        if not kms.get_key_rotation_status(KeyId=key_arn).get("KeyRotationEnabled"):
            kms.enable_key_rotation(KeyId=key_arn)  # yearly rotation of the disk key
        wanted = security_configuration(key_arn)
        try:
            have = json.loads(self.emr.describe_security_configuration(
                Name=SECURITY_CONFIGURATION)["SecurityConfiguration"])
        except ClientError:
            self.emr.create_security_configuration(Name=SECURITY_CONFIGURATION,
                                                   SecurityConfiguration=json.dumps(wanted))
        else:
            if have != wanted:  # security configurations are immutable; clusters keep the one they started with
                raise EmrError(f"security configuration {SECURITY_CONFIGURATION} exists with other settings: "
                               "delete it (aws emr delete-security-configuration) and run setup again")
        values = policy_values(settings, account, key_arn)
        iam = self.client("iam")
        roles = ((settings.service_role, "emr-service-trust", "emr-service-role"),
                 (settings.instance_role, "ec2-trust", "ec2-instance-role"))
        for role, trust, inline in roles:
            try:
                iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(render_policy(trust, **values)),
                                Tags=[{"Key": "project", "Value": "fruitpipe"}])
            except iam.exceptions.EntityAlreadyExistsException:
                iam.update_assume_role_policy(RoleName=role,
                                              PolicyDocument=json.dumps(render_policy(trust, **values)))
            iam.put_role_policy(RoleName=role, PolicyName="fruitpipe",
                                PolicyDocument=json.dumps(render_policy(inline, **values)))
        iam.attach_role_policy(RoleName=settings.service_role, PolicyArn=EMR_MANAGED_POLICY)
        try:
            iam.create_instance_profile(InstanceProfileName=settings.instance_role)
        except iam.exceptions.EntityAlreadyExistsException:
            pass
        profile = iam.get_instance_profile(InstanceProfileName=settings.instance_role)["InstanceProfile"]
        if not any(r["RoleName"] == settings.instance_role for r in profile["Roles"]):
            iam.add_role_to_instance_profile(InstanceProfileName=settings.instance_role,
                                             RoleName=settings.instance_role)
        changed: list[str] = []
        for bucket in dict.fromkeys(split_s3(uri, "URI")[0] for uri in (settings.artifacts_uri, settings.logs_uri)):
            changed += self.ensure_bucket(bucket)
        self.check_data_regions(settings)
        return {"account": account, "kms_key": key_arn, "service_role": settings.service_role,
                "instance_profile": settings.instance_role, "security_configuration": SECURITY_CONFIGURATION,
                "buckets_changed": changed or ["nothing: every bucket setting was already as strong or stronger"]}

    def upload(self, settings: EmrSettings, wheel: str | None = None) -> dict[str, str]:
        """Put the wheel, requirements, bootstrap script and model in S3; the model only if not there yet."""
        from botocore.exceptions import ClientError

        from fruitpipe.models import get_spec, resolve_model

        settings.validate()
        uris = artifact_uris(settings)
        bucket = split_s3(uris["wheel"], "URI")[0]
        try:
            self.s3.head_bucket(Bucket=bucket)
        except ClientError:
            raise EmrError(f"bucket {bucket} does not exist: run `fruitpipe emr setup` first (it creates and "
                           "hardens it)") from None
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(wheel) if wheel else build_wheel(Path(tmp))
            if path.name != wheel_name():
                raise EmrError(f"--wheel {path} is not {wheel_name()}: build this version's wheel")
            self._put(uris["wheel"], path.read_bytes())
        extras = ("int8",) if "int8" in settings.run_args else ()  # --run-arg=--precision --run-arg=int8
        self._put(uris["requirements"], ("\n".join(runtime_requirements(extras)) + "\n").encode())
        self._put(uris["bootstrap"], resources.files("fruitpipe.cloud").joinpath("bootstrap.sh").read_bytes())
        if self._exists(uris["model"]):
            log.info("model already in S3: %s", uris["model"])
        else:
            model = resolve_model(get_spec(settings.model), settings.model_path)
            data = Path(model.path).read_bytes()
            if hashlib.sha256(data).hexdigest() != model.sha256:
                raise EmrError(f"{model.path} changed while being uploaded: retry")
            self._put(uris["model"], data)
        return uris

    # -- cluster lifecycle ---------------------------------------------------------------------------------
    def up(self, settings: EmrSettings) -> dict[str, str]:
        """Start the cluster with its step; refuses if the artifacts are missing."""
        settings.validate()
        self.check_data_regions(settings)  # before any billed resource starts
        uris = artifact_uris(settings)
        missing = [k for k in ("wheel", "requirements", "bootstrap", "model") if not self._exists(uris[k])]
        if missing:
            raise EmrError(f"missing in S3: {', '.join(uris[k] for k in missing)}; run `fruitpipe emr upload` first")
        request = job_flow_request(settings)
        cluster_id = self.emr.run_job_flow(**request)["JobFlowId"]
        steps = self.emr.list_steps(ClusterId=cluster_id)["Steps"]
        log.info("cluster %s starting in %s", cluster_id, self.region)
        return {"cluster_id": cluster_id, "step_id": steps[0]["Id"] if steps else ""}

    def status(self, cluster_id: str) -> dict[str, Any]:
        """Cluster state, its reason, and each step's state."""
        from botocore.exceptions import ClientError

        try:
            c = self.emr.describe_cluster(ClusterId=cluster_id)["Cluster"]
        except ClientError as exc:
            raise EmrError(f"cluster {cluster_id} not found in {self.region} ({exc.response['Error']['Code']}): "
                           "check the id and --region") from None
        steps = self.emr.list_steps(ClusterId=cluster_id)["Steps"]
        return {
            "cluster_id": cluster_id, "name": c.get("Name"), "state": c["Status"]["State"],
            "reason": c["Status"].get("StateChangeReason", {}).get("Message") or "",
            "reason_code": c["Status"].get("StateChangeReason", {}).get("Code") or "",
            "log_uri": c.get("LogUri", ""), "normalized_instance_hours": c.get("NormalizedInstanceHours", 0),
            "steps": [{"id": s["Id"], "name": s["Name"], "state": s["Status"]["State"],
                       "reason": s["Status"].get("FailureDetails", {}).get("Reason", "")} for s in steps],
        }

    def logs(self, cluster_id: str, step_id: str | None = None) -> dict[str, str]:
        """The step's stderr/stdout/controller logs, as EMR pushed them to the log URI (every ~5 minutes)."""
        st = self.status(cluster_id)
        if not st["log_uri"]:
            raise EmrError(f"cluster {cluster_id} has no log URI: it was not started by fruitpipe")
        step_id = step_id or (st["steps"][-1]["id"] if st["steps"] else None)
        if step_id is None:
            raise EmrError(f"cluster {cluster_id} has no step")
        base = re.sub(r"^s3n://", "s3://", st["log_uri"]).rstrip("/")
        found: dict[str, str] = {}
        for name in ("controller", "stderr", "stdout"):
            data = self.read(f"{base}/{cluster_id}/steps/{step_id}/{name}.gz")
            if data is not None:
                found[name] = gzip.decompress(data).decode("utf-8", "replace")
        if not found:
            raise EmrError(f"no logs yet under {base}/{cluster_id}/steps/{step_id}/ (EMR pushes them every "
                           "~5 minutes): try again later")
        return found

    def down(self, cluster_id: str) -> str:
        """Terminate the cluster; returns its state after the request."""
        self.emr.terminate_job_flows(JobFlowIds=[cluster_id])
        return self.status(cluster_id)["state"]

    def wait(self, cluster_id: str, timeout_s: float, poll_s: float = 30.0,
             report: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Poll until the step ends or the cluster terminates; reports each state change with elapsed time."""
        start = time.monotonic()
        last = ""
        while True:
            st = self.status(cluster_id)
            step = st["steps"][-1] if st["steps"] else {"state": "NONE"}
            now = f"cluster {st['state']}, step {step['state']}"
            if st["state"] in _CLUSTER_DONE and (st["reason_code"] or st["reason"]):
                now += f" ({' '.join(x for x in (st['reason_code'], st['reason']) if x)})"  # why it ended
            if now != last and report is not None:
                elapsed = time.monotonic() - start
                report(f"[{int(elapsed // 60):3d}m{int(elapsed % 60):02d}s] {now}")
            last = now
            if step["state"] in _STEP_DONE or st["state"] in _CLUSTER_DONE:
                return st
            if time.monotonic() - start > timeout_s:
                raise EmrError(f"cluster {cluster_id} still {now} after {timeout_s:.0f} s; it keeps running: "
                               f"watch it with `fruitpipe emr status {cluster_id}`, stop it with "
                               f"`fruitpipe emr down {cluster_id}`")
            time.sleep(poll_s)

    def run(self, settings: EmrSettings, timeout_s: float, poll_s: float = 30.0, wheel: str | None = None,
            report: Callable[[str], None] | None = None) -> dict[str, Any]:
        """upload + up + wait + fetch run.json + down; the cluster is terminated whatever happens."""
        self.upload(settings, wheel)
        started = self.up(settings)
        cluster_id = started["cluster_id"]
        try:
            st = self.wait(cluster_id, timeout_s, poll_s, report)
        except BaseException:
            self.down(cluster_id)
            raise
        if st["state"] not in _CLUSTER_DONE:
            self.down(cluster_id)
        out = settings.output.rstrip("/")
        success = self.read(f"{out}/_SUCCESS") is not None
        run_json = self.read(f"{out}/run.json")
        step = st["steps"][-1] if st["steps"] else {"state": "NONE", "reason": ""}
        if not success or run_json is None or step["state"] in {"FAILED", "CANCELLED", "INTERRUPTED"}:
            cluster_why = " ".join(x for x in (st.get("reason_code", ""), st.get("reason", "")) if x)
            raise EmrError(f"the run did not complete (cluster {st['state']}"
                           + (f": {cluster_why}" if cluster_why else "")
                           + f"; step {step['state']} {step.get('reason', '')}".rstrip()
                           + f"; _SUCCESS {'present' if success else 'missing'}): read "
                           f"`fruitpipe emr logs {cluster_id}`; re-running resumes where it stopped")
        report_json = json.loads(run_json)
        return {"cluster_id": cluster_id, "step_state": step["state"], "run": report_json}

