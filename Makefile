# posrewrite: `make test` and `make demo` do all of the set-up on a fresh machine, then run.
#
#   make test            create .venv (python3.11, else python3), install, run the whole pytest suite
#   make demo            install, export a tiny HF Llama, inspect it, rescale it 4x with YaRN, inspect again, fuse;
#                        rescale an onnxruntime-genai model folder and generate past its old context
#   make install         only the set-up (skipped while pyproject.toml and this Makefile are unchanged)
#   make clean           remove build outputs (out/, build/, *.egg-info); `make distclean` also removes .venv
#
# torch is pinned and installed first: pip takes the CPU wheel that lies on disk; a range admitting newer
# releases would download a CUDA build of several GB.

SHELL       := /bin/bash
PYTHON      ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.posrewrite-installed
TORCH       := torch==2.13.0
PYTEST_ARGS ?=

.PHONY: all install test demo clean distclean

all: test

$(PY):
	@test -n "$(PYTHON)" || { echo "no python3.11 or python3 found" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when it collected no test: say so and do not fail.
test: $(STAMP)
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

demo: $(STAMP)
	$(PY) -m fixtures.demo

clean:
	rm -rf out build *.egg-info

distclean: clean
	rm -rf $(VENV)
