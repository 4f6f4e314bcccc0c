"""The documentation site: it builds strictly (a broken link or anchor fails it), its generated reference pages
match the code, they cover every hook, config key and metric, and the quickstart's examples work as written."""
from __future__ import annotations

import ast
import asyncio
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator, Union, get_args, get_origin

import attrs
import pytest
import yaml

from proxy import docgen, hookspecs
from proxy.config.load import CONFIG_SECTIONS, load_config, load_layers
from proxy.config.schema import Config, PipelineEntry
from proxy.plugin_manager import BUILTIN_PLUGINS
from tests.conftest import REPO

DOCS = REPO / "docs"
ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}

#: Hooks no test implements with @hookimpl (a finding, reported; see test_every_hook_is_exercised_by_a_test).
#: Strict: when a test starts implementing one, its case passes unexpectedly and fails: remove it from here.
NOT_EXERCISED: set[str] = set()


def hook_names() -> list[str]:
    return [name for name, f in vars(hookspecs).items() if callable(f) and hasattr(f, "ssegate_spec")]


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], capture_output=True, text=True, env=ENV, timeout=120)


def words(text: str) -> str:
    """Text reduced to its words: reST roles, Markdown/reST markup and punctuation removed."""
    text = re.sub(r":(?:class|func|meth|data|attr|mod|exc|obj):`~?([^`]+)`", r"\1", text)
    text = re.sub(r":param (\w+):", r"\1", text)
    return " ".join(re.sub(r"[^\w]+", " ", text).split())


def sections(text: str, level: str) -> dict[str, str]:
    """``{heading text: body}`` for the headings of one level (``"##"``), backticks and ``{#id}`` removed."""
    found: dict[str, str] = {}
    parts = re.split(rf"^{level} (.+)$", text, flags=re.MULTILINE)
    for title, body in zip(parts[1::2], parts[2::2]):
        title = re.sub(r"\s*\{#[^}]*\}$", "", title).replace("`", "").strip()
        found[title] = body
    return found


def table_rows(text: str) -> dict[str, list[str]]:
    """Rows of the Markdown tables in ``text`` whose first cell is code: ``{first cell: the other cells}``."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


# --- the site ----------------------------------------------------------------------------------------------


def test_site_builds_strictly(tmp_path: Path) -> None:
    result = mkdocs_build(REPO / "mkdocs.yml", tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    site = tmp_path / "site"
    for page in ("index.html", "reference/hooks/index.html", "reference/configuration/index.html",
                 "observability/index.html", "plugins/index.html", "performance/index.html"):
        assert (site / page).is_file(), page
    # the architecture page's diagram is handed to Mermaid, not shown as a code block
    assert '<pre class="mermaid"><code>flowchart TD' in (site / "architecture/index.html").read_text()


def test_a_broken_link_or_anchor_fails_the_strict_build(tmp_path: Path) -> None:
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(REPO / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with open(tmp_path / "docs" / "index.md", "a") as page:
        page.write("\nSee [a missing page](no-such-page.md) and [a missing section](deploy.md#no-such-section).\n")
    result = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert re.search(r"WARNING .*'no-such-page\.md'", output), output
    assert re.search(r"WARNING .*anchor '#no-such-section'", output), output


def test_every_page_is_in_the_nav() -> None:
    config = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)  # no python/name tags
    in_nav = {next(iter(item.values())) for item in config["nav"]}
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert pages == in_nav


# --- the generated reference -------------------------------------------------------------------------------


def test_generated_reference_is_up_to_date() -> None:
    stale = docgen.stale(REPO)
    assert not stale, f"stale generated pages {stale}: run python -m proxy.docgen"


def test_docgen_check_names_stale_files_and_generation_writes_them(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 1
    assert docgen.HOOKS_PAGE in capsys.readouterr().err
    assert docgen.main(["--root", str(tmp_path)]) == 0
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 0
    page = tmp_path / docgen.CONFIG_PAGE
    page.write_text(page.read_text().replace("Address to bind.", "Address to bind!"))
    capsys.readouterr()
    assert docgen.main(["--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert docgen.CONFIG_PAGE in err and docgen.HOOKS_PAGE not in err


def test_generation_is_deterministic_across_processes() -> None:
    """Another interpreter, another hash seed, the command line: the same pages as in the tree."""
    result = subprocess.run([sys.executable, "-m", "proxy.docgen", "--check"], cwd=REPO, capture_output=True,
                            text=True, env={**ENV, "PYTHONHASHSEED": "12345"}, timeout=60)
    assert result.returncode == 0, result.stderr


# --- hooks -------------------------------------------------------------------------------------------------


def test_hook_reference_has_every_hook_with_its_full_docstring() -> None:
    page = (DOCS / "reference" / "hooks.md").read_text()
    assert f"Hook API version: **{hookspecs.HOOK_API_VERSION}**" in page
    found = sections(page, "##")
    names = hook_names()
    assert set(found) == set(names)
    for name in names:
        spec = getattr(hookspecs, name)
        body = found[name]
        assert f"def {name}(" in body
        assert words(spec.__doc__) in words(body), name
        firstresult = bool(spec.ssegate_spec.get("firstresult"))
        assert ("first result wins (`firstresult`)" in body) is firstresult, name
    # lifecycle order: metrics and startup first, then the request's phases, shutdown last
    order = list(found)
    assert order[:2] == ["register_metrics", "startup"] and order[-1] == "shutdown"
    assert order.index("authenticate") < order.index("check_request") < order.index("cached_response") \
        < order.index("select_route") < order.index("upstream_request") < order.index("on_chunk") \
        < order.index("exchange_done")
    assert "`def` only" in found["on_chunk"] and "`async def`" in found["exchange_done"]


def _hookimpls_in(path: Path) -> Iterator[str]:
    """Names of the hooks implemented with ``@hookimpl`` (or ``@hookimpl(specname=...)``) in one file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for decorator in node.decorator_list:
            target = decorator.func if isinstance(decorator, ast.Call) else decorator
            name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", None)
            if name != "hookimpl":
                continue
            specname = None
            if isinstance(decorator, ast.Call):
                specname = next((k.value.value for k in decorator.keywords
                                 if k.arg == "specname" and isinstance(k.value, ast.Constant)), None)
            yield specname or node.name


@pytest.fixture(scope="module")
def implemented_in_tests() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted((REPO / "tests").rglob("*.py")):
        for hook in _hookimpls_in(path):
            found.setdefault(hook, []).append(str(path.relative_to(REPO)))
    return found


@pytest.mark.parametrize("hook", [
    pytest.param(name, marks=pytest.mark.xfail(
        strict=True, reason="finding: no test implements this hook in a plugin of its own")
    ) if name in NOT_EXERCISED else name
    for name in hook_names()
])
def test_every_hook_is_exercised_by_a_test(hook: str, implemented_in_tests: dict[str, list[str]]) -> None:
    """A hook is exercised when a plugin written in a test implements it: built-in plugins running during tests
    do not count, since they do not show that the hook's contract holds for a third-party plugin."""
    assert implemented_in_tests.get(hook), f"no file under tests/ implements {hook!r} with @hookimpl"


def test_the_hookimpl_scan_finds_what_it_should() -> None:
    """The scan above, on known sources: decorated, called decorators, specname, undecorated."""
    sample = REPO / "tests" / "sample_plugins" / "audit.py"
    assert {"check_request", "on_chunk"} <= set(_hookimpls_in(sample))
    assert "register_metrics" in set(_hookimpls_in(REPO / "plugins" / "metrics.py"))
    assert set(_hookimpls_in(REPO / "proxy" / "hookspecs.py")) == set()  # specs are not implementations


# --- configuration -----------------------------------------------------------------------------------------


def _unwrap(tp: Any) -> Any:
    if get_origin(tp) is Union or type(tp).__name__ == "UnionType":
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def keys_of(cls: type, prefix: str = "") -> Iterator[tuple[str, attrs.Attribute]]:  # type: ignore[type-arg]
    """Every key of an attrs config class, recursively: ``("providers[i].simulation.seed", field)``."""
    attrs.resolve_types(cls)
    for field in attrs.fields(cls):
        key = f"{prefix}.{field.name}" if prefix else field.name
        yield key, field
        inner = _unwrap(field.type)
        if PipelineEntry in (inner, *get_args(inner)):  # `- name` or `- name: {settings}`: no key of its own
            continue
        if attrs.has(inner):
            yield from keys_of(inner, key)
        elif get_origin(inner) in (tuple, list) and attrs.has(_unwrap(get_args(inner)[0])):
            yield from keys_of(_unwrap(get_args(inner)[0]), key + "[i]")
        elif get_origin(inner) is dict and attrs.has(_unwrap(get_args(inner)[1])):
            yield from keys_of(_unwrap(get_args(inner)[1]), key + ".<name>")


@pytest.fixture(scope="module")
def config_page() -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [type, default, env, meaning]}}`` of the configuration reference."""
    page = (DOCS / "reference" / "configuration.md").read_text()
    gateway, _, plugins = page.partition("\n## Built-in plugins\n")
    found = {f"config.{title}": table_rows(body) for title, body in sections(gateway, "###").items()}
    found.update({f"plugin.{title}": table_rows(body) for title, body in sections(plugins, "###").items()})
    found["plugin-text"] = {title: [body] for title, body in sections(plugins, "###").items()}  # type: ignore
    return found


def _meaning(field: attrs.Attribute) -> str:  # type: ignore[type-arg]
    return " ".join(str(field.metadata.get("doc", "")).split())


def test_every_gateway_key_is_documented(config_page: dict[str, dict[str, list[str]]]) -> None:
    for key, field in keys_of(Config):
        rows = config_page.get(f"config.{key.partition('.')[0].partition('[')[0]}", {})
        assert key in rows, f"{key} is not in the configuration reference"
        meaning = _meaning(field)
        assert meaning, f"{key} has no metadata doc"
        assert rows[key][3] == meaning, key


@pytest.mark.parametrize("plugin", list(BUILTIN_PLUGINS))
def test_every_builtin_plugin_setting_is_documented(plugin: str,
                                                    config_page: dict[str, dict[str, list[str]]]) -> None:
    target = docgen.load_target(BUILTIN_PLUGINS[plugin])
    text = config_page["plugin-text"][plugin][0]
    config_cls = getattr(target, "Config", None)
    if config_cls is None:
        assert "takes no settings" in text
        return
    assert f"`{config_cls.__module__}.{config_cls.__qualname__}`" in text
    rows = config_page[f"plugin.{plugin}"]
    keys = list(keys_of(config_cls))
    assert keys
    for key, field in keys:
        assert key in rows, f"{plugin}: {key} is not in the configuration reference"
        assert _meaning(field), f"{plugin}: {key} has no metadata doc"
        assert rows[key][3] == _meaning(field), f"{plugin}: {key}"


def _segments(key: str) -> list[str | int]:
    """``providers[i].circuit_breaker.enabled`` -> ``["providers", 0, "circuit_breaker", "enabled"]``."""
    out: list[str | int] = []
    for part in key.split("."):
        name, _, rest = part.partition("[")
        out.append("x" if name == "<name>" else name)
        if rest:
            out.append(0)
    return out


def _skeleton(path: list[str | int]) -> dict[str, Any]:
    """The least data in which every list on ``path`` has an item 0 (variables index only existing items)."""
    root: dict[str, Any] = {}
    node: Any = root
    for segment, following in zip(path, path[1:]):
        if isinstance(segment, int):
            node = node[segment]
            continue
        node[segment] = [{}] if isinstance(following, int) else {}
        node = node[segment]
    return root


def _at(data: Any, path: list[str | int]) -> Any:
    for segment in path:
        data = data[segment]
    return data


def test_every_environment_variable_sets_its_key(config_page: dict[str, dict[str, list[str]]]) -> None:
    """The reference's variable names, fed to the real loader, land exactly on the key their row names."""
    checked = 0
    for section, rows in config_page.items():
        if not section.startswith(("config.", "plugin.")):
            continue
        plugin = section.partition(".")[2] if section.startswith("plugin.") else None
        for key, (_, _, env, _) in rows.items():
            assert env.startswith("`SSEGATE_"), f"{key}: no variable ({env})"
            name = env.strip("`").replace("<i>", "0").replace("<n>", "0").replace("<name>", "x")
            path = _segments(key)
            if plugin is not None:
                path = ["pipeline", 0, plugin, *path]
            data, _ = load_layers(None, env={name: "sentinel"}, sections=CONFIG_SECTIONS, default=_skeleton(path))
            assert _at(data, path) == "sentinel", f"{name} does not set {key}"
            checked += 1
    assert checked > 100


def test_a_documented_variable_really_configures_the_gateway(tmp_path: Path) -> None:
    """End to end through load_config, for a gateway key and a plugin setting named by a bare string."""
    base = tmp_path / "ssegate.yaml"
    base.write_text("providers: [{name: s, type: simulated}]\npipeline: [ratelimit, router]\n")
    config = load_config(base, env={"SSEGATE_PROVIDERS__0__CIRCUIT_BREAKER__FAILURE_THRESHOLD": "9",
                                    "SSEGATE_PIPELINE__0__RATELIMIT__BACKEND": "redis",
                                    "SSEGATE_OBSERVABILITY__SUMMARY_WINDOW": "77"})
    assert config.providers[0].circuit_breaker is not None
    assert config.providers[0].circuit_breaker.failure_threshold == 9
    assert config.pipeline[0] == PipelineEntry("ratelimit", {"backend": "redis"})
    assert config.observability.summary_window == 77


# --- metrics and alerts ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def observability_page() -> str:
    return (DOCS / "observability.md").read_text()


async def test_every_runtime_metric_is_documented(observability_page: str) -> None:
    """Start a real Gateway with every built-in plugin, then read what their register_metrics created."""
    from aioprometheus import Counter, Gauge, Histogram

    from proxy.gateway import Gateway
    from proxy.metrics import FastCounter, FastHistogram

    pipeline = [{"auth": {"keys": ["sk-docs-test-key-0001 name=docs"], "keys_env": None}} if name == "auth"
                else name for name in BUILTIN_PLUGINS if name != "router"] + ["router"]
    config = load_config(None, env={"SSEGATE_PIPELINE": yaml.safe_dump(pipeline, default_flow_style=True)})
    gateway = Gateway(config)
    await gateway.start()
    try:
        collectors = {c.name: c for c in gateway.registry.collectors.values()}
        plugins = [p.obj for p in gateway.plugins]
    finally:
        await gateway.close()
    assert "ssegate_requests_total" in collectors and len(collectors) >= 20
    rows = table_rows(observability_page)
    kinds = {Counter: "counter", Gauge: "gauge", Histogram: "histogram"}
    labels = {}
    for plugin in plugins:
        for value in [*vars(plugin).values(), *vars(getattr(plugin, "series", plugin)).values()]:
            if isinstance(value, (FastCounter, FastHistogram)):
                labels[value.collector.name] = value.labelnames
    for name, collector in sorted(collectors.items()):
        assert name in rows, f"metric {name} is not documented in docs/observability.md"
        kind, documented_labels = rows[name][0], rows[name][1]
        assert kind == kinds[type(collector)], name
        if name in labels:
            assert re.findall(r"`(\w+)`", documented_labels) == list(labels[name]), name


def test_every_alert_is_documented_and_watches_real_metrics(observability_page: str) -> None:
    rules = yaml.safe_load((REPO / "docker" / "prometheus" / "alerts.yml").read_text())
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert alerts
    rows = table_rows(observability_page)
    documented_metrics = {name for name in rows if re.fullmatch(r"[a-z_]+", name)}
    for rule in alerts:
        assert rule["alert"] in rows, f"alert {rule['alert']} is not in docs/observability.md"
        assert rows[rule["alert"]][0] == rule["labels"]["severity"], rule["alert"]
        anchor = rule["annotations"]["runbook_url"].partition("#")[2]
        assert f"(deploy.md#{anchor})" in rows[rule["alert"]][2], rule["alert"]
        for metric in re.findall(r"\b(ssegate_[a-z_]+?)(?:_bucket|_sum|_count)?\b", rule["expr"]):
            assert metric in documented_metrics, f"{rule['alert']} watches {metric}, which is not documented"


# --- the quickstart works as written -----------------------------------------------------------------------


def _code_blocks(language: str) -> list[str]:
    page = (DOCS / "index.md").read_text()
    return re.findall(rf"^```{language}\n(.*?)^```", page, flags=re.MULTILINE | re.DOTALL)


@pytest.fixture
async def default_gateway() -> Any:
    """The gateway `ssegate serve` runs without a config (the simulated provider), on a free port."""
    from proxy.testing import GatewayServer

    server = await GatewayServer.start(load_config(None, env={"SSEGATE_OBSERVABILITY__ACCESS_LOG": "false"}))
    yield server
    await server.close()  # the app's cleanup closes the gateway


def _run_python(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "docs/index.md", "exec"), {})
    return out.getvalue()


async def test_quickstart_sdk_examples_stream_from_the_gateway(default_gateway: Any) -> None:
    blocks = _code_blocks("python")
    assert any("from openai import OpenAI" in b for b in blocks) and any("import anthropic" in b for b in blocks)
    for block in blocks:
        assert "http://127.0.0.1:8000" in block
        code = block.replace("http://127.0.0.1:8000", default_gateway.url)
        printed = await asyncio.to_thread(_run_python, code)
        assert len(printed.split()) > 5, (block, printed)


async def test_quickstart_curl_example_streams(default_gateway: Any) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    (block,) = [b for b in _code_blocks("sh") if b.startswith("curl")]
    command = block.replace("\\\n", " ").replace("http://127.0.0.1:8000", default_gateway.url)
    proc = await asyncio.create_subprocess_shell(command, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    events = [e for e in out.decode().split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]" and len(events) > 3, out


async def test_quickstart_browser_fetch_example_reads_the_stream(default_gateway: Any) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (the browser example runs in Node's fetch and streams)")
    (block,) = _code_blocks("js")
    usage = 'await streamChat("Hello", (text) => { document.querySelector("#answer").textContent += text; });\n'
    assert block.endswith(usage)
    script = block[: -len(usage)].replace("http://127.0.0.1:8000", default_gateway.url) + (
        'let answer = "";\nawait streamChat("Hello", (text) => { answer += text; });\n'
        'console.log(JSON.stringify({answer}));\n')
    proc = await asyncio.create_subprocess_exec(node, "--input-type=module", "-e", script,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    answer = yaml.safe_load(out.decode())["answer"]
    assert len(answer.split()) > 5, out
