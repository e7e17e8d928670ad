#!/usr/bin/env bash
# Install what fruitpipe needs on a Debian/Ubuntu machine, idempotently: Java 17 (Spark's JVM), Chromium for the
# page's browser test (dev), a virtual environment in .venv with the package and its test dependencies. Usage: scripts/setup.sh [extras, default "dev"]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
  echo "setup: need root to run: $*" >&2; exit 1; fi; }

apt_updated=0
apt_install() {
  if ! command -v apt-get >/dev/null; then
    echo "setup: please install $* with your system's package manager" >&2; exit 1
  fi
  if [ "$apt_updated" = 0 ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! command -v java >/dev/null; then
  echo "setup: installing Java 17 (openjdk-17-jre-headless)"
  apt_install openjdk-17-jre-headless
fi
# No system BLAS/LAPACK: the PCA is numpy's (its wheel ships OpenBLAS), and Spark ML's classifier fits ran as fast on
# its pure-Java BLAS (47.7 s against 56.0 s with libopenblas0-pthread for `fruitpipe train` on 10 classes).

if [[ ",$extras," == *",dev,"* ]] && ! command -v chromium >/dev/null; then
  # The page's browser test drives a real headless Chromium through Playwright; Debian's package, so nothing is
  # downloaded at test time (Playwright's own browser download is not used).
  echo "setup: installing Chromium for the browser tests (chromium)"
  apt_install chromium
fi

python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "setup: Python 3.11+ is required, $("$python" --version) found; set PYTHON=python3.11" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)-$extras"
# `make run` asks for serve, `make test` for dev; dev holds everything serve does, so a dev install serves both.
if [ "$extras" = serve ] && [ -f "${stamp%-serve}-dev" ]; then stamp="${stamp%-serve}-dev"; fi
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$extras]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
echo "setup: ready ($(.venv/bin/python --version), $(java -version 2>&1 | head -1))"
