"""CLI: --help of every command, README in sync, one-line errors with exit code 2, crash safety."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import fruitpipe
from fruitpipe.cli import build_parser, main
from conftest import ROOT, copy_classes, sample_classes

COMMANDS = ["run", "embed", "reduce", "train", "evaluate", "serve", "drift", "sample", "models", "emr", "emr plan", "emr setup", "emr upload", "emr up", "emr run",
            "emr status", "emr logs", "emr down", "emr studio"]


def _cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fruitpipe.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ}, **kw)


def _subparsers(parser=None) -> dict:
    """{"run": parser, ..., "emr plan": parser, ...}: every command and sub-command."""
    parser = parser or build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    found = {}
    for name, sub in action.choices.items():
        found[name] = sub
        if any(a.__class__.__name__ == "_SubParsersAction" for a in sub._actions):
            found.update({f"{name} {k}": v for k, v in _subparsers(sub).items()})
    return found


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(command: str) -> None:
    proc = _cli(*command.split(), "--help")
    assert proc.returncode == 0, proc.stderr
    assert f"usage: fruitpipe {command}" in proc.stdout
    for action in _subparsers()[command]._actions:
        for opt in action.option_strings:
            if opt.startswith("--"):
                assert opt in proc.stdout


def test_top_level_help_lists_commands() -> None:
    proc = _cli("--help")
    assert proc.returncode == 0
    assert set(COMMANDS) == set(_subparsers())
    for command in COMMANDS:
        assert command.split()[0] in proc.stdout


def test_the_command_line_is_built_without_the_extras() -> None:
    """Every command's parser builds, and `fruitpipe run --help` answers, without the optional extras (serve:
    FastAPI, Starlette, uvicorn, python-multipart; finetune: JAX; monitor: SciPy): a core install and the EMR nodes'
    environment lack them. Once, generating serve's flags imported FastAPI and every command failed there."""
    blocked = ("fastapi", "starlette", "uvicorn", "multipart", "python_multipart", "jax", "scipy")
    code = (f"import sys\nfor m in {blocked!r}:\n    sys.modules[m] = None  # importing it raises ImportError\n"
            "from fruitpipe.cli import build_parser, main\n"
            "p = build_parser()\n"
            "for argv in (['run', 'a', 'b'], ['serve', 'o'], ['evaluate', 'o', 'p'], ['train', 'o'], ['drift', 'a', 'b'],"
            " ['emr', 'plan', 's3://a/b', 's3://c/d']):\n    p.parse_args(argv)\n"
            "sys.exit(main(['run', '--help']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: fruitpipe run" in proc.stdout, proc.stderr


def test_every_command_is_dispatched_through_the_table() -> None:
    from fruitpipe.cli import HANDLERS, build_parser

    commands = next(a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(HANDLERS) == set(commands)


def test_readme_documents_every_command_and_option() -> None:
    """Every command and option is documented: in the README, or for `emr` in docs/emr.md, which it links."""
    readme = (ROOT / "README.md").read_text()
    emr_doc = (ROOT / "docs" / "emr.md").read_text()
    assert "docs/emr.md" in readme
    for command, sub in _subparsers().items():
        doc, where = (emr_doc, "docs/emr.md") if command.startswith("emr") else (readme, "README")
        assert re.search(rf"fruitpipe {command}\b", doc), f"`fruitpipe {command}` not in {where}"
        for action in sub._actions:
            for opt in action.option_strings:
                if opt.startswith("--") and opt != "--help":
                    assert f"`{opt}" in doc, f"option {opt} of `fruitpipe {command}` not in {where}"


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_arguments_get_one_line(tmp_path: Path) -> None:
    data = copy_classes(tmp_path / "in", sample_classes(1), splits=("Test",), per_split=2)
    out = str(tmp_path / "out")
    _one_line_error(_cli("run", str(tmp_path / "missing"), out), "is not a folder", "Training/<Class>/")
    _one_line_error(_cli("run", str(data), out, "--model", "resnet9000"), "unknown model", "mobilenet_v2")
    _one_line_error(_cli("run", str(data), out, "--k", "0"), "--k 0", "at least 1")
    _one_line_error(_cli("run", str(data), out, "--k", "2000"), "exceeds the embedding size")
    _one_line_error(_cli("run", str(data), out, "--variance", "1.5"), "--variance 1.5", "0.95")
    _one_line_error(_cli("run", str(data), out, "--k", "five"), "'five' is not a whole number")
    _one_line_error(_cli("run", str(data), out, "--spark-conf", "oops"), "KEY=VALUE")
    _one_line_error(_cli("run", str(data), out, "--model-path", str(tmp_path / "nope.onnx")), "--model-path")
    _one_line_error(_cli("run", str(data)), "required")
    _one_line_error(_cli("reduce", out), "no fruitpipe embeddings")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.docx").write_text("precious")
    _one_line_error(_cli("run", str(data), str(tmp_path / "busy")), "not a fruitpipe output")
    assert (tmp_path / "busy" / "thesis.docx").read_text() == "precious"
    assert not Path(out).exists()  # nothing was created by a refused command


def test_output_from_another_config_is_refused(spark, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = copy_classes(tmp_path / "in", sample_classes(2), splits=("Test",), per_split=3)
    out = tmp_path / "out"
    fruitpipe.embed(fruitpipe.Config(input=str(data), output=str(out), quiet=True))
    assert main(["embed", str(data), str(out), "--model", "efficientnet_lite0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "belongs to another configuration" in err[0] and "--overwrite" in err[0]
    other = copy_classes(tmp_path / "other", sample_classes(1), splits=("Test",), per_split=1)
    assert main(["embed", str(other), str(out), "--quiet"]) == 2
    assert "input was" in capsys.readouterr().err
    # --overwrite replaces it
    assert main(["embed", str(other), str(out), "--quiet", "--overwrite"]) == 0
    capsys.readouterr()  # the --overwrite warning
    assert json.loads((out / "run.json").read_text())["counts"]["embedded"] == 1
    assert main(["reduce", str(out), "--quiet"]) == 2  # one embedding: no PCA, and a message saying why
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at least 2 embedded images" in err[0]


def test_the_pca_does_not_depend_on_sparks_blas(tmp_path: Path) -> None:
    """Spark's pure-Java BLAS/LAPACK fallback got Spark ML's PCA wrong on 1280-d embeddings of these 240 photos; the
    covariance is now summed by the executors and decomposed by numpy, so forcing that fallback changes nothing:
    the published curve is numpy's."""
    data = copy_classes(tmp_path / "in", ["Apple 10", "Banana 1", "Lemon 1"])  # 240 photos
    out = tmp_path / "out"
    proc = _cli("run", str(data), str(out), "--quiet", "--spark-conf",
                "spark.driver.extraJavaOptions=-Ddev.ludovic.netlib.lapack.allowNative=false "
                "-Ddev.ludovic.netlib.blas.allowNative=false")  # as on a machine with no native BLAS/LAPACK
    assert proc.returncode == 0, proc.stderr
    x = np.array(pq.read_table(out / "embeddings").column("features").to_pylist(), dtype=np.float64)
    eig = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
    report = json.loads((out / "pca" / "explained_variance.json").read_text())
    np.testing.assert_allclose(report["per_component"][:20], (eig / eig.sum())[:20], rtol=1e-4)


def _parquet_rows(folder: Path) -> list[str]:
    return pq.read_table(folder).column("uri").to_pylist() if folder.exists() else []


def test_killed_run_publishes_nothing_and_resumes(spark, tmp_path: Path) -> None:
    classes = sample_classes(8)
    data = copy_classes(tmp_path / "in", classes[:2])
    out = tmp_path / "out"
    config = fruitpipe.Config(input=str(data), output=str(out), k=5, quiet=True)
    first = fruitpipe.run(config)
    assert (out / "_SUCCESS").exists()
    committed = sorted(p.name for p in (out / "embeddings").iterdir())
    copy_classes(data, classes[2:])  # 480 more images
    gate = tmp_path / "gate"
    gate.touch()  # the worker pauses after 40 images, i.e. with 2 parts of 16 staged: the run cannot finish first
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests" / "gate"), "FRUITPIPE_TEST_GATE": str(gate),
           "FRUITPIPE_TEST_GATE_AFTER": "40"}
    proc = subprocess.Popen([sys.executable, "-m", "fruitpipe.cli", "run", str(data), str(out), "--k", "5",
                             "--quiet", "--partition-size", "16", "--master", "local[1]"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 240
    while not list(tmp_path.glob("gate.held-*")):  # observable: the third task is under way
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.1)  # polling for the event, not a timed fault
    staged = list(out.glob("_staging/*/embeddings/*.parquet"))
    assert len(staged) == 2, staged
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its JVM and its Python workers
    proc.wait(timeout=30)
    gate.unlink()
    assert not (out / "_SUCCESS").exists()  # the output no longer claims to be complete
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == committed  # nothing half-published
    result = fruitpipe.run(config)
    counts = result.counts
    assert counts["listed"] == 640 and counts["embedded"] == 640 and counts["accounted"]
    assert counts["embedded_this_run"] == 480 and first.counts["embedded"] == 160
    uris = _parquet_rows(out / "embeddings")
    ids = pq.read_table(out / "embeddings").column("id").to_pylist()
    assert len(uris) == len(set(uris)) == 640 and len(set(ids)) == 640
    assert (out / "_SUCCESS").exists() and not (out / "_staging").exists()


def test_onnx_threads_follow_spark_task_cpus(tmp_path: Path) -> None:
    data = copy_classes(tmp_path / "in", sample_classes(2), splits=("Test",), per_split=8)
    out = tmp_path / "out"
    proc = _cli("embed", str(data), str(out), "--quiet", "--master", "local[2]", "--task-cpus", "2")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "run.json").read_text())
    assert report["config"]["task_cpus"] == 2
    assert report["counts"]["inference"]["threads_per_task"] == 2
    assert report["counts"]["embedded"] == 16 and report["pca"] is None


def test_no_module_below_the_cli_imports_it() -> None:
    """Lower floors never import the command line (cloud/artifacts.py once did, to parse a step's flags: the
    package's one import cycle): only the cli* modules import the CLI's modules, and `run`'s flags live below them
    (run_args)."""
    import ast

    root = Path(fruitpipe.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if path.parent == root and path.name.startswith("cli"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[:2] in (["fruitpipe", "cli"], ["fruitpipe", "cli_emr"], ["fruitpipe", "cli_apps"])
                   for n in names):  # cli_args (parser helpers, importing nothing of the CLI) is below it
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders, offenders


def test_sigterm_is_an_interruption_in_every_command() -> None:
    """One convention: SIGTERM, as Ctrl-C, exits 130 (run: test_pipeline; serve: test_serve_limits). Here the
    command's own work sends the signal, an observable point."""
    code = ("import os, signal, sys, threading\n"
            "import fruitpipe.cli_apps as apps\n"
            "from fruitpipe.cli import main\n"
            "def work(args):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    threading.Event().wait(60)  # interrupted by the handler, never reached its end\n"
            "    return 0\n"
            "apps._sample_main = work\n"
            "sys.exit(main(['sample', '--mini', 'unused']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert "fruitpipe sample: interrupted" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv", [
    ["serve", "OUT", "--header-timeout", "nan"], ["serve", "OUT", "--body-timeout", "inf"],
    ["serve", "OUT", "--decoders", "-1"], ["serve", "OUT", "--max-connections", "0"],
    ["serve", "OUT", "--max-buffered-mb", "0"], ["serve", "OUT", "--max-pixels", "0"],
    ["serve", "OUT", "--threads", "-1"], ["serve", "OUT", "--port", "70000"], ["serve", "OUT", "--queue", "-2"],
    ["serve", "OUT", "--max-bytes", "0"], ["evaluate", "OUT", "PHOTOS", "--max-pixels", "-1"],
    ["evaluate", "OUT", "PHOTOS", "--threads", "-1"], ["train", "OUT", "--holdout", "nan"],
])
def test_an_out_of_range_number_is_one_line_before_anything_runs(argv: list[str], capsys) -> None:
    """Every numeric option has its range checked where it is declared: one line naming the option, exit 2.

    (train --augment, --finetune-epochs and --finetune-blocks are checked by TrainSettings, tests in
    test_augmented.py and test_finetune.py.)"""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and argv[-2] in err[0] and "Traceback" not in err[0], err


def test_a_bad_serve_host_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    """A --host that is no address this machine can listen on: one line before anything is loaded (before: six
    lines of uvicorn's). No name is looked up on a network: one fails in the codec, the resolver's answer to the
    other is given by the test."""
    import socket

    assert main(["serve", str(tmp_path), "--host", "x" * 64]) == 2  # a DNS label over 63 characters
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--host" in err[0] and "127.0.0.1" in err[0], err

    def unknown(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", unknown)
    assert main(["serve", str(tmp_path), "--host", "lcoalhost"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'lcoalhost'" in err[0] and "Name or service not known" in err[0], err


def test_the_cli_reference_is_the_parsers_own_help() -> None:
    """docs/cli.md is every command's --help, generated (`make docs`): an option added, renamed or re-defaulted in the
    code and not in the page fails here, so the reference cannot drift."""
    from fruitpipe.cli_reference import render

    page = (ROOT / "docs" / "cli.md").read_text()
    assert page == render(), "docs/cli.md differs from the parser: run `make docs` and commit it"
    for command in COMMANDS:
        assert f"## `fruitpipe {command}`" in page


def test_the_readmes_first_screen_says_what_for_whom_how_and_the_real_photo_figure() -> None:
    """The front door: within its first 40 lines the README says what fruitpipe does and for whom, the two
    commands, what to expect on real shop photos (the held-out figure) and where the rest is (the tour)."""
    first = (ROOT / "README.md").read_text().splitlines()[:40]
    text = "\n".join(first)
    for needed in ("For data scientists", "make run", "make test", "What to expect on a real shop photo",
                   "held_out", "**Tour**", "docs/cli.md", "docs/index.md"):
        assert needed in text, needed
    assert (ROOT / "docs" / "index.md").is_file()
    linked = set(re.findall(r"\]\(([a-z-]+\.md)\)", (ROOT / "docs" / "index.md").read_text()))
    assert linked == {p.name for p in (ROOT / "docs").glob("*.md")} - {"index.md"}  # every page has its line


def test_shared_options_and_defaults_are_written_once() -> None:
    """One place per shared option and per default (issue 36): the storage and verbosity options are declared in
    cli_args only, the decode limit's default (64 Mpx) is images.DEFAULT_MAX_PIXELS and the EU region is
    storage_options.DEFAULT_REGION, everywhere else by name, help strings included; every command's parser
    shows those defaults."""
    import io
    import tokenize

    from fruitpipe.images import DEFAULT_MAX_PIXELS
    from fruitpipe.storage_options import DEFAULT_REGION

    strings: dict[str, list[str]] = {}
    numbers: dict[str, list[str]] = {}
    for path in sorted((ROOT / "src" / "fruitpipe").rglob("*.py")):
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            where = str(path.relative_to(ROOT / "src" / "fruitpipe"))
            if tok.type == tokenize.STRING:
                strings.setdefault(tok.string.strip("\"'"), []).append(where)
            elif tok.type == tokenize.NUMBER:
                numbers.setdefault(tok.string.replace("_", ""), []).append(where)
    for flag in ("--s3-endpoint", "--region", "--quiet", "--verbose"):
        declared = [str(p.relative_to(ROOT / "src" / "fruitpipe")) for p in sorted((ROOT / "src").rglob("*.py"))
                    for _ in re.finditer(rf'add_argument\(\s*"{flag}"', p.read_text())]
        # emr's --region is the cluster's (a default, EU-checked): the field EmrSettings.region for the cluster
        # commands (its flag generated), and once in cli_emr for status, logs and down
        assert declared == (["cli_args.py", "cli_emr.py"] if flag == "--region" else ["cli_args.py"]), \
            (flag, declared)
    assert numbers[str(DEFAULT_MAX_PIXELS)] == ["images.py"]
    assert sorted(strings[DEFAULT_REGION]) == ["cloud/settings.py", "storage_options.py"]  # the default; the prices'
    parser = build_parser()
    for argv in (["run", "a", "b"], ["evaluate", "a", "b"], ["serve", "a"]):
        args = parser.parse_args(argv)
        assert args.max_pixels in (None, DEFAULT_MAX_PIXELS)  # run's None: Config's default, the same constant
    assert fruitpipe.Config(input="a", output="b").max_pixels == DEFAULT_MAX_PIXELS
    assert fruitpipe.Config(input="a", output="b").region == DEFAULT_REGION


@pytest.mark.parametrize("command, option, env_value, toml_value, flag_value, dest, expected", [
    (["train", "out"], "seed", "7", 3, "11", "seed", (3, 7, 11)),
    (["evaluate", "out", "photos"], "max-pixels", "2000", 1000, "3000", "max_pixels", (1000, 2000, 3000)),
    (["serve", "out"], "port", "8081", 8080, "8082", "port", (8080, 8081, 8082)),
    (["drift", "ref", "cur"], "report-dir", "env-dir", "toml-dir", "flag-dir", "report_dir",
     ("toml-dir", "env-dir", "flag-dir")),
    (["sample", "photos"], "quiet", "false", True, None, "quiet", (True, False, True)),
    (["emr", "plan", "s3://a-in/x", "s3://a-out/y"], "core-nodes", "3", 4, "5", "core_nodes", (4, 3, 5)),
])
def test_every_command_reads_a_toml_table_and_its_variables_and_flags_win(tmp_path: Path, monkeypatch, command,
                                                                         option, env_value, toml_value,
                                                                         flag_value, dest, expected) -> None:
    """Every command reads settings the way `run` does: its TOML table ([fruitpipe.<command>]), then
    FRUITPIPE_<COMMAND>_<OPTION>, then flags, each layer over the one before; from the options the parser declares
    (none written out per command), typed and checked as the flag is."""
    from fruitpipe.cli import _with_layers

    table = command[0]
    key = f"{'FRUITPIPE_'}{table.upper()}_{option.upper().replace('-', '_')}"
    toml = tmp_path / "settings.toml"
    value = f'"{toml_value}"' if isinstance(toml_value, str) else str(toml_value).lower()
    toml.write_text(f"[fruitpipe]\nk = 30\n\n[fruitpipe.{table}]\n{option} = {value}\n")
    with_file = [*command, "--config", str(toml)]
    with_flag = [*with_file, f"--{option}", *([flag_value] if flag_value else [])]
    for (argv, env), want in zip(((with_file, None), (with_file, env_value), (with_flag, env_value)), expected):
        if env is None:  # the file alone, then the variable over it, then the flag over both
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, env)
        parser = build_parser()
        args = _with_layers(parser, parser.parse_args(argv), argv)
        assert getattr(args, dest) == want, (argv, env)
    # run's own table and variables are untouched by the other commands' tables (its [fruitpipe] k = 30 reads)
    assert fruitpipe.load_config({"input": "a", "output": "b"}, toml_path=str(toml), env={}).k == 30


def test_a_bad_setting_in_a_file_or_a_variable_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    toml = tmp_path / "settings.toml"
    toml.write_text("[fruitpipe.serve]\nprot = 8080\n")
    assert main(["serve", "out", "--config", str(toml)]) == 2
    err = capsys.readouterr().err
    assert "unknown setting(s) prot in [fruitpipe.serve]" in err and "port" in err and err.count("\n") == 1
    monkeypatch.setenv("FRUITPIPE_SERVE_PORT", "70000")
    assert main(["serve", "out"]) == 2
    err = capsys.readouterr().err
    assert "environment FRUITPIPE_SERVE_PORT: --port '70000'" in err and err.count("\n") == 1
    monkeypatch.setenv("FRUITPIPE_SERVE_PORT", "8080")
    monkeypatch.setenv("FRUITPIPE_TRAIN_SEEED", "1")
    assert main(["train", "out"]) == 2
    assert "FRUITPIPE_TRAIN_SEEED: `fruitpipe train` has no option --seeed" in capsys.readouterr().err
