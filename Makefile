# One place for the commands the README and CI use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The pinned pair installs from local wheels where they exist; elsewhere any release in the
# pyproject ranges is fine (set TORCH_SPEC= to let pip choose).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv serve test lint bench clean

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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
