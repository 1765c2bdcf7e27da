#!/usr/bin/env bash
# The built wheel, alone: `python -m build` (the sdist, then the wheel built from it), SHA256SUMS beside them, the
# wheel installed with the pinned torch into a fresh venv (no system site-packages, no checkout on sys.path), and
# from a folder outside the checkout: `dsocr --version`, `dsocr --help`, `dsocr-server --help`, an image and a
# PDF page on the tiny test model (passed by path), an image with --quantize int8 (the C kernels built from the
# wheel's source), and one chat request to `dsocr-server` on loopback.
#
#   bash .ci/wheel_smoke.sh              # KEEP=1 keeps the scratch folder (dist/, the venv) and prints it
#
# pip's cache is used as usual, so a second run installs in seconds. Any failure exits non-zero.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
FIXTURE="$REPO/tests/fixtures/deepseek-ocr"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dsocr-wheel-smoke.XXXXXX")"
SERVER_PID=""
started=$SECONDS

finish() {
    local rc=$?
    if [[ -n "$SERVER_PID" ]]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    if [[ $rc -ne 0 && -s "$WORK/server.log" ]]; then tail -n 30 "$WORK/server.log"; fi
    if [[ "${KEEP:-0}" == 1 ]]; then echo "wheel smoke: kept $WORK"; else rm -rf "$WORK"; fi
    echo "wheel smoke: $([[ $rc -eq 0 ]] && echo passed || echo FAILED) in $((SECONDS - started)) s"
}
trap finish EXIT

step() { echo "--- wheel smoke ($((SECONDS - started)) s): $*"; }

step "build the sdist and the wheel"
"$PYTHON" -m build --outdir "$WORK/dist" "$REPO" > "$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; exit 1; }
"$PYTHON" "$REPO/.ci/sha256sums.py" "$WORK/dist"
(cd "$WORK/dist" && sha256sum --check --quiet SHA256SUMS)
wheel="$(ls "$WORK"/dist/dsocr-*-py3-none-any.whl)"

step "install $(basename "$wheel") and $TORCH_SPEC into a fresh venv"
"$PYTHON" -m venv "$WORK/venv"
VENV_BIN="$WORK/venv/bin"
"$VENV_BIN/python" -m pip install --disable-pip-version-check "$TORCH_SPEC" "$wheel" > "$WORK/pip.log" 2>&1 ||
    { tail -n 40 "$WORK/pip.log"; exit 1; }

# Outside the checkout, with a clean environment: nothing may come from $REPO.
mkdir "$WORK/run"
cd "$WORK/run"
export PATH="$VENV_BIN:$PATH"
unset PYTHONPATH
while IFS= read -r name; do unset "$name"; done < <(env | sed -n 's/^\(DSOCR_[A-Z0-9_]*\)=.*/\1/p')
export HF_HUB_OFFLINE=1

"$VENV_BIN/python" - "$REPO" "$WORK/venv" <<'EOF'
import importlib.util, os, sys
repo, venv = (os.path.realpath(p) for p in sys.argv[1:3])
for name in ("cli", "server", "common", "dsocr_torch", "dsocr_mlx"):
    origin = os.path.realpath(importlib.util.find_spec(name).origin)
    assert origin.startswith(venv + os.sep), f"{name} imported from {origin}, not from the venv"
    assert not origin.startswith(repo + os.sep), f"{name} imported from the checkout: {origin}"
print("imports come from the venv")
EOF

step "dsocr --version"
dsocr --version | tee version.txt
grep -q "^dsocr [0-9]" version.txt
grep -q "^device: cpu with the torch backend" version.txt
step "dsocr --help, dsocr-server --help, dsocr verify --help"
dsocr --help > /dev/null
dsocr-server --help > /dev/null
dsocr verify --help > /dev/null

step "an image and a PDF page on the tiny model"
"$VENV_BIN/python" -c "from PIL import Image; Image.open('$FIXTURE/images/table.png').convert('RGB').save('page.pdf')"
dsocr --model "$FIXTURE/model" "$FIXTURE/images/doc_text.png" page.pdf --max-new-tokens 16 --temperature 0 \
    -o out -q
test -s out/doc_text.md
test -s out/page_page001.md
echo "outputs:" out/*

step "--quantize int8 on a copy of the tiny model: the C row products built from the installed wheel"
cp -r "$FIXTURE/model" model-copy
DSOCR_KERNEL_CACHE="$WORK/kernels" dsocr --model model-copy "$FIXTURE/images/doc_text.png" --device cpu \
    --dtype float32 --quantize int8 --max-new-tokens 8 --temperature 0 -o out-int8 -q
test -s out-int8/doc_text.md
if grep -qw avx2 /proc/cpuinfo; then ls "$WORK"/kernels/*/decode_step-*.so; fi

step "dsocr-server on loopback: /health, one chat request with an image"
port="$("$VENV_BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
dsocr-server --model "$FIXTURE/model" --port "$port" --api-key smoke-key > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
"$VENV_BIN/python" - "$port" "$FIXTURE/images/doc_text.png" <<'EOF'
import base64, json, sys, time, urllib.error, urllib.request
port, image = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + 120
while True:
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as reply:
            if reply.status == 200:
                break
    except (urllib.error.URLError, ConnectionError):
        pass
    if time.monotonic() > deadline:
        sys.exit("the server was not healthy within 120 s")
    time.sleep(0.5)
url = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
body = {"model": "deepseek-ocr", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                  {"type": "text", "text": "Free OCR."}]}]}
request = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer smoke-key"})
with urllib.request.urlopen(request, timeout=120) as reply:
    answer = json.load(reply)
choice = answer["choices"][0]
assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str), answer
print(f"chat completion: finish_reason={choice['finish_reason']}, {answer['usage']['completion_tokens']} tokens")
EOF
kill "$SERVER_PID"
wait "$SERVER_PID" || true
SERVER_PID=""
