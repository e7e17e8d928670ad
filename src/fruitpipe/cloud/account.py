"""`emr setup`: the account side, done once: KMS key, security configuration, least-privilege roles, hardened buckets
that are never weakened, and the GDPR check of where every bucket lives."""

from __future__ import annotations

import json
import logging
from typing import Any

from fruitpipe.cloud.plan import policy_values, render_policy, security_configuration
from fruitpipe.cloud.preflight import Preflight
from fruitpipe.cloud.settings import (
    EMR_MANAGED_POLICY,
    KMS_ALIAS,
    SECURITY_CONFIGURATION,
    EmrError,
    EmrSettings,
    split_s3,
)

log = logging.getLogger(__name__)


class AccountSetup(Preflight):
    """The setup half of the EMR client: needs `region`, `s3`, `emr` and `client(name)` from its subclass."""

    s3: Any
    emr: Any

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
        changed: list[str] = self.tag_network(self.network(settings))
        for bucket in dict.fromkeys(split_s3(uri, "URI")[0] for uri in (settings.artifacts_uri, settings.logs_uri)):
            changed += self.ensure_bucket(bucket)
        self.check_data_regions(settings)
        return {"account": account, "kms_key": key_arn, "service_role": settings.service_role,
                "instance_profile": settings.instance_role, "security_configuration": SECURITY_CONFIGURATION,
                "changed": changed or ["nothing: the network and every bucket setting were already as needed"]}
