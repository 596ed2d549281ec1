# `make demo` and `make test` each set up everything they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARCH := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH_PINS := torch==2.9.1 torchvision==0.24.1
else
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
endif

.PHONY: demo test install browser bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch and torchvision must come from one release pair (see README: installing torch).
	$(PY) -m pip install --disable-pip-version-check -q $(TORCH_PINS)
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test]" $(TORCH_PINS)
	touch $@

install: $(VENV)/.installed

browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Chromium from Debian's packages"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null; }

demo: install
	$(VENV)/bin/camscope demo $(DEMO_ARGS)

test: install browser
	$(PY) -m pytest -v tests

bench: install
	$(PY) benchmarks/engine_bench.py

clean:
	rm -rf $(VENV) .camscope-cache
