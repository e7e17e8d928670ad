"""Checks before a launch that moto cannot enforce: the network EMR's managed policy accepts, and the vCPU quota."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from fruitpipe.cloud.settings import EMR_MANAGED_TAG, INSTANCE_TYPES, VCPU_QUOTA, EmrError, EmrSettings, split_s3

log = logging.getLogger(__name__)

#: The security groups EMR creates and manages in a VPC (the third only for private subnets). Made before the VPC
#: was tagged, they lack the tag, and AmazonEMRServicePolicy_v2 then refuses to launch into them.
#: In a private subnet EMR uses the -Private pair and the ServiceAccess group instead of the public pair.
EMR_MANAGED_GROUPS = ("ElasticMapReduce-master", "ElasticMapReduce-slave", "ElasticMapReduce-Master-Private",
                      "ElasticMapReduce-Slave-Private", "ElasticMapReduce-ServiceAccess")


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _read_or_absent(read: Any, bucket: str, permission: str, absent: str) -> Any:
    """read()'s answer, or None when S3 answers that the setting is not there (`absent`, its only "not found"
    code); any other refusal (AccessDenied above all) is one line naming the permission, before anything is written."""
    from botocore.exceptions import ClientError

    try:
        return read()
    except ClientError as exc:
        if _code(exc) == absent:
            return None
        raise EmrError(f"s3://{bucket}: reading its settings was refused ({_code(exc)}): the identity running setup "
                       f"needs {permission} on the bucket; nothing was changed") from None


@dataclass
class Network:
    """Where the nodes go: the subnet, its VPC, EMR's security groups there, and which of them lack the tag."""

    subnet_id: str
    vpc_id: str
    default_vpc: bool
    security_groups: list[str] = field(default_factory=list)
    untagged: list[str] = field(default_factory=list)
    #: How the nodes reach S3 (the bootstrap reads the wheelhouse there): "gateway endpoint", "NAT gateway",
    #: "internet gateway", "unverified" (a default route to a transit gateway, a firewall or appliance endpoint,
    #: a peering connection: it may well reach S3, fruitpipe cannot tell), or "" when the route table has none.
    s3_route: str = ""
    s3_route_via: str = ""
    #: Why the route could not be verified (the S3 gateway endpoints could not be read, or where it leads).
    s3_route_why: str = ""

    def describe(self) -> dict[str, Any]:
        """The plan's view of it."""
        out = {"subnet_id": self.subnet_id, "vpc_id": self.vpc_id,
               "chosen": "the default VPC's subnet" if self.default_vpc else "--subnet-id",
               "emr_security_groups": self.security_groups, "tag": f"{EMR_MANAGED_TAG}=true",
               "untagged": self.untagged, "s3_route": _route_words(self.s3_route, self.s3_route_via,
                                                                   self.s3_route_why)}
        return out


def _route_words(kind: str, via: str, why: str = "") -> str:
    if kind == "gateway endpoint":
        return f"S3 gateway endpoint {via} (free)"
    if kind == "NAT gateway":
        return (f"NAT gateway {via}: S3 traffic through it is billed per GB (NAT data processing); an S3 gateway "
                "endpoint in the VPC is free")
    if kind == "internet gateway":
        return f"internet gateway {via} (the nodes get public addresses)"
    if kind == "unverified":
        return f"not verified: {why}"
    return ("none: the nodes cannot reach S3 (no S3 gateway endpoint, NAT, internet gateway or other default "
            "route)")


#: Targets of a default route that may reach S3 but whose way on fruitpipe cannot see (a transit gateway, a
#: peering connection, a firewall or Gateway Load Balancer endpoint, an appliance's interface or instance).
_OTHER_TARGETS = (("TransitGatewayId", "transit gateway"), ("VpcPeeringConnectionId", "peering connection"),
                  ("NetworkInterfaceId", "network interface (an appliance)"), ("InstanceId", "instance"),
                  ("LocalGatewayId", "local gateway"), ("CoreNetworkArn", "core network"),
                  ("CarrierGatewayId", "carrier gateway"))


def s3_route(route_tables: list[dict[str, Any]], subnet_id: str,
             s3_endpoints: set[str] | None = None) -> tuple[str, str, str]:
    """(kind, id, why) of the best way the subnet reaches S3: its route table (an explicit association, else the
    VPC's main table) with a route to one of `s3_endpoints` (the VPC's S3 gateway endpoints, from
    DescribeVpcEndpoints; a DynamoDB one does not count), else 0.0.0.0/0 through a NAT gateway or an internet
    gateway; else a default route elsewhere, or a gateway endpoint route when `s3_endpoints` is None (unknown):
    "unverified", with why."""
    own = [t for t in route_tables if any(a.get("SubnetId") == subnet_id for a in t.get("Associations", []))]
    main = [t for t in route_tables if any(a.get("Main") for a in t.get("Associations", []))]
    table = (own or main or [{}])[0]
    found: dict[str, tuple[str, str]] = {}
    for r in table.get("Routes", []):
        if r.get("State", "active") != "active":
            continue
        gateway = r.get("GatewayId", "") or r.get("VpcEndpointId", "") or ""
        default = r.get("DestinationCidrBlock") == "0.0.0.0/0"
        if gateway.startswith("vpce-") and r.get("DestinationPrefixListId"):
            if s3_endpoints is None:
                found.setdefault("unverified", (gateway, f"a gateway endpoint {gateway} whose service could not be "
                                                         "read (ec2:DescribeVpcEndpoints)"))
            elif gateway in s3_endpoints:
                found.setdefault("gateway endpoint", (gateway, ""))
        elif default and r.get("NatGatewayId"):
            found.setdefault("NAT gateway", (r["NatGatewayId"], ""))
        elif default and gateway.startswith("igw-"):
            found.setdefault("internet gateway", (gateway, ""))
        elif default:
            target = next(((r[key], words) for key, words in _OTHER_TARGETS if r.get(key)),
                          (gateway, "VPC endpoint (a firewall or Gateway Load Balancer)") if gateway else None)
            if target is not None:
                found.setdefault("unverified", (target[0], f"the default route goes to {target[1]} {target[0]}, "
                                                           "which may reach S3 beyond what fruitpipe can see"))
    for kind in ("gateway endpoint", "NAT gateway", "internet gateway", "unverified"):
        if kind in found:
            return kind, *found[kind]
    return "", "", ""


def _tagged(resource: dict[str, Any]) -> bool:
    return any(t.get("Key") == EMR_MANAGED_TAG and t.get("Value") == "true" for t in resource.get("Tags", []))


class Preflight:
    """The read-only half of the EMR client (network, quota, the buckets' keys): needs `region`, `s3` and
    `client(name)` from its subclass."""

    region: str
    s3: Any

    def client(self, name: str) -> Any:
        """A boto3 client of the session (ec2, service-quotas); provided by the subclass."""
        raise NotImplementedError

    def network(self, settings: EmrSettings) -> Network:
        """The subnet the cluster will use (--subnet-id, else a default subnet of the default VPC), and which of the
        subnet, its VPC and EMR's security groups lack the tag AmazonEMRServicePolicy_v2 requires."""
        from botocore.exceptions import ClientError

        ec2 = self.client("ec2")
        if settings.subnet_id:
            try:
                subnet = ec2.describe_subnets(SubnetIds=[settings.subnet_id])["Subnets"][0]
            except (ClientError, IndexError):
                raise EmrError(f"--subnet-id {settings.subnet_id} does not exist in {self.region}: pass a subnet "
                               "of this region (aws ec2 describe-subnets)") from None
            vpc = ec2.describe_vpcs(VpcIds=[subnet["VpcId"]])["Vpcs"][0]
            default = bool(vpc.get("IsDefault"))
        else:
            vpcs = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
            if not vpcs:
                raise EmrError(f"the account has no default VPC in {self.region} and no --subnet-id was given: pass "
                               "--subnet-id of a subnet (with an S3 gateway endpoint or NAT), or create the default "
                               "VPC with `aws ec2 create-default-vpc`")
            vpc, default = vpcs[0], True
            subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc["VpcId"]]},
                                                    {"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
            if not subnets:
                raise EmrError(f"the default VPC {vpc['VpcId']} has no default subnet: pass --subnet-id")
            # Stable, so that plan, setup and up agree: one already tagged if any, else the first zone's.
            subnet = sorted(subnets, key=lambda s: (not _tagged(s), s.get("AvailabilityZone", "")))[0]
        groups = ec2.describe_security_groups(Filters=[
            {"Name": "vpc-id", "Values": [vpc["VpcId"]]},
            {"Name": "group-name", "Values": list(EMR_MANAGED_GROUPS)}])["SecurityGroups"]
        untagged = [r[key] for r, key in ((subnet, "SubnetId"), (vpc, "VpcId")) if not _tagged(r)]
        untagged += [g["GroupId"] for g in groups if not _tagged(g)]
        tables = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc["VpcId"]]}])["RouteTables"]
        endpoints: set[str] | None
        try:
            endpoints = {e["VpcEndpointId"] for e in ec2.describe_vpc_endpoints(Filters=[
                {"Name": "vpc-id", "Values": [vpc["VpcId"]]},
                {"Name": "service-name", "Values": [f"com.amazonaws.{self.region}.s3"]}])["VpcEndpoints"]
                if e.get("VpcEndpointType", "Gateway") == "Gateway"}
        except ClientError as exc:
            log.info("the VPC's endpoints could not be read (%s)", _code(exc))
            endpoints = None
        kind, via, why = s3_route(tables, subnet["SubnetId"], endpoints)
        return Network(subnet["SubnetId"], vpc["VpcId"], default, sorted(g["GroupId"] for g in groups), untagged,
                       kind, via, why)

    def tag_network(self, net: Network) -> list[str]:
        """Tag what lacks the tag; returns what was changed, in words (setup's report)."""
        if not net.untagged:
            return []
        self.client("ec2").create_tags(Resources=net.untagged, Tags=[{"Key": EMR_MANAGED_TAG, "Value": "true"}])
        return [f"{rid}: tagged {EMR_MANAGED_TAG}=true (required by AmazonEMRServicePolicy_v2)"
                for rid in net.untagged]

    def check_network(self, settings: EmrSettings) -> Network:
        """Refuse, before anything is billed, a network the managed policy would refuse at launch."""
        net = self.network(settings)
        if net.untagged:
            raise EmrError(f"{', '.join(net.untagged)} lack the tag {EMR_MANAGED_TAG}=true, without which "
                           "AmazonEMRServicePolicy_v2 refuses to launch the cluster (it would end "
                           "TERMINATED_WITH_ERRORS): run `fruitpipe emr setup` with the same flags (it tags them), or "
                           f"`aws ec2 create-tags --resources {' '.join(net.untagged)} "
                           f"--tags Key={EMR_MANAGED_TAG},Value=true`")
        if net.s3_route == "unverified":
            log.warning("subnet %s: the way to S3 is %s; if the bootstrap cannot read the wheelhouse, `emr logs` "
                        "says so", net.subnet_id, _route_words(net.s3_route, net.s3_route_via, net.s3_route_why))
        if not net.s3_route and settings.skip_network_check:
            log.warning("subnet %s has no route to S3 that fruitpipe can see; launching anyway "
                        "(--skip-network-check)", net.subnet_id)
        elif not net.s3_route:
            raise EmrError(f"subnet {net.subnet_id} has no route to S3, so the bootstrap could not read the "
                           "wheelhouse (the cluster would fail after being billed): add an S3 gateway endpoint to "
                           f"VPC {net.vpc_id} (aws ec2 create-vpc-endpoint --service-name com.amazonaws."
                           f"{self.region}.s3 --route-table-ids ...), or a NAT gateway route; --skip-network-check "
                           "launches anyway when the way out is one fruitpipe cannot see")
        if net.s3_route == "NAT gateway":
            log.warning("subnet %s reaches S3 through %s", net.subnet_id, _route_words(net.s3_route,
                                                                                     net.s3_route_via))
        return net

    def quota(self, settings: EmrSettings) -> dict[str, Any]:
        """The on-demand standard-instance vCPU quota against what this cluster needs plus what already runs.
        Never raises: a quota that cannot be read is reported as not checked, with the reason."""
        from botocore.exceptions import BotoCoreError, ClientError

        need = INSTANCE_TYPES[settings.master_type].vcpus + settings.core_nodes * INSTANCE_TYPES[
            settings.core_type].vcpus
        out: dict[str, Any] = {"quota_code": VCPU_QUOTA[1], "needed_vcpus": need}
        sq = self.client("service-quotas")
        try:
            try:
                value = sq.get_service_quota(ServiceCode=VCPU_QUOTA[0], QuotaCode=VCPU_QUOTA[1])["Quota"]["Value"]
            except sq.exceptions.NoSuchResourceException:  # never raised for this account: the default applies
                value = sq.get_aws_default_service_quota(ServiceCode=VCPU_QUOTA[0],
                                                         QuotaCode=VCPU_QUOTA[1])["Quota"]["Value"]
            running = self._running_standard_vcpus()
        except (ClientError, BotoCoreError) as exc:  # no servicequotas:GetServiceQuota, or no such API here
            out.update(checked=False, why=f"could not read the quota: {str(exc).splitlines()[0][:200]}")
            return out
        out.update(checked=True, quota_vcpus=int(value), running_vcpus=running,
                   ok=running + need <= value)
        if not out["ok"]:
            out["advice"] = (f"{need} vCPUs needed, {running} already running, quota {int(value)}: the cluster "
                             "would wait in STARTING and then fail; ask for more in Service Quotas "
                             f"(code {VCPU_QUOTA[1]}) or use fewer or smaller nodes")
        return out

    def _running_standard_vcpus(self) -> int:
        """vCPUs of the pending and running on-demand instances (spot counts against another quota)."""
        total = 0
        pages = self.client("ec2").get_paginator("describe_instances").paginate(
            Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}])
        for page in pages:
            for reservation in page["Reservations"]:
                for inst in reservation["Instances"]:
                    if inst.get("InstanceLifecycle") == "spot":
                        continue
                    cpu = inst.get("CpuOptions") or {}
                    known = INSTANCE_TYPES.get(inst.get("InstanceType", ""))
                    total += (cpu.get("CoreCount", 0) * cpu.get("ThreadsPerCore", 1)) or (known.vcpus if known else 0)
        return total

    def bucket_keys(self, settings: EmrSettings, uris: tuple[str, ...] | None = None) -> set[str]:
        """The ARNs of the customer KMS keys that the buckets of `uris` (INPUT's, OUTPUT's, the artifacts' and the
        logs' by default) encrypt new objects with by default (SSE-KMS): the instance role must be able to use them,
        or every write fails and every image of an encrypted INPUT becomes `unreadable`; the operator reads OUTPUT
        and the logs and writes the artifacts. AWS's own aws/s3 key needs no grant."""
        from botocore.exceptions import ClientError

        keys: set[str] = set()
        uris = uris or (settings.input, settings.output, settings.artifacts_uri, settings.logs_uri)
        buckets = dict.fromkeys(split_s3(u, "URI")[0] for u in uris)
        kms = self.client("kms")
        for bucket in buckets:
            try:
                self.s3.head_bucket(Bucket=bucket)
            except ClientError:
                continue  # created below, with SSE-S3
            found = _read_or_absent(lambda b=bucket: self.s3.get_bucket_encryption(Bucket=b)[
                "ServerSideEncryptionConfiguration"], bucket, "s3:GetEncryptionConfiguration",
                "ServerSideEncryptionConfigurationNotFoundError") or {}
            for rule in found.get("Rules", []):
                default = rule.get("ApplyServerSideEncryptionByDefault", {})
                key = default.get("KMSMasterKeyID")
                if default.get("SSEAlgorithm", "").startswith("aws:kms") and key:
                    try:
                        meta = kms.describe_key(KeyId=key)["KeyMetadata"]
                    except ClientError as exc:
                        if key.startswith("arn:aws:kms:"):
                            keys.add(key)  # another account's key: granted by its ARN, its policy must allow us
                            continue
                        raise EmrError(f"s3://{bucket} encrypts with KMS key {key}, which cannot be described "
                                       f"({_code(exc)}): the identity running setup needs kms:DescribeKey on "
                                       "it") from None
                    if meta.get("KeyManager") == "CUSTOMER":
                        keys.add(meta["Arn"])
        return keys
