# posrewrite: `make test` and `make demo` do all of the set-up on a fresh machine, then run.
#
#   make test            create .venv, install the locked versions, run ruff and the whole suite (slow tests too)
#   make check           the same set-up, then ruff and every test not marked slow, failing unless every
#                        posrewrite module ran (< 2 minutes)
#   make demo            install, export a tiny HF Llama, inspect it, rescale it 4x with YaRN, inspect again, fuse;
#                        rescale an onnxruntime-genai model folder and generate past its old context
#   make install         only the set-up (skipped while the lock, pyproject.toml and this Makefile are unchanged)
#   make lint            ruff check, with the locked ruff
#   make goldens         regenerate fixtures/goldens/ (optimum-cli in a throw-away venv, genai builder, torch.onnx)
#   make lock            re-resolve requirements/dev.lock from pyproject.toml's ranges (newest releases today)
#   make test-latest     the whole suite in .venv-latest against the newest releases the ranges admit
#   make clean           remove build outputs (out/, build/, *.egg-info); `make distclean` also the venvs
#
# The lock pins every package `make test` and `make demo` install (requirements/dev.lock, made by pip-tools'
# pip-compile); pyproject.toml keeps ranges for users who install posrewrite beside their own stack.
# torch is pinned: pip takes the CPU wheel that lies on disk; a range admitting newer releases would
# download a CUDA build of several GB.

SHELL       := /bin/bash
PYTHON      ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.posrewrite-installed
LOCK        := requirements/dev.lock
TORCH       := torch==2.13.0
# timm requires torchvision, whose wheels do not import beside the CPU torch: installed without dependencies (the
# tests stub torchvision, fixtures/third_party.py); `pip check` knows that one missing requirement
TIMM        := timm==1.0.31
PIP_CHECK_KNOWN := ^timm [^ ]+ requires torchvision, which is not installed\.$$
PIP_TOOLS   := pip-tools==7.6.2
LATEST      := .venv-latest
PYTEST_ARGS ?=

.PHONY: all install lint test check demo goldens lock test-latest clean distclean

all: test

$(PY):
	@test -n "$(PYTHON)" || { echo "no python3.11 or python3 found" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(LOCK) pyproject.toml Makefile | $(PY)
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps $(TIMM)
	$(PY) -m pip install --quiet --no-deps -e .
	@out=$$($(PY) -m pip check 2>&1 | grep -Ev '$(PIP_CHECK_KNOWN)' | grep -v '^No broken requirements found'); \
	if [ -n "$$out" ]; then echo "$$out"; exit 1; fi; echo "pip check: no broken requirements (timm's torchvision stubbed)"
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

# pytest exits 5 when it collected no test: say so and do not fail.
test: lint
	@POSREWRITE_SLOW=1 $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

# every test not marked slow (the rule is in tests/conftest.py); --every-module fails the run unless each
# posrewrite module ran
check: lint
	$(PY) -m pytest -m "not slow" --every-module $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) -m fixtures.demo

# The golden exports of the tools users run (fixtures/goldens/make.py); optimum gets a venv of its own, deleted after.
goldens: $(STAMP)
	$(PY) -m fixtures.goldens.make

# Re-resolve the lock in a throw-away venv (pip-tools pinned); torch's local "+cpu" label is dropped so the
# lock also installs on machines without the CPU wheel on disk.
lock:
	@d=$$(mktemp -d) && trap 'rm -rf "$$d"' EXIT && \
	$(PYTHON) -m venv "$$d/venv" && "$$d/venv/bin/pip" install --quiet $(PIP_TOOLS) && \
	mkdir -p $(dir $(LOCK)) && \
	"$$d/venv/bin/pip-compile" --quiet --upgrade --strip-extras --allow-unsafe --extra dev \
	    --no-emit-index-url --no-emit-find-links -o $(LOCK) pyproject.toml && \
	sed -i -E 's/^(torch==[^+ ]+)\+[A-Za-z0-9.]+/\1/' $(LOCK)
	@echo "wrote $(LOCK): review and commit it"

# The newest releases pyproject.toml's ranges admit, in a venv of their own (rebuilt each time).
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet $(TORCH)
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager -e '.[dev]'
	$(LATEST)/bin/pip install --quiet --no-deps $(TIMM)
	$(LATEST)/bin/pip list --format=freeze | grep -iE '^(torch|transformers|onnx|onnx-ir|onnxscript|onnxruntime|numpy)=='
	$(LATEST)/bin/python -m ruff check .
	@POSREWRITE_SLOW=1 $(LATEST)/bin/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

clean:
	rm -rf out build *.egg-info

distclean: clean
	rm -rf $(VENV) $(LATEST)
