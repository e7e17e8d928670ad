"""What a cluster runs: the wheel built from this checkout, its pinned requirements, the model, and their S3 URIs."""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import io
import logging
import os
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

from fruitpipe.cloud.settings import EmrError, EmrSettings
from fruitpipe.models import get_spec
from fruitpipe.models.fetch import sha256_file
from fruitpipe.run_args import run_parser
from fruitpipe.version import __version__, code_sha256, files_digest

log = logging.getLogger(__name__)


def _version() -> str:
    return __version__


def wheel_name() -> str:
    """File name of this version's wheel."""
    return f"fruitpipe-{_version()}-py3-none-any.whl"


def model_file(settings: EmrSettings) -> tuple[str, str]:
    """(file name, sha256) of the model the step will use: the registry's, or the --model-path file's."""
    spec = get_spec(settings.model)
    if settings.model_path:
        if not os.path.isfile(settings.model_path):
            raise EmrError(f"--model-path {settings.model_path} is not a local file")
        return spec.filename, sha256_file(settings.model_path)
    return spec.filename, spec.sha256


def node_requirements(settings: EmrSettings) -> list[str]:
    """The requirements the nodes install for this run (its extras included)."""
    return runtime_requirements(node_extras(settings.run_args))


def wheel_code_sha256(wheel: Path) -> str:
    """The digest of the fruitpipe code a wheel holds (version.code_sha256 of its install)."""
    with zipfile.ZipFile(wheel) as zf:
        return files_digest((n, zf.read(n)) for n in zf.namelist() if n.startswith("fruitpipe/") and
                            not n.endswith("/"))


def artifact_uris(settings: EmrSettings) -> dict[str, str]:
    """Where each artifact lives in S3, each under its content: the wheel and the bootstrap under the version and
    the digest of the code (two checkouts at one version, or an edit between two runs, never share a key; run.json
    records it as versions.fruitpipe_code_sha256), the wheelhouse under the hash of its requirements and the model
    under its sha256 (each uploaded once)."""
    base = settings.artifacts_uri
    filename, sha = model_file(settings)
    code = f"{base}/code/{_version()}-{code_sha256()[:16]}"
    reqs = hashlib.sha256("\n".join(node_requirements(settings)).encode()).hexdigest()[:16]
    return {
        "prefix": code,
        "wheel": f"{code}/{wheel_name()}",
        "bootstrap": f"{code}/bootstrap.sh",
        "wheelhouse": f"{base}/wheelhouse/py{NODE_PYTHON}-{reqs}",
        "requirements": f"{base}/wheelhouse/py{NODE_PYTHON}-{reqs}/requirements.txt",
        "model": f"{base}/models/{sha[:16]}/{filename}",
    }


#: The wheelhouse as one object under its prefix (the nodes read it with one GET; they may not list the prefix).
WHEELHOUSE_TAR = "wheelhouse.tar"
#: The nodes' Python and platform: EMR 7 runs Amazon Linux 2023 (glibc 2.34) on x86_64 for the m5/c5/r5 types
#: fruitpipe sizes, and the bootstrap installs python3.11 from its repository.
NODE_PYTHON = "3.11"
NODE_PLATFORMS = tuple(f"manylinux_2_{minor}_x86_64" for minor in range(34, 16, -1)) + (
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64")
#: PEP 508 marker values of the nodes, so that requirements are chosen for them, not for the uploader's machine.
NODE_MARKERS = {"python_version": NODE_PYTHON, "python_full_version": f"{NODE_PYTHON}.0", "os_name": "posix",
                "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def run_options(run_args: tuple[str, ...]) -> argparse.Namespace:
    """The step's `fruitpipe run` flags as `run` itself parses them (abbreviations and --flag=value included);
    a flag `run` would refuse is refused here, before anything is uploaded or billed."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return run_parser().parse_args(["s3://input/x", "s3://output/x", *run_args])
    except SystemExit:
        why = (err.getvalue().strip().splitlines() or ["not accepted"])[-1].replace("fruitpipe run: error: ", "")
        raise EmrError(f"--run-arg {' '.join(run_args)}: `fruitpipe run` would refuse it: {why}") from None


def node_extras(run_args: tuple[str, ...]) -> tuple[str, ...]:
    """The extras the step needs: int8 (onnx, for the quantizer) when the run asks for int8 in any spelling, or
    when it reads a --config file, which may."""
    opts = run_options(run_args)
    return ("int8",) if opts.precision == "int8" or opts.config else ()


#: The nodes' packages, every one pinned, their dependencies too (package data; its header says how it was chosen).
NODES_LOCK = "nodes.txt"


def node_lock() -> dict[str, str]:
    """The pins of cloud/nodes.txt: {canonical name: 'name==version'}."""
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for line in resources.files("fruitpipe.cloud").joinpath(NODES_LOCK).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep or not version:
                raise EmrError(f"cloud/{NODES_LOCK}: {line!r} is not pinned as name==version")
            pins[canonicalize_name(name)] = f"{name.strip()}=={version.strip()}"
    return pins


def runtime_requirements(extras: tuple[str, ...] = ()) -> list[str]:
    """What the nodes install: the whole of cloud/nodes.txt (fruitpipe's runtime dependencies and theirs, pinned
    for EMR's PySpark 3.5, which needs numpy 1.x), whatever Python or numpy runs this. fruitpipe's requirements are
    evaluated for the nodes (their markers, `extras`); one the lock does not pin is an error, not an unpinned
    install: the lock is stale. pyspark is left out: the nodes use EMR's own Spark."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = node_lock()
    for text in importlib.metadata.requires("fruitpipe") or []:
        req = Requirement(text)
        if req.name.lower() == "pyspark":
            continue
        if req.marker is not None and not any(req.marker.evaluate({**NODE_MARKERS, "extra": extra})
                                              for extra in ("", *extras)):
            continue
        if canonicalize_name(req.name) not in pins:
            raise EmrError(f"the nodes need {req} but cloud/{NODES_LOCK} does not pin it: run "
                           "scripts/nodes-env.sh --lock in a source checkout, then the nodes' tests (make test-nodes)")
    return sorted(pins.values(), key=str.lower)


def build_wheelhouse(requirements: list[str], dest: Path, find_links: str | None = None) -> list[Path]:
    """Download every wheel the nodes need (requirements and their dependencies) for the nodes' Python and
    platform, binary wheels only, so that the bootstrap installs with --no-index and the nodes need no internet.
    The index is pip's own setting (PIP_INDEX_URL, pip.conf); `find_links` resolves from a local folder instead."""
    dest.mkdir(parents=True, exist_ok=True)
    req_file = dest.parent / "requirements.txt"
    req_file.write_text("\n".join(requirements) + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--only-binary=:all:",
           "--python-version", NODE_PYTHON, "--implementation", "cp", "--abi", f"cp{NODE_PYTHON.replace('.', '')}",
           *(arg for platform in NODE_PLATFORMS for arg in ("--platform", platform)),
           "-r", str(req_file), "-d", str(dest)]
    if find_links:
        cmd += ["--no-index", "--find-links", find_links]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.strip()]
        raise EmrError(f"no wheels for the nodes (Python {NODE_PYTHON}, manylinux x86_64): "
                       f"{lines[-1] if lines else 'pip download failed'}; pin a version that has them, or point "
                       "--wheelhouse-from at a folder of such wheels")
    wheels = sorted(dest.glob("*.whl"))
    log.info("wheelhouse: %d wheels, %.1f MB, for Python %s on manylinux x86_64", len(wheels),
             sum(w.stat().st_size for w in wheels) / 1e6, NODE_PYTHON)
    return wheels


def build_wheel(dest: Path) -> Path:
    """Build this checkout's wheel into `dest` with pip (its isolated build fetches setuptools from the index)."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "pyproject.toml").is_file():
        raise EmrError("fruitpipe is not installed from a source checkout, so no wheel can be built: "
                       "pass --wheel FILE")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dest), str(root)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / wheel_name()
    if done.returncode != 0 or not wheel.is_file():
        raise EmrError(f"building the wheel failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return wheel


