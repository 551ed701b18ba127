# Set-up and checks for LoRAMux. Every target creates and uses the local virtualenv .venv.
#   make serve   install everything, prepare the default model, start a development server
#                (--dev: no keys, 127.0.0.1 only; `make serve SERVE_ARGS="--admin-keys-file F --host 0.0.0.0"`)
#   make test    install everything, prepare the default model, lint, type-check, run all tests
#   make models-doc  rewrite docs/models.md (the support matrix) from a run of its test
#
# torch: on a machine without a GPU we want the CPU build. TORCH_SPEC is what pip is asked
# for when .venv has no torch yet; on these machines `torch==2.13.0` is a CPU build on local
# disk. On a GPU machine use a CUDA build instead, e.g.
#   make serve TORCH_SPEC=torch          (PyPI's default Linux wheel is the CUDA build)
# or install torch into .venv yourself first; an installed torch is never replaced.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.loramux-installed
SERVE_ARGS ?= --dev --http-port 8000

.PHONY: install system-deps serve test lint typecheck proto bench models-doc clean

# Debian packages the fleet tests start for real (tests/test_fleet.py): PostgreSQL and
# nginx. Installed only when missing, and only where apt-get can (root on Debian); the
# tests that need them are skipped, saying so, where they are absent.
system-deps:
	@missing=""; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || missing="$$missing postgresql"; \
	command -v nginx >/dev/null || test -x /usr/sbin/nginx || missing="$$missing nginx"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing$$missing (apt-get)"; \
			apt-get update -qq >/dev/null && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		else \
			echo "not installed:$$missing (the fleet tests will be skipped)"; \
		fi; \
	fi

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ./clients/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/loramux models prepare
	$(BIN)/loramux serve $(SERVE_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint Dockerfile

typecheck: install
	$(BIN)/mypy -p loramux.core -p loramux.cli -p loramux.server -p loramux.trainer -p loramux.client -m loramux.errors

# Regenerate clients/python/loramux/v1 from proto/ (a test fails when the checked-in code is stale).
proto: install
	$(BIN)/python -m loramux.core.protogen

# pytest exits 5 when it collects no test; that is not a failure of the code under test.
test: install system-deps lint typecheck
	$(BIN)/loramux models prepare
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS) || [ $$? -eq 5 ]

# docs/models.md: the support matrix, rewritten from a run of its test (issue 23).
models-doc: install
	$(BIN)/loramux models prepare
	LORAMUX_MODELS_DOC=1 $(BIN)/python -m pytest -q tests/test_model_families.py

bench: install
	$(BIN)/loramux models prepare
	$(BIN)/python -m bench.run_all --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
