"""Shared pytest fixtures: cached ONNX exports of tiny RoPE models (see ``fixtures/``).

Exports are cached on disk (``$POSREWRITE_FIXTURE_CACHE`` or ``<repo>/.cache/fixtures``), so only the
first run pays the ~5 s per model. Fixtures needing torch skip when it is not installed.

Model fixtures (session scope):
    llama_onnx, neox_onnx, llama_pos_onnx (input_ids + position_ids), hf_onnx (factory: hf_onnx(arch, **kw))
    interleaved_meta_onnx, interleaved_gptj_onnx, legacy_gather_onnx, legacy_index_onnx,
    legacy_slice_onnx, fp16_rope_onnx, three_d_rope_onnx      -> (path, info)
    module_onnx (factory: module_onnx(kind, **kw) -> (path, info))
Other: tmp_out (a fresh output directory per test), rng (numpy Generator, seed 0).

Set POSREWRITE_SLOW=1 to run tests marked ``slow`` (e.g. exporting every arch in fixtures.hf_models.ARCHS).

Which tests are ``slow`` (the rule): a test is slow when its setup + call + teardown took more than 0.3 s in
``pytest --durations=0`` on a warm fixture cache, either in a whole-suite run or in ``make check``'s own run
(where a test pays for a fixture that a slow test used to build first), on the shared 2-core development
machine (its load inflates times: the rule works on their ranking). The ids are listed in tests/slow_tests.txt,
written by tests/slow_list.py, which applies this rule; a test of a module that no fast test reaches is kept fast
(slow_list.KEEP, the cheapest such test). ``make check`` runs ruff and the tests that are not slow
(``-m "not slow"``) in about a minute; ``make test`` runs everything.

``--every-module`` (what ``make check`` passes): the run fails unless every module of the posrewrite package
tree was exercised in this process: for a module that defines a function or method, at least one of its
functions ran (a function frame whose code lies in that file); for a module without any (``__init__`` files,
``__main__``), its body ran; for a module that runs only in a child process (``SUBPROCESS_ONLY``: the Triton
kernel), the test that runs it there passed. The evidence comes from a global trace function that records the
first frame of each module and returns None (no line tracing), and that removes itself as soon as every module
has been seen, so the run is traced only until the last module is reached.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def pytest_addoption(parser):
    parser.addoption("--every-module", action="store_true", default=False,
                     help="fail unless every posrewrite module ran in this session (make check)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (set POSREWRITE_SLOW=1 to run)")
    if config.getoption("--every-module"):
        config.pluginmanager.register(_ModuleEvidence(REPO / "posrewrite"), "posrewrite-every-module")


#: modules whose code runs only in a child process (no frame in this one): the test that runs them there counts
SUBPROCESS_ONLY = {
    # Triton kernels run on CPU only under TRITON_INTERPRET=1, set before triton is imported: a fresh process
    "posrewrite.ops.rope_triton": "tests/test_ops_rope.py::test_triton_kernel_in_interpreter",
}


class _ModuleEvidence:
    """Records which posrewrite modules ran (see the module doc) and fails the session naming the others."""

    def __init__(self, package: Path) -> None:
        import ast

        self.modules: dict[str, str] = {}  # file -> dotted name
        self.needs_function: set[str] = set()
        for path in sorted(package.rglob("*.py")):
            rel = path.relative_to(package.parent).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            fname = str(path.resolve())
            self.modules[fname] = ".".join(parts)
            tree = ast.parse(path.read_text(encoding="utf-8"))
            if any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(tree)):
                self.needs_function.add(fname)
        self.pending = set(self.modules)
        self.tests = 0
        self.last = ""
        self.last_at = 0
        self._start()

    def _start(self) -> None:
        import threading

        pending, needs_function = self.pending, self.needs_function
        function_flags = 0x2  # CO_NEWLOCALS: a function's frame (module and class bodies lack it)

        def tracer(frame, event, arg):
            code = frame.f_code
            name = code.co_filename
            if name in pending:
                if name not in needs_function or (code.co_flags & function_flags and code.co_name[0] != "<"):
                    pending.discard(name)
                    self.last = self.modules[name]
                    if not pending:
                        sys.settrace(None)
                        threading.settrace(None)  # type: ignore[arg-type]
            return None

        self._tracer = tracer
        sys.settrace(tracer)
        threading.settrace(tracer)

    def _stop(self) -> None:
        import threading

        if sys.gettrace() is self._tracer:
            sys.settrace(None)
        threading.settrace(None)  # type: ignore[arg-type]

    def pytest_runtest_logreport(self, report):
        if report.when == "setup":
            self.tests += 1
            if self.pending:
                self.last_at = self.tests
        if report.when == "call" and report.passed:
            for module, test in SUBPROCESS_ONLY.items():
                if report.nodeid == test:
                    self.pending.difference_update(f for f, m in self.modules.items() if m == module)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus):
        self._stop()
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if not self.pending and tr is not None:
            tr.ensure_newline()
            tr.write_line(f"--every-module: all {len(self.modules)} posrewrite modules ran (the last, {self.last}, "
                          f"in test {self.last_at} of {self.tests}; traced until then)")
        if exitstatus != pytest.ExitCode.OK or not self.pending or session.config.option.collectonly:
            return
        missing = sorted(self.modules[f] for f in self.pending)
        lines = ["--every-module: these posrewrite modules did not run in this session (no fast test reaches "
                 "them; add one, or unmark a test):", *(f"  {m}" for m in missing)]
        if tr is not None:
            tr.write_line("")
            for line in lines:
                tr.write_line(line, red=True)
        else:  # pragma: no cover
            print("\n".join(lines), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


SLOW_LIST = Path(__file__).with_name("slow_tests.txt")


def _slow_entries() -> dict[str, str]:
    """Node ids (a test function's id covers all its parameters) listed in slow_tests.txt -> their line."""
    entries = {}
    for line in SLOW_LIST.read_text(encoding="utf-8").splitlines():
        entry = line.split("#", 1)[0].strip()
        if entry:
            entries[entry] = line
    return entries


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    entries = _slow_entries()
    used = set()
    for item in items:
        for key in (item.nodeid, item.nodeid.split("[", 1)[0]):
            if key in entries:
                item.add_marker(pytest.mark.slow)
                used.add(key)
    if config.getoption("--every-module") and config.args_source == pytest.Config.ArgsSource.TESTPATHS:
        # on a whole-suite run, an entry that names no collected test is stale (renamed or removed): say so
        stale = sorted(e for e in entries if e not in used)
        if stale:
            raise pytest.UsageError(f"{SLOW_LIST.name}: no collected test has these ids: {', '.join(stale)}")
    if os.environ.get("POSREWRITE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set POSREWRITE_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _need_torch():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")


@pytest.fixture
def tmp_out(tmp_path) -> Path:
    """A fresh, empty output directory for one test."""
    out = tmp_path / "out"
    out.mkdir()
    return out


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# ---------------------------------------------------------------- HF models


@pytest.fixture(scope="session")
def hf_onnx():
    """Factory: ``hf_onnx(arch, **export_hf_onnx_kwargs) -> Path`` (cached)."""
    _need_torch()
    from fixtures.hf_models import export_hf_onnx

    return export_hf_onnx


@pytest.fixture(scope="session")
def llama_onnx(hf_onnx) -> Path:
    """Tiny LlamaForCausalLM (GQA 4/2 heads, head_dim 16, base 1e4, max_pos 64): input_ids -> logits."""
    return hf_onnx("llama")


@pytest.fixture(scope="session")
def llama_pos_onnx(hf_onnx) -> Path:
    """Tiny Llama with inputs input_ids and position_ids."""
    return hf_onnx("llama", with_position_ids=True)


@pytest.fixture(scope="session")
def neox_onnx(hf_onnx) -> Path:
    """Tiny GPTNeoXForCausalLM, partial rotary (8 of 16 channels)."""
    return hf_onnx("gpt_neox")


# ---------------------------------------------------------------- hand-written modules


@pytest.fixture(scope="session")
def module_onnx():
    """Factory: ``module_onnx(kind, **kw) -> (path, info)`` (see fixtures.modules.build)."""
    _need_torch()
    from fixtures.modules import build

    return build


@pytest.fixture(scope="session")
def interleaved_meta_onnx(module_onnx):
    return module_onnx("interleaved_rope_attention", variant="meta")


@pytest.fixture(scope="session")
def interleaved_gptj_onnx(module_onnx):
    return module_onnx("interleaved_rope_attention", variant="gptj")


@pytest.fixture(scope="session")
def legacy_gather_onnx(module_onnx):
    return module_onnx("legacy_cached_rope", variant="gather")


@pytest.fixture(scope="session")
def legacy_index_onnx(module_onnx):
    return module_onnx("legacy_cached_rope", variant="index")


@pytest.fixture(scope="session")
def legacy_slice_onnx(module_onnx):
    return module_onnx("legacy_cached_rope", variant="slice")


@pytest.fixture(scope="session")
def fp16_rope_onnx(module_onnx):
    return module_onnx("fp16_legacy_rope")


@pytest.fixture(scope="session")
def three_d_rope_onnx(module_onnx):
    return module_onnx("three_d_rope")
