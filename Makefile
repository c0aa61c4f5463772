# `make demo` and `make test` set everything up on a fresh machine (a virtual environment in .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
# The NumPy-only leg's own environment: the package, its core dependencies and the test runner; no torch, no JAX.
NUMPY_VENV ?= .venv-numpy
NUMPY_PY := $(NUMPY_VENV)/bin/python

.PHONY: demo test lint test-numpy bench fuzz clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# The CPU build of torch first: any other torch requirement pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	# DeepSpeed builds no CUDA/C++ ops on a CPU machine; they are not needed to write or read its checkpoints.
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet torch==2.13.0 -e '.[all,test,demo,trainers]'
	touch $@

$(NUMPY_VENV)/.installed: pyproject.toml
	python3 -m venv $(NUMPY_VENV)
	# numpy and ml_dtypes (the package's dependencies) and the test-numpy extra: nothing that brings a framework.
	$(NUMPY_PY) -m pip install --quiet -e '.[test-numpy]'
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/demo.py

# In order: lint, format, types, the tests with every framework (a missing one fails, it is not skipped),
# then the same tests with none (OPTSTATE_TEST_FRAMEWORKS is read by tests/conftest.py).
test: lint
	OPTSTATE_TEST_FRAMEWORKS=all $(PY) -m pytest
	$(MAKE) --no-print-directory test-numpy

lint: $(VENV)/.installed
	$(PY) -m ruff check
	$(PY) -m ruff format --check
	$(PY) -m mypy optstate

test-numpy: $(NUMPY_VENV)/.installed
	OPTSTATE_TEST_FRAMEWORKS=none $(NUMPY_PY) -m pytest -q

# The parsers of untrusted bytes, fuzzed longer than the suite's short run (tests/test_reliability.py).
fuzz: $(VENV)/.installed
	OPTSTATE_FUZZ_EXAMPLES=20000 $(PY) -m pytest -q tests/test_reliability.py -k fuzz

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_convert.py

clean:
	rm -rf $(VENV) $(NUMPY_VENV) demo-out .mypy_cache .ruff_cache
