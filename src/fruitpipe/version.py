"""The package's version (pyproject.toml's) and the digest of its code, on the ground floor: run.json, the API and
the cloud artifacts name them."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path

__version__ = "0.1.0"


def files_digest(files: Iterable[tuple[str, bytes]]) -> str:
    """sha256 over (path, sha256 of the bytes) of a package's files, sorted by path: the same for a source tree,
    the wheel built from it and the install made from that wheel. Compiled files (__pycache__) are not code."""
    h = hashlib.sha256()
    for name, data in sorted((n, d) for n, d in files if "__pycache__/" not in n and not n.endswith(".pyc")):
        h.update(f"{name}\0{hashlib.sha256(data).hexdigest()}\n".encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def code_sha256() -> str:
    """The digest of the fruitpipe code running here (every file of the package: modules, policies, bootstrap):
    two checkouts at the same version, or one edited between two runs, differ."""
    root = Path(__file__).resolve().parent
    return files_digest(("fruitpipe/" + p.relative_to(root).as_posix(), p.read_bytes())
                        for p in root.rglob("*") if p.is_file())
