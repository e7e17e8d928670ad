"""`emr setup`: the account side, done once: KMS key, security configuration, least-privilege roles, hardened buckets
that are never weakened, and the GDPR check of where every bucket lives."""

from __future__ import annotations

import hashlib
import json
import logging
import urllib.parse
from typing import Any

from fruitpipe.cloud.iam import ensure_role, policy_values, render_policy
from fruitpipe.cloud.plan import security_configuration
from fruitpipe.cloud.preflight import Preflight, _code, _read_or_absent
from fruitpipe.cloud.settings import (
    EMR_MANAGED_POLICY,
    KMS_ALIAS,
    SECURITY_CONFIGURATION,
    EmrError,
    EmrSettings,
    split_s3,
)

log = logging.getLogger(__name__)


#: The service-linked role EMR creates for itself once per account (iam:CreateServiceLinkedRole).
EMR_CLEANUP_ROLE = "AWSServiceRoleForEMRCleanup"
#: IAM's limit on the inline policies of one role, all together (characters, whitespace not counted).
ROLE_INLINE_LIMIT = 10_240


def pair_policy_name(settings: EmrSettings) -> str:
    """The instance role's inline policy for one (INPUT, output grant) pair: named by their hash, so that a second
    setup for the same pair replaces it and one for another pair adds its own."""
    pair = f"{settings.input.rstrip('/')}|{settings.output_grant}"
    return f"fruitpipe-{hashlib.sha256(pair.encode()).hexdigest()[:12]}"


def _granted_prefixes(document: dict[str, Any]) -> tuple[set[str], set[str]]:
    """(s3://bucket/prefix the document lets list and read as input, ... lets write as output), from the statements
    fruitpipe's own policy names (ec2-instance-role.json)."""
    inputs, outputs = set(), set()
    for st in document.get("Statement", []):
        if st.get("Effect") != "Allow":
            continue
        resources = st.get("Resource", [])
        for res in [resources] if isinstance(resources, str) else resources:
            if not res.startswith("arn:aws:s3:::") or res.endswith("/*"):
                continue
            if st.get("Sid") == "ReadInputPrefixOnly":
                inputs.add("s3://" + res[len("arn:aws:s3:::"):])
            elif st.get("Sid") == "ReadWriteOutputPrefixOnly":
                outputs.add("s3://" + res[len("arn:aws:s3:::"):])
    return inputs, outputs


def bucket_key_statement(key_arns: list[str], region: str) -> dict[str, Any]:
    """The instance role's use of the buckets' own KMS keys: only through S3 in the region (kms:ViaService), only
    what SSE-KMS reads and writes need."""
    return {"Sid": "UseTheBucketKeysThroughS3Only", "Effect": "Allow",
            "Action": ["kms:Decrypt", "kms:GenerateDataKey"], "Resource": key_arns,
            "Condition": {"StringEquals": {"kms:ViaService": f"s3.{region}.amazonaws.com"}}}


def _granted_keys(document: dict[str, Any]) -> set[str]:
    keys: set[str] = set()
    for st in document.get("Statement", []):
        if st.get("Effect") == "Allow" and st.get("Sid") == "UseTheBucketKeysThroughS3Only":
            keys |= set([st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"])
    return keys


def _within(uri: str, prefixes: set[str]) -> bool:
    uri = uri.rstrip("/")
    return any(uri == p or uri.startswith(p + "/") for p in prefixes)


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
        except ClientError as exc:
            if _code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise EmrError(f"s3://{bucket}: HeadBucket was refused ({_code(exc)}): the identity running setup "
                               "needs s3:ListBucket on it; nothing was changed") from None
            log.info("creating bucket s3://%s in %s", bucket, self.region)
            self.s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": self.region})
            changed.append(f"s3://{bucket}: created in {self.region}")
        # Everything is read before anything is written: a setting that cannot be read is an error, never "not set"
        # (which would replace a bucket policy or a KMS default that is there).
        block = _read_or_absent(lambda: self.s3.get_public_access_block(Bucket=bucket)[
            "PublicAccessBlockConfiguration"], bucket, "s3:GetBucketPublicAccessBlock",
            "NoSuchPublicAccessBlockConfiguration") or {}
        encryption = _read_or_absent(lambda: self.s3.get_bucket_encryption(Bucket=bucket)[
            "ServerSideEncryptionConfiguration"], bucket, "s3:GetEncryptionConfiguration",
            "ServerSideEncryptionConfigurationNotFoundError")
        found = _read_or_absent(lambda: self.s3.get_bucket_policy(Bucket=bucket)["Policy"], bucket,
                                "s3:GetBucketPolicy", "NoSuchBucketPolicy")
        flags = ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets")
        off = [f for f in flags if not block.get(f)]
        if off:  # only ever turned on, never off
            self.s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration={f: True for f in flags})
            changed.append(f"s3://{bucket}: public access block turned on ({', '.join(off)})")
        rules = (encryption or {}).get("Rules", [])
        algorithms = {r.get("ApplyServerSideEncryptionByDefault", {}).get("SSEAlgorithm") for r in rules}
        if not algorithms & {"AES256", "aws:kms", "aws:kms:dsse"}:  # an existing default (SSE-KMS above all) stays
            self.s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": [
                {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}, "BucketKeyEnabled": True}]})
            changed.append(f"s3://{bucket}: default encryption SSE-S3 (AES256) set")
        deny_http = {"Sid": "DenyInsecureTransport", "Effect": "Deny", "Principal": "*", "Action": "s3:*",
                     "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
                     "Condition": {"Bool": {"aws:SecureTransport": "false"}}}
        policy: dict[str, Any] = json.loads(found) if found else {"Version": "2012-10-17", "Statement": []}
        if not any(s.get("Sid") == deny_http["Sid"] for s in policy["Statement"]):
            policy["Statement"].append(deny_http)  # merged: the bucket's other statements are kept
            self.s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
            changed.append(f"s3://{bucket}: bucket policy statement DenyInsecureTransport added")
        return changed

    def _ensure_cleanup_role(self, iam: Any) -> list[str]:
        """EMR's service-linked role (AWSServiceRoleForEMRCleanup), which an account that never ran EMR lacks: EMR
        uses it to clean up instances if the service role cannot. Created once (found by its path: the only role
        EMR links there); a second setup leaves it."""
        path = "/aws-service-role/elasticmapreduce.amazonaws.com/"
        if iam.list_roles(PathPrefix=path)["Roles"]:
            return []
        try:
            iam.create_service_linked_role(AWSServiceName="elasticmapreduce.amazonaws.com")
        except (iam.exceptions.InvalidInputException, iam.exceptions.EntityAlreadyExistsException) as exc:
            log.debug("EMR's service-linked role exists already: %s", exc)  # created meanwhile
            return []
        return [f"EMR's service-linked role {EMR_CLEANUP_ROLE} created (once per account)"]

    def _check_inline_room(self, iam: Any, role: str, name: str, document: str) -> None:
        """Refuse, before writing, a pair policy that would pass IAM's size limit on the role's inline policies."""
        used = 0
        for other in iam.list_role_policies(RoleName=role)["PolicyNames"]:
            if other != name:
                body = iam.get_role_policy(RoleName=role, PolicyName=other)["PolicyDocument"]
                text = urllib.parse.unquote(body) if isinstance(body, str) else json.dumps(body)
                used += len("".join(text.split()))
        if used + len(document) > ROLE_INLINE_LIMIT:
            raise EmrError(f"the role {role} has {used} characters of inline policies and this pair needs "
                           f"{len(document)} more, past IAM's {ROLE_INLINE_LIMIT}: grant a common prefix once with "
                           "--output-root, or delete a pair you no longer run (aws iam delete-role-policy "
                           f"--role-name {role} --policy-name fruitpipe-...)")

    def check_role_grants(self, settings: EmrSettings) -> None:
        """Before a billed launch: the instance role's policies (any of them) let it read INPUT and write OUTPUT;
        else one line naming the `setup` to run. When this identity may not read IAM, say so and go on."""
        from botocore.exceptions import BotoCoreError, ClientError

        iam = self.client("iam")
        inputs: set[str] = set()
        outputs: set[str] = set()
        keys: set[str] = set()
        try:
            for name in iam.list_role_policies(RoleName=settings.instance_role)["PolicyNames"]:
                body = iam.get_role_policy(RoleName=settings.instance_role, PolicyName=name)["PolicyDocument"]
                document = json.loads(body) if isinstance(body, str) else body
                found_in, found_out = _granted_prefixes(document)
                inputs |= found_in
                outputs |= found_out
                keys |= _granted_keys(document)
        except (ClientError, BotoCoreError) as exc:
            code = exc.response.get("Error", {}).get("Code", "") if isinstance(exc, ClientError) else type(exc).__name__
            if code == "NoSuchEntity":
                raise EmrError(f"the instance role {settings.instance_role} does not exist: run `fruitpipe emr setup "
                               f"{settings.input} {settings.output}` first") from None
            log.warning("could not check what the instance role %s may read and write (%s): iam:ListRolePolicies "
                        "and iam:GetRolePolicy on it let `up` check before launching (policies/operator.json)",
                        settings.instance_role, code)
            return
        missing = [what for what, uri, granted in (("read INPUT", settings.input, inputs),
                                                   ("write OUTPUT", settings.output, outputs))
                   if not _within(uri, granted)]
        self._warn_input_key(settings, keys)
        if missing:
            root = f" --output-root {settings.output_root}" if settings.output_root else ""
            raise EmrError(f"the instance role {settings.instance_role} may not {' or '.join(missing)} "
                           f"({settings.input} -> {settings.output}): run `fruitpipe emr setup {settings.input} "
                           f"{settings.output}{root}` (or with --output-root for a prefix above OUTPUT) before `up`")

    def _warn_input_key(self, settings: EmrSettings, granted: set[str]) -> None:
        """Warn when INPUT's first object is encrypted with a customer KMS key the instance role may not use: each
        such image would be rejected as unreadable."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = split_s3(settings.input, "INPUT")
        try:
            first = self.s3.list_objects_v2(Bucket=bucket, Prefix=prefix.rstrip("/") + "/", MaxKeys=1)
            if not first.get("Contents"):
                return
            head = self.s3.head_object(Bucket=bucket, Key=first["Contents"][0]["Key"])
            key = head.get("SSEKMSKeyId")
            if head.get("ServerSideEncryption", "").startswith("aws:kms") and key:
                arn = self.client("kms").describe_key(KeyId=key)["KeyMetadata"]
                if arn.get("KeyManager") == "CUSTOMER" and arn["Arn"] not in granted:
                    log.warning("INPUT's objects are encrypted with KMS key %s, which the instance role may not use: "
                                "every image would be rejected as unreadable; run `fruitpipe emr setup` again (it "
                                "grants the buckets' default keys) or grant kms:Decrypt on it", arn["Arn"])
        except (ClientError, BotoCoreError) as exc:  # the operator may not list INPUT (operator.json does not grant it)
            log.info("INPUT's encryption not checked (%s): s3:ListBucket and s3:GetObject on INPUT and "
                     "kms:DescribeKey let `up` warn of a KMS key the instance role cannot use",
                     str(exc).splitlines()[0][:120])

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
        # Only "not found" means absent: an AccessDenied (or a throttle) must not create a second key or
        # configuration beside the one that is there.
        try:
            key_arn = kms.describe_key(KeyId=KMS_ALIAS)["KeyMetadata"]["Arn"]
        except ClientError as exc:
            if _code(exc) != "NotFoundException":
                raise EmrError(f"reading KMS key {KMS_ALIAS} was refused ({_code(exc)}): the identity running setup "
                               "needs kms:DescribeKey on it; nothing was created") from None
            key_arn = kms.create_key(Description="fruitpipe EMR: EBS and local disk encryption",
                                     Tags=[{"TagKey": "project", "TagValue": "fruitpipe"}])["KeyMetadata"]["Arn"]
            kms.create_alias(AliasName=KMS_ALIAS, TargetKeyId=key_arn)
        if not kms.get_key_rotation_status(KeyId=key_arn).get("KeyRotationEnabled"):
            kms.enable_key_rotation(KeyId=key_arn)  # yearly rotation of the disk key
        wanted = security_configuration(key_arn)
        try:
            have = json.loads(self.emr.describe_security_configuration(
                Name=SECURITY_CONFIGURATION)["SecurityConfiguration"])
        except ClientError as exc:
            absent = _code(exc) == "InvalidRequestException" and "does not exist" in str(exc)
            if not absent:
                raise EmrError(f"reading the security configuration {SECURITY_CONFIGURATION} was refused "
                               f"({_code(exc)}): the identity running setup needs "
                               "elasticmapreduce:DescribeSecurityConfiguration; nothing was created") from None
            self.emr.create_security_configuration(Name=SECURITY_CONFIGURATION,
                                                   SecurityConfiguration=json.dumps(wanted))
        else:
            if have != wanted:  # security configurations are immutable; clusters keep the one they started with
                raise EmrError(f"security configuration {SECURITY_CONFIGURATION} exists with other settings: "
                               "delete it (aws emr delete-security-configuration) and run setup again")
        values = policy_values(settings, account, key_arn)
        bucket_keys = self.bucket_keys(settings)
        iam = self.client("iam")
        roles = ((settings.service_role, "emr-service-trust", "emr-service-role"),
                 (settings.instance_role, "ec2-trust", "ec2-instance-role"))
        for role, trust, inline in roles:
            ensure_role(iam, role, render_policy(trust, **values), {"project": "fruitpipe"})
            # The instance role gets one policy per (INPUT, output grant) pair, added beside the others: a setup for
            # run B never revokes run A's access mid-run. The service role's one policy is the same for every run.
            name = pair_policy_name(settings) if role == settings.instance_role else "fruitpipe"
            rendered = render_policy(inline, **values)
            if role == settings.instance_role and bucket_keys:
                rendered["Statement"].append(bucket_key_statement(sorted(bucket_keys), self.region))
            document = json.dumps(rendered, separators=(",", ":"))
            if role == settings.instance_role:
                self._check_inline_room(iam, role, name, document)
            iam.put_role_policy(RoleName=role, PolicyName=name, PolicyDocument=document)
        iam.attach_role_policy(RoleName=settings.service_role, PolicyArn=EMR_MANAGED_POLICY)
        linked = self._ensure_cleanup_role(iam)
        try:
            iam.create_instance_profile(InstanceProfileName=settings.instance_role)
        except iam.exceptions.EntityAlreadyExistsException:
            pass
        profile = iam.get_instance_profile(InstanceProfileName=settings.instance_role)["InstanceProfile"]
        if not any(r["RoleName"] == settings.instance_role for r in profile["Roles"]):
            iam.add_role_to_instance_profile(InstanceProfileName=settings.instance_role,
                                             RoleName=settings.instance_role)
        changed: list[str] = linked + self.tag_network(self.network(settings))
        for bucket in dict.fromkeys(split_s3(uri, "URI")[0] for uri in (settings.artifacts_uri, settings.logs_uri)):
            changed += self.ensure_bucket(bucket)
        self.check_data_regions(settings)
        return {"account": account, "kms_key": key_arn, "service_role": settings.service_role,
                "instance_profile": settings.instance_role, "security_configuration": SECURITY_CONFIGURATION,
                "changed": changed or ["nothing: the network and every bucket setting were already as needed"]}
