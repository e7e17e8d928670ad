"""`fruitpipe emr` without AWS: the shipped IAM policies, the plan and its checks, and the nodes' wheelhouse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emrkit import INPUT, OUTPUT, emr_settings, fake_wheel
from fruitpipe.cli import main
from fruitpipe.cloud import emr
from fruitpipe.cloud.artifacts import NODE_PYTHON, build_wheelhouse, node_extras, node_lock, runtime_requirements
from fruitpipe.cloud.plan import job_flow_request
from fruitpipe.cloud.sizing import executor_conf, executors
from fruitpipe.cloud.settings import INSTANCE_TYPES, S3_GET_PER_1000


@pytest.fixture
def no_credentials(monkeypatch, tmp_path: Path) -> None:
    """No AWS credentials anywhere in the chain: `emr plan` then makes no AWS call and says so."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _s3_statements(policy: dict) -> list[dict]:
    actions = lambda st: [st["Action"]] if isinstance(st["Action"], str) else st["Action"]  # noqa: E731
    return [st for st in policy["Statement"] if any(a.startswith("s3:") or a == "*" for a in actions(st))]


def test_shipped_policies_are_least_privilege() -> None:
    """Every Allow on S3 names one action list without wildcards and resources under the run's prefixes only."""
    from importlib import resources

    folder = resources.files("fruitpipe.cloud").joinpath("policies")
    names = sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))
    assert names == ["ec2-instance-role", "ec2-trust", "emr-service-role", "emr-service-trust", "operator",
                     "studio-service-role", "studio-user-role", "studio-user-trust"]
    for name in names:
        json.loads(folder.joinpath(f"{name}.json").read_text())  # the templates themselves are valid JSON
    values = emr.policy_values(emr_settings(), "123456789012", "arn:aws:kms:eu-west-3:123456789012:key/k1")
    instance = emr.render_policy("ec2-instance-role", **values)
    allowed_prefixes = ("arn:aws:s3:::fruits-in/fruits360", "arn:aws:s3:::fruits-out/runs/emr",
                        "arn:aws:s3:::fruits-out/fruitpipe-artifacts/", "arn:aws:s3:::fruits-out/fruitpipe-logs/")
    s3_statements = _s3_statements(instance)
    assert len(s3_statements) == 6
    for st in s3_statements:
        assert st["Effect"] == "Allow"
        actions = [st["Action"]] if isinstance(st["Action"], str) else st["Action"]
        resources_ = [st["Resource"]] if isinstance(st["Resource"], str) else st["Resource"]
        assert all("*" not in a for a in actions), st
        for res in resources_:
            assert res != "*" and not res.startswith("arn:aws:s3:::*"), st
            if actions == ["s3:ListBucket"]:  # bucket ARN, narrowed to the prefix by a condition
                assert res in ("arn:aws:s3:::fruits-in", "arn:aws:s3:::fruits-out")
                prefixes = st["Condition"]["StringLike"]["s3:prefix"]
                assert all(p.startswith(("fruits360", "runs/emr")) for p in prefixes)
            else:
                assert res.startswith(allowed_prefixes), res
                assert not res.endswith("/*") or res.count("*") == 1
    by_sid = {st["Sid"]: st for st in instance["Statement"]}
    assert by_sid["ReadInputPrefixOnly"]["Action"] == "s3:GetObject"  # input: read, never write
    assert by_sid["WriteLogsOnly"]["Action"] == "s3:PutObject"
    assert all(st["Resource"] != "*" for st in instance["Statement"])
    service = emr.render_policy("emr-service-role", **values)
    assert _s3_statements(service) == []  # the service role gets no S3 access of its own
    assert {st["Resource"] for st in service["Statement"]} == {
        "arn:aws:iam::123456789012:role/fruitpipe-emr-ec2", "arn:aws:kms:eu-west-3:123456789012:key/k1"}
    trust = emr.render_policy("emr-service-trust", **values)
    assert trust["Statement"][0]["Condition"]["StringEquals"]["aws:SourceAccount"] == "123456789012"


def test_whole_bucket_prefixes_are_refused(no_credentials) -> None:
    with pytest.raises(emr.EmrError, match="never a whole bucket"):
        emr.plan(emr.EmrSettings(input="s3://fruits-in", output=OUTPUT))


def test_plan_has_the_whole_request(no_credentials, capsys) -> None:
    assert main(["emr", "plan", INPUT, OUTPUT, "--core-nodes", "3", "--run-arg=--k", "--run-arg=50"]) == 0
    plan = json.loads(capsys.readouterr().out)
    req = plan["run_job_flow"]
    assert plan["region"] == "eu-west-3" and req["ReleaseLabel"] == emr.DEFAULT_RELEASE
    groups = {g["InstanceRole"]: g for g in req["Instances"]["InstanceGroups"]}
    assert groups["MASTER"]["InstanceType"] == groups["CORE"]["InstanceType"] == "m5.xlarge"
    assert groups["MASTER"]["InstanceCount"] == 1 and groups["CORE"]["InstanceCount"] == 3
    assert req["Instances"]["KeepJobFlowAliveWhenNoSteps"] is False  # terminates after its step
    assert req["Applications"] == [{"Name": "Spark"}] and req["LogUri"] == "s3://fruits-out/fruitpipe-logs/"
    art = plan["artifacts"]
    from fruitpipe.version import code_sha256

    code = f"s3://fruits-out/fruitpipe-artifacts/code/{emr._version()}-{code_sha256()[:16]}"
    assert art["prefix"] == code and art["wheel"] == f"{code}/{emr.wheel_name()}"
    assert art["model"].startswith("s3://fruits-out/fruitpipe-artifacts/models/ad116e43570b0c58/")
    bootstrap = req["BootstrapActions"][0]["ScriptBootstrapAction"]
    assert bootstrap == {"Path": art["bootstrap"], "Args": [art["prefix"], emr.wheel_name(), art["wheelhouse"],
                                                     "eu-west-3"]}
    assert art["wheelhouse"].startswith("s3://fruits-out/fruitpipe-artifacts/wheelhouse/py3.11-")
    step = req["Steps"][0]
    assert step["ActionOnFailure"] == "TERMINATE_CLUSTER" and step["HadoopJarStep"]["Jar"] == "command-runner.jar"
    args = step["HadoopJarStep"]["Args"]
    # A step that hangs is killed (and the cluster with it): 3x the estimate, at least 30 minutes.
    assert args[:4] == ["timeout", "--signal=TERM", "--kill-after=120", "30m"]
    assert args[4:9] == ["spark-submit", "--master", "yarn", "--deploy-mode", "client"]
    run = args[args.index(emr.SUBMIT_SCRIPT) + 1:]
    assert run == ["run", INPUT, OUTPUT, "--model", "mobilenet_v2", "--model-path", art["model"], "--master", "yarn",
                   "--region", "eu-west-3", "--k", "50"]
    assert req["SecurityConfiguration"] == emr.SECURITY_CONFIGURATION  # EBS encrypted with the setup's KMS key
    assert {"Key": emr.EMR_MANAGED_TAG, "Value": "true"} in req["Tags"]
    # fruitpipe cannot know whether the photos hold personal data: no classification tag unless the team adds one.
    assert "data-classification" not in {t["Key"] for t in req["Tags"]}
    spark_defaults = req["Configurations"][0]["Properties"]
    # m5.xlarge: YARN has 12,288 MB; 4 Python workers + Spark's 384 MB outside the heap, the AM's 896 MB and 512 MB
    # of headroom; the rest is heap.
    assert {k: spark_defaults[k] for k in ("spark.executor.cores", "spark.executor.memory",
                                           "spark.executor.memoryOverhead", "spark.yarn.am.memory",
                                           "spark.yarn.am.memoryOverhead")} == {
        "spark.executor.cores": "4", "spark.executor.memory": "8448m", "spark.executor.memoryOverhead": "2432m",
        "spark.yarn.am.memory": "512m", "spark.yarn.am.memoryOverhead": "384m"}
    assert not any("extraJavaOptions" in k for k in spark_defaults)  # EMR's own stay in place
    assert plan["network"] == {"checked": False, "why": plan["network"]["why"],
                               "subnet_id": "a default subnet of the default VPC"}
    assert "no AWS credentials" in plan["network"]["why"] and plan["quota"]["checked"] is False
    est = plan["estimate"]
    assert est["s3_requests"]["get_images"] == 138_704 and est["s3_requests"]["head_images"] == 0
    assert est["usd"]["s3_requests"] > 138_704 / 1000 * S3_GET_PER_1000
    assert est["core_vcpus"] == 12 and est["prices"]["stated_on"] == emr.PRICES_DATE
    listing_min = 139 * 0.1 / 60  # 139 LIST pages of 1,000 keys, 100 ms each, on the driver before the embedding
    expected_min = listing_min + 138_704 / (12 * emr.MEASURED_IMG_PER_VCPU_S) / 60 + 12.0
    assert est["total_minutes"] == pytest.approx(expected_min, abs=0.1)
    assert est["listing_minutes"] == pytest.approx(listing_min, abs=0.05)
    expected_usd = expected_min / 60 * 4 * sum(emr.NODE_PRICES_EU_WEST_3["m5.xlarge"])
    assert est["usd"]["nodes"] == pytest.approx(expected_usd, abs=1e-3)


def test_a_notebook_cluster_has_livy_and_the_gateway_no_step_and_an_idle_timeout(no_credentials, capsys) -> None:
    """`--notebook-idle`: what EMR Studio attaches to (Livy, Jupyter Enterprise Gateway), with fruitpipe's venv as
    Spark's Python on every node, and EMR's own auto-termination instead of a step that ends the cluster."""
    assert main(["emr", "plan", INPUT, OUTPUT, "--notebook-idle", "45"]) == 0
    plan = json.loads(capsys.readouterr().out)
    req = plan["run_job_flow"]
    # EMR notebooks require Hadoop, Spark, Livy and (6.2+) Jupyter Enterprise Gateway.
    assert req["Applications"] == [{"Name": "Hadoop"}, {"Name": "Spark"}, {"Name": "Livy"},
                                   {"Name": "JupyterEnterpriseGateway"}]
    livy = next(c for c in req["Configurations"] if c["Classification"] == "livy-conf")["Properties"]
    # A forgotten Workspace's session ends after the idle time, so EMR's own idle timeout can end the cluster; a
    # session running a statement is not cut.
    assert livy["livy.server.session.timeout"] == "45m" and livy["livy.server.session.timeout-check"] == "true"
    assert livy["livy.server.session.timeout-check.skip-busy"] == "true"
    # The notebook's driver reads the model `emr upload` put in S3 (a private subnet has no internet).
    props = req["Configurations"][0]["Properties"]
    assert props["spark.yarn.appMasterEnv.FRUITPIPE_NB_MODEL_PATH"] == plan["artifacts"]["model"]
    assert plan["artifacts"]["model"].startswith("s3://fruits-out/fruitpipe-artifacts/models/")
    assert "Steps" not in req and req["Instances"]["KeepJobFlowAliveWhenNoSteps"] is True
    assert req["AutoTerminationPolicy"] == {"IdleTimeout": 2700}
    assert req["Configurations"][0]["Properties"]["spark.pyspark.python"] == "/opt/fruitpipe/venv/bin/python"
    assert plan["estimate"]["notebook_cluster"]["usd_per_hour"] > 0
    assert main(["emr", "run", INPUT, OUTPUT, "--notebook-idle", "45"]) == 2
    assert "use `fruitpipe emr up` for it" in capsys.readouterr().err
    assert main(["emr", "plan", INPUT, OUTPUT, "--notebook-idle", "20000"]) == 2
    assert "between 1 and 10080 minutes" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--region", "us-east-1"], "outside the EU"),
    (["--core-nodes", "0"], "at least 1"),
    (["--core-type", "x9.huge"], "no price known"),
    (["--release-label", "emr-6.15.0"], "predates emr-7.1.0"),
    (["--release-label", "emr-7.0.0"], "first release whose nodes ship Python 3.11"),
    (["--core-type", "x9.huge", "--node-price", "1"], "executors cannot be sized"),
    (["--run-arg=--precision", "--run-arg=INT8"], "`fruitpipe run` would refuse it"),
])
def test_plan_refuses_bad_settings_in_one_line(no_credentials, capsys, argv, message) -> None:
    assert main(["emr", "plan", INPUT, OUTPUT, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_non_eu_region_needs_the_flag(no_credentials, capsys) -> None:
    assert main(["emr", "plan", INPUT, OUTPUT, "--region", "us-east-1", "--allow-non-eu"]) == 0
    assert json.loads(capsys.readouterr().out)["region"] == "us-east-1"


@pytest.mark.parametrize("kind", sorted(INSTANCE_TYPES))
def test_executors_fit_the_yarn_memory_of_each_instance_type_beside_the_application_master(kind: str) -> None:
    """One executor per node that YARN can grant on every node, the one holding the client-mode ApplicationMaster
    (512 MB + 384 MB) included, with 512 MB of headroom: heap + overhead + AM within the node's YARN memory, in
    YARN's 32 MB units, all vCPUs as cores and 512 MB of overhead per Python worker (each holds an ONNX session)."""
    conf = executor_conf(kind)
    heap, overhead = int(conf["spark.executor.memory"][:-1]), int(conf["spark.executor.memoryOverhead"][:-1])
    am = int(conf["spark.yarn.am.memory"][:-1]) + int(conf["spark.yarn.am.memoryOverhead"][:-1])
    yarn = INSTANCE_TYPES[kind].yarn_mb
    assert am == 896 and heap + overhead + am + 512 <= yarn and heap % 32 == 0 and heap >= 1024
    assert int(conf["spark.executor.cores"]) == INSTANCE_TYPES[kind].vcpus
    assert overhead == 384 + 512 * INSTANCE_TYPES[kind].vcpus
    assert yarn - (heap + overhead + am + 512) < 32  # nothing more left on the table than rounding
    for nodes in (1, 2, 5):
        placed = executors(emr_settings(core_type=kind, core_nodes=nodes, node_price=1.0))
        assert placed["per_node"] == 1 and placed["on_the_node_with_the_application_master"] == 1
        assert placed["in_all"] == nodes and placed["cores_in_all"] == nodes * INSTANCE_TYPES[kind].vcpus


@pytest.mark.parametrize("kind", sorted(INSTANCE_TYPES))
def test_a_notebook_drivers_container_fits_beside_the_executor_on_every_node(kind: str, no_credentials,
                                                                            capsys) -> None:
    """Livy runs a notebook session's driver inside its YARN ApplicationMaster on a core node: its memory and
    overhead are set explicitly (2,048 + 384 MB) and the executor is sized so that both fit the node's YARN memory,
    for every instance type and node count plan accepts, so the first job gets every core node's executor (EMR 7's
    default driver beside a step-sized executor: 2,048 + 384 + 10,880 > 12,288 on m5.xlarge, and the job waited).
    A type too small for both (c5.xlarge: 6,144 MB) is refused by plan in one line."""
    if INSTANCE_TYPES[kind].yarn_mb - 2432 - 512 - (384 + 512 * INSTANCE_TYPES[kind].vcpus) < 1024:
        argv = ["emr", "plan", INPUT, OUTPUT, "--notebook-idle", "60", "--core-type", kind, "--node-price", "1"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "the notebook driver; use a larger type" in err and err.count("\n") == 1
        return
    conf = executor_conf(kind, notebook=True)
    driver = int(conf["spark.driver.memory"][:-1]) + int(conf["spark.driver.memoryOverhead"][:-1])
    executor = int(conf["spark.executor.memory"][:-1]) + int(conf["spark.executor.memoryOverhead"][:-1])
    assert driver == 2048 + 384
    assert -(-driver // 32) * 32 + -(-executor // 32) * 32 <= INSTANCE_TYPES[kind].yarn_mb
    for nodes in (1, 2, 3, 10):
        settings = emr_settings(core_type=kind, core_nodes=nodes, node_price=1.0, notebook_idle_min=60)
        placed = executors(settings)
        assert placed["in_all"] == nodes and placed["on_the_node_with_the_application_master"] == 1
        assert placed["executor_container_mb"] + placed["application_master_mb"] <= placed["yarn_mb_per_node"]
        props = job_flow_request(settings)["Configurations"][0]["Properties"]
        assert props["spark.executor.instances"] == str(nodes)


def test_dynamic_allocation_is_off_and_every_core_node_has_its_executor_from_the_start(no_credentials,
                                                                                     capsys) -> None:
    """EMR turns dynamic allocation on with 0 initial executors: the run then sized its tasks from
    defaultParallelism (2) and lost its executors between stages. Off, with the plan's executor count."""
    assert main(["emr", "plan", INPUT, OUTPUT, "--core-nodes", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    props = out["run_job_flow"]["Configurations"][0]["Properties"]
    assert props["spark.dynamicAllocation.enabled"] == "false"
    assert props["spark.executor.instances"] == "3" == str(out["executors"]["in_all"])
    assert "spark.driver.memory" not in props  # a step's driver runs on the master node (client mode)
    assert not [c for c in out["run_job_flow"]["Configurations"] if c["Classification"] == "livy-conf"]


def test_plan_prints_the_executors_and_with_one_core_node_one_is_granted(no_credentials, capsys) -> None:
    assert main(["emr", "plan", INPUT, OUTPUT, "--core-nodes", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["executors"]["in_all"] == 1 and out["executors"]["on_the_node_with_the_application_master"] == 1
    props = out["run_job_flow"]["Configurations"][0]["Properties"]
    assert props["spark.yarn.am.memory"] == "512m" and out["estimate"]["core_vcpus"] == 4


def test_step_timeout_follows_the_estimate_or_the_flag(no_credentials, capsys) -> None:
    settings = emr_settings(images=5_000_000)
    listing_min = 5_000 * 0.1 / 60  # 5,000 sequential LIST pages
    step_min = listing_min + 5_000_000 / (8 * emr.MEASURED_IMG_PER_VCPU_S) / 60 + 2.0  # 2 m5.xlarge core nodes
    assert emr.step_timeout_minutes(settings) == int(-(-3 * step_min // 1)) > 30
    fanned = emr_settings(images=5_000_000, run_args=("--list-threads", "16"))  # the fan-out, as run parses it
    assert emr.estimate(fanned)["listing_minutes"] == pytest.approx(listing_min / 16, abs=0.05)
    assert emr.step_args(settings)[3] == f"{emr.step_timeout_minutes(settings)}m"
    assert emr.step_args(emr_settings(step_timeout_min=45))[3] == "45m"
    assert main(["emr", "plan", INPUT, OUTPUT, "--step-timeout", "90"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["run_job_flow"]["Steps"][0]["HadoopJarStep"]["Args"][3] == "90m"
    assert plan["estimate"]["step_timeout_minutes"] == 90
    # `emr run` waits for provisioning + that timeout + 15 minutes before it terminates the cluster itself.
    assert emr.run_timeout_s(emr_settings(step_timeout_min=90)) == 60 * (10 + 90 + 15)



def test_wheelhouse_is_resolved_for_the_nodes_python_not_this_one(tmp_path: Path) -> None:
    """The wheelhouse holds the wheels of the nodes' Python (3.11, manylinux x86_64) with their dependencies,
    whatever Python and OS run the upload; a requirement without such a wheel is one clear error."""
    index = tmp_path / "index"
    index.mkdir()
    good = fake_wheel(index, "fakenum", "2.0", "cp311-cp311-manylinux_2_28_x86_64", requires=("fakedep>=1",))
    fake_wheel(index, "fakenum", "2.0", "cp312-cp312-manylinux_2_28_x86_64")
    fake_wheel(index, "fakenum", "2.0", "cp311-cp311-macosx_11_0_arm64")
    fake_wheel(index, "fakenum", "2.0", "cp311-cp311-manylinux_2_39_x86_64")  # newer glibc than the nodes'
    fake_wheel(index, "fakenum", "2.0", "cp311-cp311-win_amd64")
    dep = fake_wheel(index, "fakedep", "1.5")
    fake_wheel(index, "only312", "1.0", "cp312-cp312-manylinux2014_x86_64")
    got = build_wheelhouse(["fakenum==2.0"], tmp_path / "out" / "wheelhouse", find_links=str(index))
    assert sorted(w.name for w in got) == sorted([dep.name, good.name])
    with pytest.raises(emr.EmrError, match=f"no wheels for the nodes \\(Python {NODE_PYTHON}.*only312"):
        build_wheelhouse(["only312==1.0"], tmp_path / "out2" / "wheelhouse", find_links=str(index))


def test_the_operator_policy_covers_every_call_of_the_operator_commands() -> None:
    """policies/operator.json (in every plan, filled in) allows each AWS action plan, upload, up, run, status, logs
    and down make, with no wildcard action, and passes only the two fruitpipe roles."""
    from fruitpipe.cloud.iam import policy_values, render_policy

    policy = render_policy("operator", **policy_values(emr_settings(), "123456789012", "arn:aws:kms:k"))
    allowed = {a for st in policy["Statement"] if st["Effect"] == "Allow"
               for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])}
    needed = {"ec2:DescribeVpcs", "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups", "ec2:DescribeRouteTables",
              "ec2:DescribeVpcEndpoints",
              "ec2:DescribeInstances", "servicequotas:GetServiceQuota", "servicequotas:GetAWSDefaultServiceQuota",
              "s3:GetBucketLocation", "s3:PutObject", "s3:GetObject", "s3:ListBucket",
              "elasticmapreduce:RunJobFlow", "elasticmapreduce:DescribeCluster", "elasticmapreduce:ListSteps",
              "elasticmapreduce:TerminateJobFlows", "iam:PassRole", "iam:ListRolePolicies", "iam:GetRolePolicy",
              "elasticmapreduce:ListStudios", "elasticmapreduce:DescribeStudio",  # up --notebook-idle's subnet check
              "elasticmapreduce:PutAutoTerminationPolicy"}  # a notebook cluster's idle auto-termination
    assert needed <= allowed and not any("*" in a for a in allowed)
    passed = [st for st in policy["Statement"] if st["Action"] == "iam:PassRole"][0]
    assert passed["Resource"] == ["arn:aws:iam::123456789012:role/fruitpipe-emr-service",
                                  "arn:aws:iam::123456789012:role/fruitpipe-emr-ec2"]
    assert "${" not in json.dumps(policy)
    by_action: dict[str, list[dict]] = {}
    for st in policy["Statement"]:
        for a in [st["Action"]] if isinstance(st["Action"], str) else st["Action"]:
            by_action.setdefault(a, []).append(st)
    # RunJobFlow only with the request tags (as AmazonEMRFullAccessPolicy_v2 requires its own), and the request
    # `up` sends carries them: checked against that exact request, notebook cluster included.
    (run_flow,) = by_action["elasticmapreduce:RunJobFlow"]
    wanted = {k.removeprefix("aws:RequestTag/"): v for k, v in run_flow["Condition"]["StringEquals"].items()}
    assert wanted == {"project": "fruitpipe", emr.EMR_MANAGED_TAG: "true"}
    for settings in (emr_settings(), emr_settings(notebook_idle_min=30, tags={"team": "vision"})):
        sent = {t["Key"]: t["Value"] for t in emr.job_flow_request(settings)["Tags"]}
        assert wanted.items() <= sent.items()
    # AddTags: never the key `project` (which TerminateJobFlows trusts), and only on fruitpipe's own clusters.
    (tagging,) = by_action["elasticmapreduce:AddTags"]
    assert tagging["Condition"] == {"StringEquals": {"elasticmapreduce:ResourceTag/project": "fruitpipe"},
                                    "ForAllValues:StringNotEquals": {"aws:TagKeys": ["project"]}}
    assert tagging["Resource"] == "arn:aws:elasticmapreduce:eu-west-3:123456789012:cluster/*"
    # Auto-termination (notebook clusters) may be set and read, never removed.
    assert "elasticmapreduce:PutAutoTerminationPolicy" in by_action
    assert "elasticmapreduce:RemoveAutoTerminationPolicy" not in by_action
    with pytest.raises(emr.EmrError, match="drop this --tag"):
        emr_settings(tags={"project": "mine"})


def test_requirements_are_chosen_for_the_nodes_and_int8_in_any_spelling_brings_onnx(monkeypatch) -> None:
    """The nodes install cloud/nodes.txt whole, whatever numpy runs here (EMR's PySpark 3.5 needs 1.x); markers are
    evaluated for the nodes (Python 3.11, Linux), not for the uploader, so a requirement the nodes need and the
    lock lacks is an error (the lock is stale), one for Windows is not; the step's int8 is read the way `fruitpipe
    run` reads it, so every spelling of it adds the int8 extra (onnx)."""
    import importlib.metadata as md

    plain = runtime_requirements()
    assert plain == sorted(node_lock().values(), key=str.lower) and "numpy==1.26.4" in plain
    assert not any(r.startswith(("pywin32", "pyspark")) for r in plain)
    assert any(r.startswith("onnx==") for r in plain)  # every node wraps its model for uint8 input
    assert any(r.startswith("onnx==") for r in runtime_requirements(("int8",)))
    real = md.requires
    monkeypatch.setattr(md, "requires", lambda name: [*real(name), 'pywin32>=300; sys_platform == "win32"'])
    assert runtime_requirements() == plain
    monkeypatch.setattr(md, "requires", lambda name: [*real(name), 'tomli>=2; python_version < "3.12"'])
    with pytest.raises(emr.EmrError, match="does not pin it"):
        runtime_requirements()  # needed on 3.11 nodes even when this Python is newer
    for spelling in (["--precision", "int8"], ["--precision=int8"], ["--prec", "int8"], ["--k", "5", "--precision",
                                                                                          "int8"]):
        assert node_extras(tuple(spelling)) == ("int8",), spelling
    assert node_extras(("--precision", "fp32")) == () and node_extras(()) == ()
    assert node_extras(("--config", "s3://b/fruitpipe.toml")) == ("int8",)  # a config file may ask for int8
    with pytest.raises(emr.EmrError, match="would refuse it"):
        node_extras(("--precision", "int4"))



def test_the_nodes_lock_pins_every_runtime_requirement_within_its_range() -> None:
    """cloud/nodes.txt against pyproject.toml: each runtime dependency (pyspark aside: EMR's own) pinned at a version
    its range admits, and numpy below 2 for PySpark 3.5 (SPARK-48710)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {k: v.partition("==")[2] for k, v in node_lock().items()}
    for text in md.requires("fruitpipe") or []:
        req = Requirement(text)
        if req.marker is None and req.name != "pyspark":
            assert req.specifier.contains(pins[canonicalize_name(req.name)]), (req, pins.get(req.name))
    assert int(pins["numpy"].split(".")[0]) == 1


def test_the_subnets_way_to_s3_is_read_from_its_route_table() -> None:
    """The subnet's own table, else the VPC's main one; a gateway endpoint beats a NAT gateway, which beats an
    internet gateway; a blackhole route or a table with the local route only is no way at all."""
    from fruitpipe.cloud.preflight import _route_words, s3_route

    local = {"DestinationCidrBlock": "10.0.0.0/16", "GatewayId": "local", "State": "active"}
    nat = {"DestinationCidrBlock": "0.0.0.0/0", "NatGatewayId": "nat-1", "State": "active"}
    vpce = {"DestinationPrefixListId": "pl-1", "GatewayId": "vpce-1", "State": "active"}
    igw = {"DestinationCidrBlock": "0.0.0.0/0", "GatewayId": "igw-1", "State": "active"}
    main_table = {"Associations": [{"Main": True}], "Routes": [local, igw]}
    own = {"Associations": [{"SubnetId": "subnet-a"}], "Routes": [local, nat]}
    s3_endpoints = {"vpce-1"}
    assert s3_route([main_table, own], "subnet-a", s3_endpoints) == ("NAT gateway", "nat-1", "")
    assert s3_route([main_table, own], "subnet-b", s3_endpoints) == ("internet gateway", "igw-1", "")
    own["Routes"].append(vpce)
    assert s3_route([main_table, own], "subnet-a", s3_endpoints) == ("gateway endpoint", "vpce-1", "")
    assert s3_route([{"Associations": [{"Main": True}], "Routes": [local, {**nat, "State": "blackhole"}]}],
                    "subnet-a", s3_endpoints) == ("", "", "")
    assert "billed per GB" in _route_words("NAT gateway", "nat-1")
    # A gateway endpoint that is DynamoDB's (DescribeVpcEndpoints names S3's only) is no way to S3.
    dynamo_only = {"Associations": [{"Main": True}], "Routes": [local, {**vpce, "GatewayId": "vpce-dynamo"}]}
    assert s3_route([dynamo_only], "subnet-a", s3_endpoints)[0] == ""
    # Endpoints that could not be read: the endpoint route is a warning, not a refusal.
    kind, via, why = s3_route([dynamo_only], "subnet-a", None)
    assert (kind, via) == ("unverified", "vpce-dynamo") and "DescribeVpcEndpoints" in why
    # Default routes that work but lead where fruitpipe cannot look: unverified, never "none".
    for route, words in (({"TransitGatewayId": "tgw-1"}, "transit gateway tgw-1"),
                         ({"VpcPeeringConnectionId": "pcx-1"}, "peering connection pcx-1"),
                         ({"NetworkInterfaceId": "eni-1"}, "network interface (an appliance) eni-1"),
                         ({"GatewayId": "vpce-fw"}, "Gateway Load Balancer) vpce-fw"),
                         ({"VpcEndpointId": "vpce-fw2"}, "Gateway Load Balancer) vpce-fw2")):
        table = {"Associations": [{"Main": True}], "Routes": [
            local, {"DestinationCidrBlock": "0.0.0.0/0", "State": "active", **route}]}
        kind, via, why = s3_route([table], "subnet-a", s3_endpoints)
        assert kind == "unverified" and words in why, (route, why)
        assert _route_words(kind, via, why).startswith("not verified: the default route goes to")


def test_the_step_logs_yarns_memory_and_stops_when_a_node_has_less_than_the_plan_assumed() -> None:
    """The step carries the YARN memory per node its executors were sized for; on YARN the run logs the
    NodeManagers' memory, dynamic allocation and the executors asked for, and stops in one line, before any work,
    when a node has less (the executors would never be granted and the step would wait, billing, until its
    timeout)."""
    from fruitpipe.errors import ConfigError
    from fruitpipe.spark import YARN_MB_CONF, yarn_verdict

    args = emr.step_args(emr_settings(core_type="r5.xlarge", node_price=1.0))
    assert args[args.index(f"{YARN_MB_CONF}=24576") - 1] == "--conf"
    assert args.index(f"{YARN_MB_CONF}=24576") < args.index(emr.SUBMIT_SCRIPT)  # a spark-submit option
    line = yarn_verdict([12288, 12288], 12288, "false", "2")
    assert line == ("YARN: 2 NodeManager(s), memory 12288 MB, 12288 MB; dynamic allocation off; executors asked "
                    "for: 2")
    assert "dynamic allocation on" in yarn_verdict([12288], None, "true", "Spark's default")
    with pytest.raises(ConfigError, match=r"sized the executors for 12288 MB per node and YARN gives 6144 MB: they "
                                          r"would never be granted"):
        yarn_verdict([12288, 6144], 12288, "false", "2")
    assert "none yet" in yarn_verdict([], 12288, "false", "2")  # no node registered yet: nothing to refuse
