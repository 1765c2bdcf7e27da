#!/usr/bin/env bash
# Builds deploy/Dockerfile and runs the image on the tiny test model, on a machine that reaches PyPI and Debian's
# mirror but no image registry nor PyTorch's index (as this project's CI machines):
#
#   - the base image is made from Debian packages (mmdebstrap bookworm: python3, python3-venv) and imported, with
#     the host's extra CA certificates;
#   - torch's pinned CPU wheel (and what it needs) is served from a local index on 127.0.0.1 (TORCH_INDEX_URL);
#   - the image runs with the tiny model mounted read-only (DSOCR_MODEL), the port published on 127.0.0.1 only;
#     Docker's health check must turn healthy, and one chat request with an image must be answered.
#
#   bash deploy/test_image.sh          # needs a running Docker daemon (dockerd), mmdebstrap (first run), python3
#
# Where a registry is reachable, the plain `docker build -f deploy/Dockerfile -t dsocr .` is the build to use.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
BASE="${BASE:-dsocr-test-base:bookworm}"
TAG="${TAG:-dsocr:test}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/dsocr-image-test.XXXXXX")"
NAME="dsocr-image-test-$$"
INDEX_PID=""
started=$SECONDS

finish() {
    local rc=$?
    if [[ $rc -ne 0 ]] && docker container inspect "$NAME" > /dev/null 2>&1; then docker logs --tail 40 "$NAME"; fi
    docker rm -f "$NAME" > /dev/null 2>&1 || true
    docker volume rm "$NAME-data" > /dev/null 2>&1 || true
    if [[ -n "$INDEX_PID" ]]; then kill "$INDEX_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
    echo "image test: $([[ $rc -eq 0 ]] && echo passed || echo FAILED) in $((SECONDS - started)) s"
}
trap finish EXIT
step() { echo "--- image test ($((SECONDS - started)) s): $*"; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

if ! docker image inspect "$BASE" > /dev/null 2>&1; then
    step "base image $BASE from Debian bookworm packages (mmdebstrap)"
    # The host's own CA certificates (a TLS-inspecting proxy between it and PyPI) are trusted inside too.
    # shellcheck disable=SC2016  # "$1" is the root file system, expanded by mmdebstrap in the hook
    mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        --customize-hook='copy-in /usr/local/share/ca-certificates /usr/local/share' \
        --customize-hook='chroot "$1" update-ca-certificates' bookworm - \
        | docker import --change 'CMD ["python3"]' - "$BASE"
fi
base_python="$(docker run --rm --network none "$BASE" python3 -c 'import sys; print("%d%d" % sys.version_info[:2])')"

step "a local index with torch==$TORCH_VERSION (CPU) for cp$base_python"
python3 -m pip download --quiet --disable-pip-version-check --only-binary=:all: --python-version "$base_python" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest "$WORK/wheels" "torch==$TORCH_VERSION"
python3 - "$WORK/wheels" "$WORK/index/simple" <<'EOF'
import os, re, sys
wheels, simple = sys.argv[1:]
for name in sorted(os.listdir(wheels)):  # the PEP 503 layout: simple/<normalized project name>/<file>
    project = re.sub(r"[-_.]+", "-", name.split("-")[0]).lower()
    os.makedirs(os.path.join(simple, project), exist_ok=True)
    os.symlink(os.path.join(wheels, name), os.path.join(simple, project, name))
EOF
grep -q "+cpu" <(ls "$WORK/wheels") || { echo "the torch wheel found is not a CPU build"; exit 1; }
index_port="$(free_port)"
python3 -m http.server --bind 127.0.0.1 --directory "$WORK/index" "$index_port" > "$WORK/index.log" 2>&1 &
INDEX_PID=$!

step "docker build (base $BASE, torch from the local index)"
build_started=$SECONDS
docker build --network host -f "$REPO/deploy/Dockerfile" -t "$TAG" \
    --build-arg BASE_IMAGE="$BASE" \
    --build-arg TORCH_INDEX_URL="http://127.0.0.1:$index_port/simple" \
    "$REPO" > "$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; exit 1; }
echo "built in $((SECONDS - build_started)) s; size $(docker image inspect --format '{{.Size}}' "$TAG" \
    | awk '{printf "%.0f MB", $1 / 1e6}')"

step "docker run --rm $TAG dsocr --version"
docker run --rm --network none "$TAG" dsocr --version
test "$(docker run --rm --network none "$TAG" id -u)" = 10001

step "the server on the tiny model (mounted read-only), published on 127.0.0.1 only"
port="$(free_port)"
docker run -d --name "$NAME" --init --health-interval 3s --health-start-period 120s \
    -p "127.0.0.1:$port:8000" -v "$NAME-data:/data" \
    -v "$REPO/tests/fixtures/deepseek-ocr/model:/models/tiny:ro" \
    -e DSOCR_MODEL=/models/tiny -e DSOCR_API_KEY=sk-image-test -e DSOCR_ALLOWED_HOSTS=dsocr \
    "$TAG" > /dev/null
for _ in $(seq 1 60); do
    health="$(docker inspect --format '{{.State.Health.Status}}' "$NAME")"
    [[ "$health" == healthy ]] && break
    [[ "$(docker inspect --format '{{.State.Running}}' "$NAME")" == true ]] || { echo "the container stopped"; exit 1; }
    sleep 2
done
echo "Docker's health check: $health"
[[ "$health" == healthy ]]
python3 - "$port" "$REPO/tests/fixtures/deepseek-ocr/images/doc_text.png" <<'EOF'
import base64, json, sys, urllib.request
port, image = sys.argv[1:]
base = f"http://127.0.0.1:{port}"
print("GET /health:", urllib.request.urlopen(base + "/health", timeout=10).status)
url = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
body = {"model": "deepseek-ocr", "max_tokens": 12, "temperature": 0,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                  {"type": "text", "text": "Free OCR."}]}]}
request = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer sk-image-test"})
answer = json.load(urllib.request.urlopen(request, timeout=120))
choice = answer["choices"][0]
print(f"POST /v1/chat/completions: finish_reason={choice['finish_reason']}, usage={answer['usage']}")
print("answer (random weights, meaningless):", json.dumps(choice["message"]["content"], ensure_ascii=False))
assert choice["message"]["role"] == "assistant" and answer["usage"]["completion_tokens"] > 0

import io
from PIL import Image  # a one-page PDF: rendered in the container's PDF worker processes
pdf = io.BytesIO()
Image.open(image).convert("RGB").save(pdf, "PDF")
url = "data:application/pdf;base64," + base64.b64encode(pdf.getvalue()).decode()
body["messages"][0]["content"][0] = {"type": "file", "file": {"file_data": url, "filename": "page.pdf"}}
request = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer sk-image-test"})
answer = json.load(urllib.request.urlopen(request, timeout=120))
print(f"the same with a PDF: finish_reason={answer['choices'][0]['finish_reason']}, usage={answer['usage']}")
EOF
docker exec "$NAME" sh -c 'echo "inside: uid $(id -u), HF_HOME=$HF_HOME"; ls -ld /data'
