"""`fruitpipe emr` against a moto server on 127.0.0.1: setup, upload, up, status, logs, down, run, and a run's S3
requests against the plan's model (the plan itself, without AWS: test_emr_plan.py)."""

from __future__ import annotations

import gzip
import json
import threading
import time
from pathlib import Path

import boto3
import pyarrow.parquet as pq
import pytest

from conftest import REGION, copy_classes, sample_classes, upload_folder
from emrkit import INPUT, OUTPUT, emr_settings, fake_wheel
from fruitpipe.cli import main
from fruitpipe.cloud import emr
from fruitpipe.cloud.artifacts import runtime_requirements
from fruitpipe.cloud.cost import lease_renewals, s3_requests
from fruitpipe.lease import LEASE, TTL_S

# -- every command against moto server --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def aws(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory):
    """AWS_ENDPOINT_URL at the loopback moto server, the sample uploaded as INPUT, and a wheel built once."""
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    mp.setenv("AWS_REGION", REGION)
    mp.setenv("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")  # AWS's managed policies, as a real account has them
    data = copy_classes(tmp_path_factory.mktemp("emr-in"), sample_classes(2), per_split=5)
    upload_folder(data, s3_endpoint, "fruits-in", "fruits360")
    wheel = emr.build_wheel(tmp_path_factory.mktemp("wheel"))
    # The nodes' wheelhouse comes from pip's configured index; here that is a local folder of stand-in wheels of
    # every pinned requirement (PIP_NO_INDEX / PIP_FIND_LINKS are pip's own settings), so no test needs PyPI.
    index = tmp_path_factory.mktemp("index")
    for req in runtime_requirements(("int8",)):
        name, _, version = req.partition("==")
        fake_wheel(index, name, version)
    mp.setenv("PIP_NO_INDEX", "1")
    mp.setenv("PIP_FIND_LINKS", str(index))
    # An account prepared as docs/emr.md says: the default VPC's network tagged for the managed policy (the
    # network tests below use their own VPC, untagged, to see setup tag it and up refuse it).
    aws = emr.Emr(REGION)
    aws.tag_network(aws.network(emr_settings()))
    # AWS's default VPC reaches the internet (and S3) through an internet gateway; moto's has no such route.
    ec2 = boto3.client("ec2", endpoint_url=s3_endpoint, region_name=REGION)
    vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    igw = ec2.create_internet_gateway()["InternetGateway"]["InternetGatewayId"]
    ec2.attach_internet_gateway(InternetGatewayId=igw, VpcId=vpc)
    main_table = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc]},
                                                    {"Name": "association.main", "Values": ["true"]}])
    ec2.create_route(RouteTableId=main_table["RouteTables"][0]["RouteTableId"], DestinationCidrBlock="0.0.0.0/0",
                     GatewayId=igw)
    yield {"endpoint": s3_endpoint, "wheel": str(wheel), "index": str(index)}
    mp.undo()


@pytest.fixture(scope="module")
def runs_granted(aws) -> None:
    """The README's dated outputs: one setup grants the instance role every run below s3://fruits-out/runs."""
    assert main(["emr", "setup", INPUT, "s3://fruits-out/runs/first", "--output-root", "s3://fruits-out/runs",
                 "-q"]) == 0
    _client("s3", aws["endpoint"]).delete_bucket_policy(Bucket="fruits-out")  # moto's unconditional Deny (below)


def _client(name: str, endpoint: str):
    return boto3.client(name, endpoint_url=endpoint, region_name=REGION)


def test_setup_creates_roles_key_and_hardened_buckets(aws, capsys) -> None:
    assert main(["emr", "setup", INPUT, OUTPUT, "-q"]) == 0
    done = json.loads(capsys.readouterr().out)
    iam = _client("iam", aws["endpoint"])
    inline = iam.get_role_policy(RoleName="fruitpipe-emr-ec2",
                                 PolicyName=emr.pair_policy_name(emr_settings()))["PolicyDocument"]
    assert {st["Sid"] for st in inline["Statement"]} >= {"ReadInputPrefixOnly", "ReadWriteOutputPrefixOnly"}
    assert "arn:aws:s3:::fruits-in/fruits360/*" in json.dumps(inline)
    linked = iam.list_roles(PathPrefix="/aws-service-role/elasticmapreduce.amazonaws.com/")["Roles"]
    assert len(linked) == 1 and any("service-linked role" in c for c in done["changed"])
    attached = iam.list_attached_role_policies(RoleName="fruitpipe-emr-service")["AttachedPolicies"]
    assert [p["PolicyArn"] for p in attached] == [emr.EMR_MANAGED_POLICY]
    profile = iam.get_instance_profile(InstanceProfileName="fruitpipe-emr-ec2")["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == ["fruitpipe-emr-ec2"]
    sec = _client("emr", aws["endpoint"]).describe_security_configuration(Name=emr.SECURITY_CONFIGURATION)
    disk = json.loads(sec["SecurityConfiguration"])["EncryptionConfiguration"]["AtRestEncryptionConfiguration"]
    assert disk["LocalDiskEncryptionConfiguration"]["EnableEbsEncryption"] is True
    assert disk["LocalDiskEncryptionConfiguration"]["AwsKmsKey"] == done["kms_key"]
    s3 = _client("s3", aws["endpoint"])
    block = s3.get_public_access_block(Bucket="fruits-out")["PublicAccessBlockConfiguration"]
    assert all(block.values()) and len(block) == 4
    rule = s3.get_bucket_encryption(Bucket="fruits-out")["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    policy = json.loads(s3.get_bucket_policy(Bucket="fruits-out")["Policy"])
    deny = [st for st in policy["Statement"] if st["Effect"] == "Deny"]
    assert deny and deny[0]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert main(["emr", "setup", INPUT, OUTPUT, "-q"]) == 0  # idempotent: a second setup changes nothing
    capsys.readouterr()
    assert len(json.loads(s3.get_bucket_policy(Bucket="fruits-out")["Policy"])["Statement"]) == len(policy["Statement"])
    # moto applies a bucket policy's Deny without its Condition (a documented moto limitation), so on this
    # plain-http loopback server the TLS-only statement would refuse every later request of these tests.
    with pytest.raises(Exception, match="403|Forbidden|AccessDenied"):
        s3.put_object(Bucket="fruits-out", Key="probe", Body=b"x")
    s3.delete_bucket_policy(Bucket="fruits-out")


def test_setup_never_weakens_existing_bucket_settings_and_says_what_it_changed(aws, capsys) -> None:
    s3 = _client("s3", aws["endpoint"])
    s3.create_bucket(Bucket="fruits-kms", CreateBucketConfiguration={"LocationConstraint": REGION})
    mine = _client("kms", aws["endpoint"]).create_key(Description="the bucket's own key")["KeyMetadata"]["Arn"]
    _client("kms", aws["endpoint"]).create_alias(AliasName="alias/mine", TargetKeyId=mine)
    kms_rule = {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": "alias/mine"},
                "BucketKeyEnabled": True}
    s3.put_bucket_encryption(Bucket="fruits-kms", ServerSideEncryptionConfiguration={"Rules": [kms_rule]})
    s3.put_public_access_block(Bucket="fruits-kms", PublicAccessBlockConfiguration={
        "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": False, "RestrictPublicBuckets": True})
    args = ["emr", "setup", INPUT, "s3://fruits-kms/runs/1", "--artifacts", "s3://fruits-kms/artifacts",
            "--logs", "s3://fruits-kms/logs", "-q"]
    assert main(args) == 0
    done = json.loads(capsys.readouterr().out)
    rule = s3.get_bucket_encryption(Bucket="fruits-kms")["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "aws:kms"  # SSE-KMS kept, not downgraded
    block = s3.get_public_access_block(Bucket="fruits-kms")["PublicAccessBlockConfiguration"]
    assert all(block.values())  # the one flag that was off is turned on; none is turned off
    changes = " | ".join(done["changed"])
    assert "public access block turned on (BlockPublicPolicy)" in changes and "encryption" not in changes
    kms = _client("kms", aws["endpoint"])
    assert kms.get_key_rotation_status(KeyId=done["kms_key"])["KeyRotationEnabled"] is True
    s3.delete_bucket_policy(Bucket="fruits-kms")  # moto applies the TLS-only Deny unconditionally (see above)
    service = json.dumps(_client("iam", aws["endpoint"]).get_role_policy(
        RoleName="fruitpipe-emr-service", PolicyName="fruitpipe")["PolicyDocument"])
    assert '"kms:GrantIsForAWSResource": "true"' in service
    pair = emr.pair_policy_name(emr_settings(output="s3://fruits-kms/runs/1"))
    instance = _client("iam", aws["endpoint"]).get_role_policy(RoleName="fruitpipe-emr-ec2", PolicyName=pair)
    keys = [st for st in instance["PolicyDocument"]["Statement"] if st["Sid"] == "UseTheBucketKeysThroughS3Only"]
    assert keys and keys[0]["Resource"] == [mine]  # the alias resolved to its key: writes under SSE-KMS work


def test_buckets_outside_the_chosen_region_are_refused(aws, capsys) -> None:
    s3 = boto3.client("s3", endpoint_url=aws["endpoint"], region_name="us-east-1")
    s3.create_bucket(Bucket="fruits-us")  # us-east-1: no location constraint
    argv = ["emr", "up", INPUT, "s3://fruits-us/runs/1", "--artifacts", "s3://fruits-out/fruitpipe-artifacts"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "s3://fruits-us is in us-east-1, not in eu-west-3" in err[0] and "GDPR" in err[0]
    assert main(["emr", "setup", INPUT, OUTPUT, "--logs", "s3://fruits-us/logs", "-q"]) == 2
    assert "the logs bucket s3://fruits-us is in us-east-1" in capsys.readouterr().err
    # --allow-non-eu accepts it (the refusal then comes from the next check: no artifacts uploaded there)
    assert main([*argv, "--artifacts", "s3://fruits-us/artifacts", "--allow-non-eu"]) == 2
    assert "run `fruitpipe emr upload` first" in capsys.readouterr().err


def test_upload_to_a_missing_bucket_says_to_run_setup(aws, capsys) -> None:
    """Checked with GetBucketLocation (the operator policy's s3:ListBucket is prefix-scoped, so HeadBucket would be
    refused to the operator even on a bucket that exists)."""
    assert main(["emr", "upload", INPUT, "s3://fruits-nowhere/runs/1", "--wheel", aws["wheel"], "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bucket fruits-nowhere does not exist: run `fruitpipe emr setup` first" in err


def test_up_refuses_without_artifacts(aws, capsys) -> None:
    assert main(["emr", "up", INPUT, "s3://fruits-out/other", "--artifacts", "s3://fruits-out/empty-prefix"]) == 2
    assert "run `fruitpipe emr upload` first" in capsys.readouterr().err


def test_upload_up_status_logs_down(aws, capsys) -> None:
    assert main(["emr", "upload", INPUT, OUTPUT, "--wheel", aws["wheel"], "-q"]) == 0
    uris = json.loads(capsys.readouterr().out)
    s3 = _client("s3", aws["endpoint"])
    keys = {o["Key"]: o["Size"] for o in s3.list_objects_v2(Bucket="fruits-out",
                                                            Prefix="fruitpipe-artifacts/")["Contents"]}
    from fruitpipe.version import code_sha256

    code = f"fruitpipe-artifacts/code/{emr._version()}-{code_sha256()[:16]}"  # keyed by the code, not the version
    wheelhouse = uris["wheelhouse"].removeprefix("s3://fruits-out/")
    reqs = s3.get_object(Bucket="fruits-out", Key=f"{wheelhouse}/requirements.txt")["Body"].read().decode()
    assert set(keys) == {f"{code}/{emr.wheel_name()}", f"{wheelhouse}/requirements.txt",
                         f"{code}/bootstrap.sh", f"{wheelhouse}/wheelhouse.tar",
                         "fruitpipe-artifacts/models/ad116e43570b0c58/mobilenet_v2_features.onnx"}
    import io
    import tarfile

    tar = tarfile.open(fileobj=io.BytesIO(s3.get_object(Bucket="fruits-out", Key=f"{wheelhouse}/wheelhouse.tar")[
        "Body"].read()))
    assert sorted(tar.getnames()) == sorted(f"{line.replace('-', '_').replace('==', '-')}-py3-none-any.whl"
                                            for line in reqs.split())  # a wheel's file name spells - as _
    assert keys["fruitpipe-artifacts/models/ad116e43570b0c58/mobilenet_v2_features.onnx"] == Path(
        __file__).resolve().parents[2].joinpath("shared/models/mobilenet_v2_features.onnx").stat().st_size
    assert "onnxruntime==" in reqs and "pyspark" not in reqs  # the nodes use EMR's own Spark
    assert "onnx==" in reqs  # every run wraps its model for uint8 input (models/wrap.py)
    head = s3.head_object(Bucket="fruits-out", Key=f"{code}/bootstrap.sh")
    assert head["ServerSideEncryption"] == "AES256"
    script = s3.get_object(Bucket="fruits-out", Key=f"{code}/bootstrap.sh")["Body"].read()
    installs = [ln for ln in script.decode().splitlines() if '/bin/pip" install' in ln]
    assert len(installs) == 2 and all("--no-index" in ln for ln in installs)  # nothing from PyPI
    # The instance role may GET under the artifacts prefix but not LIST it: the bootstrap reads named objects only.
    assert b"--recursive" not in script and b"aws s3 ls" not in script and b"aws s3 sync" not in script
    copies = [ln for ln in script.decode().splitlines() if "aws s3 cp" in ln]
    assert len(copies) == 3 and all('--region "$REGION"' in ln for ln in copies)
    # onnx (the quantizer's, and the uint8 wrapper's on every node) is a core dependency: an int8 run's
    # requirements are the plain ones, so it shares their wheelhouse (keyed by the requirements).
    assert main(["emr", "upload", INPUT, OUTPUT, "--wheel", aws["wheel"], "--run-arg=--precision=int8", "-q"]) == 0
    int8 = json.loads(capsys.readouterr().out)
    assert int8["wheelhouse"] == uris["wheelhouse"]

    assert main(["emr", "up", INPUT, OUTPUT]) == 0
    started = json.loads(capsys.readouterr().out)
    cluster_id = started["cluster_id"]
    api = _client("emr", aws["endpoint"])
    cluster = api.describe_cluster(ClusterId=cluster_id)["Cluster"]
    assert cluster["ReleaseLabel"] == emr.DEFAULT_RELEASE and cluster["AutoTerminate"] is True
    assert cluster["SecurityConfiguration"] == emr.SECURITY_CONFIGURATION
    assert {"Key": "project", "Value": "fruitpipe"} in cluster["Tags"]
    assert cluster["ServiceRole"] == "fruitpipe-emr-service"
    assert cluster["Ec2InstanceAttributes"]["IamInstanceProfile"] == "fruitpipe-emr-ec2"
    groups = {g["InstanceGroupType"]: g for g in api.list_instance_groups(ClusterId=cluster_id)["InstanceGroups"]}
    assert groups["MASTER"]["InstanceType"] == "m5.xlarge" and groups["CORE"]["RequestedInstanceCount"] == 2
    actions = api.list_bootstrap_actions(ClusterId=cluster_id)["BootstrapActions"]
    assert actions[0]["ScriptPath"] == uris["bootstrap"]
    assert actions[0]["Args"] == [uris["prefix"], emr.wheel_name(), uris["wheelhouse"], REGION]
    step = api.list_steps(ClusterId=cluster_id)["Steps"][0]
    assert step["Id"] == started["step_id"] and step["Config"]["Args"] == emr.step_args(emr_settings())

    assert main(["emr", "status", cluster_id]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] in ("STARTING", "BOOTSTRAPPING", "RUNNING", "WAITING")
    assert status["steps"][0]["id"] == started["step_id"]

    assert main(["emr", "logs", cluster_id]) == 2  # nothing pushed yet: one line that says when it will be
    err = capsys.readouterr().err
    assert "EMR copies node, bootstrap and step logs to S3 every 5 minutes" in err and "try again after" in err
    assert err.count("\n") == 1
    base = f"fruitpipe-logs/{cluster_id}"
    pushed = {f"{base}/steps/{started['step_id']}/stderr.gz": b"INFO fruitpipe: embed 20 images\n",
              f"{base}/node/i-0abc/bootstrap-actions/1/stderr.gz": b"ERROR: No matching distribution for numpy\n",
              f"{base}/containers/application_1_0001/container_1_0001_01_000002/stderr.gz":
                  b"".join(b"line %d\n" % i for i in range(300)),
              f"{base}/node/i-0abc/daemons/instance-state/state.log.gz": b"not a log users need\n"}
    for key, body in pushed.items():
        s3.put_object(Bucket="fruits-out", Key=key, Body=gzip.compress(body))
    assert main(["emr", "logs", cluster_id]) == 0
    out = capsys.readouterr().out
    assert "==> node/i-0abc/bootstrap-actions/1/stderr <==\nERROR: No matching distribution for numpy" in out
    assert f"==> steps/{started['step_id']}/stderr <==\nINFO fruitpipe: embed 20 images" in out
    assert out.index("bootstrap-actions") < out.index("steps/") < out.index("containers/")  # bootstrap first
    assert "[... 100 earlier lines; --tail 0 shows all]\nline 100\n" in out and "state.log" not in out
    assert main(["emr", "logs", cluster_id, "--tail", "0"]) == 0
    assert "line 0\n" in capsys.readouterr().out
    # ListSteps answers newest first (AWS and moto): status lists oldest first, so the latest step is the last.
    later = api.add_job_flow_steps(JobFlowId=cluster_id, Steps=[{
        "Name": "a later step", "ActionOnFailure": "CONTINUE",
        "HadoopJarStep": {"Jar": "command-runner.jar", "Args": ["true"]}}])["StepIds"][0]
    assert api.list_steps(ClusterId=cluster_id)["Steps"][0]["Id"] == later
    assert main(["emr", "status", cluster_id]) == 0
    steps = json.loads(capsys.readouterr().out)["steps"]
    assert [st["id"] for st in steps] == [started["step_id"], later]
    assert set(steps[0]) == {"id", "name", "state", "reason", "message", "log_file"}

    assert main(["emr", "down", cluster_id]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "TERMINATED"
    assert main(["emr", "status", "j-NOSUCHCLUSTER"]) == 2
    assert "not found" in capsys.readouterr().err


def test_network_is_tagged_by_setup_and_an_untagged_one_refused_by_up(aws, capsys) -> None:
    """AmazonEMRServicePolicy_v2 launches only into a subnet, VPC and EMR security groups tagged
    for-use-with-amazon-emr-managed-policies=true (moto does not enforce it, so fruitpipe checks): plan shows the
    network and what lacks the tag, up refuses before anything is billed, setup tags them, up then launches there."""
    assert main(["emr", "setup", INPUT, OUTPUT, "-q"]) == 0  # the account's buckets and roles (default network)
    capsys.readouterr()
    _client("s3", aws["endpoint"]).delete_bucket_policy(Bucket="fruits-out")  # moto's unconditional Deny (above)
    ec2 = _client("ec2", aws["endpoint"])
    vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24")["Subnet"]["SubnetId"]
    group = ec2.create_security_group(GroupName="ElasticMapReduce-master", Description="EMR master", VpcId=vpc)
    flags = ["--subnet-id", subnet, "--name", "fruitpipe-network-test"]
    assert main(["emr", "plan", INPUT, OUTPUT, *flags]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["network"]["checked"] is True and plan["network"]["vpc_id"] == vpc
    assert plan["network"]["untagged"] == [subnet, vpc, group["GroupId"]] and "emr setup" in plan["network"]["advice"]
    assert plan["run_job_flow"]["Instances"]["Ec2SubnetId"] == subnet
    assert plan["network"]["s3_route"].startswith("none: the nodes cannot reach S3")
    api = _client("emr", aws["endpoint"])
    before = len(api.list_clusters()["Clusters"])
    assert main(["emr", "upload", INPUT, OUTPUT, "--wheel", aws["wheel"], "-q"]) == 0
    capsys.readouterr()
    assert main(["emr", "up", INPUT, OUTPUT, *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{subnet}, {vpc}, {group['GroupId']} lack the tag" in err
    assert "run `fruitpipe emr setup`" in err and len(api.list_clusters()["Clusters"]) == before  # nothing started
    assert main(["emr", "setup", INPUT, OUTPUT, *flags, "-q"]) == 0
    changed = json.loads(capsys.readouterr().out)["changed"]
    _client("s3", aws["endpoint"]).delete_bucket_policy(Bucket="fruits-out")
    assert [c.split(":")[0] for c in changed[:3]] == [subnet, vpc, group["GroupId"]]
    tags = ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": [subnet, vpc, group["GroupId"]]}])["Tags"]
    assert {(t["ResourceId"], t["Key"], t["Value"]) for t in tags} == {
        (r, emr.EMR_MANAGED_TAG, "true") for r in (subnet, vpc, group["GroupId"])}
    # Tagged, but this subnet has no route to S3: the bootstrap could not read the wheelhouse.
    assert main(["emr", "up", INPUT, OUTPUT, *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"subnet {subnet} has no route to S3" in err and "gateway endpoint" in err
    assert len(api.list_clusters()["Clusters"]) == before
    table = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["RouteTables"][0]
    endpoint_id = ec2.create_vpc_endpoint(VpcId=vpc, ServiceName=f"com.amazonaws.{REGION}.s3",
                                          VpcEndpointType="Gateway", RouteTableIds=[table["RouteTableId"]]
                                          )["VpcEndpoint"]["VpcEndpointId"]
    assert main(["emr", "plan", INPUT, OUTPUT, *flags]) == 0
    assert json.loads(capsys.readouterr().out)["network"]["s3_route"] == f"S3 gateway endpoint {endpoint_id} (free)"
    assert main(["emr", "up", INPUT, OUTPUT, *flags]) == 0
    cluster_id = json.loads(capsys.readouterr().out)["cluster_id"]
    attrs = api.describe_cluster(ClusterId=cluster_id)["Cluster"]["Ec2InstanceAttributes"]
    assert attrs["Ec2SubnetId"] == subnet
    api.terminate_job_flows(JobFlowIds=[cluster_id])


def test_default_vpc_is_found_and_its_absence_explained(aws) -> None:
    """Without --subnet-id the default VPC's default subnet is used; an account without a default VPC gets one
    line saying to pass --subnet-id or create the default VPC."""
    net = emr.Emr(REGION).network(emr_settings())
    ec2 = _client("ec2", aws["endpoint"])
    default_vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    assert net.default_vpc and net.vpc_id == default_vpc and net.untagged == []  # the fixture's setup tagged it
    region = "eu-north-1"
    north = boto3.client("ec2", endpoint_url=aws["endpoint"], region_name=region)
    vpc_id = north.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    for sub in north.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["Subnets"]:
        north.delete_subnet(SubnetId=sub["SubnetId"])
    for igw in north.describe_internet_gateways(Filters=[{"Name": "attachment.vpc-id", "Values": [vpc_id]}])[
            "InternetGateways"]:
        north.detach_internet_gateway(InternetGatewayId=igw["InternetGatewayId"], VpcId=vpc_id)
    north.delete_vpc(VpcId=vpc_id)
    with pytest.raises(emr.EmrError, match="no default VPC in eu-north-1 .* --subnet-id .* create-default-vpc"):
        emr.Emr(region).network(emr_settings(region=region))


def _quota_of_16_with_one_m5_running(aws, monkeypatch):
    """Give moto's in-process Service Quotas backend (it has no EC2 quotas) an on-demand standard vCPU quota of 16,
    as AWS would answer, and start one m5.xlarge (4 vCPUs): (the ec2 client, run_instances' answer)."""
    from moto.servicequotas.models import ServiceQuotasBackend

    real = ServiceQuotasBackend.get_service_quota

    def ec2_quota(self, service_code: str, quota_code: str) -> dict:
        if (service_code, quota_code) == ("ec2", "L-1216C47A"):
            return {"ServiceCode": "ec2", "QuotaCode": quota_code, "QuotaName": "Running On-Demand Standard "
                    "(A, C, D, H, I, M, R, T, Z) instances", "Value": 16.0, "Unit": "None"}
        return real(self, service_code, quota_code)

    monkeypatch.setattr(ServiceQuotasBackend, "get_service_quota", ec2_quota)
    ec2 = _client("ec2", aws["endpoint"])
    image = ec2.describe_images()["Images"][0]["ImageId"]
    return ec2, ec2.run_instances(ImageId=image, InstanceType="m5.xlarge", MinCount=1, MaxCount=1)


def test_plan_checks_the_vcpu_quota(aws, monkeypatch, capsys) -> None:
    """The on-demand standard vCPU quota (Service Quotas L-1216C47A) against the cluster plus what already runs;
    moto has no EC2 quotas, so the test gives its in-process backend one, as AWS would answer."""
    assert main(["emr", "plan", INPUT, OUTPUT]) == 0  # moto knows no EC2 quota: reported, not fatal
    quota = json.loads(capsys.readouterr().out)["quota"]
    assert quota["checked"] is False and "could not read the quota" in quota["why"]

    ec2, running = _quota_of_16_with_one_m5_running(aws, monkeypatch)
    try:
        assert main(["emr", "plan", INPUT, OUTPUT]) == 0  # 4 + 2 x 4 vCPUs, 4 running: 16 fits
        quota = json.loads(capsys.readouterr().out)["quota"]
        assert quota == {"quota_code": "L-1216C47A", "needed_vcpus": 12, "checked": True, "quota_vcpus": 16,
                         "running_vcpus": 4, "ok": True}
        assert main(["emr", "plan", INPUT, OUTPUT, "--core-nodes", "3"]) == 0
        quota = json.loads(capsys.readouterr().out)["quota"]
        assert quota["ok"] is False and "16 vCPUs needed, 4 already running, quota 16" in quota["advice"]
    finally:
        ec2.terminate_instances(InstanceIds=[i["InstanceId"] for i in running["Instances"]])


class _CountingProxy:
    """An HTTP proxy on 127.0.0.1 in front of the S3 server that records every request (method, path, query): what
    a run really sends to S3, request by request."""

    def __init__(self, upstream: str) -> None:
        import http.client
        import http.server
        import urllib.parse

        self.requests: list[tuple[str, str, str]] = []
        target = urllib.parse.urlsplit(upstream)
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            break
                        data += chunk
                    return data
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                body = self._body()
                parts = urllib.parse.urlsplit(self.path)
                proxy.requests.append((self.command, urllib.parse.unquote(parts.path), parts.query))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding",
                                                                                        "connection")}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
                self.send_response(resp.status)
                length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(payload))
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", length or "0")  # a HEAD's is the object's size
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.mark.parametrize("partition_size", [512, 5])
def test_s3_requests_of_a_run_match_the_plan(aws, spark, tmp_path: Path, partition_size: int) -> None:
    """Every request a run sends to S3, counted at a proxy: each image is read with exactly one GET and no HEAD;
    the LIST pages, PUTs and driver reads stay within what `emr plan` prices (estimate.s3_requests)."""
    import re

    s3 = _client("s3", aws["endpoint"])
    if "fruits-out" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket="fruits-out", CreateBucketConfiguration={"LocationConstraint": REGION})
    proxy = _CountingProxy(aws["endpoint"])
    started = time.monotonic()
    try:
        assert main(["run", INPUT, f"s3://fruits-out/runs/requests-{partition_size}", "--k", "3", "--master",
                     "local[2]", "--s3-endpoint", proxy.url, "--partition-size", str(partition_size), "--quiet"]) == 0
    finally:
        seconds = time.monotonic() - started
        proxy.close()
    # The lease's heartbeats (one GET and one PUT every TTL / 4) grow with the run's time, not its images: counted
    # apart (every lease PUT after the one that takes it), so a slow machine's extra beat is not an extra request.
    def on_lease(method: str) -> list[int]:
        return [i for i, r in enumerate(proxy.requests) if r[0] == method and r[1].endswith("/" + LEASE)]

    lease_puts, lease_gets = on_lease("PUT"), on_lease("GET")
    beats = len(lease_puts) - 1
    assert 0 <= beats <= seconds // (TTL_S / 4), (beats, seconds)
    beat_requests = set(lease_puts[1:] + lease_gets[1:1 + beats])  # acquire's own GET and PUT stay
    reqs = [r for i, r in enumerate(proxy.requests) if i not in beat_requests]
    images = [(m, p) for m, p, _ in reqs if p.startswith("/fruits-in/fruits360/") and p.endswith(".jpg")]
    by_image: dict[str, list[str]] = {}
    for method, path in images:
        by_image.setdefault(path, []).append(method)
    assert len(by_image) == 20 and all(methods == ["GET"] for methods in by_image.values()), by_image
    lists = [r for r in reqs if r[0] == "GET" and ("list-type=2" in r[2] or re.search(r"(^|&)prefix=", r[2]))]
    puts = [r for r in reqs if r[0] in ("PUT", "POST")]
    driver_reads = [r for r in reqs if r[0] in ("GET", "HEAD") and r not in lists
                    and not (r[1].startswith("/fruits-in/fruits360/") and r[1].endswith(".jpg"))]
    settings = emr_settings(images=20, run_args=("--partition-size", str(partition_size)))
    plan, planned_beats = s3_requests(settings, slots=2), lease_renewals(settings)
    print(f"S3 requests for 20 images in {seconds:.0f} s: {len(images)} image GETs, {len(lists)} LIST, "
          f"{len(puts)} PUT/POST, {len(driver_reads)} other GET/HEAD, and {beats} lease heartbeats; plan: {plan}, "
          f"{planned_beats} heartbeats of them")
    assert plan["get_images"] == len(images) and plan["head_images"] == 0
    # The plan prices what the run sends, its heartbeats apart: never less, and not padded.
    assert plan["list_pages"] - 4 <= len(lists) <= plan["list_pages"], lists
    assert plan["put"] - planned_beats - 4 <= len(puts) <= plan["put"] - planned_beats, puts
    reads = plan["get_head_driver"] - planned_beats
    assert reads - 4 <= len(driver_reads) <= reads, driver_reads


def _play_the_cluster(endpoint: str, errors: list[BaseException]) -> None:
    """What EMR would do here: wait for the cluster, run its step's `fruitpipe run` arguments (in this process,
    on the tests' Spark session instead of YARN), then auto-terminate."""
    api = _client("emr", endpoint)
    try:
        deadline = time.monotonic() + 60
        while True:
            clusters = api.list_clusters(ClusterStates=["STARTING", "BOOTSTRAPPING", "RUNNING", "WAITING"])["Clusters"]
            mine = [c for c in clusters if c["Name"] == "fruitpipe-run-test"]
            if mine:
                break
            assert time.monotonic() < deadline, "no cluster started"
            time.sleep(0.2)
        cluster_id = mine[0]["Id"]
        args = api.list_steps(ClusterId=cluster_id)["Steps"][0]["Config"]["Args"]
        assert main(args[args.index(emr.SUBMIT_SCRIPT) + 1:] + ["--quiet"]) == 0
        api.terminate_job_flows(JobFlowIds=[cluster_id])
    except BaseException as exc:  # surfaced by the test
        errors.append(exc)


def test_emr_run_executes_its_step_and_fetches_run_json(aws, runs_granted, spark, capsys) -> None:
    """`emr run`: upload, up, wait with progress, fetch run.json, down. The step's own arguments are executed
    (against the same S3 API, the model read from the artifacts), so a wrong argument fails here."""
    errors: list[BaseException] = []
    cluster = threading.Thread(target=_play_the_cluster, args=(aws["endpoint"], errors))
    cluster.start()
    code = main(["emr", "run", INPUT, "s3://fruits-out/runs/emr-run", "--name", "fruitpipe-run-test",
                 "--wheel", aws["wheel"], "--poll", "0.2", "--timeout", "300", "--run-arg=--k", "--run-arg=4"])
    cluster.join(timeout=300)
    assert not errors, errors
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["counts"]["embedded"] == 20 and result["counts"]["accounted"] is True
    assert "cluster TERMINATED" in captured.err  # the progress lines
    api = _client("emr", aws["endpoint"])
    assert api.describe_cluster(ClusterId=result["cluster_id"])["Cluster"]["Status"]["State"] == "TERMINATED"
    s3 = _client("s3", aws["endpoint"])
    run_json = json.loads(s3.get_object(Bucket="fruits-out", Key="runs/emr-run/run.json")["Body"].read())
    assert run_json["model"]["source"] == "model_path" and run_json["pca"]["k"] == 4
    import io

    reduced = pq.read_table(io.BytesIO(s3.get_object(Bucket="fruits-out", Key=next(
        o["Key"] for o in s3.list_objects_v2(Bucket="fruits-out", Prefix="runs/emr-run/reduced/")["Contents"]
        if o["Key"].endswith(".parquet")))["Body"].read()))
    assert len(reduced.column("pca")[0].as_py()) == 4


def test_emr_run_reports_a_failed_step(aws, runs_granted, capsys) -> None:
    """A cluster that terminates without publishing (_SUCCESS missing) is a failure that points at the logs."""
    def fail_the_cluster() -> None:
        api = _client("emr", aws["endpoint"])
        for _ in range(300):
            clusters = [c for c in api.list_clusters(ClusterStates=["STARTING", "BOOTSTRAPPING", "RUNNING",
                                                                   "WAITING"])["Clusters"]
                        if c["Name"] == "fruitpipe-fail-test"]
            if clusters:
                api.terminate_job_flows(JobFlowIds=[clusters[0]["Id"]])
                return
            time.sleep(0.2)

    thread = threading.Thread(target=fail_the_cluster)
    thread.start()
    code = main(["emr", "run", INPUT, "s3://fruits-out/runs/never", "--name", "fruitpipe-fail-test",
                 "--wheel", aws["wheel"], "--poll", "0.2", "--timeout", "60", "-q"])
    thread.join()
    err = capsys.readouterr().err
    assert code == 2 and "did not complete" in err and "fruitpipe emr logs j-" in err and err.count("\n") == 1


def test_a_failed_bootstrap_is_explained(aws, runs_granted, capsys) -> None:
    """EMR ends a cluster whose bootstrap action failed in TERMINATED_WITH_ERRORS with a reason; the user sees it
    (moto runs in this process, so the test sets that state on its cluster, as EMR would)."""
    from moto.emr.models import emr_backends

    why = "On the master instance (i-0abc), bootstrap action 1 returned a non-zero return code"

    def fail_the_bootstrap() -> None:
        for _ in range(300):
            clusters = [c for account in list(emr_backends.values()) for backend in list(account.values())
                        for c in list(backend.clusters.values())
                        if c.name == "fruitpipe-bootstrap-test" and c.state != "TERMINATED"]
            if clusters:
                clusters[0].state = "TERMINATED_WITH_ERRORS"
                clusters[0].last_state_change_reason = why
                return
            time.sleep(0.05)  # polling for the cluster to exist, not a timed fault

    thread = threading.Thread(target=fail_the_bootstrap)
    thread.start()
    code = main(["emr", "run", INPUT, "s3://fruits-out/runs/bootstrap", "--name", "fruitpipe-bootstrap-test",
                 "--wheel", aws["wheel"], "--poll", "0.2", "--timeout", "60"])
    thread.join()
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2 and "cluster TERMINATED_WITH_ERRORS: " + why in last and "fruitpipe emr logs j-" in last
    assert "cluster TERMINATED_WITH_ERRORS, step" in err and why in err  # the progress line says it too


def _emr_run_process(aws, name: str):
    """`emr run` in a fresh process (signals go to it, not to pytest), its stderr piped."""
    import os
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "fruitpipe.cli", "emr", "run", INPUT, f"s3://fruits-out/runs/{name}",
                             "--name", name, "--wheel", aws["wheel"], "--poll", "0.2", "--timeout", "120", "-q"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ})


def _assert_interrupted_and_terminated(aws, proc, name: str) -> None:
    _, err = proc.communicate(timeout=60)
    cluster = [c for c in _client("emr", aws["endpoint"]).list_clusters()["Clusters"] if c["Name"] == name][0]
    assert cluster["Status"]["State"] in ("TERMINATING", "TERMINATED"), cluster["Status"]
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("fruitpipe emr: interrupted"), err


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_emr_run_terminates_its_cluster_on_a_signal(aws, runs_granted, sig: str) -> None:
    """A session closed (SIGHUP), a scheduler's kill (SIGTERM) or Ctrl-C while `emr run` waits: the cluster it
    started is terminated, and the command exits 130 with one line."""
    import signal

    name = f"fruitpipe-signal-{sig.lower()}"
    proc = _emr_run_process(aws, name)
    api = _client("emr", aws["endpoint"])
    deadline = time.monotonic() + 120
    while not [c for c in api.list_clusters()["Clusters"] if c["Name"] == name]:  # observable: it was started
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.1)  # polling for the event, not a timed fault
    proc.send_signal(getattr(signal, sig))
    _assert_interrupted_and_terminated(aws, proc, name)


def test_a_signal_while_run_job_flow_answers_still_terminates_the_cluster(aws, runs_granted, monkeypatch) -> None:
    """SIGTERM sent by the loopback EMR itself once it has made the cluster and before it answers RunJobFlow (the
    event, not a timing): `emr run` is inside botocore's call, the cluster exists and its id is not yet known. The
    signal waits for the id, then the cluster is terminated (it was left running: the signal raised inside the call,
    as the test above once saw under load)."""
    import signal

    from moto.emr.models import ElasticMapReduceBackend

    name, procs, signalled = "fruitpipe-signal-in-runjobflow", [], []
    real = ElasticMapReduceBackend.run_job_flow

    def run_job_flow(self, **kwargs):  # moto serves from this process: the hook runs before the answer is sent
        cluster = real(self, **kwargs)
        if kwargs.get("name") == name:
            procs[0].send_signal(signal.SIGTERM)
            signalled.append(cluster.id)
        return cluster

    monkeypatch.setattr(ElasticMapReduceBackend, "run_job_flow", run_job_flow)
    procs.append(_emr_run_process(aws, name))
    _assert_interrupted_and_terminated(aws, procs[0], name)
    assert len(signalled) == 1


def test_pipeline_runs_with_only_the_instance_role_policy(aws, tmp_path: Path) -> None:
    """The shipped EC2 policy is enough for a whole run, and no more: moto enforces IAM for this test, the
    pipeline runs (a fresh `fruitpipe run` process) with a user holding only that policy plus a Deny on one
    image. That image ends in rejects as `unreadable` (access denied); everything else is embedded; reading
    outside the granted prefixes is refused."""
    import os
    import subprocess
    import sys
    import urllib.request

    endpoint = aws["endpoint"]
    iam, s3 = _client("iam", endpoint), _client("s3", endpoint)
    for bucket in ("fruits-private", "fruits-out"):
        if bucket not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
            s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
    s3.put_object(Bucket="fruits-private", Key="secret.txt", Body=b"not for the cluster")
    s3.put_object(Bucket="fruits-in", Key="other-prefix/x.jpg", Body=b"outside the input prefix")
    test_objects = s3.list_objects_v2(Bucket="fruits-in", Prefix="fruits360/Test/")["Contents"]
    denied_key = sorted(o["Key"] for o in test_objects)[0]
    settings = emr.EmrSettings(input=INPUT, output="s3://fruits-out/runs/iam").validate()
    policy = emr.render_policy("ec2-instance-role", **emr.policy_values(
        settings, "123456789012", "arn:aws:kms:eu-west-3:123456789012:key/k1"))
    policy["Statement"].append({"Sid": "TestDeniesOneImage", "Effect": "Deny", "Action": "s3:GetObject",
                                "Resource": f"arn:aws:s3:::fruits-in/{denied_key}"})
    # moto authorises a multi-object delete (POST ?delete) as s3:DeleteObject on the *bucket* ARN, where AWS checks
    # s3:DeleteObject on each key (already granted above). On AWS this extra statement grants nothing: object
    # actions never match a bucket ARN.
    policy["Statement"].append({"Sid": "MotoMultiDelete", "Effect": "Allow", "Action": "s3:DeleteObject",
                                "Resource": "arn:aws:s3:::fruits-out"})
    iam.create_user(UserName="emr-node")
    iam.put_user_policy(UserName="emr-node", PolicyName="instance-role", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="emr-node")["AccessKey"]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
           "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": REGION}

    def enforce(count: str) -> None:
        """moto's switch: IAM is enforced after `count` more requests (0: now; inf: never)."""
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=count.encode(),
                                                      headers={"Content-Type": "text/plain"}, method="POST"),
                               timeout=10).close()

    enforce("0")
    try:
        node = boto3.client("s3", endpoint_url=endpoint, region_name=REGION, aws_access_key_id=key["AccessKeyId"],
                            aws_secret_access_key=key["SecretAccessKey"])
        for bucket, k in (("fruits-private", "secret.txt"), ("fruits-in", "other-prefix/x.jpg")):
            with pytest.raises(Exception, match="AccessDenied|403"):
                node.get_object(Bucket=bucket, Key=k)
        with pytest.raises(Exception, match="AccessDenied|403"):
            node.put_object(Bucket="fruits-in", Key="fruits360/Test/new.jpg", Body=b"x")  # input is read-only
        done = subprocess.run([sys.executable, "-m", "fruitpipe.cli", "run", INPUT, "s3://fruits-out/runs/iam",
                               "--k", "3", "--master", "local[2]", "--quiet"], env=env, capture_output=True,
                              text=True, timeout=600)
    finally:
        enforce("inf")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(s3.get_object(Bucket="fruits-out", Key="runs/iam/run.json")["Body"].read())
    counts = report["counts"]
    assert counts["listed"] == 20 and counts["embedded"] == 19 and counts["accounted"] is True
    assert counts["rejects_by_reason"] == {"unreadable": 1}
    import io

    rejects_key = next(o["Key"] for o in s3.list_objects_v2(Bucket="fruits-out", Prefix="runs/iam/rejects/")["Contents"]
                       if o["Key"].endswith(".parquet"))
    rejects = pq.read_table(io.BytesIO(s3.get_object(Bucket="fruits-out", Key=rejects_key)["Body"].read()))
    assert rejects.column("uri").to_pylist() == [f"s3://fruits-in/{denied_key}"]
    assert "AccessDenied" in rejects.column("detail")[0].as_py()


def _enforce_iam(endpoint: str, count: str) -> None:
    """moto's switch: IAM is enforced after `count` more requests (0: now; inf: never)."""
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=count.encode(),
                                                  headers={"Content-Type": "text/plain"}, method="POST"),
                           timeout=10).close()


def test_setup_that_cannot_read_a_bucket_setting_changes_nothing(aws, monkeypatch) -> None:
    """A refused read (AccessDenied) is not "not set": setup would have replaced the bucket's own policy. It stops
    in one line naming the permission, before any write; the "not found" answers alone mean absent."""
    endpoint = aws["endpoint"]
    iam, s3 = _client("iam", endpoint), _client("s3", endpoint)
    s3.create_bucket(Bucket="fruits-guarded", CreateBucketConfiguration={"LocationConstraint": REGION})
    theirs = {"Version": "2012-10-17", "Statement": [{"Sid": "Theirs", "Effect": "Deny", "Principal": "*",
                                                       "Action": "s3:DeleteBucket",
                                                       "Resource": "arn:aws:s3:::fruits-guarded"}]}
    s3.put_bucket_policy(Bucket="fruits-guarded", Policy=json.dumps(theirs))
    iam.create_user(UserName="half-admin")
    iam.put_user_policy(UserName="half-admin", PolicyName="s3", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": ["arn:aws:s3:::fruits-guarded",
                                                             "arn:aws:s3:::fruits-guarded/*"]},
            {"Effect": "Deny", "Action": "s3:GetBucketPolicy", "Resource": "arn:aws:s3:::fruits-guarded"}]}))
    key = iam.create_access_key(UserName="half-admin")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    _enforce_iam(endpoint, "0")
    try:
        with pytest.raises(emr.EmrError, match=r"^s3://fruits-guarded: reading its settings was refused "
                                               r"\(AccessDenied\): .* needs s3:GetBucketPolicy on the bucket; "
                                               r"nothing was changed$"):
            emr.Emr(REGION).ensure_bucket("fruits-guarded")
    finally:
        _enforce_iam(endpoint, "inf")
    assert json.loads(s3.get_bucket_policy(Bucket="fruits-guarded")["Policy"]) == theirs
    with pytest.raises(s3.exceptions.ClientError, match="NoSuchPublicAccessBlockConfiguration"):
        s3.get_public_access_block(Bucket="fruits-guarded")  # nothing written before the refused read either
    monkeypatch.undo()
    # With the reads allowed, the same bucket is hardened and its own statement kept.
    changed = emr.Emr(REGION).ensure_bucket("fruits-guarded")
    assert any("DenyInsecureTransport" in c for c in changed)
    sids = [st["Sid"] for st in json.loads(s3.get_bucket_policy(Bucket="fruits-guarded")["Policy"])["Statement"]]
    assert sids == ["Theirs", "DenyInsecureTransport"]


def test_each_input_output_pair_keeps_its_grant_and_up_checks_the_role_first(aws, capsys) -> None:
    """`setup` for another pair adds a policy beside the first (a run in progress keeps its access); --output-root
    grants every run below it once (the README's dated outputs); `up` refuses an OUTPUT the role may not write, in
    one line that says which setup to run, before anything is launched."""
    iam, api = _client("iam", aws["endpoint"]), _client("emr", aws["endpoint"])
    assert main(["emr", "setup", INPUT, OUTPUT, "-q"]) == 0
    assert main(["emr", "setup", INPUT, "s3://fruits-out/runs/2026-12-01", "--output-root", "s3://fruits-out/runs",
                 "-q"]) == 0
    capsys.readouterr()
    _client("s3", aws["endpoint"]).delete_bucket_policy(Bucket="fruits-out")  # moto's unconditional Deny (above)
    names = set(iam.list_role_policies(RoleName="fruitpipe-emr-ec2")["PolicyNames"])
    first = emr.pair_policy_name(emr_settings())
    rooted = emr.pair_policy_name(emr_settings(output="s3://fruits-out/runs/x", output_root="s3://fruits-out/runs"))
    assert {first, rooted} <= names and first != rooted
    aws_client = emr.Emr(REGION)
    aws_client.check_role_grants(emr_settings())  # the first pair is still granted
    aws_client.check_role_grants(emr_settings(output="s3://fruits-out/runs/2026-12-24"))  # any run below the root
    clusters = len(api.list_clusters()["Clusters"])
    assert main(["emr", "up", INPUT, "s3://fruits-out/elsewhere/1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "may not write OUTPUT" in err
    assert "run `fruitpipe emr setup s3://fruits-in/fruits360 s3://fruits-out/elsewhere/1`" in err
    assert len(api.list_clusters()["Clusters"]) == clusters  # nothing launched, nothing billed
    with pytest.raises(emr.EmrError, match="not under --output-root"):
        emr_settings(output="s3://fruits-out/other", output_root="s3://fruits-out/runs")


def test_setup_grants_the_buckets_own_kms_keys_through_s3_only_and_up_warns_of_others(aws, capsys, caplog) -> None:
    """A bucket whose default encryption is a customer KMS key: setup grants the instance role kms:Decrypt and
    kms:GenerateDataKey on exactly that key, only via S3 in the region; up warns when INPUT's objects use a key
    the role cannot use (each image would be rejected as unreadable)."""
    import logging

    kms, s3 = _client("kms", aws["endpoint"]), _client("s3", aws["endpoint"])
    theirs = kms.create_key(Description="the input bucket's key")["KeyMetadata"]["Arn"]
    other = kms.create_key(Description="a key the role never gets")["KeyMetadata"]["Arn"]
    s3.create_bucket(Bucket="fruits-kms-in", CreateBucketConfiguration={"LocationConstraint": REGION})
    s3.put_bucket_encryption(Bucket="fruits-kms-in", ServerSideEncryptionConfiguration={"Rules": [
        {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": theirs}}]})
    s3.put_object(Bucket="fruits-kms-in", Key="photos/Apple/1.jpg", Body=b"x", ServerSideEncryption="aws:kms",
                  SSEKMSKeyId=other)
    settings = emr_settings(input="s3://fruits-kms-in/photos")
    assert main(["emr", "setup", "s3://fruits-kms-in/photos", OUTPUT, "-q"]) == 0
    capsys.readouterr()
    s3.delete_bucket_policy(Bucket="fruits-out")  # moto's unconditional Deny (above)
    document = _client("iam", aws["endpoint"]).get_role_policy(
        RoleName="fruitpipe-emr-ec2", PolicyName=emr.pair_policy_name(settings))["PolicyDocument"]
    granted = [st for st in document["Statement"] if st["Sid"] == "UseTheBucketKeysThroughS3Only"]
    assert granted == [{"Sid": "UseTheBucketKeysThroughS3Only", "Effect": "Allow",
                        "Action": ["kms:Decrypt", "kms:GenerateDataKey"], "Resource": [theirs],
                        "Condition": {"StringEquals": {"kms:ViaService": f"s3.{REGION}.amazonaws.com"}}}]
    with caplog.at_level(logging.WARNING, logger="fruitpipe"):
        emr.Emr(REGION).check_role_grants(settings)
    assert any(other in r.getMessage() and "rejected as unreadable" in r.getMessage() for r in caplog.records)


def test_a_second_ctrl_c_cannot_cut_the_termination_short_and_expired_credentials_say_what_runs(
        aws, runs_granted, monkeypatch) -> None:
    """Ctrl-C while `emr run` waits, and a second one while it terminates the cluster (sent from inside the
    termination: an observable point): the second is ignored and the cluster ends. Credentials that expire
    during the wait (the termination refused too): the error names the cluster still running, when it ends by
    itself, and the `emr down` to run."""
    import os
    import signal

    from botocore.exceptions import ClientError

    api = _client("emr", aws["endpoint"])
    client = emr.Emr(REGION)
    real_down = client.down

    def interrupted_wait(*_args, **_kwargs):
        raise KeyboardInterrupt

    def down_with_a_second_ctrl_c(cluster_id: str) -> str:
        os.kill(os.getpid(), signal.SIGINT)  # ignored while terminating; else KeyboardInterrupt right here
        return real_down(cluster_id)

    monkeypatch.setattr(client, "wait", interrupted_wait)
    monkeypatch.setattr(client, "down", down_with_a_second_ctrl_c)
    settings = emr_settings(output="s3://fruits-out/runs/ctrl-c", name="fruitpipe-ctrl-c")
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        client.run(settings, 60, wheel=aws["wheel"])
    cluster = [c for c in api.list_clusters()["Clusters"] if c["Name"] == "fruitpipe-ctrl-c"][0]
    assert cluster["Status"]["State"] in ("TERMINATING", "TERMINATED")
    assert signal.getsignal(signal.SIGINT) is handler  # restored afterwards

    expired = ClientError({"Error": {"Code": "ExpiredTokenException", "Message": "The security token included in "
                                     "the request is expired"}}, "DescribeCluster")

    def fails(*_args, **_kwargs):
        raise expired

    monkeypatch.setattr(client, "wait", fails)
    monkeypatch.setattr(client, "down", fails)
    settings = emr_settings(output="s3://fruits-out/runs/expired", name="fruitpipe-expired")
    with pytest.raises(emr.EmrError) as caught:
        client.run(settings, 60, wheel=aws["wheel"])
    cluster_id = [c for c in api.list_clusters()["Clusters"] if c["Name"] == "fruitpipe-expired"][0]["Id"]
    message = str(caught.value)
    assert f"cluster {cluster_id} could not be terminated" in message and "is still running" in message
    assert f"`fruitpipe emr down {cluster_id} --region {REGION}`" in message and "UTC" in message
    api.terminate_job_flows(JobFlowIds=[cluster_id])


def test_a_customer_kms_bucket_keeps_its_key_and_the_operator_gets_decrypt_through_s3_only(aws, capsys) -> None:
    """Artifacts in a bucket whose default is a customer KMS key: upload sends no SSE header, so every artifact is
    encrypted with that key (an explicit AES256 downgraded it, and a "deny unless aws:kms" bucket policy refused
    it); plan (with credentials) gives the operator kms:Decrypt on exactly the keys of OUTPUT's, the logs' and the
    artifacts' buckets and GenerateDataKey on the artifacts' key, both through S3 in the region only."""
    kms, s3 = _client("kms", aws["endpoint"]), _client("s3", aws["endpoint"])
    key = kms.create_key(Description="the team's bucket key")["KeyMetadata"]["Arn"]
    s3.create_bucket(Bucket="fruits-cmk", CreateBucketConfiguration={"LocationConstraint": REGION})
    s3.put_bucket_encryption(Bucket="fruits-cmk", ServerSideEncryptionConfiguration={"Rules": [
        {"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key}}]})
    where = ["--artifacts", "s3://fruits-cmk/artifacts", "--logs", "s3://fruits-cmk/logs"]
    assert main(["emr", "plan", INPUT, "s3://fruits-cmk/runs/1", *where]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["operator_bucket_keys"] == {"checked": True, "customer_keys": [key]}
    kms_statements = [st for st in plan["operator_policy"]["Statement"] if "kms:" in json.dumps(st["Action"])]
    via = {"StringEquals": {"kms:ViaService": f"s3.{REGION}.amazonaws.com"}}
    assert kms_statements == [
        {"Sid": "RunLogsAndUploadReadThroughTheBucketKeysViaS3Only", "Effect": "Allow", "Action": "kms:Decrypt",
         "Resource": [key], "Condition": via},
        {"Sid": "UploadWritesThroughTheArtifactsBucketKeyViaS3Only", "Effect": "Allow",
         "Action": "kms:GenerateDataKey", "Resource": [key], "Condition": via}]
    assert main(["emr", "plan", INPUT, OUTPUT]) == 0  # SSE-S3 buckets: no key to grant, no KMS statement
    plan = json.loads(capsys.readouterr().out)
    assert plan["operator_bucket_keys"]["customer_keys"] == []
    assert "kms:" not in json.dumps(plan["operator_policy"])

    assert main(["emr", "upload", INPUT, "s3://fruits-cmk/runs/1", *where, "--wheel", aws["wheel"], "-q"]) == 0
    uris = json.loads(capsys.readouterr().out)
    for what in ("wheel", "bootstrap", "requirements", "model"):
        bucket, _, name = uris[what].removeprefix("s3://").partition("/")
        head = s3.head_object(Bucket=bucket, Key=name)
        assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"] == key, what


def _refuse(client, operation: str, code: str) -> None:
    """Make `client` answer `operation` with the error `code`, as AWS would for an identity lacking the right."""
    import botocore.awsrequest

    def refuse(**kwargs):
        error = {"Error": {"Code": code, "Message": f"not authorized to perform {operation}"},
                 "ResponseMetadata": {"HTTPStatusCode": 400}}
        return botocore.awsrequest.AWSResponse("", 400, {}, None), error

    client.meta.events.register(f"before-call.{client.meta.service_model.endpoint_prefix}.{operation}", refuse)


@pytest.mark.parametrize("refused", ["kms:DescribeKey", "elasticmapreduce:DescribeSecurityConfiguration"])
def test_a_refused_read_of_the_key_or_the_security_configuration_creates_no_second_one(aws, monkeypatch,
                                                                                        refused) -> None:
    """Only "not found" means absent: setup with kms:DescribeKey (or the security configuration's read) refused
    says which right is missing, in one line, and creates no second key, alias or configuration."""
    assert main(["emr", "setup", INPUT, OUTPUT, "-q"]) == 0  # the key and the configuration exist
    _client("s3", aws["endpoint"]).delete_bucket_policy(Bucket="fruits-out")  # moto's unconditional Deny (above)
    kms, emr_client = _client("kms", aws["endpoint"]), _client("emr", aws["endpoint"])
    keys_before = kms.list_keys()["Keys"]
    config_before = emr_client.describe_security_configuration(Name=emr.SECURITY_CONFIGURATION)
    aws_ = emr.Emr(REGION)
    plain_client = aws_.client
    service, operation = refused.split(":")
    if service == "kms":
        def client(name: str):
            made = plain_client(name)
            if name == "kms":
                _refuse(made, operation, "AccessDeniedException")
            return made

        monkeypatch.setattr(aws_, "client", client)
    else:
        _refuse(aws_.emr, operation, "AccessDeniedException")
    with pytest.raises(emr.EmrError, match=rf"refused \(AccessDeniedException\): .* needs {refused}.*; nothing was "
                                           "created$"):
        aws_.setup(emr_settings())
    assert kms.list_keys()["Keys"] == keys_before
    config_after = emr_client.describe_security_configuration(Name=emr.SECURITY_CONFIGURATION)
    assert config_after["CreationDateTime"] == config_before["CreationDateTime"]
    assert [a["AliasName"] for a in kms.list_aliases()["Aliases"]].count(emr.KMS_ALIAS) == 1


def _clusters(endpoint: str) -> set[str]:
    return {c["Id"] for c in _client("emr", endpoint).list_clusters()["Clusters"]}


def test_up_waits_for_iam_to_propagate_new_roles_and_nothing_else(aws) -> None:
    """Right after `setup`, EMR may answer RunJobFlow "Invalid InstanceProfile" until IAM has propagated the roles:
    `up` tries again, 5 s apart, for a minute (the waits are counted, not slept); another refusal is not retried,
    and a minute of refusals is one line saying what to check, with nothing started."""
    import botocore.awsrequest

    def failing(message: str, times: int):
        calls = {"n": 0}

        def answer(**kwargs):
            calls["n"] += 1
            if calls["n"] > times:
                return None  # the real call
            error = {"Error": {"Code": "ValidationException", "Message": message},
                     "ResponseMetadata": {"HTTPStatusCode": 400}}
            return botocore.awsrequest.AWSResponse("", 400, {}, None), error
        return answer, calls

    def launcher(message: str, times: int):
        aws_ = emr.Emr(REGION)
        waits: list[float] = []
        aws_.sleep = waits.append
        answer, calls = failing(message, times)
        aws_.emr.meta.events.register("before-call.elasticmapreduce.RunJobFlow", answer)
        return aws_, waits, calls

    before = _clusters(aws["endpoint"])
    aws_, waits, calls = launcher("Invalid InstanceProfile: fruitpipe-emr-ec2.", 2)
    started = aws_.up(emr_settings())["cluster_id"]
    assert waits == [5.0, 5.0] and calls["n"] == 3 and _clusters(aws["endpoint"]) == before | {started}
    aws_.down(started)

    aws_, waits, calls = launcher("Instance type m5.xlarge is not supported in this zone", 1)
    with pytest.raises(Exception, match="not supported in this zone"):
        aws_.up(emr_settings())
    assert waits == [] and calls["n"] == 1

    aws_, waits, calls = launcher("Service role arn:aws:iam::123456789012:role/fruitpipe-emr-service has "
                                  "insufficient EC2 permissions", 100)
    with pytest.raises(emr.EmrError, match=r"still refuses the roles after 60 s .*emr setup.*nothing was started$"):
        aws_.up(emr_settings())
    assert len(waits) == 11 and calls["n"] == 12
    assert _clusters(aws["endpoint"]) == before | {started}


def test_up_refuses_a_cluster_the_vcpu_quota_cannot_hold_unless_told(aws, monkeypatch, capsys) -> None:
    """A quota read too small for the plan is a refusal before anything is billed (it was a warning, and the
    cluster then waited in STARTING and failed); --ignore-quota launches anyway."""
    ec2, running = _quota_of_16_with_one_m5_running(aws, monkeypatch)
    before = _clusters(aws["endpoint"])
    try:
        assert main(["emr", "up", INPUT, OUTPUT, "--core-nodes", "3", "-q"]) == 2
        err = capsys.readouterr().err
        assert "16 vCPUs needed, 4 already running, quota 16" in err and "--ignore-quota" in err
        assert err.count("\n") == 1 and _clusters(aws["endpoint"]) == before
        assert main(["emr", "up", INPUT, OUTPUT, "--core-nodes", "3", "--ignore-quota", "-q"]) == 0
        started = json.loads(capsys.readouterr().out)["cluster_id"]
        assert _clusters(aws["endpoint"]) == before | {started}
        emr.Emr(REGION).down(started)
    finally:
        ec2.terminate_instances(InstanceIds=[i["InstanceId"] for i in running["Instances"]])


def test_the_way_to_s3_is_matched_to_the_vpcs_s3_endpoints_and_private_groups_are_tagged(aws, capsys,
                                                                                        caplog) -> None:
    """A subnet whose only gateway endpoint is DynamoDB's is refused (it was accepted), one whose default route
    goes to a transit gateway is launched with a warning (it was refused), --skip-network-check launches the first;
    EMR's private-subnet security groups are checked and tagged as the public ones are."""
    import logging

    ec2, api = _client("ec2", aws["endpoint"]), _client("emr", aws["endpoint"])
    vpc = ec2.create_vpc(CidrBlock="10.7.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.7.1.0/24")["Subnet"]["SubnetId"]
    private = [ec2.create_security_group(GroupName=name, Description="EMR private", VpcId=vpc)["GroupId"]
               for name in ("ElasticMapReduce-Master-Private", "ElasticMapReduce-Slave-Private")]
    table = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["RouteTables"][0]
    ec2.create_vpc_endpoint(VpcId=vpc, ServiceName=f"com.amazonaws.{REGION}.dynamodb", VpcEndpointType="Gateway",
                            RouteTableIds=[table["RouteTableId"]])
    flags = ["--subnet-id", subnet, "--name", "fruitpipe-route-test"]
    assert main(["emr", "plan", INPUT, OUTPUT, *flags]) == 0
    network = json.loads(capsys.readouterr().out)["network"]
    assert set(private) <= set(network["untagged"]) and set(private) <= set(network["emr_security_groups"])
    assert main(["emr", "setup", INPUT, OUTPUT, *flags, "-q"]) == 0  # tags the subnet, VPC and private groups
    capsys.readouterr()
    _client("s3", aws["endpoint"]).delete_bucket_policy(Bucket="fruits-out")  # moto's unconditional Deny (above)
    tags = ec2.describe_tags(Filters=[{"Name": "resource-id", "Values": private}])["Tags"]
    assert {t["ResourceId"] for t in tags if t["Key"] == emr.EMR_MANAGED_TAG} == set(private)
    before = _clusters(aws["endpoint"])
    assert main(["emr", "up", INPUT, OUTPUT, *flags]) == 2  # DynamoDB's endpoint is no way to S3
    err = capsys.readouterr().err
    assert f"subnet {subnet} has no route to S3" in err and "--skip-network-check" in err
    assert _clusters(aws["endpoint"]) == before
    assert main(["emr", "up", INPUT, OUTPUT, *flags, "--skip-network-check", "-q"]) == 0
    started = json.loads(capsys.readouterr().out)["cluster_id"]
    api.terminate_job_flows(JobFlowIds=[started])

    tgw = ec2.create_transit_gateway(Description="the company's hub")["TransitGateway"]["TransitGatewayId"]
    ec2.create_route(RouteTableId=table["RouteTableId"], DestinationCidrBlock="0.0.0.0/0", TransitGatewayId=tgw)
    assert main(["emr", "plan", INPUT, OUTPUT, *flags]) == 0
    route = json.loads(capsys.readouterr().out)["network"]["s3_route"]
    assert route.startswith("not verified: the default route goes to transit gateway " + tgw)
    with caplog.at_level(logging.WARNING, logger="fruitpipe"):
        assert main(["emr", "up", INPUT, OUTPUT, *flags]) == 0
    started = json.loads(capsys.readouterr().out)["cluster_id"]
    assert any("not verified" in r.getMessage() and tgw in r.getMessage() for r in caplog.records)
    assert api.describe_cluster(ClusterId=started)["Cluster"]["Ec2InstanceAttributes"]["Ec2SubnetId"] == subnet
    api.terminate_job_flows(JobFlowIds=[started])


def test_the_code_is_keyed_by_its_digest_and_a_wheel_of_other_code_is_refused(aws, tmp_path: Path, capsys) -> None:
    """Two checkouts at one version (or an edit between two runs) used to share `<version>/`, so a cluster got
    whichever upload landed last: the wheel and the bootstrap now live under the digest of the code, the one
    run.json records (versions.fruitpipe_code_sha256); a --wheel holding other code than the fruitpipe running
    the command is refused, and nothing is uploaded for it."""
    import shutil
    import zipfile

    from fruitpipe.cloud.artifacts import wheel_code_sha256
    from fruitpipe.version import code_sha256

    assert wheel_code_sha256(Path(aws["wheel"])) == code_sha256()  # the built wheel holds exactly this code
    edited = tmp_path / "other" / Path(aws["wheel"]).name
    edited.parent.mkdir()
    with zipfile.ZipFile(aws["wheel"]) as src, zipfile.ZipFile(edited, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "fruitpipe/cloud/bootstrap.sh":
                data += b"# an edit made in another checkout\n"
            dst.writestr(item, data)
    assert wheel_code_sha256(edited) != code_sha256()
    s3 = _client("s3", aws["endpoint"])
    s3.create_bucket(Bucket="fruits-code", CreateBucketConfiguration={"LocationConstraint": REGION})
    where = ["--artifacts", "s3://fruits-code/artifacts"]
    assert main(["emr", "upload", INPUT, OUTPUT, *where, "--wheel", str(edited), "-q"]) == 2
    err = capsys.readouterr().err
    assert "holds other code" in err and "omit --wheel" in err and err.count("\n") == 1
    assert "Contents" not in s3.list_objects_v2(Bucket="fruits-code")
    shutil.copy(aws["wheel"], tmp_path / Path(aws["wheel"]).name)
    assert main(["emr", "upload", INPUT, OUTPUT, *where, "--wheel", str(tmp_path / Path(aws["wheel"]).name),
                 "-q"]) == 0
    uris = json.loads(capsys.readouterr().out)
    assert uris["prefix"] == f"s3://fruits-code/artifacts/code/{emr._version()}-{code_sha256()[:16]}"


def test_a_notebook_cluster_is_told_where_the_model_is_in_s3_and_up_prints_it(aws, capsys) -> None:
    """`up --notebook-idle` prints the notebook's model parameter (the model `upload` put in S3) and sets it on the
    cluster, where the notebook's driver (Livy's AM) reads it: never the public weights, which a private subnet
    cannot reach."""
    assert main(["emr", "up", INPUT, OUTPUT, "--notebook-idle", "30", "-q"]) == 0
    started = json.loads(capsys.readouterr().out)
    model = emr.artifact_uris(emr_settings())["model"]
    assert started["notebook"]["FRUITPIPE_NB_MODEL_PATH"] == model and started["step_id"] == ""
    cluster = _client("emr", aws["endpoint"]).describe_cluster(ClusterId=started["cluster_id"])["Cluster"]
    defaults = next(c for c in cluster["Configurations"] if c["Classification"] == "spark-defaults")
    assert defaults["Properties"]["spark.yarn.appMasterEnv.FRUITPIPE_NB_MODEL_PATH"] == model
    emr.Emr(REGION).down(started["cluster_id"])


class _StudioApi:
    """EMR Studio's calls answered as AWS documents them (moto has no Studio API), recording each request: the
    security groups and roles are moto's own."""

    def __init__(self) -> None:
        self.studios: dict[str, dict] = {}
        self.requests: list[tuple[str, dict]] = []

    def install(self, client) -> None:
        """Answer this client's Studio calls from this registry."""
        import botocore.awsrequest

        def create(params):
            sid = f"es-{len(self.studios) + 1:025d}"
            self.studios[sid] = {"StudioId": sid, "Url": f"https://{sid}.emrstudio-prod.{REGION}.amazonaws.com",
                                 **{k: v for k, v in params.items() if k != "Tags"}}
            return {"StudioId": sid, "Url": self.studios[sid]["Url"]}

        answers = {"CreateStudio": create,
                   "ListStudios": lambda p: {"Studios": [{"StudioId": s["StudioId"], "Name": s["Name"]}
                                                         for s in self.studios.values()]},
                   "DescribeStudio": lambda p: {"Studio": self.studios[p["StudioId"]]},
                   "DeleteStudio": lambda p: self.studios.pop(p["StudioId"]) and {}}
        for operation, respond in answers.items():
            def handler(params, operation=operation, respond=respond, **kwargs):
                body = params["body"]  # the serialized request: EMR's JSON protocol
                sent = json.loads((body.decode() if isinstance(body, bytes) else body) or "{}")
                self.requests.append((operation, sent))
                return (botocore.awsrequest.AWSResponse("", 200, {}, None),
                        {**respond(sent), "ResponseMetadata": {"HTTPStatusCode": 200}})
            client.meta.events.register(f"before-call.elasticmapreduce.{operation}", handler)

    def calls(self, operation: str) -> list[dict]:
        return [params for op, params in self.requests if op == operation]


def test_emr_studio_is_planned_created_once_in_the_clusters_subnet_and_removed(aws, monkeypatch, capsys) -> None:
    """`emr studio` shows the plan and writes nothing; `--create` makes the two roles (EMR's trust, conditioned on
    this account), the Workspace and engine groups (18888 between them only, 443 out, tagged for the managed
    policies) and an IAM-auth Studio in the cluster's VPC and subnet with its S3 location under the artifacts; a
    second `--create` changes nothing; a notebook cluster outside the Studio's subnets is refused; `--down` removes
    all of it."""
    ec2, iam = _client("ec2", aws["endpoint"]), _client("iam", aws["endpoint"])
    api = _StudioApi()
    real_init = emr.Emr.__init__

    def init(self, region: str) -> None:  # every Emr the commands make answers Studio calls from `api`
        real_init(self, region)
        api.install(self.emr)

    monkeypatch.setattr(emr.Emr, "__init__", init)
    vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    subnet = emr.Emr(REGION).network(emr_settings()).subnet_id
    names = {"Name": "group-name", "Values": ["fruitpipe-studio-workspace", "fruitpipe-studio-engine"]}
    assert main(["emr", "studio", INPUT, OUTPUT]) == 0  # the plan: nothing written
    plan = json.loads(capsys.readouterr().out)
    assert plan["studio"]["AuthMode"] == "IAM" and plan["studio"]["SubnetIds"] == [subnet]
    assert plan["studio"]["DefaultS3Location"] == "s3://fruits-out/fruitpipe-artifacts/studio/"
    assert plan["existing"] is None and not api.calls("CreateStudio")
    assert not ec2.describe_security_groups(Filters=[names])["SecurityGroups"]

    assert main(["emr", "studio", INPUT, OUTPUT, "--create", "-q"]) == 0
    done = json.loads(capsys.readouterr().out)
    _client("s3", aws["endpoint"]).delete_bucket_policy(Bucket="fruits-out")  # moto's unconditional Deny (above)
    (request,) = api.calls("CreateStudio")
    groups = {g["GroupName"]: g for g in ec2.describe_security_groups(Filters=[
        {"Name": "vpc-id", "Values": [vpc]}, names])["SecurityGroups"]}
    workspace, engine = groups["fruitpipe-studio-workspace"], groups["fruitpipe-studio-engine"]
    assert request == {**plan["studio"], "ServiceRole": "arn:aws:iam::123456789012:role/fruitpipe-studio-service",
                       "VpcId": vpc, "WorkspaceSecurityGroupId": workspace["GroupId"],
                       "EngineSecurityGroupId": engine["GroupId"]}
    assert [(r["IpProtocol"], r["FromPort"], [p["GroupId"] for p in r["UserIdGroupPairs"]]) for r in
            engine["IpPermissions"]] == [("tcp", 18888, [workspace["GroupId"]])]
    egress = sorted((r["FromPort"], [p["GroupId"] for p in r["UserIdGroupPairs"]],
                     [x["CidrIp"] for x in r.get("IpRanges", [])]) for r in workspace["IpPermissionsEgress"])
    assert egress == [(443, [], ["0.0.0.0/0"]), (18888, [engine["GroupId"]], [])]
    assert engine["IpPermissionsEgress"] == []  # the default allow-all rule removed
    for group in (workspace, engine):
        assert {"Key": emr.EMR_MANAGED_TAG, "Value": "true"} in group["Tags"]
    trust = iam.get_role(RoleName="fruitpipe-studio-service")["Role"]["AssumeRolePolicyDocument"]
    assert trust["Statement"][0]["Principal"] == {"Service": "elasticmapreduce.amazonaws.com"}
    assert trust["Statement"][0]["Condition"]["StringEquals"] == {"aws:SourceAccount": "123456789012"}
    service = iam.get_role_policy(RoleName="fruitpipe-studio-service", PolicyName="fruitpipe-studio")
    s3_resources = [st["Resource"] for st in service["PolicyDocument"]["Statement"] if "s3:PutObject" in st["Action"]]
    assert s3_resources == ["arn:aws:s3:::fruits-out/fruitpipe-artifacts/studio/*"]
    assert iam.get_role(RoleName="fruitpipe-studio-user")["Role"]["RoleName"] == "fruitpipe-studio-user"
    assert done["url"].startswith("https://es-") and "fruitpipe-studio-user" in done["for_users"]

    assert main(["emr", "studio", INPUT, OUTPUT, "--create", "-q"]) == 0  # idempotent
    again = json.loads(capsys.readouterr().out)
    _client("s3", aws["endpoint"]).delete_bucket_policy(Bucket="fruits-out")
    # Only the bucket statement this test removed (moto's Deny) comes back: no role, group or Studio is made again.
    assert len(api.calls("CreateStudio")) == 1
    assert [c for c in again["changed"] if "DenyInsecureTransport" not in c] == []
    assert len(ec2.describe_security_groups(Filters=[names])["SecurityGroups"]) == 2

    # A notebook cluster in a subnet the Studio does not have: refused before anything is billed.
    before = _clusters(aws["endpoint"])
    elsewhere = ec2.create_vpc(CidrBlock="10.5.0.0/16")["Vpc"]["VpcId"]
    outside = ec2.create_subnet(VpcId=elsewhere, CidrBlock="10.5.1.0/24")["Subnet"]["SubnetId"]
    aws_ = emr.Emr(REGION)
    aws_.tag_network(aws_.network(emr_settings(subnet_id=outside)))
    table = ec2.describe_route_tables(Filters=[{"Name": "vpc-id", "Values": [elsewhere]}])["RouteTables"][0]
    ec2.create_vpc_endpoint(VpcId=elsewhere, ServiceName=f"com.amazonaws.{REGION}.s3", VpcEndpointType="Gateway",
                            RouteTableIds=[table["RouteTableId"]])
    assert main(["emr", "up", INPUT, OUTPUT, "--notebook-idle", "30", "--subnet-id", outside]) == 2
    err = capsys.readouterr().err
    assert f"subnet {outside} is not one of the EMR Studio's ({subnet})" in err and err.count("\n") == 1
    assert _clusters(aws["endpoint"]) == before

    assert main(["emr", "studio", INPUT, OUTPUT, "--down", "-q"]) == 0
    removed = json.loads(capsys.readouterr().out)["removed"]
    assert len(removed) == 5 and not api.studios
    assert not ec2.describe_security_groups(Filters=[names])["SecurityGroups"]
    assert not {"fruitpipe-studio-user", "fruitpipe-studio-service"} & {r["RoleName"] for r in iam.list_roles()["Roles"]}
    assert main(["emr", "studio", INPUT, OUTPUT, "--down", "-q"]) == 0  # nothing left: nothing to do
    assert json.loads(capsys.readouterr().out)["removed"][0].startswith("nothing")
