"""Executor sizing for EMR: one executor per core node that YARN can grant beside the ApplicationMaster (or a
notebook's driver), from the memory EMR gives YARN on each instance type."""

from __future__ import annotations

from typing import Any

from fruitpipe.cloud.settings import INSTANCE_TYPES, EmrError, EmrSettings

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
