# postkeep: two commands.
#   make run   set up a demo server (example.test, self-signed certificate, ports 10000+N) and serve
#   make test  install what the tests need and run them all

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
VAR    := var
CONFIG := $(VAR)/postkeep.toml

.PHONY: run test lint typecheck bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(CONFIG): | $(VENV)/.installed
	$(PY) -m postkeep init --dir $(VAR) --hostname mail.example.test --domain example.test --dev-ports
	$(PY) -m postkeep --config $(CONFIG) user add demo@example.test --generate-password

run: $(VENV)/.installed $(CONFIG)
	$(PY) -m postkeep --config $(CONFIG) serve

test: $(VENV)/.installed
	$(PY) -m ruff check src tests bench
	$(PY) -m mypy
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(PY) -m ruff check src tests bench

bench: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/smtp_submit.py --backends sqlite,postgresql
	$(PY) bench/imap_fetch.py --backends sqlite,postgresql

clean:
	rm -rf $(VAR) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
