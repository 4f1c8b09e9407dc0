#!/usr/bin/env bash
# Build the image with this machine's Docker, run it as a user would harden it (read-only root,
# /tmp on tmpfs, no capabilities), wait until Docker calls it healthy, post a photo, check the
# answer, stop it with plain `docker stop` and check the exit status and the drain in its log.
#
#   deploy/smoke.sh                  # or: make docker-smoke
# Environment (all optional):
#   IMAGE=yolov1:smoke  TORCH_VARIANT=cpu  PHOTO=path.jpg (default: ../shared/images/dog.jpg,
#   else a generated one)  BASE_IMAGE=... PIP_ARGS=... (build arguments, see the Dockerfile)
#   BUILD_NETWORK=host (to reach a package index on this machine's loopback)  SKIP_BUILD=1
# Prints one "smoke:" line per step and its measurements; exits non-zero at the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${IMAGE:-yolov1:smoke}
variant=${TORCH_VARIANT:-cpu}
photo=${PHOTO:-../shared/images/dog.jpg}
say() { echo "smoke: $*"; }
fail() { echo "smoke: FAILED: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

command -v docker >/dev/null || fail "docker is not installed"
docker info >/dev/null 2>&1 || fail "no Docker daemon answers"

if [ -z "${SKIP_BUILD:-}" ]; then
    args=(--build-arg "TORCH_VARIANT=$variant")
    [ -n "${BASE_IMAGE:-}" ] && args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
    [ -n "${PIP_ARGS:-}" ] && args+=(--build-arg "PIP_ARGS=$PIP_ARGS")
    [ -n "${BUILD_NETWORK:-}" ] && args+=(--network "$BUILD_NETWORK")
    t0=$(now)
    docker build -q "${args[@]}" -t "$image" . >/dev/null || fail "docker build"
    say "built $image ($variant) in $(since "$t0") s"
fi
size=$(docker image inspect -f '{{.Size}}' "$image")
say "image size $((size / 1000000)) MB"
if [ "$variant" = cpu ]; then
    cuda=$(docker run --rm --entrypoint sh "$image" -c \
        'find / -xdev \( -name "libcuda*" -o -name "libcudart*" -o -name "libcublas*" -o -name "libcudnn*" \) 2>/dev/null | wc -l')
    [ "$cuda" = 0 ] || fail "the CPU image holds $cuda CUDA libraries"
    say "no CUDA library in the CPU image"
fi

t0=$(now)
cid=$(docker run -d --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
    -p 127.0.0.1::8000 "$image")
trap 'docker rm -f "$cid" >/dev/null 2>&1 || true' EXIT
port=$(docker port "$cid" 8000/tcp | head -1 | sed 's/.*://') \
    || fail "no port 8000 published (exited?): $(docker logs "$cid" 2>&1 | tail -3)"
url="http://127.0.0.1:$port"
ready=""
for _ in $(seq 1 1800); do
    if [ -z "$ready" ] && curl -sf -o /dev/null "$url/health/ready"; then
        ready=$(since "$t0")
    fi
    [ "$(docker inspect -f '{{.State.Running}}' "$cid")" = true ] \
        || fail "the container exited: $(docker logs "$cid" 2>&1 | tail -3)"
    health=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$cid")
    [ -n "$health" ] || fail "the image has no health check"
    [ "$health" = healthy ] && break
    sleep 0.1
done
[ "$health" = healthy ] || fail "not healthy after 180 s: $(docker logs "$cid" 2>&1 | tail -3)"
say "/health/ready 200 after ${ready:-?} s; Docker: healthy after $(since "$t0") s"

user=$(docker exec "$cid" id -u)
[ "$user" = 10001 ] || fail "runs as uid $user"
owner=$(docker exec "$cid" python -c \
    "import app, os, pathlib; p = pathlib.Path(app.__file__).parent; s = p.stat(); \
print(s.st_uid, os.access(p, os.W_OK), os.access(p / 'main.py', os.W_OK))")
[ "$owner" = "0 False False" ] || fail "code ownership/writability: $owner"
say "runs as uid 10001; its code belongs to root and is read-only to it"
docker logs "$cid" 2>&1 | grep -q "reusing the ONNX export /srv/yolov1/weights/" \
    || fail "the baked export was not used: $(docker logs "$cid" 2>&1 | grep -i onnx | tail -2)"
say "served the baked ONNX export"

if [ ! -f "$photo" ]; then
    photo=$(mktemp --suffix .jpg)
    docker exec "$cid" python -c "import io, sys; from PIL import Image; b = io.BytesIO(); \
Image.new('RGB', (640, 480), (90, 140, 200)).save(b, 'JPEG'); sys.stdout.buffer.write(b.getvalue())" \
        >"$photo"
fi
answer=$(curl -sf -F "image=@$photo" "$url/v1/detect") || fail "POST /v1/detect"
python3 - "$photo" "$answer" <<'EOF' || fail "the answer: $answer"
import json, struct, sys
answer = json.loads(sys.argv[2])
data = open(sys.argv[1], "rb").read()
i = 2  # the JPEG's own size, from its SOF marker
while data[i + 1] not in (0xC0, 0xC1, 0xC2):
    i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
height, width = struct.unpack(">HH", data[i + 5 : i + 9])
assert (answer["image"]["width"], answer["image"]["height"]) == (width, height), answer["image"]
for d in answer["detections"]:
    b = d["box"]
    assert 0 <= b["x1"] <= b["x2"] <= width and 0 <= b["y1"] <= b["y2"] <= height, d
    assert 0 <= d["confidence"] <= 1, d
print(f"smoke: POST /v1/detect {width}x{height}: {len(answer['detections'])} detections, "
      f"{answer['model']['name'] if isinstance(answer.get('model'), dict) else answer.get('model')}")
EOF
docs=$(curl -sf "$url/docs") || fail "GET /docs"
js=$(grep -o '/docs-static/swagger-ui-bundle.js' <<<"$docs" | head -1)
[ -n "$js" ] && curl -sf -o /dev/null "$url$js" || fail "/docs does not load Swagger UI locally"
! grep -q "cdn.jsdelivr" <<<"$docs" || fail "/docs still loads from a CDN"
say "/docs serves Swagger UI from the image"

t0=$(now)
docker stop "$cid" >/dev/null
stopped=$(since "$t0")
status=$(docker inspect -f '{{.State.ExitCode}}' "$cid")
[ "$status" = 0 ] || fail "exit status $status after docker stop"
docker logs "$cid" 2>&1 | grep -q "SIGTERM: draining" || fail "no drain in the log"
say "docker stop: drained and exited 0 in $stopped s"
say "OK"
