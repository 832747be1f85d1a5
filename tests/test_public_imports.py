"""posrewrite uses onnxscript through its public API only: no module of the package imports (or reaches into) a
private onnxscript module or name — a path component starting with an underscore."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import posrewrite

PACKAGE = Path(posrewrite.__file__).parent


def _private(dotted: str) -> bool:
    return any(part.startswith("_") for part in dotted.split("."))


def private_onnxscript_uses(source: str) -> list[str]:
    """`import`s of onnxscript paths with a private component, and attributes with a leading underscore read
    from a name that was bound to an onnxscript module or object."""
    tree = ast.parse(source)
    found: list[str] = []
    bound: set[str] = set()  # local names that refer to onnxscript modules/objects
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "onnxscript":
                    if _private(alias.name):
                        found.append(f"line {node.lineno}: import {alias.name}")
                    bound.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "onnxscript":
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                if _private(dotted):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
                bound.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in bound:
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize(
    "source",
    [
        "from onnxscript.rewriter import _basics",
        "from onnxscript.rewriter._rewrite_rule import PatternBase",
        "import onnxscript.rewriter._pattern_ir as p",
        "from onnxscript.rewriter.ort_fusions import _core",
        "from onnxscript.rewriter import ort_fusions\nort_fusions._core._pre_optimize(m)",
        "def f():\n    from onnxscript.rewriter import pattern\n    return pattern._to_graph_pattern",
    ],
)
def test_the_check_flags_private_uses(source):
    assert private_onnxscript_uses(source)


@pytest.mark.parametrize(
    "source",
    [
        "from onnxscript.rewriter import pattern",
        "from onnxscript.rewriter.pattern import MatchingTracer, PatternBase",
        "import onnxscript.version_converter",
        "from onnxscript.rewriter.ort_fusions.gqa import fuse_gqa",
        "from onnx_ir import _core",  # not onnxscript
        "import numpy as np\nnp._private",
    ],
)
def test_the_check_accepts_public_uses(source):
    assert private_onnxscript_uses(source) == []


def test_no_module_uses_a_private_onnxscript_module():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the package itself was found
    bad = {}
    for path in files:
        uses = private_onnxscript_uses(path.read_text(encoding="utf-8"))
        if uses:
            bad[str(path.relative_to(PACKAGE.parent))] = uses
    assert bad == {}
