# The two commands of the README: `make run` and `make test`.  Both start from
# nothing on Debian 12 / Python 3.11 and set up what they need themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= etc/gateway.yaml
# Debian packages the test suite drives for real: curl as a client, redis-server
# for the shared rate-limit and cache tests, etcd-server for etcd discovery
# (the tests start their own on free ports), chromium for the dashboard test,
# prometheus for promtool (checks the alert rules; no server is started).
TEST_DEBS := curl redis-server etcd-server chromium prometheus
BENCH_DEBS := nginx wrk nghttp2-client redis-server

.PHONY: setup run test check lint bench system-deps bench-deps clean

$(BIN)/.installed: setup.cfg pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "installing python3-venv (Debian)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 'setuptools>=68' wheel
	$(BIN)/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/twistd --pidfile= -n txgateway -c $(CONFIG) --demo

system-deps:
	@missing=""; for p in $(TEST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

test: setup system-deps
	$(BIN)/ruff check txgateway tests twisted bench
	$(BIN)/trial --temp-directory=/tmp/txgateway-trial-$$$$ tests

check: setup
	$(BIN)/txgateway check -c $(CONFIG)

lint: setup
	$(BIN)/ruff check txgateway tests twisted bench
	$(BIN)/mypy txgateway

bench-deps:
	@missing=""; for p in $(BENCH_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

bench: setup bench-deps
	$(BIN)/python bench/suite.py

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp*
