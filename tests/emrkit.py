"""Shared by the `fruitpipe emr` tests: the input and output URIs, validated settings, and stand-in wheels."""

from __future__ import annotations

from pathlib import Path

from fruitpipe.cloud import emr

INPUT = "s3://fruits-in/fruits360"
OUTPUT = "s3://fruits-out/runs/emr"


def emr_settings(**changes) -> emr.EmrSettings:
    return emr.EmrSettings(**{"input": INPUT, "output": OUTPUT, **changes}).validate()


def fake_wheel(folder: Path, name: str, version: str, tag: str = "py3-none-any", requires: tuple = ()) -> Path:
    """A minimal, valid wheel (metadata only): what pip needs to resolve, for a wheelhouse built offline."""
    import zipfile

    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                    + "".join(f"Requires-Dist: {r}\n" for r in requires))
        zf.writestr(f"{dist}.dist-info/WHEEL", f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                               f"Tag: {tag}\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return path
