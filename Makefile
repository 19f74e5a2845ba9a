# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test test-gpu bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip==26.3 setuptools==84.2.1 wheel==0.48.0
	# torch first (local wheels on these machines), then deepspeed built against it.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1 numpy==2.4.6
	$(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/resam-demo

test: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -q --durations=25 tests

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu tests/gpu

bench: $(STAMP)
	$(BIN)/resam-bench all

clean-venv:
	rm -rf $(VENV)
