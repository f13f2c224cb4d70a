# Two commands a fresh machine needs: `make demo` and `make test` (each creates .venv if missing).
SHELL := /bin/bash
# jax >= 0.11 (which uses this CPU's bf16 matrix units) needs Python >= 3.12: prefer it when present.
PYTHON ?= $(shell (PYENV_VERSION=3.12.1 pyenv which python3.12 2>/dev/null) || command -v python3.12 || \
             ls $(HOME)/.pyenv/versions/3.12*/bin/python3 2>/dev/null | tail -n 1 | grep . || command -v python3)
VENV := .venv
VPY := $(VENV)/bin/python
# The package and its dependencies (all the demo and the benchmarks need); the test extra adds
# pytest, libtpu (~0.7 GB, for the deviceless TPU compiles of tests/test_aot.py) and the local GCS / S3
# servers with their clients (tests/test_buckets.py), which the demo does not install: ~15 s less on a fresh machine here, more on a slow link.
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
FAKE_DEVICES := XLA_FLAGS=--xla_force_host_platform_device_count=8

.PHONY: venv test faults lint demo bench clean

venv: $(STAMP)

$(STAMP): setup.py
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(VPY) -m pip install -q -e ".[test]"
	touch $(TEST_STAMP)

# Two pytest workers; --dist loadfile keeps each file (and its module-scoped trained fixtures) in one.
test: lint
	$(FAKE_DEVICES) $(VPY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=15 -m "not faults" tests

# The slow fault-injection runs (tests marked `faults`: all 10 kill -9 points, the trainer command's
# exit codes, SIGTERM to one of two processes, kill -9 on a gs:// workdir); `make test` runs a quick
# part of tests/test_faults.py.
faults: $(TEST_STAMP)
	$(FAKE_DEVICES) $(VPY) -m pytest -q --durations=15 -m faults tests

# ruff (pyflakes, pycodestyle, bugbear; rules in ruff.toml) and its formatter come with the test
# extra; `$(VENV)/bin/ruff format .` applies the format this checks.
lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(STAMP)
	bash launch/demo.sh

bench: $(STAMP)
	$(VPY) -m bench.run_all

clean:
	rm -rf runs/demo
