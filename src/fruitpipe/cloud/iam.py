"""The shipped IAM policies filled in for one run, and the operator's use of the buckets' own KMS keys."""

from __future__ import annotations

import json
import string
from importlib import resources
from typing import TYPE_CHECKING, Any

from fruitpipe.cloud.settings import EmrError, EmrSettings, split_s3

if TYPE_CHECKING:
    from fruitpipe.cloud.preflight import Preflight

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


def ensure_role(iam: Any, name: str, trust: dict[str, Any], tags: dict[str, str]) -> bool:
    """Role `name` with the trust policy `trust`: created (with `tags`) when missing, else its trust policy set to
    `trust`, so a re-run repairs an edited one. True when it was created."""
    try:
        iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust),
                        Tags=[{"Key": k, "Value": v} for k, v in tags.items()])
        return True
    except iam.exceptions.EntityAlreadyExistsException:
        iam.update_assume_role_policy(RoleName=name, PolicyDocument=json.dumps(trust))
        return False
