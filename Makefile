# The two commands: `make demo` and `make test`. Everything else is a step of those.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_STAMP := tests/node/node_modules/.installed
# buf (protobuf linter) comes pinned from npm with the Node.js test client: no other installer.
BUF := tests/node/node_modules/.bin/buf
# The release `buf breaking` compares the protos with (`make lint`).
BREAKING_AGAINST ?= v1.0.0

.PHONY: setup protos lint test test-fast vllm-check demo bench clean console-assets

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch is pinned (==2.13.0, the CPU wheel on disk) in the same pip command as the rest.
	# numpy: pyproject allows 2.3.5 (what the vllm extra needs); the CPU lane runs 2.4.6.
	$(BIN)/python -m pip install -q -e '.[dev]' torch==2.13.0 numpy==2.4.6
	touch $@

$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(STAMP) $(NODE_STAMP)

# The console's browser libraries, copied from tests/node's pinned npm packages into the Python
# package (committed: `pip install` serves them without Node). tests/console checks they match.
CONSOLE_STATIC := services/console/static
console-assets: $(NODE_STAMP)
	cp tests/node/node_modules/htmx.org/dist/htmx.min.js $(CONSOLE_STATIC)/
	cp tests/node/node_modules/uplot/dist/uPlot.iife.min.js tests/node/node_modules/uplot/dist/uPlot.min.css $(CONSOLE_STATIC)/

protos: $(STAMP)
	$(BIN)/python -m services.devtools.protogen

lint: $(STAMP) $(NODE_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BUF) lint
	# Wire and generated-code compatibility with the last release (buf.yaml `breaking`), from the
	# v1.0.0 tag on; a checkout without that tag (before the release, a shallow clone) skips it.
	@if git rev-parse -q --verify 'refs/tags/$(BREAKING_AGAINST)' >/dev/null; then \
	  $(BUF) breaking --against '.git#tag=$(BREAKING_AGAINST)'; \
	else echo "buf breaking skipped: no tag $(BREAKING_AGAINST) in this checkout"; fi

test: setup lint
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The quick lane while editing: no lint, nothing seconds long (`slow`: training, models, `tlm up`,
# timeouts); test modules slow as a whole are not even imported (conftest.py).
test-fast: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m 'not slow' $(PYTEST_ARGS)

# `pip install '.[vllm]'` resolves for the GPU image (a dry run from PyPI; about a minute).
vllm-check: $(STAMP)
	.ci/vllm_resolves

demo: setup
	$(BIN)/python -m services.devtools.demo

bench: setup
	$(BIN)/python bench/registry_upload.py
	$(BIN)/python bench/reward_throughput.py
	$(BIN)/python bench/rollout_throughput.py
	$(BIN)/python bench/gateway_throughput.py
	$(BIN)/python bench/grpo_step.py
	$(BIN)/python bench/weight_sync.py

clean:
	rm -rf $(VENV) tests/node/node_modules
