"""What a cluster runs: the wheel built from this checkout, its pinned requirements, the model, and their S3 URIs."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from fruitpipe.cloud.settings import EmrError, EmrSettings

log = logging.getLogger(__name__)


def _version() -> str:
    from fruitpipe import __version__

    return __version__


def wheel_name() -> str:
    """File name of this version's wheel."""
    return f"fruitpipe-{_version()}-py3-none-any.whl"


def model_file(settings: EmrSettings) -> tuple[str, str]:
    """(file name, sha256) of the model the step will use: the registry's, or the --model-path file's."""
    from fruitpipe.models import get_spec
    from fruitpipe.models.fetch import sha256_file

    spec = get_spec(settings.model)
    if settings.model_path:
        if not os.path.isfile(settings.model_path):
            raise EmrError(f"--model-path {settings.model_path} is not a local file")
        return spec.filename, sha256_file(settings.model_path)
    return spec.filename, spec.sha256


def artifact_uris(settings: EmrSettings) -> dict[str, str]:
    """Where each artifact lives in S3; code under the version, the model under its sha256 (uploaded once)."""
    base = settings.artifacts_uri
    filename, sha = model_file(settings)
    code = f"{base}/{_version()}"
    return {
        "prefix": code,
        "wheel": f"{code}/{wheel_name()}",
        "requirements": f"{code}/requirements.txt",
        "bootstrap": f"{code}/bootstrap.sh",
        "model": f"{base}/models/{sha[:16]}/{filename}",
    }


def runtime_requirements(extras: tuple[str, ...] = ()) -> list[str]:
    """fruitpipe's runtime dependencies (and those of `extras`) pinned to the versions installed here (the ones
    tested), without pyspark: the nodes use EMR's own Spark."""
    reqs = []
    for req in importlib.metadata.requires("fruitpipe") or []:
        extra = re.search(r"""extra == ['"]([^'"]+)['"]""", req)
        if extra and extra.group(1) not in extras:
            continue
        name = re.split(r"[ <>=!~;\[]", req, maxsplit=1)[0]
        if name.lower() == "pyspark":
            continue
        reqs.append(f"{name}=={importlib.metadata.version(name)}")
    return sorted(reqs)


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


