# rag-pipeline: `make run` and `make test` are the two commands a new user needs (see README).
VENV    := .venv
PY      := $(VENV)/bin/python
RP      := $(VENV)/bin/rag-pipeline
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export ANONYMIZED_TELEMETRY := False

.PHONY: setup run test test-fast lint bench clean

setup:            ## idempotent: .venv, torch CPU, project, xllamacpp (prebuilt), SmolLM2; no root, no system package
	bash scripts/setup.sh

run: setup        ## the main job on the bundled example data (CPU: a llama.cpp SmolLM2 server is started); no root
	$(RP) run --input data/example/records.jsonl --output output/example \
		--store data/store --collection example --ingest data/example/corpus.jsonl

test:             ## the whole suite, unit tier first; setup + test-only deps (SGLang's parser; apt: Slurm, munge, shellcheck, chromium)
	RAG_PIPELINE_TEST_DEPS=1 bash scripts/setup.sh
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests/unit
	$(PY) -m pytest -q --ignore=tests/unit

test-fast:        ## the unit tier only: no process started, no model loaded (seconds); no system package needed
	bash scripts/setup.sh
	$(PY) -m pytest -q tests/unit

lint:             ## ruff + shellcheck (a test-only system package: installed with the test deps)
	RAG_PIPELINE_TEST_DEPS=1 bash scripts/setup.sh
	$(VENV)/bin/ruff check .
	shellcheck launch_servers.sh scripts/*.sh .ci/run

bench: setup      ## benchmarks: print measured ratios against a baseline measured in the same run
	$(PY) bench/ingest.py
	$(PY) bench/llm_client.py
	$(PY) bench/orchestration.py
	$(PY) bench/memory.py
	$(PY) bench/retrieval.py
	$(PY) bench/long_run.py

clean:
	rm -rf output data/store .pytest_cache
