#!/usr/bin/env bash
# The EMR nodes' Python environment in .venv-nodes, for CI's second test run (`pytest -m nodes`): exactly the
# packages of src/fruitpipe/cloud/nodes.txt (what `fruitpipe emr upload` puts in the nodes' wheelhouse), PySpark
# 3.5.6 (the Spark of EMR 7's newest release, settings.DEFAULT_RELEASE) and the test tools, all installed under
# nodes.txt as constraints so that no test tool moves a node's version; then fruitpipe itself without its
# dependencies (its pyproject pins the laptop's pyspark 4).
# Usage: scripts/nodes-env.sh          set up .venv-nodes (idempotent)
#        scripts/nodes-env.sh --lock   re-resolve nodes.txt from pyproject.toml's ranges with numpy 1.x
set -euo pipefail
cd "$(dirname "$0")/.."
lock=src/fruitpipe/cloud/nodes.txt
python=${PYTHON:-python3}
# The Spark of the nodes and what its Python half needs from PyPI (py4j comes with it).
pyspark="pyspark==3.5.6"
tools=("pytest>=8" "pytest-timeout>=2.3" "moto[server]>=5")

if [ "${1:-}" = --lock ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$python" -m venv "$tmp/venv"
  # fruitpipe's runtime ranges (pyspark left out: the nodes run EMR's own), resolved with numpy 1.x for PySpark 3.5.
  mapfile -t ranges < <("$python" - <<'PY'
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not d.lower().startswith("pyspark")))
PY
)
  # pyarrow<26: 26.0.1 refuses numpy 1.x at import, which its metadata does not say (nodes.txt's header).
  "$tmp/venv/bin/pip" install -q --disable-pip-version-check "numpy==1.26.4" "pyarrow<26" "${ranges[@]}"
  { grep '^#' "$lock"; "$tmp/venv/bin/pip" freeze --all --exclude pip --exclude setuptools --exclude wheel \
      | LC_ALL=C sort -f; } > "$tmp/nodes.txt"
  mv "$tmp/nodes.txt" "$lock"
  echo "nodes-env: $lock re-resolved ($(grep -vc '^#' "$lock") packages); update the date in its header"
  exit 0
fi

# Java is not needed to install this environment, only to run its tests (make test-nodes runs setup.sh first): CI
# installs it while setup.sh installs Java and the main environment.
if [ ! -x .venv-nodes/bin/python ]; then
  "$python" -m venv .venv-nodes
fi
stamp=".venv-nodes/.installed-$(cat "$lock" pyproject.toml "$0" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv-nodes/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
  .venv-nodes/bin/python -m pip install -q --disable-pip-version-check -c "$lock" -r "$lock" "$pyspark" "${tools[@]}"
  .venv-nodes/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
  rm -f .venv-nodes/.installed-*
  touch "$stamp"
fi
echo "nodes-env: ready ($(.venv-nodes/bin/python -c 'import pyspark, numpy, pandas, pyarrow
print("pyspark", pyspark.__version__, "numpy", numpy.__version__, "pandas", pandas.__version__,
      "pyarrow", pyarrow.__version__)'))"
