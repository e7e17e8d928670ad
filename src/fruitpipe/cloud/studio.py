"""`emr studio`: the EMR Studio (IAM auth mode) the notebook clusters are used from: its service and user roles,
the Workspace and engine security groups in the cluster's VPC, and the Studio; planned first, created on
`--create` (idempotent), removed on `--down`."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from fruitpipe.cloud.iam import ensure_role, policy_values, render_policy
from fruitpipe.cloud.preflight import _code
from fruitpipe.cloud.settings import EMR_MANAGED_TAG, EmrError, EmrSettings, split_s3

if TYPE_CHECKING:
    from fruitpipe.cloud.account import AccountSetup

log = logging.getLogger(__name__)

STUDIO_NAME = "fruitpipe"
STUDIO_SERVICE_ROLE = "fruitpipe-studio-service"
STUDIO_USER_ROLE = "fruitpipe-studio-user"
WORKSPACE_GROUP = "fruitpipe-studio-workspace"
ENGINE_GROUP = "fruitpipe-studio-engine"
#: The port of the cluster's Jupyter Enterprise Gateway, which the Workspaces reach through the engine group.
ENGINE_PORT = 18888
#: Tags of everything `emr studio` makes: the project, and the tag AWS's managed EMR policies require.
STUDIO_TAGS = {"project": "fruitpipe", EMR_MANAGED_TAG: "true"}
_ALL_EGRESS = {"IpProtocol": "-1", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}


def studio_location(settings: EmrSettings) -> str:
    """The Studio's DefaultS3Location: under the artifacts prefix, in the hardened bucket of the run's region."""
    return f"{settings.artifacts_uri}/studio"


def group_rules(workspace: str, engine: str) -> dict[str, list[dict[str, Any]]]:
    """The rules AWS documents for EMR Studio: the Workspace group may reach the engine group on 18888 and HTTPS
    (Git, AWS endpoints) out; the engine group accepts 18888 from the Workspace group only. Nothing else."""
    to_engine = {"IpProtocol": "tcp", "FromPort": ENGINE_PORT, "ToPort": ENGINE_PORT,
                 "UserIdGroupPairs": [{"GroupId": engine}]}
    https = {"IpProtocol": "tcp", "FromPort": 443, "ToPort": 443, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    from_workspace = {"IpProtocol": "tcp", "FromPort": ENGINE_PORT, "ToPort": ENGINE_PORT,
                      "UserIdGroupPairs": [{"GroupId": workspace}]}
    return {"workspace_egress": [to_engine, https], "engine_ingress": [from_workspace]}


def studio_request(settings: EmrSettings, account: str, vpc_id: str, subnet_id: str, workspace: str,
                   engine: str) -> dict[str, Any]:
    """The exact keyword arguments of emr.create_studio."""
    return {"Name": STUDIO_NAME, "Description": "fruitpipe notebooks (examples/fruitpipe.ipynb) on clusters from "
                                                "`fruitpipe emr up --notebook-idle`",
            "AuthMode": "IAM", "VpcId": vpc_id, "SubnetIds": [subnet_id],
            "ServiceRole": f"arn:aws:iam::{account}:role/{STUDIO_SERVICE_ROLE}",
            "WorkspaceSecurityGroupId": workspace, "EngineSecurityGroupId": engine,
            "DefaultS3Location": studio_location(settings) + "/",
            "Tags": [{"Key": k, "Value": v} for k, v in STUDIO_TAGS.items()]}


def _roles(settings: EmrSettings, account: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, trust policy, inline policy) of the Studio's two roles."""
    values = policy_values(settings, account, "KMS_KEY_ARN")
    return [(STUDIO_SERVICE_ROLE, render_policy("emr-service-trust", **values),
             render_policy("studio-service-role", **values)),
            (STUDIO_USER_ROLE, render_policy("studio-user-trust", **values),
             render_policy("studio-user-role", **values))]


class Studio:
    """EMR Studio for one account and region, through the EMR client's boto3 session."""

    def __init__(self, aws: AccountSetup) -> None:
        self.aws = aws
        self.emr = aws.emr

    def find(self) -> dict[str, Any] | None:
        """The Studio named fruitpipe (DescribeStudio's answer), or None."""
        pages = self.emr.get_paginator("list_studios").paginate()
        for page in pages:
            for summary in page.get("Studios", []):
                if summary.get("Name") == STUDIO_NAME:
                    return dict(self.emr.describe_studio(StudioId=summary["StudioId"])["Studio"])
        return None

    def _group(self, ec2: Any, vpc_id: str, name: str) -> str | None:
        found = ec2.describe_security_groups(Filters=[{"Name": "vpc-id", "Values": [vpc_id]},
                                                      {"Name": "group-name", "Values": [name]}])["SecurityGroups"]
        return found[0]["GroupId"] if found else None

    def plan(self, settings: EmrSettings, read: bool = True) -> dict[str, Any]:
        """What `--create` makes, with placeholders for what does not exist yet; read-only. With `read` False (no
        credentials) nothing is read: the network and the account are placeholders too."""
        settings.validate()
        account = "ACCOUNT_ID"
        vpc_id, subnet_id = "<the cluster's VPC>", settings.subnet_id or "<a default subnet of the default VPC>"
        workspace, engine, existing = f"<{WORKSPACE_GROUP}>", f"<{ENGINE_GROUP}>", None
        if read:
            net = self.aws.network(settings)
            vpc_id, subnet_id = net.vpc_id, net.subnet_id
            ec2 = self.aws.client("ec2")
            workspace = self._group(ec2, net.vpc_id, WORKSPACE_GROUP) or workspace
            engine = self._group(ec2, net.vpc_id, ENGINE_GROUP) or engine
            existing = (self.find() or {}).get("StudioId")
        return {"studio": studio_request(settings, account, vpc_id, subnet_id, workspace, engine),
                "existing": existing,
                "security_groups": {WORKSPACE_GROUP: workspace, ENGINE_GROUP: engine,
                                    **group_rules(workspace, engine), "tags": STUDIO_TAGS},
                "roles": {name: {"trust": trust, "policy": policy} for name, trust, policy in
                          _roles(settings, account)},
                "subnet_for_notebook_clusters": subnet_id,
                "then": "`fruitpipe emr studio ... --create` makes what is missing (idempotent); `--down` removes it"}

    def create(self, settings: EmrSettings) -> dict[str, Any]:
        """Create what is missing (roles, groups, the Studio); a second call changes nothing. Returns the Studio's
        URL and what a user needs to attach a Workspace."""
        settings.validate()
        self.aws.check_data_regions(settings, buckets_may_be_missing=True)
        account = self.aws.client("sts").get_caller_identity()["Account"]
        net = self.aws.network(settings)
        if net.untagged:
            raise EmrError(f"{', '.join(net.untagged)} lack the tag {EMR_MANAGED_TAG}=true, which the Studio's "
                           "service role needs: run `fruitpipe emr setup` with the same flags first")
        changed = self.aws.ensure_bucket(split_s3(settings.artifacts_uri, "--artifacts")[0])
        changed += self._ensure_roles(settings, account)
        ec2 = self.aws.client("ec2")
        groups: dict[str, str] = {}
        for name in (WORKSPACE_GROUP, ENGINE_GROUP):
            gid = self._group(ec2, net.vpc_id, name)
            if gid is None:
                gid = ec2.create_security_group(
                    GroupName=name, VpcId=net.vpc_id, Description=f"fruitpipe EMR Studio: {name.split('-')[-1]}",
                    TagSpecifications=[{"ResourceType": "security-group", "Tags": [
                        {"Key": k, "Value": v} for k, v in STUDIO_TAGS.items()]}])["GroupId"]
                ec2.revoke_security_group_egress(GroupId=gid, IpPermissions=[_ALL_EGRESS])  # only what is needed
                changed.append(f"security group {name} {gid} created in {net.vpc_id}")
            groups[name] = gid
        rules = group_rules(groups[WORKSPACE_GROUP], groups[ENGINE_GROUP])
        for rule in rules["workspace_egress"]:
            changed += self._authorize(ec2.authorize_security_group_egress, groups[WORKSPACE_GROUP], rule)
        for rule in rules["engine_ingress"]:
            changed += self._authorize(ec2.authorize_security_group_ingress, groups[ENGINE_GROUP], rule)
        request = studio_request(settings, account, net.vpc_id, net.subnet_id, groups[WORKSPACE_GROUP],
                                 groups[ENGINE_GROUP])
        studio = self.find()
        if studio is None:
            studio_id = self.emr.create_studio(**request)["StudioId"]
            studio = dict(self.emr.describe_studio(StudioId=studio_id)["Studio"])
            changed.append(f"EMR Studio {STUDIO_NAME} {studio_id} created (IAM auth mode)")
        elif studio.get("VpcId") != net.vpc_id:
            raise EmrError(f"the EMR Studio {STUDIO_NAME} ({studio['StudioId']}) is in {studio.get('VpcId')}, not in "
                           f"the cluster's VPC {net.vpc_id}: remove it with `fruitpipe emr studio --down` and the "
                           "flags it was made with, or pass --subnet-id of its VPC")
        return {"studio_id": studio["StudioId"], "url": studio.get("Url", ""),
                "subnets": studio.get("SubnetIds", []), "default_s3_location": request["DefaultS3Location"],
                "changed": changed or ["nothing: the Studio, its roles and its security groups were already there"],
                "for_users": (f"assume the role {STUDIO_USER_ROLE} (or attach its policy to your identity), open "
                              f"{studio.get('Url', 'the Studio URL')}, create a Workspace and attach it to a cluster "
                              "started by `fruitpipe emr up INPUT OUTPUT --notebook-idle 60` with the same "
                              f"--subnet-id ({net.subnet_id}); open examples/fruitpipe.ipynb with the PySpark "
                              "kernel")}

    @staticmethod
    def _authorize(call: Any, group: str, rule: dict[str, Any]) -> list[str]:
        from botocore.exceptions import ClientError

        try:
            call(GroupId=group, IpPermissions=[rule])
        except ClientError as exc:
            if _code(exc) == "InvalidPermission.Duplicate":
                return []
            raise
        return [f"{group}: rule tcp {rule['FromPort']} added"]

    def _ensure_roles(self, settings: EmrSettings, account: str) -> list[str]:
        iam = self.aws.client("iam")
        changed = []
        for name, trust, policy in _roles(settings, account):
            if ensure_role(iam, name, trust, STUDIO_TAGS):
                changed.append(f"role {name} created")
            iam.put_role_policy(RoleName=name, PolicyName="fruitpipe-studio",
                                PolicyDocument=json.dumps(policy, separators=(",", ":")))
        return changed

    def down(self, settings: EmrSettings) -> dict[str, Any]:
        """Remove the Studio, its security groups and its roles (what `--create` made); absent parts are skipped."""
        from botocore.exceptions import ClientError

        settings.validate()
        removed = []
        studio = self.find()
        if studio is not None:
            self.emr.delete_studio(StudioId=studio["StudioId"])
            removed.append(f"EMR Studio {studio['StudioId']}")
        net = self.aws.network(settings)
        ec2 = self.aws.client("ec2")
        workspace = self._group(ec2, net.vpc_id, WORKSPACE_GROUP)
        engine = self._group(ec2, net.vpc_id, ENGINE_GROUP)
        if workspace and engine:  # the groups name each other: their rules go first
            rules = group_rules(workspace, engine)
            for call, held, rule in ((ec2.revoke_security_group_egress, workspace, rules["workspace_egress"][0]),
                                     (ec2.revoke_security_group_ingress, engine, rules["engine_ingress"][0])):
                try:
                    call(GroupId=held, IpPermissions=[rule])
                except ClientError as exc:
                    log.debug("rule already gone from %s: %s", held, _code(exc))
        for name, gid in ((ENGINE_GROUP, engine), (WORKSPACE_GROUP, workspace)):
            if gid is None:
                continue
            try:
                ec2.delete_security_group(GroupId=gid)
            except ClientError as exc:
                raise EmrError(f"security group {name} {gid} could not be deleted ({_code(exc)}): a Workspace's "
                               "network interface may still use it for a few minutes after the Studio went; run "
                               "`--down` again later") from None
            removed.append(f"security group {name} {gid}")
        iam = self.aws.client("iam")
        for name in (STUDIO_SERVICE_ROLE, STUDIO_USER_ROLE):
            try:
                for policy in iam.list_role_policies(RoleName=name)["PolicyNames"]:
                    iam.delete_role_policy(RoleName=name, PolicyName=policy)
                iam.delete_role(RoleName=name)
            except iam.exceptions.NoSuchEntityException:
                continue
            removed.append(f"role {name}")
        return {"removed": removed or ["nothing: no Studio, group or role of fruitpipe's was there"]}

    def check_subnet(self, subnet_id: str | None) -> None:
        """Before a notebook cluster launches: its subnet must be one of the Studio's, or Workspaces cannot reach
        it. No Studio yet is a warning (the cluster may be used otherwise); a Studio that cannot be read, too."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            studio = self.find()
        except (ClientError, BotoCoreError) as exc:
            log.warning("the EMR Studio could not be read (%s): check that this cluster's subnet is one of its "
                        "subnets", str(exc).splitlines()[0][:120])
            return
        if studio is None:
            log.warning("no EMR Studio named %s in this region: `fruitpipe emr studio --create` makes one in this "
                        "cluster's subnet", STUDIO_NAME)
            return
        subnets = studio.get("SubnetIds", [])
        if subnet_id is None:  # the network could not be read: EMR picks the subnet
            log.warning("the notebook cluster's subnet is unknown (the network could not be read): pass --subnet-id "
                        "one of the EMR Studio's subnets (%s)", ", ".join(subnets))
            return
        if subnet_id not in subnets:
            raise EmrError(f"the notebook cluster's subnet {subnet_id} is not one of the EMR Studio's "
                           f"({', '.join(subnets)}): its Workspaces could not attach; pass --subnet-id "
                           f"{subnets[0] if subnets else '...'}; nothing was started")
