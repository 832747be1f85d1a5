"""Every command shown in README.md and docs/*.md is run, so that the documentation cannot drift from the tool.

What counts as a command: every line of a fenced ``bash``/``sh``/``shell``/``console`` block (``\\``-continued
lines joined, ``#`` comments dropped) and every fenced ``python`` block as a whole. They run in order, per page,
in a workspace of that page's own: a copy of what ``make demo`` writes (``out/demo/``, made once by
``python -m fixtures.demo``), ``model.onnx`` (the demo's tiny Llama, trained for 64 tokens) with its HF
``config.json`` beside it, ``llama31-config.json`` (a Llama-3.1 ``config.json``) and the repository's ``docs/``.
``posrewrite``, ``python`` and ``olive`` are this interpreter's. A fenced block whose info string says
``file=NAME`` (``\u0060\u0060\u0060json file=workflow.json``) is written to NAME in the workspace first.

A command must exit 0. A block the tests do not run is marked in the page itself, on the line before its fence:
``<!-- not run by tests: REASON -->``; each of its commands is reported here as skipped with that reason (run
``pytest -rs``), never dropped silently. Commands written outside fences (indented blocks) are refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = {"bash", "sh", "shell", "console"}
SKIP_MARK = re.compile(r"<!--\s*not run by tests:\s*(.+?)\s*-->")
FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)(.*)$")
SLOW = ("olive run", "olive.workflows")  # whole Olive workflows: tens of seconds each
TIMEOUT = 600


@dataclasses.dataclass
class Command:
    page: Path
    line: int
    kind: str  # "shell" or "python"
    text: str
    skip: str | None
    block: int = 0  # the line of the block's fence: a block's commands depend on each other

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


@dataclasses.dataclass
class Page:
    commands: list[Command]
    files: dict[str, str]  # file=NAME blocks
    unfenced: list[str]  # command-like lines outside fences


def _shell_lines(body: list[tuple[int, str]]) -> list[tuple[int, str]]:
    out, pending, start = [], "", 0
    for number, raw in body:
        line = raw.rstrip()
        if not pending:
            start = number
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not pending):
            continue
        if stripped.startswith("$ "):
            stripped = stripped[2:]
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        command = re.sub(r"\s+#(?![^'\"]*['\"]).*$", "", pending + stripped).strip()  # a trailing comment
        pending = ""
        out.append((start, command))
    return out


def parse(page: Path) -> Page:
    lines = page.read_text().splitlines()
    commands: list[Command] = []
    files: dict[str, str] = {}
    unfenced: list[str] = []
    k = 0
    while k < len(lines):
        m = FENCE.match(lines[k])
        if not m:
            if re.match(r"^ {4}(posrewrite|python|olive|make|pip) ", lines[k]):
                unfenced.append(f"{page.relative_to(ROOT)}:{k + 1}: {lines[k].strip()}")
            k += 1
            continue
        fence, lang, rest = m.group(1), m.group(2).lower(), m.group(3)
        mark = SKIP_MARK.search(lines[k - 1]) if k > 0 else None
        end = next(j for j in range(k + 1, len(lines)) if lines[j].startswith(fence))
        body = [(j + 1, lines[j]) for j in range(k + 1, end)]
        name = re.search(r"file=(\S+)", rest)
        if name:
            files[name.group(1)] = "\n".join(text for _, text in body) + "\n"
        elif lang in SHELLS:
            for number, text in _shell_lines(body):
                commands.append(Command(page, number, "shell", text, mark.group(1) if mark else None, k + 1))
        elif lang == "python":
            commands.append(Command(page, k + 2, "python", "\n".join(t for _, t in body) + "\n",
                                    mark.group(1) if mark else None, k + 1))
        k = end + 1
    return Page(commands, files, unfenced)


def _all_commands() -> list[Command]:
    return [c for page in PAGES for c in parse(page).commands]


def _params():
    out = []
    commands = _all_commands()
    slow_blocks = {(c.page, c.block) for c in commands if any(s in c.text for s in SLOW)}
    for c in commands:
        marks = [pytest.mark.slow] if (c.page, c.block) in slow_blocks else []
        out.append(pytest.param(c, id=c.id, marks=marks))
    return out


# ---------------------------------------------------------------------------------------------------- workspace


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    """``out/demo`` as ``make demo`` writes it (the Makefile's recipe is ``python -m fixtures.demo``)."""
    pytest.importorskip("torch")
    base = tmp_path_factory.mktemp("demo")
    run = subprocess.run([sys.executable, "-m", "fixtures.demo", "--out", str(base / "out" / "demo")], cwd=ROOT,
                         capture_output=True, text=True, timeout=TIMEOUT, env=_env(base))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return base / "out" / "demo"


def _env(bin_parent: Path) -> dict[str, str]:
    shims = bin_parent / "bin"
    shims.mkdir(exist_ok=True)
    for name, target in (("posrewrite", f'exec "{sys.executable}" -m posrewrite "$@"'),
                         ("python", f'exec "{sys.executable}" "$@"'),
                         ("olive", f'exec "{sys.executable}" -m olive "$@"')):
        script = shims / name
        script.write_text(f"#!/bin/sh\n{target}\n")
        script.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{shims}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["OLIVE_DISABLE_TELEMETRY"] = "1"  # Olive's usage telemetry: tests send nothing anywhere
    return env


_WORKSPACES: dict[Path, Path] = {}


@pytest.fixture
def workspace(demo_out, tmp_path_factory):
    """Per page: a workspace made once, then shared by the page's commands in order."""
    def get(page: Path) -> Path:
        if page not in _WORKSPACES:
            from fixtures.hf_models import hf_config

            ws = tmp_path_factory.mktemp(page.stem)
            shutil.copytree(demo_out, ws / "out" / "demo")
            shutil.copytree(ROOT / "docs", ws / "docs")
            shutil.copy(demo_out / "llama.onnx", ws / "model.onnx")
            hf_config("llama").to_json_file(ws / "config.json")
            (ws / "llama31-config.json").write_text(json.dumps({
                "max_position_embeddings": 131072, "rope_theta": 500000.0,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))
            for name, text in parse(page).files.items():
                (ws / name).write_text(text)
            _WORKSPACES[page] = ws
        return _WORKSPACES[page]

    return get


# -------------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("command", _params())
def test_documented_command_runs(command: Command, workspace):
    if command.skip:
        pytest.skip(f"marked in {command.page.name}: {command.skip}")
    if command.kind == "python" and "olive" in command.text:
        pytest.importorskip("olive")
    if command.kind == "shell" and command.text.split()[0] == "olive":
        pytest.importorskip("olive")
    ws = workspace(command.page)
    argv = ["bash", "-o", "pipefail", "-c", command.text] if command.kind == "shell" else [
        sys.executable, "-c", command.text]
    run = subprocess.run(argv, cwd=ws, capture_output=True, text=True, timeout=TIMEOUT, env=_env(ws))
    assert run.returncode == 0, (f"{command.id}: `{command.text.strip()}` exited {run.returncode}\n"
                                 f"{run.stdout[-2000:]}\n{run.stderr[-2000:]}")


def test_every_page_is_parsed_and_commands_are_fenced():
    unfenced = [line for page in PAGES for line in parse(page).unfenced]
    assert unfenced == [], "commands outside fenced blocks are not run by this test:\n" + "\n".join(unfenced)
    commands = _all_commands()
    readme = [c for c in commands if c.page.name == "README.md" and c.skip is None]
    assert len(readme) >= 6  # the five commands and the Python example
    assert sum(c.skip is None for c in commands) > sum(c.skip is not None for c in commands)


def test_make_demo_is_what_the_workspace_is_built_with():
    recipe = re.search(r"^demo:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert recipe.strip() == "$(PY) -m fixtures.demo"


def test_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 150
    for shown in ("make demo", "make test", "out/demo/"):
        assert shown in text
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).is_file(), link


@pytest.mark.slow
def test_demo_on_a_cold_cache_prints_only_posrewrite(tmp_path):
    """Issue 25: on a fresh machine `make demo` showed torch.onnx's "torchvision is not installed" log lines and the
    genai builder's "Writing model shards: 0%" bar, which read like errors. Cold fixture cache: every export runs."""
    pytest.importorskip("torch")
    env = _env(tmp_path) | {"POSREWRITE_FIXTURE_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "fixtures.demo", "--out", str(tmp_path / "out" / "demo")], cwd=ROOT,
                         capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    text = run.stdout + run.stderr
    for noise in ("torchvision", "Writing model shards", "Warning", "WARNING"):
        assert noise not in text, noise
    assert f"everything is in {tmp_path / 'out' / 'demo'}/" in run.stdout
