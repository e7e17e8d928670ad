"""`emr plan`: the run_job_flow request, the security configuration, the IAM policies and the cost estimate (no
AWS call)."""

from __future__ import annotations

import json
import logging
import string
from importlib import resources
from typing import Any

from fruitpipe.cloud.artifacts import _version, artifact_uris, wheel_name
from fruitpipe.cloud.settings import (
    EMR_MANAGED_TAG,
    FIXED_MINUTES,
    GP3_GB_MONTH,
    KMS_ALIAS,
    NODE_PRICES_EU_WEST_3,
    PRICES_DATE,
    S3_GET_PER_1000,
    SECURITY_CONFIGURATION,
    SUBMIT_SCRIPT,
    VCPUS,
    VENV_PYTHON,
    EmrError,
    EmrSettings,
    split_s3,
)

log = logging.getLogger(__name__)

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


