# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL_FILES := $(foreach m,setosa versicolor virginica aggregate,model_repository/$(m)/1/model.onnx) \
               model_repository/iris_ensemble/config.pbtxt

.PHONY: help install train models run triton test lint clean

help:
	@echo "make run      set up, train if needed, and serve Triton on :8000/:8001/:8002"
	@echo "make test     set up and run the tests (real embedded Triton)"
	@echo "make train    retrain and rewrite model_repository/"
	@echo "make triton   serve the embedded Triton only"
	@echo "make lint     ruff and mypy"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[train,server,dev]'
	touch $@

install: $(STAMP)

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

test: $(STAMP) models
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy training local_triton client_proxy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
