"""AWS EMR launcher (boto3): artifacts upload, `up` and `run`; account setup is account.py, a started cluster
watch.py, the request plan.py, sizing and cost sizing.py and cost.py, the policies iam.py, the settings settings.py."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import tarfile
import tempfile
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from fruitpipe.cloud.account import AccountSetup, pair_policy_name
from fruitpipe.cloud.artifacts import (
    WHEELHOUSE_TAR,
    _version,
    artifact_uris,
    build_wheel,
    build_wheelhouse,
    node_requirements,
    runtime_requirements,
    wheel_code_sha256,
    wheel_name,
)
from fruitpipe.cloud.cost import estimate, run_timeout_s, step_timeout_minutes
from fruitpipe.cloud.iam import policy_values, render_policy
from fruitpipe.cloud.plan import NOTEBOOK_MODEL_ENV, job_flow_request, plan, step_args
from fruitpipe.cloud.settings import (
    DEFAULT_REGION,
    DEFAULT_RELEASE,
    EMR_MANAGED_POLICY,
    EMR_MANAGED_TAG,
    FIXED_MINUTES,
    KMS_ALIAS,
    MEASURED_IMG_PER_VCPU_S,
    NODE_PRICES_EU_WEST_3,
    PRICES_DATE,
    SECURITY_CONFIGURATION,
    SUBMIT_SCRIPT,
    EmrError,
    EmrSettings,
    split_s3,
)
from fruitpipe.cloud.studio import Studio
from fruitpipe.cloud.watch import CLUSTER_DONE, ClusterWatch, signals_deferred, signals_ignored, signals_interrupt
from fruitpipe.models import get_spec, resolve_model
from fruitpipe.version import code_sha256

#: The names `fruitpipe.cloud.emr` has always offered (the CLI and the tests use them), from their new homes.
__all__ = [
    "Emr",
    "DEFAULT_REGION",
    "DEFAULT_RELEASE",
    "EMR_MANAGED_POLICY",
    "EMR_MANAGED_TAG",
    "EmrError",
    "EmrSettings",
    "KMS_ALIAS",
    "MEASURED_IMG_PER_VCPU_S",
    "NODE_PRICES_EU_WEST_3",
    "PRICES_DATE",
    "SECURITY_CONFIGURATION",
    "SUBMIT_SCRIPT",
    "_version",
    "artifact_uris",
    "build_wheel",
    "estimate",
    "job_flow_request",
    "pair_policy_name",
    "plan",
    "policy_values",
    "render_policy",
    "run_timeout_s",
    "runtime_requirements",
    "split_s3",
    "step_args",
    "step_timeout_minutes",
    "wheel_name",
]

log = logging.getLogger(__name__)


#: RunJobFlow is tried this many times, this many seconds apart, while IAM propagates new roles (about a minute).
RUN_JOB_FLOW_TRIES = 12
RUN_JOB_FLOW_WAIT_S = 5.0
#: EMR's answers while a role or instance profile `setup` just made has not propagated.
_IAM_NOT_YET = re.compile(r"Invalid InstanceProfile|instance profile|[Ss]ervice ?[Rr]ole|JobFlowRole|role .* "
                          r"(does not exist|is invalid|cannot be assumed)")


class Emr(AccountSetup, ClusterWatch):
    """boto3 clients for one region; endpoints come from the standard AWS settings (AWS_ENDPOINT_URL, profiles)."""

    #: How `up` waits between RunJobFlow tries (replaced by the tests, which count the tries instead).
    sleep: Callable[[float], None] = staticmethod(time.sleep)

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
        """Another boto3 client of the same session (iam, sts, kms, ec2, service-quotas)."""
        return self._session.client(name)

    def has_credentials(self) -> bool:
        """True when the standard chain finds credentials (so read-only checks can run in `emr plan`)."""
        return self._session.get_credentials() is not None

    # -- S3 -----------------------------------------------------------------------------------------------
    def _exists(self, uri: str) -> bool:
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri, "URI")
        try:
            self.s3.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError:
            return False

    # No ServerSideEncryption header: the bucket's default applies (SSE-S3 as `setup` sets it, or the customer KMS
    # key a team set), where an explicit AES256 silently downgraded a KMS bucket and was refused by the common
    # "deny unless aws:kms" bucket policy.
    def _put(self, uri: str, body: bytes) -> None:
        bucket, key = split_s3(uri, "URI")
        self.s3.put_object(Bucket=bucket, Key=key, Body=body)
        log.info("uploaded %s (%d bytes)", uri, len(body))

    def _put_file(self, uri: str, path: Path) -> None:
        bucket, key = split_s3(uri, "URI")
        self.s3.upload_file(str(path), bucket, key)  # multipart
        log.info("uploaded %s (%d bytes)", uri, path.stat().st_size)


    # -- setup and upload ----------------------------------------------------------------------------------
    def upload(self, settings: EmrSettings, wheel: str | None = None,
               wheelhouse_from: str | None = None) -> dict[str, str]:
        """Put the wheel, the bootstrap script, the nodes' wheelhouse and the model in S3; the wheelhouse and the
        model only if not there yet (they are keyed by content)."""
        from botocore.exceptions import ClientError

        settings.validate()
        uris = artifact_uris(settings)
        bucket = split_s3(uris["wheel"], "URI")[0]
        try:  # GetBucketLocation, not HeadBucket: the operator's s3:ListBucket is prefix-scoped (operator.json)
            self.s3.get_bucket_location(Bucket=bucket)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchBucket", "404"):
                raise EmrError(f"bucket {bucket} does not exist: run `fruitpipe emr setup` first (it creates and "
                               "hardens it)") from None
            raise EmrError(f"bucket {bucket} cannot be read ({code}): the identity running upload needs "
                           "s3:GetBucketLocation on it (policies/operator.json)") from None
        if self._exists(uris["wheel"]):  # keyed by the code's digest, written after the bootstrap
            log.info("this code is already in S3: %s", uris["prefix"])
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(wheel) if wheel else build_wheel(Path(tmp))
                if path.name != wheel_name():
                    raise EmrError(f"--wheel {path} is not {wheel_name()}: build this version's wheel")
                held = wheel_code_sha256(path)
                if held != code_sha256():
                    raise EmrError(f"{'--wheel ' + str(path) if wheel else 'the wheel built from this checkout'} "
                                   f"holds other code (sha256 {held[:16]}) than the fruitpipe running this command "
                                   f"({code_sha256()[:16]}), whose key the cluster would be given: "
                                   + ("build this checkout's wheel (omit --wheel)" if wheel else
                                      "reinstall this checkout (pip install -e .) and retry"))
                self._put(uris["bootstrap"], resources.files("fruitpipe.cloud").joinpath(
                    "bootstrap.sh").read_bytes())
                self._put(uris["wheel"], path.read_bytes())
        if self._exists(uris["requirements"]):  # written last: present means complete
            log.info("wheelhouse already in S3: %s", uris["wheelhouse"])
        else:
            requirements = node_requirements(settings)
            with tempfile.TemporaryDirectory() as tmp:
                wheels = build_wheelhouse(requirements, Path(tmp) / "wheelhouse", wheelhouse_from)
                # One tar, read with one GET: the instance role may read the artifacts prefix, not list it.
                archive = Path(tmp) / WHEELHOUSE_TAR
                with tarfile.open(archive, "w") as tar:
                    for whl in wheels:
                        tar.add(whl, arcname=whl.name)
                self._put_file(f"{uris['wheelhouse']}/{WHEELHOUSE_TAR}", archive)
            self._put(uris["requirements"], ("\n".join(requirements) + "\n").encode())
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
    def up(self, settings: EmrSettings, started: Callable[[str], None] | None = None) -> dict[str, Any]:
        """Start the cluster with its step; refuses if the artifacts are missing. `started(cluster_id)` is called
        as soon as EMR has accepted the request, so a caller can terminate the cluster whatever happens next."""
        settings.validate()
        self.check_data_regions(settings)  # before any billed resource starts
        uris = artifact_uris(settings)
        missing = [k for k in ("wheel", "bootstrap", "requirements", "model") if not self._exists(uris[k])]
        if missing:
            raise EmrError(f"missing in S3: {', '.join(uris[k] for k in missing)}; run `fruitpipe emr upload` first")
        self.check_role_grants(settings)
        from botocore.exceptions import ClientError

        try:
            subnet: str | None = self.check_network(settings).subnet_id  # refused by the policy only at launch
        except ClientError as exc:  # e.g. no ec2:Describe* for this identity: EMR still decides
            subnet = None
            log.warning("network not checked (%s): if the launch fails, check the subnet's and VPC's tag %s=true",
                        exc.response.get("Error", {}).get("Code", exc), EMR_MANAGED_TAG)
        if settings.notebook_idle_min is not None:
            Studio(self).check_subnet(subnet or settings.subnet_id)  # Workspaces reach only the Studio's subnets
        quota = self.quota(settings)
        if quota.get("checked") and not quota["ok"]:
            if not settings.ignore_quota:
                raise EmrError(f"vCPU quota: {quota['advice']}; nothing was started (--ignore-quota launches "
                               "anyway, e.g. when an instance counted here is about to stop)")
            log.warning("vCPU quota (ignored): %s", quota["advice"])
        elif not quota.get("checked"):
            log.warning("vCPU quota not checked: %s", quota["why"])
        request = job_flow_request(settings, subnet)
        # A signal during RunJobFlow once raised inside botocore: the cluster existed and its id was never known, so
        # nothing terminated it. Deferred, it is raised once the id is recorded (after IAM's retries: at most a
        # minute), and run()'s handler terminates the cluster.
        with signals_deferred():
            cluster_id = self._run_job_flow(request)
            if started is not None:
                started(cluster_id)
        steps = self.emr.list_steps(ClusterId=cluster_id)["Steps"]
        log.info("cluster %s starting in %s", cluster_id, self.region)
        answer: dict[str, Any] = {"cluster_id": cluster_id, "step_id": steps[0]["Id"] if steps else ""}
        if settings.notebook_idle_min is not None:
            answer["notebook"] = {
                NOTEBOOK_MODEL_ENV: uris["model"],
                "note": f"set on the cluster (spark.yarn.appMasterEnv.{NOTEBOOK_MODEL_ENV}): examples/fruitpipe.ipynb "
                        "reads the model from S3, not from the internet; attach a Workspace of an EMR Studio in "
                        "this cluster's subnet (`fruitpipe emr studio --create`)"}
        return answer

    def _run_job_flow(self, request: dict[str, Any]) -> str:
        """RunJobFlow, tried again for about a minute while EMR answers that a role or instance profile is invalid:
        IAM takes seconds to propagate what `setup` just made (a first `setup` then `run` failed at once). Any
        other refusal, and the last one, go to the caller."""
        from botocore.exceptions import ClientError

        for attempt in range(RUN_JOB_FLOW_TRIES):
            try:
                return str(self.emr.run_job_flow(**request)["JobFlowId"])
            except ClientError as exc:
                error = exc.response.get("Error", {})
                propagating = (error.get("Code") == "ValidationException"
                               and _IAM_NOT_YET.search(str(error.get("Message", ""))))
                if not propagating:
                    raise
                if attempt + 1 == RUN_JOB_FLOW_TRIES:
                    raise EmrError(f"EMR still refuses the roles after {RUN_JOB_FLOW_TRIES * RUN_JOB_FLOW_WAIT_S:.0f} "
                                   f"s ({error.get('Message', '')}): check that `fruitpipe emr setup` ran in this "
                                   f"account and region with the same --service-role/--instance-role; nothing "
                                   "was started") from None
                log.info("EMR does not see the roles yet (%s): IAM is propagating; trying again in %.0f s",
                         error.get("Message", ""), RUN_JOB_FLOW_WAIT_S)
                self.sleep(RUN_JOB_FLOW_WAIT_S)
        raise AssertionError("unreachable")


    def _terminate(self, cluster_id: str, settings: EmrSettings, started_at: float) -> EmrError | None:
        """Terminate a cluster `run` started, deaf to a second Ctrl-C, SIGTERM or SIGHUP meanwhile. When AWS refuses
        (credentials expired during a long wait: SSO sessions last an hour), the error says the cluster still runs,
        when it ends by itself and the command that stops it sooner; None once terminated."""
        log.warning("terminating cluster %s", cluster_id)
        with signals_ignored():
            try:
                self.down(cluster_id)
                return None
            except Exception as exc:
                step_min = step_timeout_minutes(settings)
                ends = dt.datetime.fromtimestamp(started_at + 60 * (FIXED_MINUTES["provisioning_and_bootstrap"]
                                                                    + step_min + 2), dt.UTC)
                why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                return EmrError(f"cluster {cluster_id} could not be terminated ({why}) and is still running: its "
                                f"step is killed {step_min} minutes after it starts (about {ends:%H:%M} UTC) and the "
                                "cluster then ends by itself; stop it sooner with `fruitpipe emr down "
                                f"{cluster_id} --region {self.region}` once AWS accepts your credentials again")


    def run(self, settings: EmrSettings, timeout_s: float, poll_s: float = 30.0, wheel: str | None = None,
            report: Callable[[str], None] | None = None, wheelhouse_from: str | None = None) -> dict[str, Any]:
        """upload + up + wait + fetch run.json + down; the cluster is terminated whatever happens."""
        self.upload(settings, wheel, wheelhouse_from)
        ids: list[str] = []
        started_at = time.time()
        with signals_interrupt():  # SIGTERM and SIGHUP too, so a killed session never leaves a cluster billing
            try:
                self.up(settings, started=ids.append)
                st = self.wait(ids[0], timeout_s, poll_s, report, terminate_on_timeout=True)
            except BaseException as exc:
                for cluster_id in ids:  # started, even if the interruption came before up() returned
                    failed = self._terminate(cluster_id, settings, started_at)
                    if failed is not None:
                        raise failed from exc
                raise
        cluster_id = ids[0]
        if st["state"] not in CLUSTER_DONE:
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
                           + (f": {step['message']}" if step.get("message") else "")
                           + (f", log {step['log_file']}" if step.get("log_file") else "")
                           + f"; _SUCCESS {'present' if success else 'missing'}): read "
                           f"`fruitpipe emr logs {cluster_id}`; re-running resumes where it stopped")
        report_json = json.loads(run_json)
        return {"cluster_id": cluster_id, "step_state": step["state"], "run": report_json}

