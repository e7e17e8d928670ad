"""`emr plan`: the run_job_flow request, executor sizing, the step timeout, the security configuration, the IAM
policies and the cost estimate; the network and quota checks are read-only and only run with credentials."""

from __future__ import annotations

import json
import logging
import math
import string
from importlib import resources
from typing import TYPE_CHECKING, Any

from fruitpipe.cloud.artifacts import _version, artifact_uris, run_options, wheel_name
from fruitpipe.cloud.settings import (
    EMR_MANAGED_TAG,
    FIXED_MINUTES,
    GP3_GB_MONTH,
    INSTANCE_TYPES,
    KMS_ALIAS,
    MEASURED_IMG_PER_VCPU_S,
    NODE_PRICES_EU_WEST_3,
    PRICES_DATE,
    S3_GET_PER_1000,
    S3_PUT_LIST_PER_1000,
    SECURITY_CONFIGURATION,
    SUBMIT_SCRIPT,
    THROUGHPUT_BASIS,
    VENV_PYTHON,
    EmrError,
    EmrSettings,
    split_s3,
)
from fruitpipe.config import task_count
from fruitpipe.spark import YARN_MB_CONF

if TYPE_CHECKING:
    from fruitpipe.cloud.preflight import Preflight

log = logging.getLogger(__name__)

#: Memory of one Python worker outside the JVM: the interpreter, one ONNX Runtime session (MobileNetV2 fp32:
#: ~0.3 GB resident) and a decoded batch. Spark counts it in spark.executor.memoryOverhead, which YARN enforces.
PYTHON_WORKER_MB = 512
#: Spark's own minimum overhead (JVM internals, Netty buffers).
JVM_OVERHEAD_MB = 384
#: The YARN scheduler's allocation unit on EMR (yarn.scheduler.minimum-allocation-mb): containers round up to it.
YARN_ALLOCATION_MB = 32
#: In client mode Spark still asks YARN for an ApplicationMaster container (spark.yarn.am.memory and its
#: memoryOverhead, set explicitly below), and YARN places it on a core node: an executor sized to a whole node's
#: YARN memory then never fits beside it (with one core node the step waited for an executor until its timeout).
AM_MEMORY_MB = 512
AM_OVERHEAD_MB = 384
#: On a notebook cluster Livy starts each session's driver inside its YARN ApplicationMaster (cluster mode), on a
#: core node: EMR 7 gives it 2,048 MB, and 2,048 + 384 + an executor sized as for a step (10,880 MB on m5.xlarge)
#: exceed the node's 12,288, so the notebook's first job waited forever (one core node) or got half the cores (two).
#: Set explicitly (the same 2 GB heap a notebook user expects) and reserved on every node like the step's AM.
NOTEBOOK_DRIVER_MB = 2048
NOTEBOOK_DRIVER_OVERHEAD_MB = 384
#: Left free on every node beyond the executor and the AM: only m5.xlarge's YARN memory (12,288 MB) was cross-checked
#: against a running cluster; the other types' figures are the release guide's table.
YARN_HEADROOM_MB = 512
#: The derived step timeout: this many times the estimated step time (the estimate is +-30 % and unmeasured on
#: EMR's vCPUs), and never under STEP_TIMEOUT_FLOOR_MIN.
STEP_TIMEOUT_FACTOR = 3.0
STEP_TIMEOUT_FLOOR_MIN = 30.0
#: `fruitpipe run`'s default --partition-size (images per Spark partition).
DEFAULT_PARTITION_IMAGES = 512
#: Requests counted at a proxy on a 20-image run with 2 and with 4 partitions (see s3_requests): each partition
#: costs 15 PUT/POST (staging writes of its embeddings, index and reduced parts, their copies in under hidden
#: names, then to their visible names once the record names them) and 22.5 GET/HEAD besides the images (the
#: executors' reads of the staged index and of the committed parts for the duplicate check and the accounting, the
#: PCA, and report.html's scatter; 23 priced); the rest is fixed (10 of the fixed PUT/POST: pca/spark_model/'s two
#: files, written to staging and copied into place; 2 record writes per commit: naming the parts, then marking
#: them visible). On a new OUTPUT nothing committed is compared; a re-run also stages its verdicts and rows to embed
#: (a few files). The commit record is one conditional PUT (boto3; pyarrow's writes are 3-request multipart
#: uploads), read with its ETag. Before the conditional record: 15, 23, 56, 36; before the bookkeeping moved to the
#: executors: 10, 15, 58, 36; before hidden commits: 13, 23, 54, 35, 36.
PUTS_PER_PART = 15
READS_PER_PART = 23
FIXED_PUTS = 48
FIXED_DRIVER_READS = 37
#: LIST pages that do not grow with the input: the output's folders (staging, record checks, publish), the staged
#: index the executors read back, the input's existence probes, and report.html's; 38 counted, with 1 of headroom.
FIXED_LISTS = 38

def step_timeout_minutes(settings: EmrSettings) -> int:
    """How long the step may run before `timeout` kills it (and ActionOnFailure the cluster): --step-timeout, else
    STEP_TIMEOUT_FACTOR x the estimated step time (JVM start, embedding, PCA), at least STEP_TIMEOUT_FLOOR_MIN."""
    if settings.step_timeout_min is not None:
        return math.ceil(settings.step_timeout_min)
    step_min = _work_minutes(settings) + FIXED_MINUTES["spark_start_and_pca"]
    return math.ceil(max(STEP_TIMEOUT_FLOOR_MIN, STEP_TIMEOUT_FACTOR * step_min))


def run_timeout_s(settings: EmrSettings) -> float:
    """`emr run`'s default wait before it terminates the cluster: provisioning, the step timeout, 15 minutes."""
    return 60.0 * (FIXED_MINUTES["provisioning_and_bootstrap"] + step_timeout_minutes(settings) + 15)


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


def _round_up(mb: int) -> int:
    return -(-mb // YARN_ALLOCATION_MB) * YARN_ALLOCATION_MB


def am_container_mb(notebook: bool = False) -> int:
    """What YARN grants the ApplicationMaster, rounded up to the allocation unit: the step's client-mode AM, or on a
    notebook cluster the Livy session's driver, which runs inside its AM."""
    if notebook:
        return _round_up(NOTEBOOK_DRIVER_MB + NOTEBOOK_DRIVER_OVERHEAD_MB)
    return _round_up(AM_MEMORY_MB + AM_OVERHEAD_MB)


def executor_conf(instance_type: str, notebook: bool = False) -> dict[str, str]:
    """One executor per core node, sized so that YARN can grant it on every node, the one that also holds the
    ApplicationMaster (a notebook's driver) included: all vCPUs as cores (one Python worker and one ONNX session
    each), memoryOverhead for those workers, and the JVM heap from what is left of the node's YARN memory after the
    AM's container and YARN_HEADROOM_MB. EMR's own spark-defaults (extraJavaOptions included) are kept: only these
    keys are set. (EMR's YARN schedules by memory alone, its default resource calculator: the AM's vcore does not
    compete.)"""
    kind = INSTANCE_TYPES[instance_type]
    overhead = JVM_OVERHEAD_MB + kind.vcpus * PYTHON_WORKER_MB
    room = kind.yarn_mb - am_container_mb(notebook) - YARN_HEADROOM_MB - overhead
    heap = room // YARN_ALLOCATION_MB * YARN_ALLOCATION_MB
    if heap < 1024:
        raise EmrError(f"{instance_type} gives YARN {kind.yarn_mb} MB: too little for {kind.vcpus} Python workers, "
                       f"a 1 GB executor heap and the {'notebook driver' if notebook else 'ApplicationMaster'}; "
                       "use a larger type")
    conf = {"spark.executor.cores": str(kind.vcpus), "spark.executor.memory": f"{heap}m",
            "spark.executor.memoryOverhead": f"{overhead}m",
            "spark.yarn.am.memory": f"{AM_MEMORY_MB}m", "spark.yarn.am.memoryOverhead": f"{AM_OVERHEAD_MB}m"}
    if notebook:
        conf |= {"spark.driver.memory": f"{NOTEBOOK_DRIVER_MB}m",
                 "spark.driver.memoryOverhead": f"{NOTEBOOK_DRIVER_OVERHEAD_MB}m"}
    return conf


def executors(settings: EmrSettings) -> dict[str, Any]:
    """How YARN places the run's containers: executors per core node (the node with the AM included) and in all."""
    kind = INSTANCE_TYPES[settings.core_type]
    notebook = settings.notebook_idle_min is not None
    conf = executor_conf(settings.core_type, notebook)
    container = _round_up(int(conf["spark.executor.memory"][:-1]) + int(conf["spark.executor.memoryOverhead"][:-1]))
    per_node = kind.yarn_mb // container
    with_am = (kind.yarn_mb - am_container_mb(notebook)) // container
    total = per_node * (settings.core_nodes - 1) + with_am
    return {"per_node": per_node, "on_the_node_with_the_application_master": with_am, "in_all": total,
            "cores_in_all": total * kind.vcpus, "executor_container_mb": container,
            "application_master_mb": am_container_mb(notebook), "yarn_mb_per_node": kind.yarn_mb}


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


def _embed_minutes(settings: EmrSettings) -> float:
    vcpus = executors(settings)["cores_in_all"]  # the cores YARN grants the executors
    return settings.images / (vcpus * settings.img_per_vcpu_s) / 60


def _work_minutes(settings: EmrSettings) -> float:
    """The step's variable part: listing INPUT on the driver, then embedding on the executors."""
    return listing_minutes(settings) + _embed_minutes(settings)


#: Seconds per LIST page of 1,000 keys on the driver: the top of the 30-100 ms a round trip to S3 takes in the
#: region (docs/performance.md, "S3 listing"); the listing runs before any image is embedded. 10^7 images are
#: 10,000 sequential pages: about 17 minutes flat. `--list-threads N` fans the listing out by class prefix,
#: counted here as N times faster (an assumption: unmeasured on S3).
LIST_PAGE_S = 0.1


def listing_minutes(settings: EmrSettings) -> float:
    """Minutes the driver spends listing INPUT before the embedding starts."""
    threads = max(1, run_options(settings.run_args).list_threads or 1)
    return math.ceil(settings.images / 1000) * LIST_PAGE_S / threads / 60


def s3_requests(settings: EmrSettings, slots: int | None = None) -> dict[str, int]:
    """The S3 requests of one run, by kind, as counted request by request at a proxy in front of a loopback S3
    (tests/test_emr.py::test_s3_requests_of_a_run_match_the_plan). One GET per image and no HEAD
    (storage.read_object). LIST pages: a fixed set (the output's folders, the input's probes) and one per 1,000
    input keys (the input is listed in one flat pass; --list-threads adds a page per folder). PUT/POST and
    other GET/HEAD: a fixed part (markers, records, PCA files, run.json), a part per Spark
    partition (pyarrow writes each file as a 3-request multipart upload and publishes by copy; the executors read
    back each staged index part and the committed parts' id and uri columns), and the lease's renewal every 30 s."""
    opts = run_options(settings.run_args)
    partition = opts.partition_size or DEFAULT_PARTITION_IMAGES
    slots = slots or settings.core_nodes * INSTANCE_TYPES[settings.core_type].vcpus
    parts = task_count(settings.images, partition, slots)  # the embed job's own split
    renewals = math.ceil(2 * (_work_minutes(settings) + FIXED_MINUTES["spark_start_and_pca"]))
    return {
        "get_images": settings.images,
        "head_images": 0,
        "list_pages": FIXED_LISTS + math.ceil(settings.images / 1000),
        "put": PUTS_PER_PART * parts + FIXED_PUTS + renewals,
        "get_head_driver": READS_PER_PART * parts + FIXED_DRIVER_READS + renewals,
    }


def estimate(settings: EmrSettings) -> dict[str, Any]:
    """Time and cost of the run from the measured per-vCPU throughput, the stated prices and the S3 requests."""
    nodes = 1 + settings.core_nodes
    vcpus = executors(settings)["cores_in_all"]  # the cores YARN grants the executors
    img_s = vcpus * settings.img_per_vcpu_s
    work_min = _work_minutes(settings)
    minutes = work_min + sum(FIXED_MINUTES.values())
    if settings.node_price is not None:
        master_h = core_h = settings.node_price
    else:
        master_h = sum(NODE_PRICES_EU_WEST_3[settings.master_type])
        core_h = sum(NODE_PRICES_EU_WEST_3[settings.core_type])
    hours = minutes / 60
    compute = hours * (master_h + settings.core_nodes * core_h)
    ebs = nodes * settings.ebs_gb * GP3_GB_MONTH * hours / 730
    requests = s3_requests(settings)
    s3_usd = ((requests["get_images"] + requests["head_images"] + requests["get_head_driver"]) / 1000
              * S3_GET_PER_1000 + (requests["list_pages"] + requests["put"]) / 1000 * S3_PUT_LIST_PER_1000)
    return {
        "images": settings.images,
        "core_vcpus": vcpus,
        "img_per_vcpu_s": settings.img_per_vcpu_s,
        "expected_img_s": round(img_s, 1),
        "listing_minutes": round(listing_minutes(settings), 1),
        "embed_minutes": round(_embed_minutes(settings), 1),
        "work_minutes": round(work_min, 1),
        "fixed_minutes": FIXED_MINUTES,
        "total_minutes": round(minutes, 1),
        "step_timeout_minutes": step_timeout_minutes(settings),
        "s3_requests": requests,
        "usd": {"nodes": round(compute, 3), "ebs": round(ebs, 4), "s3_requests": round(s3_usd, 4),
                "total": round(compute + ebs + s3_usd, 2)},
        "prices": {"region": "eu-west-3", "stated_on": PRICES_DATE,
                   "node_usd_per_hour": {"master": round(master_h, 4), "core": round(core_h, 4)},
                   "source": "--node-price" if settings.node_price is not None else
                   "AWS public on-demand price pages (EC2 + EMR fee), written down offline, not fetched live: "
                   "check them before quoting",
                   "gp3_usd_per_gb_month": GP3_GB_MONTH, "s3_get_head_usd_per_1000": S3_GET_PER_1000,
                   "s3_put_list_usd_per_1000": S3_PUT_LIST_PER_1000},
        "basis": THROUGHPUT_BASIS if settings.img_per_vcpu_s == MEASURED_IMG_PER_VCPU_S else "--img-per-vcpu-s",
        **({"notebook_cluster": {
            "usd_per_hour": round(master_h + settings.core_nodes * core_h, 3),
            "note": f"no step: the cluster bills until it has been idle for {settings.notebook_idle_min:g} min "
                    "(EMR auto-termination); the figures above are for one `fruitpipe run` of --images on it"}}
           if settings.notebook_idle_min is not None else {}),
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
    out_b, out_p = split_s3(settings.output_grant, "--output-root" if settings.output_root else "OUTPUT")
    art_b, art_p = split_s3(settings.artifacts_uri, "--artifacts")
    log_b, log_p = split_s3(settings.logs_uri, "--logs")
    for what, prefix in (("INPUT", in_p), ("OUTPUT", out_p), ("--artifacts", art_p), ("--logs", log_p)):
        if not prefix:
            raise EmrError(f"{what} needs a prefix (s3://bucket/prefix): the IAM policy grants that prefix only, "
                           "never a whole bucket")
    return {"input_bucket": in_b, "input_prefix": in_p, "output_bucket": out_b, "output_prefix": out_p,
            "artifacts_bucket": art_b, "artifacts_prefix": art_p, "logs_bucket": log_b, "logs_prefix": log_p,
            "account_id": account_id, "region": settings.region, "instance_role": settings.instance_role,
            "service_role": settings.service_role,
            "kms_key_arn": kms_key_arn}


def operator_key_statements(decrypt: list[str], write: list[str], region: str) -> list[dict[str, Any]]:
    """The operator's use of the buckets' own KMS keys, through S3 in the region only (kms:ViaService): Decrypt on
    the keys of OUTPUT's and the logs' buckets (run reads run.json, logs reads the logs) and of the artifacts'
    (a multipart upload reads its parts back), GenerateDataKey on the artifacts' (upload writes there)."""
    via = {"StringEquals": {"kms:ViaService": f"s3.{region}.amazonaws.com"}}
    out = []
    if decrypt:
        out.append({"Sid": "RunLogsAndUploadReadThroughTheBucketKeysViaS3Only", "Effect": "Allow",
                    "Action": "kms:Decrypt", "Resource": decrypt, "Condition": via})
    if write:
        out.append({"Sid": "UploadWritesThroughTheArtifactsBucketKeyViaS3Only", "Effect": "Allow",
                    "Action": "kms:GenerateDataKey", "Resource": write, "Condition": via})
    return out


def _operator_policy(settings: EmrSettings, checks: Preflight | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The operator policy with, when the buckets can be read, the KMS statements their customer keys need; and
    what was found about those keys."""
    policy = render_policy("operator", **policy_values(settings, "ACCOUNT_ID", "KMS_KEY_ARN"))
    if checks is None:
        return policy, {"checked": False, "why": "no AWS credentials found: with a customer KMS key as the default "
                        "of OUTPUT's, the logs' or the artifacts' bucket, the operator needs kms:Decrypt on it"}
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        decrypt = sorted(checks.bucket_keys(settings, (settings.output, settings.logs_uri, settings.artifacts_uri)))
        write = sorted(checks.bucket_keys(settings, (settings.artifacts_uri,)))
    except (EmrError, ClientError, BotoCoreError) as exc:
        return policy, {"checked": False, "why": str(exc).splitlines()[0][:200]}
    policy["Statement"] += operator_key_statements(decrypt, write, settings.region)
    return policy, {"checked": True, "customer_keys": decrypt}


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
