# Two commands do all the set-up themselves:
#   make tune   -> python -m mrigen.tune --study vae-kernels  (embedded default: demo cohort, local storage)
#   make test   -> the whole test suite (starts and stops its own servers on loopback)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build pin for CI and laptops; a GPU box can pass TORCH_SPEC='torch>=2.4' to keep its CUDA build.
TORCH_SPEC ?= torch==2.13.0
STUDY  ?= vae-kernels

.PHONY: install test tune clean

$(BIN)/.mrigen-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.mrigen-installed

test: install
	$(BIN)/python -m pytest

tune: install
	$(BIN)/python -m mrigen.tune --study $(STUDY)

clean:
	rm -rf $(VENV) .pytest_cache

# docker-compose.yml brought up for real (root; installs Docker from Debian if missing, builds the base images
# offline, trains + registers through the stack, restarts it, verifies): see docs/STACK.md.
.PHONY: compose-check
compose-check: install
	PYTHON=$(abspath $(BIN))/python bash .ci/compose_check.sh
