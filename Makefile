# The two commands: `make demo` and `make test`. Everything else is a step of those.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_STAMP := tests/node/node_modules/.installed
# buf (protobuf linter) comes pinned from npm with the Node.js test client: no other installer.
BUF := tests/node/node_modules/.bin/buf

.PHONY: setup protos lint test test-fast demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned (==2.13.0, the CPU wheel on disk) in the same pip command as the rest.
	$(BIN)/python -m pip install -q -e '.[dev]' torch==2.13.0
	touch $@

$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(STAMP) $(NODE_STAMP)

protos: $(STAMP)
	$(BIN)/python -m services.devtools.protogen

lint: $(STAMP) $(NODE_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BUF) lint

test: setup lint
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The quick lane while editing: no lint, nothing that trains or generates with a model (`slow`).
test-fast: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m 'not slow' $(PYTEST_ARGS)

demo: setup
	$(BIN)/python -m services.devtools.demo

bench: setup
	$(BIN)/python bench/registry_upload.py
	$(BIN)/python bench/reward_throughput.py
	$(BIN)/python bench/rollout_throughput.py
	$(BIN)/python bench/grpo_step.py

clean:
	rm -rf $(VENV) tests/node/node_modules
