# The YOLOv1 detection service.
#   CPU image (default): docker build -t yolov1:cpu .
#     ONNX Runtime only, no PyTorch and no CUDA library; serves the baked weights' export.
#   CUDA image:          docker build --build-arg TORCH_VARIANT=cuda -t yolov1:cuda .
#     PyTorch 2.14.1 from PyPI with its CUDA 13.0 libraries (deploy/requirements/torch.txt);
#     the host needs an NVIDIA driver for CUDA 13.0 (>= 580) and the NVIDIA container toolkit.
# Every Python package comes from deploy/requirements/*.txt (exact versions and SHA-256s;
# `python deploy/lock.py` rewrites them). Offline or behind a mirror, build arguments swap the
# sources, never the packages:
#   --build-arg BASE_IMAGE=...   another python:3.11 Debian image (deploy/standin-base.sh)
#   --build-arg PIP_ARGS="--no-index --find-links http://..."   a local wheel house or index
# One uvicorn worker per container: one batcher per process, one process per GPU.

ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG TORCH_VARIANT=cpu

# ---- a virtual environment and the service's user ------------------------------------------
FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv \
 && useradd --system --user-group --uid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin yolo

# ---- serving dependencies (ONNX Runtime, FastAPI): rebuilt only when their lock changes ----
FROM base AS deps-cpu
ARG PIP_ARGS=""
COPY deploy/requirements/serve.txt /tmp/requirements/
RUN pip install --no-deps --require-hashes $PIP_ARGS -r /tmp/requirements/serve.txt \
 && pip check

# ---- PyTorch on top: the CUDA image, and the export of the baked weights -------------------
FROM deps-cpu AS deps-cuda
ARG PIP_ARGS=""
COPY deploy/requirements/torch.txt /tmp/requirements/
RUN pip install --no-deps --require-hashes $PIP_ARGS -r /tmp/requirements/torch.txt \
 && pip check

# ---- this project as a wheel, built here so that the runtime stage needs no network --------
FROM base AS wheel
ARG PIP_ARGS=""
COPY deploy/requirements/build.txt /tmp/requirements/
RUN pip install --no-deps --require-hashes $PIP_ARGS -r /tmp/requirements/build.txt
COPY pyproject.toml README.md /src/
COPY model /src/model
COPY app /src/app
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheel /src

# ---- the ONNX export of the baked weights: reads model/ and weights/ only, so edits under
# app/ reuse it. The service finds it beside the weights, keyed by their SHA-256. ----------
FROM deps-cuda AS export
ARG WEIGHTS=yolov1-voc.safetensors
WORKDIR /src
COPY model ./model
COPY weights ./weights
RUN PYTHONPATH=/src python -c "import sys; from model.export import ensure_onnx; \
print(ensure_onnx(sys.argv[1]))" "weights/$WEIGHTS"

# ---- the image ---------------------------------------------------------------------------
FROM deps-${TORCH_VARIANT} AS runtime
ARG WEIGHTS=yolov1-voc.safetensors
COPY --from=wheel /wheel /tmp/wheel
# Code and weights belong to root; the service's user can read them and write nothing there.
RUN pip install --no-deps --no-index /tmp/wheel/*.whl && rm -rf /tmp/wheel
# With the weights comes their int8 engine when one was written beside them before the build
# (python -m app.calibration weights/$WEIGHTS: it calibrates on their training data, which the
# build cannot see); YOLOV1_PRECISION=int8, or a gate recorded in the weights, serves it.
COPY weights /srv/yolov1/weights
COPY --from=export /src/weights/*.onnx /srv/yolov1/weights/
# Docker's default stop timeout is 10 s: drain within it. Compose and Kubernetes allow 30 s.
ENV YOLOV1_WEIGHTS=/srv/yolov1/weights/$WEIGHTS YOLOV1_HOST=0.0.0.0 YOLOV1_PORT=8000 \
    YOLOV1_DRAIN_TIMEOUT_S=8
WORKDIR /srv/yolov1
USER 10001:10001
EXPOSE 8000
# Loading and the warm-up take seconds; mounted weights without an export beside them are
# exported at startup by the CUDA image (tens of seconds; the CPU image has no PyTorch).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=4).status != 200)"]
STOPSIGNAL SIGTERM
CMD ["yolov1-serve"]
