# Two commands do all the set-up themselves:
#   make tune   -> python -m mrigen.tune --study vae-kernels  (embedded default: demo cohort, local storage)
#   make test   -> the whole test suite (starts and stops its own servers on loopback)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build pin for CI and laptops; a GPU box can pass TORCH_SPEC='torch>=2.4' to keep its CUDA build.
TORCH_SPEC ?= torch==2.13.0
STUDY  ?= vae-kernels
# pytest workers for `make test`: two keep both cores busy (one process leaves one mostly idle; CI's pytest:
# 14-16 min against 18-19); 0 = a plain one-process run. Each worker takes whole files, the long ones first
# (tests/conftest.py).
TEST_WORKERS ?= 2

.PHONY: install chromium test tune clean

$(BIN)/.mrigen-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.mrigen-installed

# The browser test (tests/ui) drives Debian's chromium, headless. As root with apt-get (CI) it is installed here and
# an apt failure stops the run; otherwise the test is skipped and says how to install it.
chromium:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for the MLflow UI browser test (apt-get install -y chromium)"; \
	  export DEBIAN_FRONTEND=noninteractive; log=$$(mktemp); \
	  if ! { apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; }; } >$$log 2>&1; \
	  then tail -n 20 $$log >&2; echo "error: apt-get install -y chromium failed (full log: $$log)" >&2; exit 1; fi; \
	  rm -f $$log; command -v chromium >/dev/null || { echo "error: chromium is not on PATH after apt-get" >&2; exit 1; }; \
	  chromium --version 2>/dev/null; \
	else echo "note: no chromium and not root with apt-get: the browser test (tests/ui) will be skipped"; fi

test: install chromium
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

tune: install
	$(BIN)/python -m mrigen.tune --study $(STUDY)

clean:
	rm -rf $(VENV) .pytest_cache

# docker-compose.yml brought up for real (root; installs Docker from Debian if missing, builds the base images
# offline, trains + registers through the stack, restarts it, verifies): see docs/STACK.md.
.PHONY: compose-check
compose-check: install
	PYTHON=$(abspath $(BIN))/python bash .ci/compose_check.sh
