# Two commands on a fresh machine:
#   make run    install, then start Redis (private, append-only), one worker and the API on :8000
#               (make run WORKERS=N: N workers splitting the CPUs evenly)
#   make test   install (with test dependencies), then run the whole test suite
#               (make test-unit, make test-e2e: one folder of it)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test test-unit test-e2e install install-dev browser bench bench-headline bench-urls bench-overhead clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# PyTorch wheels from another index, e.g. its CPU-only build on a machine without a GPU (the default
# PyPI wheel bundles CUDA): make install TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
TORCH_PINS = $(shell grep -E '^(torch|torchvision)==' requirements.txt)

# The service and the backfill client (python -m backfill), so both README commands leave it runnable.
$(VENV)/.installed: requirements.txt requirements-api.txt requirements-client.txt | $(BIN)/python
	$(if $(TORCH_INDEX_URL),$(BIN)/pip install --quiet --index-url $(TORCH_INDEX_URL) $(TORCH_PINS))
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-client.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

# The /docs test renders the page in headless Chromium: installed from Debian where apt-get runs as
# root; elsewhere that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: the /docs browser test will be skipped"

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/python -m devtools.run_local $(if $(WORKERS),--workers $(WORKERS))

test: install-dev browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

# One folder of the suite: tests/unit (in process, no service processes) or tests/e2e (real Redis, worker and API processes).
test-unit: install-dev
	$(BIN)/python -m pytest tests/unit

test-e2e: install-dev browser
	$(BIN)/python -m pytest tests/e2e

bench: install-dev
	$(BIN)/python -m bench

# Issue 13's table: the original service's stand-in, the service in float32 and in bfloat16, in interleaved rounds.
bench-headline: install-dev
	$(BIN)/python -m bench.headline

bench-urls: install-dev
	$(BIN)/python -m bench.urls

bench-overhead: install-dev
	$(BIN)/python -m bench.overhead

clean:
	rm -rf $(VENV) .local
