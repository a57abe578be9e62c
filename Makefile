# tagstream developer commands. `make demo` and `make test` are the two a new user runs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
KAFKACTL := $(PYTHON) dev/kafka/kafkactl.py
PYTEST_ARGS ?=

PHONY_EXTRA := tools deploy-check bench-setup bench-scorer bench-pipeline bench-latency bench-soak bench-serve faults-loop
.PHONY: $(PHONY_EXTRA) setup test unit integration lint fmt kafka-up kafka-down kafka-status demo schemas bench clean

## setup: create .venv and install tagstream with its test and dev extras (no-op when unchanged)
setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	@touch $(STAMP)

## tools: helm (built once from the Go module proxy) for the chart tests
tools: setup
	bash ci/validate-deploy.sh --tools-only

## deploy-check: lint, render and validate the Helm chart and docker-compose.yml offline
deploy-check: setup
	bash ci/validate-deploy.sh

## test: the whole suite, unit and integration (starts its own Kafka broker)
test: setup tools
	$(PY) -m pytest $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: setup
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

## lint: ruff and mypy --strict on the package, its tests, the benchmarks and dev tools
lint: setup
	$(VENV)/bin/ruff check worker tests bench dev ci
	$(VENV)/bin/ruff format --check worker tests bench dev ci
	$(VENV)/bin/mypy --strict worker tests bench dev ci

fmt: setup
	$(VENV)/bin/ruff check --fix worker tests bench dev ci
	$(VENV)/bin/ruff format worker tests bench dev ci

## kafka-up / kafka-down: the local broker (127.0.0.1:19092 unless TAGSTREAM_KAFKA_PORT says)
kafka-up:
	$(KAFKACTL) up

kafka-down:
	$(KAFKACTL) down

kafka-status:
	$(KAFKACTL) status

schemas: setup
	$(PY) -m worker schemas

## demo: broker, topics, a worker with the offline MiniLM scorer, sample events, a table of results
demo: setup kafka-up
	$(PY) dev/demo.py

## bench: every CPU benchmark (about 15 minutes on 2 cores); results in bench/results/
bench: bench-scorer bench-pipeline bench-latency

bench-setup: setup
	$(PY) -m pip install --quiet -e '.[test,dev,bench]'

bench-scorer: bench-setup
	$(PY) -m bench.scorer --out bench/results/scorer.json

bench-pipeline: bench-setup
	$(PY) -m bench.pipeline

bench-latency: bench-setup
	$(PY) -m bench.latency --ceiling

## bench-serve: tagstream serve's requests/s and p50/p99 at concurrency 1, 8, 64 (bench/serve.py)
bench-serve: bench-setup
	$(PY) -m bench.serve

## bench-soak: ten minutes at half the no-model rate; RSS at minute 1 and 10 (bench/soak.py)
bench-soak: bench-setup
	$(PY) -m bench.soak

## faults-loop: the rebalance and fault tests RUNS times in a row (the join/leave test under
## each group protocol); stops at the first failing run and says how many passed
RUNS ?= 20
faults-loop: setup
	@passed=0; for run in $$(seq 1 $(RUNS)); do \
	  if $(PY) -m pytest -q -p no:randomly tests/integration/test_worker_faults.py $(PYTEST_ARGS); \
	  then passed=$$((passed + 1)); else echo "run $$run failed"; break; fi; \
	done; echo "faults-loop: $$passed of $(RUNS) runs passed"; test $$passed -eq $(RUNS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

.PHONY: gpu-bundle gpu-image-check bench-gpu-dry
PYTHON312 ?=

## gpu-bundle: into .whl/, the wheels bench/gpu.py needs on the GPU machine (CPython 3.12) and its image lacks
gpu-bundle: setup
	$(PY) -m bench.gpu_bundle

## gpu-image-check: bench/gpu-run.sh --dry-run in a venv holding only the torch stack and the bundle (~1 min)
gpu-image-check: gpu-bundle
	$(PY) -m bench.gpu_image_check $(if $(PYTHON312),--python312 $(PYTHON312))

## bench-gpu-dry: bench/gpu.py on the CPU with a tiny model, to check it before a GPU run (~1 min)
bench-gpu-dry: setup
	$(PY) -m bench.gpu --dry-run --out bench/results/gpu-dry-run
