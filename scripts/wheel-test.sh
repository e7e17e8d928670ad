#!/usr/bin/env bash
# fruitpipe as `pip install` gives it: build the wheel, install it with its [serve] extra into a fresh virtual
# environment in a folder without the repository, then, from there: `fruitpipe sample --mini`, `fruitpipe run` on
# the shipped photos, `fruitpipe train`, and `fruitpipe serve` answering GET /health and POST /predict with a photo.
# The model is built from its published weights into an empty cache: set FRUITPIPE_DOWNLOAD_BASE to a mirror
# where the public host cannot be reached (CI: ../shared/tools/public-mirror). Usage: scripts/wheel-test.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d)
server=
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
step() { echo "wheel-test: $*" >&2; }

step "building the wheel"
"$python" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip -q --disable-pip-version-check)
"${pip[@]}" install --upgrade pip
"${pip[@]}" wheel --no-deps -w "$work/dist" "$root"
wheel=$(ls "$work"/dist/fruitpipe-*.whl)
step "installing $(basename "$wheel")[serve] into a fresh environment"
"${pip[@]}" install "$wheel[serve]"

cd "$work"  # no repository here, no ../shared: only what the wheel carries
export HOME="$work/home" FRUITPIPE_CACHE="$work/home/cache"
unset FRUITPIPE_MODELS
mkdir -p "$HOME"
fp="$work/venv/bin/fruitpipe"
"$fp" --version
"$fp" sample photos --mini
"$fp" run photos out -q
"$fp" train out --master 'local[2]' -q
test -f out/_SUCCESS && test -f out/classifier/fruit_classifier.onnx && test -f out/report.html

port=$("$work/venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$fp" serve out --host 127.0.0.1 --port "$port" -q > "$work/serve.log" 2>&1 &
server=$!
"$work/venv/bin/python" - "$port" photos <<'EOF'
"""Wait for the server (bounded), then check /health, the page and one prediction of a shipped photo."""
import json, pathlib, sys, time, urllib.request, uuid

port, photos = sys.argv[1], pathlib.Path(sys.argv[2])
base = f"http://127.0.0.1:{port}"
for _ in range(240):
    try:
        health = json.load(urllib.request.urlopen(base + "/health", timeout=2))
        break
    except OSError:
        time.sleep(0.25)
else:
    sys.exit("wheel-test: serve did not answer /health within 60 s")
assert health["status"] == "ok" and health["classes"] == 10, health
page = urllib.request.urlopen(base + "/", timeout=10).read().decode()
assert "<html" in page.lower(), page[:200]
photo = sorted((photos / "Test" / "Banana 1").iterdir())[0]
boundary = uuid.uuid4().hex
body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{photo.name}\"\r\n"
        f"Content-Type: image/jpeg\r\n\r\n").encode() + photo.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
req = urllib.request.Request(base + "/predict", data=body,
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
answer = json.load(urllib.request.urlopen(req, timeout=30))
top = answer["top5"][0]
print(f"wheel-test: serve answered {top['label']} ({top['probability']:.2f}) for {photo.parent.name}/{photo.name}")
assert top["label"] == "Banana 1", answer
EOF
step "passed: sample, run, train and serve from the installed wheel"
