# The two set-up commands of the README: `make dr1` (build the demo release) and `make test`.
# Each creates or reuses a virtual environment with the project installed and installs the
# Debian tools the suite drives (Hipsgen from `aladin`, SWarp, SExtractor) when missing and root.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.ks4release-installed
DEBIAN_PACKAGES := aladin swarp source-extractor

.PHONY: dr1 test bench system-deps

dr1: $(INSTALLED) system-deps
	$(BIN)/ks4release build dr1

test: $(INSTALLED) system-deps
	$(BIN)/python -m pytest

bench: $(INSTALLED) system-deps
	mkdir -p benchmarks/results
	$(BIN)/python benchmarks/bench_simulate.py --out benchmarks/results/simulate.json

$(INSTALLED): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --editable '.[test]'
	touch $@

system-deps:
	@missing=""; \
	for pkg in $(DEBIAN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
	  echo "Installing Debian packages:$$missing"; \
	  apt-get update -q >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null \
	    || echo "warning: could not install$$missing; the steps that need them will say so"; \
	else \
	  echo "Missing Debian packages; run:  sudo apt-get install -y$$missing"; \
	fi
