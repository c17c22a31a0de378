# The two commands a new user needs: `make run` and `make test`. Both set up everything they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# apt-get needs root: use sudo when not running as root.
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: run test lint browser deploy-tools postgres-tools redis-tools cluster bench sweep soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstall only when a requirements file changed.
$(VENV)/.installed-runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

run: $(VENV)/.installed-runtime
	$(BIN)/python main.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The web page's end-to-end tests drive Debian's Chromium (Playwright never downloads a browser here).
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
		echo "Installing Debian's chromium for the browser tests"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	fi

# tests/test_deploy.py checks the deploy/ files with the tools made for them: Debian's nginx (`nginx -t`,
# and the site run for real), systemd-analyze, and openssl for a throwaway certificate. Debian puts nginx in
# /usr/sbin, which is not on every user's PATH.
deploy-tools:
	@missing=""; \
	[ -x /usr/sbin/nginx ] || command -v nginx >/dev/null 2>&1 || missing="$$missing nginx"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	if [ -n "$$missing" ]; then \
		echo "Installing Debian's$$missing for the deploy/ checks"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# The storage tests also run on Postgres (tests/with_postgres.sh): on the server at 127.0.0.1:5432 if one
# answers, else on a throwaway one started from Debian's PostgreSQL binaries, installed here when missing.
postgres-tools: $(VENV)/.installed-dev
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! $(BIN)/python -c \
		"import psycopg; psycopg.connect('postgresql://postgres@127.0.0.1:5432/postgres', connect_timeout=3)" \
		2>/dev/null; then \
		echo "Installing Debian's postgresql for the storage tests on Postgres"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	fi

# The Redis tests (the link's degraded mode, the shared queue, hosts and quotas) run on a real Redis: TEST_REDIS_URL, or the
# server on 127.0.0.1:6379 if one answers, else a throwaway one (tests/redis_server.py). Some start a
# throwaway redis-server of their own (Redis appearing on a closed port): Debian's is installed when missing.
redis-tools:
	@if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then \
		echo "Installing Debian's redis-server for the tests on Redis"; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; \
	fi

test: lint browser deploy-tools postgres-tools redis-tools
	$(BIN)/python -m pytest
	PYTHON=$(BIN)/python bash tests/with_postgres.sh $(BIN)/python -m pytest --database=postgresql -m storage

# Several replicas as in production, on loopback, in the foreground until Ctrl-C (tests/cluster.py): three
# gateways on one Postgres (tests/with_postgres.sh's), nginx in front with deploy/nginx-replicas.conf, two
# test Ollama hosts, and the Redis on 127.0.0.1:6379 if one answers (or REDIS_URL's). Prints the addresses
# and an admin's sign-in.
cluster: deploy-tools postgres-tools
	PYTHON=$(BIN)/python bash tests/with_postgres.sh $(BIN)/python -m tests.cluster

# On demand, not part of `make test`: see bench/README.md.
$(VENV)/.installed-bench: requirements.txt requirements-dev.txt requirements-bench.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-bench.txt
	touch $@

bench: $(VENV)/.installed-dev
	bash bench/run.sh

sweep: $(VENV)/.installed-bench
	bash bench/run.sh sweep

soak: $(VENV)/.installed-bench
	bash bench/run.sh soak

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
