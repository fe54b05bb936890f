# Two commands on a fresh machine:
#   make run    install, then start Redis (private, append-only), one worker and the API on :8000
#               (make run WORKERS=N: N workers splitting the CPUs evenly)
#   make test   install (with test dependencies), then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test install install-dev bench bench-urls clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt requirements-api.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/python -m devtools.run_local $(if $(WORKERS),--workers $(WORKERS))

test: install-dev
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: install-dev
	$(BIN)/python -m bench

bench-urls: install-dev
	$(BIN)/python -m bench.urls

clean:
	rm -rf $(VENV) .local
