"""The typed public API: ``proxy`` ships py.typed, exports a small documented ``__all__``, and passes
``mypy --strict`` (the ``[mypy]`` section of setup.cfg), which also rejects plugins that misuse it."""
from __future__ import annotations

import configparser
import importlib
import importlib.resources
import re
from pathlib import Path

import pytest
from mypy import api as mypy_api

import proxy

REPO = Path(__file__).resolve().parent.parent
SETUP_CFG = REPO / "setup.cfg"

#: The public API for plugin authors, as documented in proxy/__init__.py's docstring.
PUBLIC = [
    "__version__",
    "HOOK_API_VERSION",
    "hookimpl",
    "plugin_config",
    "setting",
    "Exchange",
    "Outcome",
    "Principal",
    "Reply",
    "Route",
    "Usage",
    "UpstreamRequest",
    "Chunk",
    "GatewayError",
    "RouteDeclined",
    "StopStream",
]

_ERROR = re.compile(r"^(?P<path>[^:\n]+):(?P<line>\d+): error: (?P<msg>.*?)(?:  \[(?P<code>[a-z-]+)\])?$")


@pytest.fixture(scope="session")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mypy_cache")


def run_mypy(cache: Path, *files: str) -> tuple[int, str]:
    """mypy with setup.cfg's options from the repo root (its ``files`` when none are given)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        out, err, status = mypy_api.run(["--config-file", str(SETUP_CFG), "--cache-dir", str(cache),
                                         "--no-color-output", "--no-pretty", *files])
    return status, out + err


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(SETUP_CFG)
    return cfg


def mypy_files() -> list[str]:
    cfg = setup_cfg()
    return [f.strip() for f in cfg["mypy"]["files"].replace("\n", ",").split(",") if f.strip()]


# -- the public surface ----------------------------------------------------------------------------------

def test_all_is_the_documented_public_list() -> None:
    assert len(set(proxy.__all__)) == len(proxy.__all__)
    assert sorted(proxy.__all__) == sorted(PUBLIC)
    doc = proxy.__doc__ or ""
    undocumented = [name for name in PUBLIC if f"``{name}``" not in doc]
    assert not undocumented, f"names in proxy.__all__ missing from proxy's docstring: {undocumented}"


def test_every_public_name_imports() -> None:
    namespace: dict[str, object] = {}
    exec("from proxy import *", namespace)  # noqa: S102 - exactly what a star import exports
    assert sorted(n for n in namespace if n != "__builtins__") == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(proxy, name) is namespace[name]


def test_public_names_come_from_strictly_checked_modules() -> None:
    checked = {str((REPO / f).resolve()) for f in mypy_files()}
    for name in PUBLIC:
        module = getattr(getattr(proxy, name), "__module__", None)
        if module is None or not module.startswith("proxy"):
            continue  # plain values (HOOK_API_VERSION, __version__) and pluggy's marker instance
        path = str(Path(importlib.import_module(module).__file__ or "").resolve())
        assert path in checked, f"proxy.{name} is defined in {module}, which setup.cfg [mypy] files does not check"
    assert str((REPO / "proxy" / "__init__.py").resolve()) in checked
    assert str((REPO / "proxy" / "hookspecs.py").resolve()) in checked  # where hookimpl is made
    assert str((REPO / "examples" / "ssegate-redact" / "src" / "ssegate_redact").resolve()) in checked


def test_py_typed_ships() -> None:
    assert importlib.resources.files("proxy").joinpath("py.typed").is_file()
    cfg = setup_cfg()
    assert "py.typed" in cfg["options.package_data"]["proxy"].split()


# -- mypy --strict ---------------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_public_modules_pass_mypy_strict(mypy_cache: Path) -> None:
    cfg = setup_cfg()
    assert cfg["mypy"].getboolean("strict")
    for f in mypy_files():
        assert (REPO / f).exists(), f"setup.cfg [mypy] files names a missing path: {f}"
    status, output = run_mypy(mypy_cache)  # exactly what `python -m mypy` checks: proxy's API, the example plugin
    print(output)
    assert status == 0, f"mypy --strict failed:\n{output}"
    assert "Success" in output


#: A plugin using the public API, right and wrong. Every line marked ``# E: <code>`` must be reported by mypy
#: with (at least) that error code, and no other line may be: the check is real and correct use passes.
PROBE_PLUGIN = '''
from __future__ import annotations

import attrs

from proxy import (HOOK_API_VERSION, Chunk, Exchange, GatewayError, Outcome, Principal, Reply, Route, RouteDeclined,
                   StopStream, UpstreamRequest, Usage, hookimpl, plugin_config, setting)


@plugin_config
class Config:
    mask: str = setting("[redacted]", doc="What replaces a match.")
    words: list[str] = setting(doc="Words to mask.", factory=list)
    limit: int = setting("ten", doc="A default of the wrong type.")  # E: assignment


@attrs.define
class Seen:
    chunks: int = 0


class Probe:
    api: str = HOOK_API_VERSION

    def __init__(self, config: Config) -> None:
        self.config = config

    @hookimpl
    def authenticate(self, exchange: Exchange) -> Principal | None:
        if exchange.headers is None:
            return None
        return Principal(name="anon", tier=1)  # E: arg-type

    @hookimpl(tryfirst=True)
    async def check_request(self, exchange: Exchange) -> Reply | None:
        if exchange.model is None:
            raise GatewayError(400, "model required", param="model", headers={"x-why": "no model"})
        if exchange.model == "forbidden":
            raise GatewayError("403", "forbidden")  # E: arg-type
        if exchange.model == "slow":
            raise GatewayError(429, "slow down", headers={"Retry-After": 1})  # E: dict-item
        return Reply(body={"choices": []}, status=200)

    @hookimpl(trylast="yes")  # E: call-overload
    def select_route(self, exchange: Exchange) -> list[Route] | None:
        return [Route("openai", exchange.model or "gpt-4o")]

    @hookimpl
    def upstream_request(self, exchange: Exchange, request: UpstreamRequest) -> None:
        request.json["user"] = exchange.request_id
        request.headers["x-request-id"] = exchange.request_id
        request.headers["x-attempt"] = 1  # E: assignment
        if request.route.provider == "spent":
            raise RouteDeclined(429, "quota spent", reason="quota", headers={"Retry-After": "60"})
        if request.route.provider == "late":
            raise RouteDeclined(429, "quota spent", reason=None)  # E: arg-type

    @hookimpl
    def on_chunk(self, exchange: Exchange, chunk: Chunk) -> list[Chunk] | None:
        seen = exchange.state_of(Seen)
        seen.chunks += 1
        seen.chunks = "many"  # E: assignment
        exchange.state_of("Seen")  # E: arg-type
        exchange.state_of(Seen).missing  # E: attr-defined
        chunk.set_raw("data: {}")  # E: arg-type
        if chunk.is_done or chunk.json is None:
            return None
        if any(word in chunk.data for word in self.config.words):
            raise StopStream("masked", finish_reason="content_filter")
        return chunk  # E: return-value

    @hookimpl
    def exchange_done(self, exchange: Exchange) -> None:
        usage: Usage = Usage.from_dict({"prompt_tokens": 1})  # E: assignment
        ttft: float = exchange.ttft  # E: assignment
        if exchange.outcome == Outcome.OK and exchange.usage is not None:
            exchange.tags.add(str(exchange.usage.total_tokens))
'''


@pytest.mark.timeout(300)
def test_mypy_strict_rejects_a_plugin_misusing_the_api(mypy_cache: Path, tmp_path: Path) -> None:
    probe = tmp_path / "typing_probe_plugin.py"
    probe.write_text(PROBE_PLUGIN)
    expected = {n: m.group(1) for n, line in enumerate(PROBE_PLUGIN.splitlines(), 1)
                if (m := re.search(r"# E: ([a-z-]+)$", line))}
    assert len(expected) >= 10
    status, output = run_mypy(mypy_cache, str(probe))
    print(output)
    found: dict[int, set[str | None]] = {}
    for line in output.splitlines():
        m = _ERROR.match(line)
        if m:
            assert Path(m["path"]).name == probe.name, f"error outside the probe plugin: {line}"
            found.setdefault(int(m["line"]), set()).add(m["code"])
    assert status == 1, output
    missed = {n: code for n, code in expected.items() if code not in found.get(n, ())}
    unexpected = {n: codes for n, codes in found.items() if n not in expected}
    assert not missed and not unexpected, f"missed (line: code): {missed}\nunexpected: {unexpected}\n{output}"
