"""The time and cost model of an EMR run: the step timeout, the listing and embedding minutes, the S3 requests
counted request by request, and the estimate in USD from the stated prices."""

from __future__ import annotations

import math
from typing import Any

from fruitpipe.cloud.artifacts import run_options
from fruitpipe.cloud.settings import (
    FIXED_MINUTES,
    GP3_GB_MONTH,
    INSTANCE_TYPES,
    MEASURED_IMG_PER_VCPU_S,
    NODE_PRICES_EU_WEST_3,
    PRICES_DATE,
    PRICES_REGION,
    S3_GET_PER_1000,
    S3_PUT_LIST_PER_1000,
    THROUGHPUT_BASIS,
    EmrSettings,
)
from fruitpipe.cloud.sizing import executors
from fruitpipe.config import task_count
from fruitpipe.lease import TTL_S

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
#: uploads), read with its ETag. The lease's heartbeats are counted apart (lease_renewals): on 2026-12-07, 81 and
#: 111 PUT/POST, 88 and 134 GET/HEAD without them. Before they were counted apart the fixed parts were 48 and 37, and
#: the 2-minute step's 5 heartbeats hid 3 PUTs and 5 reads: a test run of over 30 s (one heartbeat) read once more
#: than priced.
#: Before the conditional record: 15, 23, 56, 36; before the bookkeeping moved to the executors: 10, 15, 58, 36;
#: before hidden commits: 13, 23, 54, 35, 36.
PUTS_PER_PART = 15
READS_PER_PART = 23
FIXED_PUTS = 51
FIXED_DRIVER_READS = 42
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
    renewals = lease_renewals(settings)
    return {
        "get_images": settings.images,
        "head_images": 0,
        "list_pages": FIXED_LISTS + math.ceil(settings.images / 1000),
        "put": PUTS_PER_PART * parts + FIXED_PUTS + renewals,
        "get_head_driver": READS_PER_PART * parts + FIXED_DRIVER_READS + renewals,
    }


def lease_renewals(settings: EmrSettings) -> int:
    """The lease's heartbeats during the estimated step (lease.hold renews every TTL / 4, one GET and one PUT each):
    the only requests that grow with the step's time rather than with its images."""
    step_s = 60 * (_work_minutes(settings) + FIXED_MINUTES["spark_start_and_pca"])
    return math.ceil(step_s / (TTL_S / 4))


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
        "prices": {"region": PRICES_REGION, "stated_on": PRICES_DATE,
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
