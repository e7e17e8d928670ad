#!/bin/bash
# EMR bootstrap action (runs on every node, as hadoop, before Spark starts): installs fruitpipe into
# /opt/fruitpipe/venv with Python 3.11, which EMR 7.x ships beside its default 3.9.
#   $1  s3:// prefix of the artifacts written by `fruitpipe emr upload`
#   $2  the wheel's file name under that prefix
# The node's Spark (EMR's own build) is used: pyspark is not installed from PyPI, requirements.txt pins the
# other dependencies to the versions fruitpipe was tested with.
set -euo pipefail
ARTIFACTS="${1:?usage: bootstrap.sh s3://bucket/prefix WHEEL}"
WHEEL="${2:?usage: bootstrap.sh s3://bucket/prefix WHEEL}"
VENV=/opt/fruitpipe/venv
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

sudo dnf install -y -q python3.11 python3.11-pip
sudo mkdir -p /opt/fruitpipe
sudo python3.11 -m venv "$VENV"
aws s3 cp --only-show-errors "$ARTIFACTS/requirements.txt" "$WORK/requirements.txt"
aws s3 cp --only-show-errors "$ARTIFACTS/$WHEEL" "$WORK/$WHEEL"
sudo "$VENV/bin/pip" install --quiet --no-cache-dir --upgrade pip
sudo "$VENV/bin/pip" install --quiet --no-cache-dir -r "$WORK/requirements.txt"
sudo "$VENV/bin/pip" install --quiet --no-cache-dir --no-deps "$WORK/$WHEEL"
# spark-submit needs a .py file: the step runs this one with the venv's Python.
sudo tee /opt/fruitpipe/submit.py > /dev/null <<'PY'
"""spark-submit entry point on EMR: the `fruitpipe` command line, inside the session spark-submit made."""
import sys

from fruitpipe.cli import main

sys.exit(main())
PY
"$VENV/bin/python" -c "import fruitpipe, onnxruntime; print('fruitpipe', fruitpipe.__version__, 'onnxruntime', onnxruntime.__version__)"
