# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL_FILES := $(foreach m,setosa versicolor virginica aggregate,model_repository/$(m)/1/model.onnx) \
               model_repository/iris_ensemble/config.pbtxt

.PHONY: help install tools train models run triton test bench soak lint clean

help:
	@echo "make run      set up, train if needed, serve Triton (:8000/:8001/:8002) and the proxy (:9000)"
	@echo "make test     set up and run the tests (real embedded Triton)"
	@echo "make train    retrain and rewrite model_repository/"
	@echo "make triton   serve the embedded Triton only"
	@echo "make bench    the proxy against Triton's ensemble and the seed's design (about 10 minutes)"
	@echo "make soak     the proxy at concurrency 64 for 3 minutes: errors, p99, memory, descriptors"
	@echo "make lint     ruff and mypy"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,server,bench,dev]'
	touch $@

install: $(STAMP)

# wrk, the benchmark's load generator, from Debian's packages (needs root, or install it yourself).
tools:
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && { apt-get install -y -qq wrk >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }; }; } \
		|| { echo "wrk is missing: install it (apt-get install wrk)"; exit 1; }

# Trains only when a model is missing; `make train` always retrains.
$(MODEL_FILES) &: | $(STAMP)
	$(BIN)/python -m training

models: $(MODEL_FILES)

train: $(STAMP)
	$(BIN)/python -m training

triton: $(STAMP) models
	$(BIN)/python -m local_triton

run: $(STAMP) models
	$(BIN)/python -m local_triton.stack

test: $(STAMP) models tools
	$(BIN)/python -m pytest

bench: $(STAMP) models tools
	$(BIN)/python -m bench

# Not part of `make test`: concurrency 64 for 3 minutes against /predict/label.
soak: $(STAMP) models tools
	$(BIN)/python -m bench.soak

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy training local_triton client_proxy bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
