#!/bin/bash
# EMR bootstrap action (runs on every node, as hadoop, before Spark starts): installs fruitpipe into
# /opt/fruitpipe/venv with Python 3.11, from S3 only: the nodes need no internet (a private subnet with an S3
# gateway endpoint is enough).
#   $1  s3:// prefix of the code written by `fruitpipe emr upload`
#   $2  the wheel's file name under that prefix
#   $3  s3:// prefix of the wheelhouse: wheelhouse.tar (every dependency as a manylinux wheel for Python 3.11) and
#       requirements.txt
#   $4  the region of the buckets (the cluster's): no region look-up, no redirect
# The node's Spark (EMR's own build) is used: pyspark is not installed, requirements.txt pins the other
# dependencies to the versions fruitpipe was tested with.
set -euo pipefail
USAGE="usage: bootstrap.sh s3://code-prefix WHEEL s3://wheelhouse-prefix REGION"
ARTIFACTS="${1:?$USAGE}"
WHEEL="${2:?$USAGE}"
WHEELHOUSE="${3:?$USAGE}"
REGION="${4:?$USAGE}"
VENV=/opt/fruitpipe/venv
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# EMR 7.1 and later ship Python 3.11 (fruitpipe refuses older releases). dnf runs only where it is missing: it needs
# Amazon Linux's repositories, which a locked-down subnet may not reach.
if ! command -v python3.11 >/dev/null; then
  sudo dnf install -y -q python3.11
fi
sudo mkdir -p /opt/fruitpipe
sudo python3.11 -m venv "$VENV"
# One object each, no listing: the instance role may read the artifacts prefix, not list it.
mkdir -p "$WORK/wheelhouse"
aws s3 cp --only-show-errors --region "$REGION" "$WHEELHOUSE/wheelhouse.tar" - | tar -x -C "$WORK/wheelhouse"
aws s3 cp --only-show-errors --region "$REGION" "$WHEELHOUSE/requirements.txt" "$WORK/wheelhouse/requirements.txt"
aws s3 cp --only-show-errors --region "$REGION" "$ARTIFACTS/$WHEEL" "$WORK/$WHEEL"
# --no-index: nothing comes from PyPI; a wheel missing from the wheelhouse fails here, in seconds, with its name.
sudo "$VENV/bin/pip" install --quiet --no-cache-dir --no-index --find-links "$WORK/wheelhouse" \
  -r "$WORK/wheelhouse/requirements.txt"
sudo "$VENV/bin/pip" install --quiet --no-cache-dir --no-index --no-deps "$WORK/$WHEEL"
# spark-submit needs a .py file: the step runs this one with the venv's Python.
sudo tee /opt/fruitpipe/submit.py > /dev/null <<'PY'
"""spark-submit entry point on EMR: the `fruitpipe` command line, inside the session spark-submit made."""
import sys

from fruitpipe.cli import main

sys.exit(main())
PY
"$VENV/bin/python" -c "import fruitpipe, onnxruntime; print('fruitpipe', fruitpipe.__version__, 'onnxruntime', onnxruntime.__version__)"
