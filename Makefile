# Two entry points: `make demo` (serve the bundled demo on http://127.0.0.1:8000) and
# `make test` (the whole suite). Both create or update .venv and are safe to re-run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.convscope-installed
# torch is pinned and installed first: an unpinned torch (pulled in by captum or the
# EfficientNet packages) would fetch a second, multi-GB build.
TORCH := torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: demo test install bench clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[test]' $(TORCH)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/convscope serve

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/occlusion_speed.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
