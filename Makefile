# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv, install the Python dependencies, build the extension, then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
# Cargo builds live outside the clone so a fresh clone (CI) builds incrementally.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/cellmap-data/target
# One build profile for demo and tests (dev with opt-level 1); `make bench` builds release.
PROFILE ?= dev

.PHONY: demo test build build-release bench test-rust test-python test-notebooks lint clean wheel test-wheel

# No pip cache: torch and its CUDA libraries would otherwise take ~3 GB twice on a fresh machine.
$(VENV)/.deps-installed: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir --upgrade pip
	$(PY) -m pip install -q --no-cache-dir -r requirements-dev.txt
	touch $@

# The extension is built for the stable ABI (_engine.abi3.so); an older per-version build left
# in the package would be imported first, so it is removed.
build: $(VENV)/.deps-installed
	rm -f cellmap_data/_engine.cpython-*.so
	VIRTUAL_ENV=$(VENV) $(VENV)/bin/maturin develop --profile $(PROFILE) -q

build-release: $(VENV)/.deps-installed
	rm -f cellmap_data/_engine.cpython-*.so
	VIRTUAL_ENV=$(VENV) $(VENV)/bin/maturin develop --release -q

demo: build
	$(PY) -m cellmap_data demo

test: build test-rust test-python test-notebooks

# --workspace resolves features exactly as the extension build does, so the engine's tests
# reuse its compiled dependencies instead of building a second copy.
test-rust: build
	cargo test --workspace --profile $(PROFILE) -q

test-python: build
	$(PY) -m pytest -q

test-notebooks: build
	@if ls notebooks/*.ipynb >/dev/null 2>&1; then $(PY) -m pytest -q --nbmake notebooks/ -p no:cacheprovider; else echo "no notebooks"; fi

# REFERENCE=/path/to/venv/bin/python (a venv holding the reference cellmap-data release) adds the
# ratios of the many-crop table; the project never depends on it.
bench: build-release
	$(PY) -m cellmap_data bench --repeat 3
	$(PY) -m cellmap_data bench --crops 6,48,144,400 $(if $(REFERENCE),--reference $(REFERENCE))

# The distribution: one abi3 wheel (CPython >= 3.10, manylinux, release, stripped) and an sdist,
# in dist/. `make test-wheel` installs the wheel the way a user would (a fresh venv, no cargo or
# maturin on PATH) and runs the demo and every public import from outside the clone.
wheel: $(VENV)/.deps-installed
	rm -rf dist
	$(VENV)/bin/maturin build --release --strip -o dist -q
	$(VENV)/bin/maturin sdist -o dist
	@ls -l dist

test-wheel: $(VENV)/.deps-installed
	@ls dist/*.whl >/dev/null 2>&1 || { echo "no wheel in dist/: run make wheel first"; exit 1; }
	$(PY) -m pytest -q -m wheel tests/test_wheel.py -p no:cacheprovider

lint:
	cargo fmt --all --check
	cargo clippy --all-targets -- -D warnings

clean:
	rm -rf $(VENV) cellmap_data/*.so
