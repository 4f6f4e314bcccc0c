"""CORS over real sockets: preflight answers (request id, OpenAI-format 403, the requested headers allowed by
exact names and ``*`` patterns) and the headers of actual responses."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import orjson
import pytest

from proxy.config import load_config
from proxy.config.load import ConfigError
from proxy.config.schema import CorsConfig
from proxy.testing import config_for
from tests.helpers import CHAT

ORIGIN = "https://chat.example"
#: What the openai JS SDK (v4/v5) asks for in a browser, as Chrome sends it (lowercase, sorted, ", "-joined).
OPENAI_SDK_HEADERS = ("authorization, content-type, x-stainless-arch, x-stainless-helper-method, x-stainless-lang, "
                      "x-stainless-os, x-stainless-package-version, x-stainless-retry-count, x-stainless-runtime, "
                      "x-stainless-runtime-version, x-stainless-timeout")
ANTHROPIC_SDK_HEADERS = ("anthropic-beta, anthropic-dangerous-direct-browser-access, anthropic-version, "
                         "content-type, x-api-key, x-stainless-lang, x-stainless-os, x-stainless-retry-count")


def cors_config(upstream: Any, **cors: Any) -> Any:
    return attrs.evolve(config_for(upstream), cors=CorsConfig(allow_origins=(ORIGIN,), **cors))


def listed(value: str | None) -> list[str]:
    """The names of a comma-separated header value, lowercased (header names are case-insensitive)."""
    return [name.strip().lower() for name in (value or "").split(",") if name.strip()]


async def preflight(url: str, request_headers: str | None = None, origin: str = ORIGIN,
                    **extra: str) -> tuple[int, dict[str, str], bytes]:
    headers = {"Origin": origin, "Access-Control-Request-Method": "POST", **extra}
    if request_headers is not None:
        headers["Access-Control-Request-Headers"] = request_headers
    async with aiohttp.ClientSession() as s, s.options(url + "/chat/completions", headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


async def test_preflight_echoes_the_sdk_headers_allowed_by_default_with_a_request_id(upstream, gateway_factory):
    gw = await gateway_factory(cors_config(upstream))  # the default allow_headers
    requested = "authorization, content-type, x-stainless-os, x-stainless-retry-count"
    status, headers, body = await preflight(gw.base_url, requested)
    assert status == 204 and body == b""
    assert headers["Access-Control-Allow-Origin"] == ORIGIN
    assert listed(headers["Access-Control-Allow-Headers"]) == listed(requested)
    assert re.fullmatch(r"[0-9a-f]{32}", headers["X-Request-ID"])
    assert "Access-Control-Request-Headers" in headers["Vary"] and "Origin" in headers["Vary"]

    for sdk in (OPENAI_SDK_HEADERS, ANTHROPIC_SDK_HEADERS):
        status, headers, _ = await preflight(gw.base_url, sdk)
        assert status == 204 and listed(headers["Access-Control-Allow-Headers"]) == listed(sdk)
        assert headers["X-Request-ID"]


async def test_preflight_keeps_a_valid_client_request_id_and_replaces_an_invalid_one(upstream, gateway_factory):
    gw = await gateway_factory(cors_config(upstream))
    status, headers, _ = await preflight(gw.base_url, "authorization", **{"X-Request-ID": "browser-req-7"})
    assert status == 204 and headers["X-Request-ID"] == "browser-req-7"
    status, headers, _ = await preflight(gw.base_url, "authorization", **{"X-Request-ID": "x" * 129})
    assert status == 204 and re.fullmatch(r"[0-9a-f]{32}", headers["X-Request-ID"])


async def test_preflight_from_a_refused_origin_is_an_openai_403_with_a_request_id(upstream, gateway_factory):
    gw = await gateway_factory(cors_config(upstream))
    status, headers, body = await preflight(gw.base_url, "authorization", origin="https://evil.example")
    assert status == 403
    assert headers["Content-Type"].startswith("application/json")
    assert orjson.loads(body) == {"error": {"message": "Origin 'https://evil.example' is not allowed.",
                                            "type": "permission_error", "param": None,
                                            "code": "cors_origin_not_allowed"}}
    assert re.fullmatch(r"[0-9a-f]{32}", headers["X-Request-ID"])
    assert "Access-Control-Allow-Origin" not in headers and "Access-Control-Allow-Headers" not in headers
    status, headers, _ = await preflight(gw.base_url, origin="https://evil.example", **{"X-Request-ID": "mine-1"})
    assert status == 403 and headers["X-Request-ID"] == "mine-1"


async def test_preflight_leaves_out_headers_not_allowed(upstream, gateway_factory):
    gw = await gateway_factory(cors_config(upstream, allow_headers=("Authorization", "x-stainless-*")))
    status, headers, _ = await preflight(gw.base_url, "Authorization, X-Stainless-OS, x-evil, x-stainless, "
                                                      "x-stainlessfoo")
    assert status == 204 and headers["X-Request-ID"]
    # Matched case-insensitively; an exact entry answers in its configured spelling, a pattern as requested.
    assert headers["Access-Control-Allow-Headers"] == "Authorization, X-Stainless-OS"
    # Nothing allowed among the requested headers: no Access-Control-Allow-Headers, the browser refuses.
    status, headers, _ = await preflight(gw.base_url, "x-evil")
    assert status == 204 and "Access-Control-Allow-Headers" not in headers
    assert headers["Access-Control-Allow-Origin"] == ORIGIN and headers["X-Request-ID"]


async def test_star_allows_any_requested_header_even_with_credentials(upstream, gateway_factory):
    gw = await gateway_factory(cors_config(upstream, allow_headers=("*",), allow_credentials=True))
    status, headers, _ = await preflight(gw.base_url, "x-anything, authorization, x-custom-thing")
    assert status == 204
    # Echoed, not the literal "*" (which a browser does not honour for a request with credentials).
    assert headers["Access-Control-Allow-Headers"] == "x-anything, authorization, x-custom-thing"
    assert headers["Access-Control-Allow-Credentials"] == "true"
    assert headers["Access-Control-Allow-Origin"] == ORIGIN and headers["X-Request-ID"]


async def test_browser_flow_preflight_then_actual_post_from_an_allowed_origin(upstream, gateway_factory):
    gw = await gateway_factory(cors_config(upstream))  # the default allow_headers
    # What the browser does for the openai SDK: the preflight must allow every header it asks for...
    status, headers, _ = await preflight(gw.base_url, OPENAI_SDK_HEADERS)
    assert status == 204 and set(listed(OPENAI_SDK_HEADERS)) <= set(listed(headers["Access-Control-Allow-Headers"]))
    # ...then the actual request gets the CORS headers of actual responses and its request id.
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.base_url + "/chat/completions", json=CHAT,
                          headers={"Origin": ORIGIN, "x-stainless-os": "MacOS", "X-Request-ID": "post-1"}) as r:
            await r.read()
            assert r.status == 200
            assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
            assert "X-Request-ID" in r.headers["Access-Control-Expose-Headers"]
            assert r.headers["X-Request-ID"] == "post-1"
            # Actual responses are not affected by allow_headers (only preflights are).
            assert "Access-Control-Allow-Headers" not in r.headers
        async with s.post(gw.base_url + "/chat/completions", json=CHAT,
                          headers={"Origin": "https://evil.example"}) as r:
            await r.read()
            assert "Access-Control-Allow-Origin" not in r.headers and r.headers["X-Request-ID"]


@pytest.mark.parametrize("entry", ["x-*-os", "x stainless", "", "**"])
def test_an_allow_headers_entry_must_be_a_name_or_a_pattern_ending_in_star(tmp_path: Path, entry: str):
    path = tmp_path / "ssegate.yaml"
    path.write_text(orjson.dumps({
        "providers": [{"name": "sim", "type": "simulated", "models": ["*"]}],
        "cors": {"allow_origins": [ORIGIN], "allow_headers": ["Authorization", entry]},
    }).decode())
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    assert "cors.allow_headers" in str(info.value) and "patterns ending in `*`" in str(info.value)
    path.write_text(orjson.dumps({
        "providers": [{"name": "sim", "type": "simulated", "models": ["*"]}],
        "cors": {"allow_origins": [ORIGIN], "allow_headers": ["Authorization", "x-stainless-*", "*"]},
    }).decode())
    assert load_config(str(path), env={}).cors.allow_headers == ("Authorization", "x-stainless-*", "*")


def test_credentials_with_any_origin_is_a_config_error(tmp_path: Path):
    """allow_credentials with "*" would let every web site send credentialed requests: refused at load."""
    path = tmp_path / "ssegate.yaml"
    path.write_text("providers:\n  - {name: sim, type: simulated, models: ['*']}\n"
                    "cors:\n  allow_origins: ['*']\n  allow_credentials: true\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    assert f"{path}:5: cors.allow_credentials: cannot be true while cors.allow_origins contains '*'" in str(info.value)
    path.write_text("providers:\n  - {name: sim, type: simulated, models: ['*']}\n"
                    "cors:\n  allow_origins: ['*']\n  allow_credentials: false\n")
    assert load_config(str(path), env={}).cors.allow_origins == ("*",)
