# The one place for commands. `make demo` and `make test` build .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Prefer a working Python 3.12 (jaxdiff needs >= 3.12), else python3.
BOOT_PY := $(shell for c in $$(ls -d $$(pyenv root 2>/dev/null)/versions/3.12.*/bin/python3.12 2>/dev/null) python3.12 python3; do \
	if $$c --version >/dev/null 2>&1; then echo $$c; break; fi; done)
PYTEST_ARGS ?=

.PHONY: env demo test test-all test-slow test-oldest test-wheel docs docs-serve bench lint format clean

env: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(BOOT_PY) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,dask,bench,docs,release,lsst]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/jaxdiff demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -n 2 -m "" $(PYTEST_ARGS)

# The tests marked slow only (jit/vmap/grad checks of the core, §15 scenarios, Dask, pull test, benchmark smoke run):
# about 12 minutes on 2 cores; too long for CI's budget, so run them (or `make test-all`) before a release.
test-slow: $(STAMP)
	$(PY) -m pytest -n 2 --durations=15 -m slow $(PYTEST_ARGS)

# The oldest supported versions: Python 3.12 and every dependency at its pyproject floor (pins in
# .ci/oldest-constraints.txt; pip has no lowest-version resolution), then the fast tests. A hung test fails after
# 300 s (pytest-timeout, thread method: a worker blocked inside XLA never returns to Python for a signal).
# The notebooks (they need the dask extra) are left to `make test`. CI runs it after `make test`.
# It runs every module's tests and the core end-to-end ones (subtract, programs, gradients, plan), not the
# integration suites that exercise jaxdiff's own logic on many whole subtractions (CLI, task, robustness
# scenarios, batches, real data, whole-image fit, kernel-source rescue, existing kernels, forward model, the noise
# scenarios, the simulator): those run on the newest versions in `make test`. With them CI took 34 min on a 2-core AMD EPYC,
# over its 30-minute budget; `make test-oldest OLDEST_SUBSET=` runs everything.
OLDEST_SUBSET ?= $(addprefix --ignore=tests/,test_cli.py test_robustness.py test_batch.py test_real.py \
	test_image_fit.py test_kernel_sources.py test_existing.py test_forward.py test_noise.py test_task.py test_sim.py)
OLDEST_PYTHON ?= 3.12
OLDEST_VENV ?= .venv-oldest
OLDEST_BOOT := $(shell for c in $$(ls -d $$(pyenv root 2>/dev/null)/versions/$(OLDEST_PYTHON).*/bin/python$(OLDEST_PYTHON) \
	2>/dev/null) python$(OLDEST_PYTHON); do if $$c --version >/dev/null 2>&1; then echo $$c; break; fi; done)

$(OLDEST_VENV)/.installed: pyproject.toml .ci/oldest-constraints.txt
	@test -n "$(OLDEST_BOOT)" || { echo "make test-oldest: no Python $(OLDEST_PYTHON) found (pyenv or PATH)"; exit 1; }
	@test -x $(OLDEST_VENV)/bin/python || $(OLDEST_BOOT) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install -q --disable-pip-version-check -c .ci/oldest-constraints.txt -e '.[test]'
	@touch $@

test-oldest: $(OLDEST_VENV)/.installed
	JAXDIFF_OLDEST=1 JAXDIFF_CACHE_DIR=$(CURDIR)/.pytest_cache/jaxdiff-xla-oldest $(OLDEST_VENV)/bin/python -m pytest -n 2 --timeout 300 --timeout-method thread -m "not slow and not notebooks" \
		$(OLDEST_SUBSET) $(PYTEST_ARGS)

# The public real pairs mirrored beside the clone, when present: jaxdiff.datasets then reads them in place instead of
# downloading them (CI has the mirror; elsewhere the docs build downloads them once into the cache).
DATA_MIRROR ?= $(wildcard $(abspath ../shared/data/real))
WHEEL_TEST ?= build/wheel-test

# The documentation site (site/): MkDocs in strict mode, so a broken link, reference or failing example fails.
docs: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH PYTHONPATH=$(CURDIR) NO_MKDOCS_2_WARNING=1 JAXDIFF_DATA_MIRROR=$(DATA_MIRROR) \
		JAXDIFF_FIGURE_DIR=$(CURDIR)/build/docs-examples $(PY) -m mkdocs build --strict

docs-serve: $(STAMP)
	JAXDIFF_DATA_MIRROR=$(DATA_MIRROR) $(PY) -m mkdocs serve

# The package as users get it: sdist + wheel, `twine check`, then the wheel (not this checkout) in a clean venv
# runs `jaxdiff demo` and, from a copy of tests/ outside the source tree, the tests of what installation can break:
# package data and metadata, the command line, the datasets registry and the LSST pipeline files. (The whole fast
# suite against the wheel took 613 s in CI and checks the same code `make test` already checked.)
WHEEL_TESTS ?= tests/test_packaging.py tests/test_cli.py tests/test_datasets.py tests/test_lsst.py
test-wheel: $(STAMP)
	rm -rf dist $(WHEEL_TEST)
	$(PY) -m build --outdir dist .
	$(PY) -m twine check --strict dist/*
	$(BOOT_PY) -m venv $(WHEEL_TEST)/venv
	$(WHEEL_TEST)/venv/bin/python -m pip install -q --disable-pip-version-check \
		"$$(ls dist/jaxdiff-*.whl)[test,lsst]"
	mkdir -p $(WHEEL_TEST)/run && cp -r tests pyproject.toml $(WHEEL_TEST)/run/ && rm -rf $(WHEEL_TEST)/run/tests/__pycache__
	cd $(WHEEL_TEST)/run && ../venv/bin/jaxdiff demo
	cd $(WHEEL_TEST)/run && JAXDIFF_WHEEL=$$(ls $(CURDIR)/dist/jaxdiff-*.whl) JAXDIFF_DATA_MIRROR=$(DATA_MIRROR) \
		../venv/bin/python -m pytest -n 2 -p no:cacheprovider -m "not slow and not notebooks and not docs" \
		$(WHEEL_TESTS) $(PYTEST_ARGS)

# Peers (SFFT, OIS) for the side-by-side benchmark; OIS builds a C extension that needs numpy at build time.
# A failed peer install is reported and the benchmark then marks that peer as skipped.
$(VENV)/.peers: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check setuptools wheel
	$(PY) -m pip install -q --disable-pip-version-check --no-build-isolation -e '.[peers]' \
		&& touch $@ || echo "make bench: peer packages did not install; peers will be reported as skipped"

# Warm single pairs beside SFFT, OIS and HOTPANTS (run.py), then a stream of distinct pairs through the task in
# fresh processes, cold and with the persistent compilation cache, beside HOTPANTS (stream.py).
bench: $(STAMP) $(VENV)/.peers
	$(PY) benchmarks/run.py
	$(PY) benchmarks/stream.py

lint: $(STAMP)
	$(VENV)/bin/ruff check jaxdiff tests benchmarks
	$(VENV)/bin/ruff format --check jaxdiff tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format jaxdiff tests benchmarks
	$(VENV)/bin/ruff check --fix jaxdiff tests benchmarks

clean:
	rm -rf $(VENV) $(OLDEST_VENV) demo_output benchmarks/results site dist build
