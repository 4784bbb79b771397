# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The lock files in requirements/ (make lock writes them); each install is stamped in the venv.
# --no-deps: a lock holds every package already, and pip's hash mode refuses a dependency asked
# for with extras it does not list (kserve's uvicorn[standard]) in a fresh venv.
INSTALL = $(BIN)/python -m pip install --quiet --require-hashes --no-deps --only-binary=:all: -r
# The project itself is not installed: every command runs from this directory.
export PYTHONPATH := $(CURDIR)
MODEL_FILES := $(foreach m,setosa versicolor virginica aggregate,model_repository/$(m)/1/model.onnx) \
               model_repository/iris_ensemble/config.pbtxt

.PHONY: help install tools perf-analyzer proxy-wheels ray train models run triton test test-unit bench soak lint lock docs docs-serve clean

help:
	@echo "make run      set up, train if needed, serve Triton (:8000/:8001/:8002) and the proxy (:9000)"
	@echo "make test     set up and run the tests (real embedded Triton)"
	@echo "make test-unit  the core's unit tests only (no Triton; seconds)"
	@echo "make train    retrain and rewrite model_repository/"
	@echo "make triton   serve the embedded Triton only"
	@echo "make bench    the proxy against Triton's ensemble, BLS, Ray Serve and the seed's design (about 40 minutes)"
	@echo "make soak     the proxy at concurrency 64 for 3 minutes: errors, p99, memory, descriptors"
	@echo "make lint     ruff and mypy"
	@echo "make docs     build the documentation site into site/ (offline, --strict)"
	@echo "make docs-serve  serve the documentation on http://127.0.0.1:8008, rebuilt on change"
	@echo "make lock     rewrite requirements/*.txt from pyproject.toml (UPGRADE=1: newest indirect deps)"

# The Python versions the tests run on (.ci/run): the lock files hold nothing for others.
$(BIN)/python:
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 11) <= v <= (3, 12) else \
		"Python %d.%d is not supported: use 3.11 or 3.12 (make run PYTHON=python3.12)" % v)'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-%: requirements/%.txt | $(BIN)/python
	$(INSTALL) $<
	touch $@

install: $(VENV)/.installed-test

# From Debian's packages (as root; otherwise install them yourself): wrk, the benchmark's load
# generator, chromium, the headless browser the /docs test renders the page in, and prometheus
# (with promtool), which the tests run on deploy/prometheus/prometheus.yml, and redis-server and
# PostgreSQL, the feature stores the tests of requests by key start on spare ports.
TOOLS := wrk chromium prometheus redis-server
# Debian packages checked by name: libb64, which perf_analyzer links against, and PostgreSQL's
# server (its programs are off PATH).
LIBRARIES := libb64-0d postgresql
tools:
	@missing=""; for tool in $(TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	for library in $(LIBRARIES); do dpkg -s $$library >/dev/null 2>&1 || missing="$$missing $$library"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get install -y -qq $$missing >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; }; \
		else echo "missing:$$missing: install them (apt-get install$$missing)"; exit 1; fi; \
	fi

# Trains only when a model is missing (installing the training tools then); `make train` always retrains.
$(MODEL_FILES) &:
	$(MAKE) $(VENV)/.installed-train
	$(BIN)/python -m training

models: $(MODEL_FILES)

train: $(VENV)/.installed-train
	$(BIN)/python -m training

triton: $(VENV)/.installed-run models
	$(BIN)/python -m local_triton

run: $(VENV)/.installed-run models
	$(BIN)/python -m local_triton.stack

test: $(VENV)/.installed-test models tools perf-analyzer proxy-wheels ray
	$(BIN)/python -m pytest

# The wheels of requirements/proxy.txt (hash-checked), fetched before the tests, so that the test
# that installs the proxy's image set alone needs no network (tests/test_deploy.py).
PROXY_WHEELS := $(VENV)/proxy-wheels
proxy-wheels: $(PROXY_WHEELS)/.done
$(PROXY_WHEELS)/.done: requirements/proxy.txt | $(VENV)/.installed-test
	rm -rf $(PROXY_WHEELS)
	$(BIN)/python -m pip download --quiet --require-hashes --only-binary=:all: \
		-r requirements/proxy.txt -d $(PROXY_WHEELS)
	touch $@

# perf_analyzer, unpacked from the wheels requirements/perf-analyzer.txt names (downloaded with
# their hashes checked, not installed): it measures Triton and the proxy in make bench and tests.
PERF_ANALYZER := .cache/perf_analyzer/perf_analyzer
perf-analyzer: $(PERF_ANALYZER)
$(PERF_ANALYZER): requirements/perf-analyzer.txt | $(VENV)/.installed-test
	rm -rf .cache/perf_analyzer && mkdir -p .cache/perf_analyzer/wheels
	$(BIN)/python -m pip download --quiet --no-deps --require-hashes --only-binary=:all: \
		-r requirements/perf-analyzer.txt -d .cache/perf_analyzer/wheels
	$(BIN)/python -m bench.perf_analyzer install .cache/perf_analyzer .cache/perf_analyzer/wheels
	rm -rf .cache/perf_analyzer/wheels

# The core's unit tests alone (no Triton, no server): seconds.
test-unit: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests/unit

bench: $(VENV)/.installed-test models tools perf-analyzer ray
	$(BIN)/python -m bench

# Ray Serve, a peer of the proxy in make bench ("Peers", bench/peer_bench.py), in an environment of
# its own inside the venv: kept out of the project's installs (requirements/ray.txt).
RAY_VENV := $(VENV)/ray
ray: $(RAY_VENV)/.installed
$(RAY_VENV)/.installed: requirements/ray.txt | $(BIN)/python
	rm -rf $(RAY_VENV)
	$(BIN)/python -m venv $(RAY_VENV)
	$(RAY_VENV)/bin/python -m pip install --quiet --require-hashes --no-deps --only-binary=:all: \
		-r requirements/ray.txt
	touch $@

# Not part of `make test`: concurrency 64 for 3 minutes against /predict/label.
soak: $(VENV)/.installed-test models tools
	$(BIN)/python -m bench.soak

# test.txt first; the others are constrained by it, so every file has the same versions.
UV_COMPILE = $(BIN)/uv pip compile pyproject.toml --quiet --universal --python-version 3.11 \
	--generate-hashes $(if $(UPGRADE),--upgrade)
lock: $(VENV)/.installed-test
	$(UV_COMPILE) --all-extras -o requirements/test.txt
	$(UV_COMPILE) --extra server -c requirements/test.txt -o requirements/run.txt
	$(UV_COMPILE) --extra train -c requirements/test.txt -o requirements/train.txt
	$(UV_COMPILE) -c requirements/test.txt -o requirements/proxy.txt
	# Triton 24.10's Python (3.10), for the by_key models' store reading (deploy/triton/Dockerfile).
	$(BIN)/uv pip compile deploy/triton/requirements.in -c requirements/proxy.txt --quiet \
		--python-version 3.10 --python-platform x86_64-manylinux_2_28 --generate-hashes \
		-o requirements/triton-by-key.txt
	$(BIN)/uv pip compile deploy/triton/requirements-test.in -c requirements/triton-by-key.txt --quiet \
		--python-version 3.10 --python-platform x86_64-manylinux_2_28 --generate-hashes \
		-o requirements/triton-by-key-test.txt
	# Ray Serve, make bench's peer, in its own environment (bench/peers/ray.in).
	$(BIN)/uv pip compile bench/peers/ray.in --quiet --universal --python-version 3.11 --generate-hashes \
		$(if $(UPGRADE),--upgrade) -o requirements/ray.txt

# The documentation site (mkdocs.yml): --strict, so a broken link or a missing page fails; the
# settings, metrics and benchmark lists are generated from the code (docs/hooks/generated.py).
docs: $(VENV)/.installed-test
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

docs-serve: $(VENV)/.installed-test
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs serve --strict -a 127.0.0.1:8008

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy training local_triton client_proxy bench docs/hooks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .cache site
