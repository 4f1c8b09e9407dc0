# One place for the commands the README and CI use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The pinned pair installs from local wheels where they exist; elsewhere any release in the
# pyproject ranges is fine (set TORCH_SPEC= to let pip choose).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv serve test lint bench bench-int8 int8 clean docker-smoke lock client-python client-typescript

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/pip install --quiet $(TORCH_SPEC) || $(BIN)/pip install --quiet torch torchvision
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

serve: venv
	$(BIN)/yolov1-serve

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python -m benchmarks.serving

# INT8 on the CPU (README): the engine of the default weights beside them, calibrated on their
# training data (docker build copies it), and its speed and accuracy gate against float32.
WEIGHTS ?= weights/yolov1-voc.safetensors
int8: venv
	$(BIN)/python -m app.calibration $(WEIGHTS)

bench-int8: venv
	$(BIN)/python -m benchmarks.quantize --weights $(WEIGHTS) --repeats 5

# Build the image, run it read-only, detect on a photo, stop it, check the drain (needs Docker;
# BASE_IMAGE, PIP_ARGS, BUILD_NETWORK pass through, see the README's Docker section).
docker-smoke:
	deploy/smoke.sh

# Rewrite deploy/requirements/*.txt (the image's pinned, hashed packages) from pyproject.toml.
lock: venv
	$(BIN)/python deploy/lock.py

# Clients generated from a running service's schema (README, "Generated clients").
OPENAPI_URL ?= http://localhost:8000/openapi.json

client-python: venv
	$(BIN)/openapi-python-client generate --url $(OPENAPI_URL) --config clients/python/config.yaml \
		--output-path clients/python/yolov1-client --overwrite

client-typescript:
	cd clients/typescript && npm ci --no-audit --no-fund && OPENAPI_URL=$(OPENAPI_URL) npx openapi-ts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
