"""`emr plan`: the run_job_flow request, executor sizing, the step timeout, the security configuration, the IAM
policies and the cost estimate; the network and quota checks are read-only and only run with credentials."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from fruitpipe.cloud.artifacts import _version, artifact_uris, wheel_name
from fruitpipe.cloud.cost import estimate, step_timeout_minutes
from fruitpipe.cloud.iam import _operator_policy, policy_values
from fruitpipe.cloud.settings import (
    EMR_MANAGED_TAG,
    INSTANCE_TYPES,
    KMS_ALIAS,
    SECURITY_CONFIGURATION,
    SUBMIT_SCRIPT,
    VENV_PYTHON,
    EmrError,
    EmrSettings,
)
from fruitpipe.cloud.sizing import executor_conf, executors
from fruitpipe.spark import YARN_MB_CONF

if TYPE_CHECKING:
    from fruitpipe.cloud.preflight import Preflight

log = logging.getLogger(__name__)


def step_args(settings: EmrSettings) -> list[str]:
    """The step's command line: spark-submit in client mode on YARN, running `fruitpipe run` S3 to S3, under
    coreutils `timeout` so that a hung step ends (TERM, then KILL two minutes later) and takes the cluster with it."""
    return [
        "timeout", "--signal=TERM", "--kill-after=120", f"{step_timeout_minutes(settings)}m",
        "spark-submit", "--master", "yarn", "--deploy-mode", "client",
        "--conf", f"spark.pyspark.python={VENV_PYTHON}",
        "--conf", f"spark.pyspark.driver.python={VENV_PYTHON}",
        # What the executors were sized for: the step logs YARN's nodes and stops if they have less (spark.py).
        "--conf", f"{YARN_MB_CONF}={INSTANCE_TYPES[settings.core_type].yarn_mb}",
        SUBMIT_SCRIPT, "run", settings.input.rstrip("/"), settings.output.rstrip("/"),
        "--model", settings.model, "--model-path", artifact_uris(settings)["model"],
        "--master", "yarn", "--region", settings.region, *settings.run_args,
    ]


def spark_defaults(settings: EmrSettings) -> dict[str, str]:
    """The spark-defaults the cluster gets: fruitpipe's Python, the executors' size, and a fixed executor count.
    EMR turns dynamic allocation on with no initial executor: the run then sized its tasks from
    defaultParallelism while no executor was up (2 tasks for a small run, idle cores for a large one), and the
    executors (JVM and model load) were released in driver-only phases and restarted for the next stage. Off, with
    one executor per core node from the start."""
    conf = {
        "spark.pyspark.python": VENV_PYTHON,
        "spark.pyspark.driver.python": VENV_PYTHON,
        **executor_conf(settings.core_type, settings.notebook_idle_min is not None),
        "spark.dynamicAllocation.enabled": "false",
        "spark.executor.instances": str(executors(settings)["in_all"]),
        "spark.python.worker.reuse": "true",
    }
    if settings.notebook_idle_min is not None:
        # The notebook's driver (inside the Livy session's AM) reads the model `emr upload` put in S3, never the
        # public weights from the internet, which a private subnet cannot reach.
        conf[f"spark.yarn.appMasterEnv.{NOTEBOOK_MODEL_ENV}"] = artifact_uris(settings)["model"]
    return conf


#: The notebook's model parameter (examples/fruitpipe.ipynb), set on notebook clusters to the model in S3.
NOTEBOOK_MODEL_ENV = "FRUITPIPE_NB_MODEL_PATH"


def _tags(settings: EmrSettings) -> list[dict[str, str]]:
    # No data-classification tag: fruitpipe cannot know what the photos show (people, GPS in EXIF); a team that
    # classifies its data passes --tag data-classification=... itself.
    tags = {"project": "fruitpipe", "fruitpipe-version": _version(), EMR_MANAGED_TAG: "true", **settings.tags}
    return [{"Key": k, "Value": v} for k, v in tags.items()]


def _notebook(settings: EmrSettings, instances: dict[str, Any]) -> dict[str, Any]:
    """For `--notebook-idle`: the applications EMR Studio attaches to (Livy, Jupyter Enterprise Gateway), a cluster
    that stays up without steps, and EMR's idle auto-termination, so a forgotten notebook cluster stops billing."""
    if settings.notebook_idle_min is None:
        return {"Applications": [{"Name": "Spark"}]}
    instances["KeepJobFlowAliveWhenNoSteps"] = True
    # EMR notebooks require Hadoop, Spark and Livy, and on 6.2+ Jupyter Enterprise Gateway.
    return {"Applications": [{"Name": "Hadoop"}, {"Name": "Spark"}, {"Name": "Livy"},
                             {"Name": "JupyterEnterpriseGateway"}],
            "AutoTerminationPolicy": {"IdleTimeout": int(settings.notebook_idle_min * 60)}}


def livy_conf(settings: EmrSettings) -> list[dict[str, Any]]:
    """On a notebook cluster, Livy ends a session idle for --notebook-idle minutes (its default is an hour): an
    open session is a running YARN application, so a forgotten Workspace would keep the cluster from ever being
    idle. Its timeout is at or below EMR's idle timeout, which then ends the cluster. A session running a statement
    (a long `run`) is never cut (skip-busy)."""
    if settings.notebook_idle_min is None:
        return []
    minutes = max(1, math.floor(settings.notebook_idle_min))
    return [{"Classification": "livy-conf", "Properties": {
        "livy.server.session.timeout-check": "true",
        "livy.server.session.timeout-check.skip-busy": "true",
        "livy.server.session.timeout": f"{minutes}m"}}]


def job_flow_request(settings: EmrSettings, subnet_id: str | None = None) -> dict[str, Any]:
    """The exact keyword arguments of emr.run_job_flow for this run; `subnet_id` is the one the network check
    found (--subnet-id, or the default VPC's), so that EMR launches where the tags were checked."""
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
    if subnet_id or settings.subnet_id:
        instances["Ec2SubnetId"] = subnet_id or settings.subnet_id
    request: dict[str, Any] = {
        "Name": settings.name,
        "ReleaseLabel": settings.release_label,
        "LogUri": settings.logs_uri + "/",
        "Instances": instances,
        "BootstrapActions": [{
            "Name": "install fruitpipe",
            "ScriptBootstrapAction": {"Path": uris["bootstrap"],
                                      "Args": [uris["prefix"], wheel_name(), uris["wheelhouse"],
                                               settings.region]},
        }],
        "Steps": [{
            "Name": "fruitpipe run",
            "ActionOnFailure": "TERMINATE_CLUSTER",
            "HadoopJarStep": {"Jar": "command-runner.jar", "Args": step_args(settings)},
        }],
        "Configurations": [
            {"Classification": "spark-defaults", "Properties": spark_defaults(settings)},
            {"Classification": "spark-env", "Configurations": [{"Classification": "export", "Properties": {
                "PYSPARK_PYTHON": VENV_PYTHON,
                # The step log is a file, not a terminal: one progress line a minute.
                "TQDM_MININTERVAL": "60",
            }}]},
            *livy_conf(settings),
        ],
        "SecurityConfiguration": SECURITY_CONFIGURATION,
        "ServiceRole": settings.service_role,
        **_notebook(settings, instances),
        "JobFlowRole": settings.instance_role,
        "VisibleToAllUsers": True,
        "EbsRootVolumeSize": 32,
        "Tags": _tags(settings),
    }
    if settings.notebook_idle_min is not None:
        request.pop("Steps")
    return request


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


def plan(settings: EmrSettings, checks: Preflight | None = None) -> dict[str, Any]:
    """Everything `emr up` would send, and what it costs. With `checks` (AWS credentials present), also the network
    it will use (and its tags) and the vCPU quota, both read-only; without, says they were not checked."""
    settings.validate()
    policy_values(settings, "ACCOUNT_ID", "KMS_KEY_ARN")  # the prefixes must be grantable
    subnet = None
    if checks is None:
        why = "no AWS credentials found: `emr setup` and `emr up` check it"
        network: dict[str, Any] = {"checked": False, "why": why,
                                   "subnet_id": settings.subnet_id or "a default subnet of the default VPC"}
        quota: dict[str, Any] = {"checked": False, "why": why}
    else:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            net = checks.network(settings)
        except EmrError as exc:  # no default VPC, unknown subnet: `up` would refuse with this
            network = {"checked": True, "problem": str(exc)}
        except (ClientError, BotoCoreError) as exc:
            network = {"checked": False, "why": f"could not read the network: {str(exc).splitlines()[0][:200]}"}
        else:
            subnet = net.subnet_id
            network = {"checked": True, **net.describe()}
            if net.untagged:
                network["advice"] = "`fruitpipe emr setup` tags them (up refuses an untagged network)"
        quota = checks.quota(settings)
    operator, bucket_keys = _operator_policy(settings, checks)
    return {
        "region": settings.region,
        "network": network,
        "quota": quota,
        "run_job_flow": job_flow_request(settings, subnet),
        "artifacts": artifact_uris(settings),
        "executors": executors(settings),
        # What the identity running plan/upload/up/run/status/logs/down needs (setup needs IAM admin rights, once).
        "operator_policy": operator,
        "operator_bucket_keys": bucket_keys,
        "setup": {"service_role": settings.service_role, "instance_profile": settings.instance_role,
                  "kms_alias": KMS_ALIAS, "security_configuration": SECURITY_CONFIGURATION},
        "estimate": estimate(settings),
    }
