"""The package's imports run one way: from the CLI down to math, never up and never in a circle.

Read from the source with `ast` (no import runs): every `import` / `from ... import` of a posrewrite module,
outside `if TYPE_CHECKING:` blocks (annotations only, never executed). Each module belongs to one layer of
`LAYERS` (the first prefix that matches); a module may import its own layer or a lower one, and the import graph
has no cycle. A new module must be placed in a layer here: the test names it otherwise."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "posrewrite"

#: low to high; a module prefix matches itself and everything under it (the longest matching prefix wins); a
#: name written "=name" matches that module only (a package's __init__, not the modules under it)
LAYERS: list[tuple[str, list[str]]] = [
    ("foundations", ["=posrewrite", "posrewrite.errors", "posrewrite.limits", "posrewrite.progress",
                     "posrewrite.memory",
                     "posrewrite.math"]),
    ("descriptions, files, options", ["posrewrite.sites", "posrewrite.io", "posrewrite.io.protowire",
                                      "posrewrite.io.policy", "posrewrite.io.load", "posrewrite.io.output",
                                      "posrewrite.options", "posrewrite.config", "posrewrite.provenance"]),
    ("graph helpers, kernels", ["=posrewrite.passes", "=posrewrite.passes.onnx", "posrewrite.passes.onnx._graph",
                                "posrewrite.passes.onnx._build", "posrewrite.passes.onnx.opset",
                                "posrewrite.passes.onnx.rope._dtypes", "posrewrite.ops",
                                "posrewrite.passes.fx._graph", "posrewrite.passes.fx.sites", "=posrewrite.passes.fx",
                                "posrewrite.passes.rotation_reading", "posrewrite.graph_check"]),
    ("identification", ["posrewrite.passes.onnx.rope", "posrewrite.passes.onnx.detect_other",
                        "posrewrite.passes.onnx.alibi.detect", "posrewrite.passes.onnx.t5.detect",
                        "posrewrite.passes.onnx.absolute.detect", "posrewrite.passes.onnx.detect",
                        "posrewrite.passes.fx.detect_rope", "posrewrite.passes.fx.detect_alibi",
                        "posrewrite.passes.fx.rotation_probe", "posrewrite.passes.fx.probe",
                        "posrewrite.passes.onnx.bias.detect",
                        # KV-cache attention read before it is fused: matched, its bias evaluated, its views
                        # proven, the kernel's rotary contract probed (the rewrite: attention.cache_rewrite)
                        "posrewrite.passes.onnx.attention.cache_match", "posrewrite.passes.onnx.attention.cache_bias",
                        "posrewrite.passes.onnx.attention.cache_views", "posrewrite.passes.onnx.attention.cache_probe",
                        # the encoding kinds' packages import nothing: importing a detector runs no pass
                        "=posrewrite.passes.onnx.alibi", "=posrewrite.passes.onnx.absolute",
                        "=posrewrite.passes.onnx.t5", "=posrewrite.passes.onnx.bias",
                        "=posrewrite.passes.onnx.attention"]),
    ("pass infrastructure", ["posrewrite.passes.onnx._infra"]),
    ("passes", ["posrewrite.passes.onnx.rope.rescale", "posrewrite.passes.onnx.rope.fp32",
                "posrewrite.passes.onnx.rope.decode_contract",
                "posrewrite.passes.onnx.rope.fuse", "posrewrite.passes.onnx.rope.precision",
                "posrewrite.passes.onnx.alibi", "posrewrite.passes.onnx.t5",
                "posrewrite.passes.onnx.absolute", "posrewrite.passes.onnx.attention", "posrewrite.passes.onnx.bias",
                "posrewrite.passes.onnx.extend_tables", "posrewrite.passes.onnx.masks",
                "posrewrite.passes.fx.rescale", "posrewrite.passes.fx.fp32_positions",
                "posrewrite.passes.fx.fuse_rope", "posrewrite.passes.fx.pipeline"]),
    # one frozen plan per rewrite, read by the pipeline and by validation alike
    ("plan", ["posrewrite.plan"]),
    ("validation", ["posrewrite.validate", "posrewrite.validation", "posrewrite.cut"]),
    ("pipeline", ["posrewrite.pipeline"]),
    ("folders", ["posrewrite.folders"]),
    ("API", ["posrewrite.api", "posrewrite.torch"]),
    ("tools on the API", ["posrewrite.advise", "posrewrite.advise_eval", "posrewrite.plot",
                          "posrewrite.olive",
                          # the generation loop that honours a rewrite's decode contract (provenance below)
                          "posrewrite.decode"]),
    ("command line", ["posrewrite.render", "posrewrite.cli", "posrewrite.__main__"]),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The posrewrite modules ``name`` imports at run time (module-level and inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module, *(f"{module}.{a.name}" for a in node.names)]
        for target in targets:
            # importing a.b.c runs the __init__ of a and of a.b first: those are imported too (but for the
            # packages that contain this module, which are initialised before it)
            parts = target.split(".")
            for k in range(1, len(parts) + 1):
                prefix = ".".join(parts[:k])
                if prefix in known and not (name == prefix or name.startswith(prefix + ".")):
                    found.add(prefix)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(name)
    return found


def _layer(name: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, layer)
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if prefix.startswith("="):
                if name == prefix[1:]:
                    return rank
                continue
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), rank)
    return None if best is None else best[1]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_every_module_has_a_layer():
    missing = sorted(m for m in _modules() if _layer(m) is None)
    assert not missing, f"place these modules in a layer of tests/test_layers.py: {missing}"


def test_imports_never_go_up():
    upward = []
    for name, targets in _graph().items():
        for target in targets:
            here, there = _layer(name), _layer(target)
            if here is not None and there is not None and there > here:
                upward.append(f"{name} ({LAYERS[here][0]}) imports {target} ({LAYERS[there][0]})")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


def test_no_import_circle():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    assert not circles, f"import circles: {circles}"


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a package where math imports the CLI is caught by both."""
    pkg = tmp_path / "posrewrite"
    (pkg / "math").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "math" / "__init__.py").write_text("from posrewrite import cli\n")
    (pkg / "cli.py").write_text("from posrewrite.math import rope\n")
    (pkg / "math" / "rope.py").write_text("import posrewrite.cli\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    graph = _graph()
    assert "posrewrite.cli" in graph["posrewrite.math.rope"]
    assert _layer("posrewrite.math.rope") < _layer("posrewrite.cli")
    import pytest

    with pytest.raises(AssertionError, match="import circles"):
        test_no_import_circle()
    with pytest.raises(AssertionError, match="lower layer to a higher"):
        test_imports_never_go_up()
