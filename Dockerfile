# syntax=docker/dockerfile:1
# The YOLOv1 detection service.
#   CPU image (default):  docker build -t yolov1 .
#   CUDA image:           docker build --build-arg TORCH_VARIANT=cuda -t yolov1:cuda .
# One uvicorn worker per container: one batcher per process, one process per GPU.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- dependencies: their own layer, rebuilt only when pyproject.toml changes ----------------
FROM ${PYTHON_IMAGE} AS deps
ARG TORCH_VARIANT=cpu
# CPU-only wheels are a fraction of the size of the default (CUDA) ones.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml /tmp/pyproject.toml
RUN if [ "$TORCH_VARIANT" = "cpu" ]; then \
        pip install --index-url "$TORCH_CPU_INDEX" torch torchvision; \
    else \
        pip install torch torchvision; \
    fi \
 && python -c "import tomllib; deps = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(deps))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt

# ---- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH \
    YOLOV1_HOST=0.0.0.0 YOLOV1_PORT=8000
COPY --from=deps /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 yolo
WORKDIR /srv/yolov1
COPY pyproject.toml README.md ./
COPY model ./model
COPY app ./app
# The default checkpoint is baked in; mount another and point YOLOV1_WEIGHTS at it to replace it.
COPY weights ./weights
# The ONNX export of the baked-in weights, written now rather than at every cold start (the
# service's ONNX Runtime backend finds it next to the weights, keyed by their SHA-256).
RUN pip install --no-deps --no-cache-dir -e . \
 && python -c "from model.export import ensure_onnx; ensure_onnx('weights/yolov1-voc.safetensors')" \
 && chown -R yolo:yolo /srv/yolov1
USER yolo
EXPOSE 8000
# Loading the weights, the warm-up batch, and the ONNX export of mounted weights (the baked-in
# ones are exported at build time) take a while on a cold start.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health/ready', timeout=4).status != 200)"]
STOPSIGNAL SIGTERM
CMD ["yolov1-serve"]
