"""docs/plugins.md is executed: every code block of the page runs, in order, or the test fails.

The page's convention (stated in an HTML comment at its top):

- ``python`` blocks run in one namespace, in order; top-level ``await`` is allowed;
- a block with ``title="name"`` is also a file of an example project (the test's directory, on ``sys.path``);
  a ``python`` file named ``test_*.py`` is not run in the namespace but with pytest (pytester, in a subprocess,
  asyncio strict mode), and all its tests must pass;
- ``yaml`` blocks are loaded as real configs (all layers' checks) and their plugins loaded;
- ``ini`` blocks are parsed with configparser and the ``ssegate`` entry points they declare are imported;
- ``toml`` blocks are parsed and must name a build backend;
- ``sh`` blocks run with bash in the project directory (``PYTHONPATH`` = it), unless the line before the block
  is ``<!-- not run: <reason> -->``;
- any other kind of block, or a fence not at the start of a line, fails the test.
"""
from __future__ import annotations

import ast
import configparser
import importlib
import inspect
import os
import re
import subprocess
import tomllib
from pathlib import Path

import attrs
import pytest

from proxy.config.load import load_layers, structure
from proxy.config.schema import Config
from proxy.plugin_manager import check_hook_api, load_plugins, new_plugin_manager
from tests.conftest import REPO

pytest_plugins = ["pytester"]

GUIDE = REPO / "docs" / "plugins.md"
KINDS = ("python", "yaml", "ini", "toml", "sh")
_FENCE = re.compile(r"^(\s*)```(.*)$")
_TITLE = re.compile(r'\btitle="([^"]+)"')
_NOT_RUN = re.compile(r"^<!--\s*not run:\s*(\S.*?)\s*-->$")


@attrs.define
class Block:
    kind: str
    title: str | None
    code: str
    line: int  # 1-based line of the opening fence
    not_run: str | None  # the reason, for a sh block marked as not run


def parse_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown page; raises ValueError for a block this convention cannot run."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, info = m.groups()
        if indent:
            raise ValueError(f"line {i + 1}: an indented code fence (only top-level blocks are run)")
        kind = info.split()[0] if info.split() else ""
        if kind not in KINDS:
            raise ValueError(f"line {i + 1}: a code block of kind {kind!r}: the guide's test runs only {KINDS}")
        title = _TITLE.search(info)
        previous = next((ln.strip() for ln in reversed(lines[:i]) if ln.strip()), "")
        marker = _NOT_RUN.match(previous)
        if previous.startswith("<!--") and "not run" in previous and not marker:
            raise ValueError(f"line {i}: write '<!-- not run: <reason> -->'")
        if marker and kind != "sh":
            raise ValueError(f"line {i + 1}: only sh blocks may be marked as not run")
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        if end is None or lines[end].strip() != "```":
            raise ValueError(f"line {i + 1}: a code block that is not closed")
        blocks.append(Block(kind, title.group(1) if title else None, "\n".join(lines[i + 1:end]) + "\n", i + 1,
                            marker.group(1) if marker else None))
        i = end + 1
    return blocks


async def _run_python(block: Block, namespace: dict) -> None:
    code = compile(block.code, f"{GUIDE.name}:{block.line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    result = eval(code, namespace)  # noqa: S307 - the page's own examples
    if inspect.iscoroutine(result):
        await result


def _check_yaml(path: Path) -> None:
    data, origins = load_layers(str(path), env={})
    config = structure(data, Config, origins)
    loaded = load_plugins(config.pipeline, new_plugin_manager(), origins)
    assert [p.name for p in loaded] == [e.name for e in config.pipeline]


def _check_ini(block: Block) -> None:
    parser = configparser.ConfigParser()
    parser.read_string(block.code)
    if parser.has_option("options.entry_points", "ssegate"):
        for line in filter(None, (ln.strip() for ln in parser.get("options.entry_points", "ssegate").splitlines())):
            name, _, target = (part.strip() for part in line.partition("="))
            module, _, attr = target.partition(":")
            obj = importlib.import_module(module)
            for part in filter(None, attr.split(".")):
                obj = getattr(obj, part)
            check_hook_api(obj)
            assert name and re.fullmatch(r"[A-Za-z0-9_.-]+", name), line


def test_every_block_of_the_guide_is_of_a_known_kind():
    blocks = parse_blocks(GUIDE.read_text())
    assert {b.kind for b in blocks} == set(KINDS)  # the page exercises every kind it claims to
    assert all(b.not_run for b in blocks if b.not_run is not None)
    assert sum(b.not_run is not None for b in blocks) <= 2, "keep blocks that are not run rare"
    assert "](reference/hooks.md)" in GUIDE.read_text()


@pytest.mark.parametrize("page,error", [
    ("```text\nhello\n```\n", "kind 'text'"),
    ("```\nplain\n```\n", "kind ''"),
    ("- item\n\n    ```python\n    x = 1\n    ```\n", "indented code fence"),
    ("<!-- not run -->\n```sh\nls\n```\n", "not run: <reason>"),
    ("<!-- not run: slow -->\n```python\nx = 1\n```\n", "only sh blocks"),
    ("```python\nx = 1\n", "not closed"),
])
def test_blocks_the_convention_cannot_run_are_refused(page, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        parse_blocks(page)


async def test_the_guide_runs(pytester, monkeypatch):
    project = pytester.path
    pytester.makeini("[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n")
    pytester.syspathinsert(project)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(project), os.environ.get("PYTHONPATH")]))}
    namespace: dict = {"__name__": "guide"}
    ran = {kind: 0 for kind in KINDS}
    for n, block in enumerate(parse_blocks(GUIDE.read_text())):
        where = f"docs/plugins.md:{block.line} ({block.kind} block)"
        path = project / (block.title or f"block{n}.{block.kind}")
        if block.title:
            path.write_text(block.code)
        if block.kind == "python":
            if path.name.startswith("test_") and block.title:
                result = pytester.runpytest_subprocess(path.name, "-p", "no:cacheprovider")
                assert result.ret == 0, f"{where}:\n" + "\n".join(result.outlines[-40:])
                result.assert_outcomes(passed=len(re.findall(r"^(?:async )?def test_", block.code, re.M)))
            else:
                try:
                    await _run_python(block, namespace)
                except Exception as exc:
                    raise AssertionError(f"{where} failed: {exc!r}") from exc
        elif block.kind == "yaml":
            path.write_text(block.code)
            _check_yaml(path)
        elif block.kind == "ini":
            _check_ini(block)
        elif block.kind == "toml":
            data = tomllib.loads(block.code)
            if path.name == "pyproject.toml":
                assert data["build-system"]["build-backend"] and data["build-system"]["requires"], where
        elif block.kind == "sh":
            if block.not_run:
                continue
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", block.code], cwd=project, env=env,
                                    capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, f"{where}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
        ran[block.kind] += 1
    assert all(ran.values()), ran
