# tiermail: `make run` starts the whole single-machine stack, `make test` runs the suite.
# Both build on `make install`, which is idempotent and takes well under two seconds when
# nothing changed.

VENV    := .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.tiermail-installed
SYSTEM  := scripts/install-system.sh

# Benchmark options: make bench BENCH_ARGS='--quick'
BENCH_ARGS ?=
# The suite runs in this many pytest-xdist workers (0: one process). Most tests wait on
# processes, brokers and timeouts, so even on two cores four workers beat two (2026-12-07,
# 2 cores: 583 s against 825 s, and 648 s with a busy loop beside them).
TEST_WORKERS ?= 4

.PHONY: install system run test lint typecheck unit bench bench-accounts bench-drain bench-imap clean help

help:
	@echo "make install   venv at $(VENV), Python deps, Debian packages, RabbitMQ + Redis running"
	@echo "make run       install, then run the whole stack in the foreground (tiermail up)"
	@echo "make test      install, then ruff, mypy and pytest (TEST_WORKERS=4 in parallel)"
	@echo "make lint      ruff and mypy only"
	@echo "make bench     SMTP benchmark against tiermail and a loopback Postfix (BENCH_ARGS=...)"
	@echo "make bench-imap IMAP benchmark against tiermail and a loopback Dovecot (BENCH_ARGS=--quick)"
	@echo "make bench-drain the store catching up on a backlog, beside Postfix (BENCH_ARGS=--quick)"
	@echo "make clean     remove caches and build output (keeps $(VENV) and the mail in var/)"

install: system $(STAMP)

# Debian packages and the two local services: the script checks before it acts.
system:
	@bash $(SYSTEM)

$(PYTHON):
	python3 -m venv $(VENV)

# Reinstall the Python dependencies only when pyproject.toml is newer than the stamp.
$(STAMP): pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	@touch $@

run: install
	exec $(VENV)/bin/tiermail up

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist worksteal

bench: install
	$(PYTHON) bench/smtp_bench.py $(BENCH_ARGS)

bench-imap: install
	$(PYTHON) bench/imap_bench.py $(BENCH_ARGS)

bench-accounts: install
	$(PYTHON) bench/accounts_bench.py $(BENCH_ARGS)

bench-drain: install
	$(PYTHON) bench/drain_bench.py $(BENCH_ARGS)

clean:
	rm -rf build/ *.egg-info .pytest_cache .mypy_cache .ruff_cache bench/results
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
