# Two commands set everything up on a fresh machine with Python 3.11+:
#   make demo   creates .venv, installs the package and runs `asyncsched demo`
#   make test   creates .venv, installs the test extras and runs ruff, mypy --strict and pytest
#               (the Celery tests need redis-server: as root, make installs it with apt-get when missing;
#               the tests start their own servers on 127.0.0.1; the dashboard's browser test needs Debian's
#               chromium, installed the same way)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench bench-backends redis-server chromium clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[uvloop]"
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/asyncsched demo

lint: $(VENV)/.installed-test
	$(BIN)/ruff check asyncsched tests benchmarks examples
	$(BIN)/mypy

# Idempotent and quiet: nothing happens when redis-server is installed; without root or apt the
# Celery tests skip, saying why.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; } \
		|| echo "redis-server is not installed and cannot be installed here: the Celery tests will skip"

# The same for the browser that tests the dashboard (driven by Playwright, which never downloads one here).
chromium:
	@[ -x /usr/bin/chromium ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium is not installed and cannot be installed here: the browser test will skip"

test: lint redis-server chromium
	$(BIN)/pytest

bench: $(VENV)/.installed-test
	$(BIN)/python benchmarks/throughput.py

bench-backends: $(VENV)/.installed-test redis-server
	$(BIN)/python -m benchmarks.backends

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
