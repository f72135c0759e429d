# Quick start: `make demo` (install + run the pipeline on synthetic Seestar frames)
#              `make test` (install + run the test suite)
# Python packages install into a repo-local virtual environment, .venv/; the plate solver
# (astrometry.net + Tycho-2 index files) is installed with apt-get when run as root, and
# otherwise scripts/install_system_deps.sh says how to get it.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= demo

.PHONY: demo test test-slow test-all lint coverage ci bench clean system-deps peers

system-deps:
	@scripts/install_system_deps.sh

peers:
	@scripts/install_system_deps.sh peers

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# One stamp per set of extras; reinstalled when pyproject.toml changes.
$(VENV)/.installed-%: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e ".$(if $(filter core,$*),,[$*])"
	touch $@

$(DEMO)/data/frames: | $(VENV)/.installed-core
	$(PY) -m zemosaic_synth $(DEMO)/data --size full --panels 2x2 --frames-per-panel 6 --seed 1

demo: system-deps $(VENV)/.installed-core $(DEMO)/data/frames
	$(PY) -m zemosaic_worker examples/demo_config.json

# `make test`: the fast set (about 4 minutes on 2 cores). The slow set (real data, the peer
# programs, full-size scenes: `-m slow`) runs with `make test-slow`; `make test-all` runs both.
PYTEST := QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q

test: system-deps $(VENV)/.installed-gui,test,gpu
	$(PYTEST) -m "not slow"

test-slow: system-deps peers $(VENV)/.installed-gui,test,gpu
	$(PYTEST) -m slow

test-all: system-deps peers $(VENV)/.installed-gui,test,gpu
	$(PYTEST)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .

# Every test, fast and slow, with the pipeline modules' line coverage ([tool.coverage] in pyproject.toml).
coverage: system-deps peers $(VENV)/.installed-gui,test,gpu
	$(PYTEST) --cov --cov-report=term

ci: lint coverage

bench: peers $(VENV)/.installed-test
	$(PY) benchmarks/bench_pipeline.py
	$(PY) benchmarks/bench_stacking.py
	$(PY) benchmarks/bench_coadd.py
	$(PY) benchmarks/bench_solve.py
	$(PY) benchmarks/bench_photometry.py
	$(PY) benchmarks/bench_debayer.py
	$(PY) benchmarks/bench_robustness.py

clean:
	rm -rf $(DEMO) .pytest_cache
