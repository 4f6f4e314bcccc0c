"""proxy.testing for plugin authors: the pytest11 plugin's fixtures (in a fresh project, strict asyncio mode, with
and without pytest-asyncio) and the helpers that run hooks without a server."""
from __future__ import annotations

import subprocess
import sys

import pytest

from proxy import Chunk, GatewayError, Reply, StopStream, hookimpl, plugin_config, setting
from proxy.pipeline import PluginError
from proxy.testing import (Answer, AnswerError, ConfigError, RunningGateway, ScriptedUpstream, build_pipeline,
                           content_of, feed_chunks, make_chunks, make_exchange, run_check_request,
                           run_on_response, run_upstream_request)

pytest_plugins = ["pytester"]


class HoldAll:
    """Holds every chunk back and releases them all with [DONE] (the hold-back contract in its simplest form)."""

    def __init__(self) -> None:
        self.held: list[Chunk] = []

    @hookimpl
    def on_chunk(self, chunk):
        if chunk.is_done:
            out, self.held = [*self.held, chunk], []
            return out
        self.held.append(chunk)
        return []


class Upper:
    @hookimpl
    def on_chunk(self, chunk):
        obj = chunk.json
        if obj and obj.get("choices"):
            obj["choices"][0]["delta"]["content"] = content_of(obj).upper()
            chunk.set_json(obj)


class StopAtX:
    @hookimpl
    def on_chunk(self, chunk):
        if "x" in content_of(chunk):
            raise StopStream("found x", finish_reason="content_filter")


@plugin_config
class GuardConfig:
    word: str = setting("secret", doc="A word that is refused in prompts.")


class Guard:
    Config = GuardConfig

    def __init__(self, config: GuardConfig) -> None:
        self.config = config

    @hookimpl
    def check_request(self, exchange):
        if self.config.word in exchange.json["messages"][-1]["content"]:
            raise GatewayError(403, f"no {self.config.word}", code="guarded")


# -- without a server -----------------------------------------------------------------------------------------

def test_make_chunks_are_the_scripted_upstreams_events():
    up = ScriptedUpstream()
    body = {"model": "m", "stream_options": {"include_usage": True}}
    up.script.texts = ["a", "b"]
    assert [c.raw for c in make_chunks(["a", "b"], model="m", usage=up.script.usage)] == up.events(body)
    chunks = make_chunks(["Hel", "lo"])
    assert [content_of(c) for c in chunks] == ["", "Hel", "lo", "", ""] and chunks[-1].is_done
    assert chunks[-2].json["choices"][0]["finish_reason"] == "stop"


def test_make_exchange_builds_the_request_the_gateway_would_see():
    ex = make_exchange("hi", headers={"Authorization": "Bearer k"})
    assert ex.json == {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert ex.stream and ex.model == "gpt-4o-mini" and ex.headers["authorization"] == "Bearer k"
    ex = make_exchange({"model": "x", "messages": [], "stream_options": {"include_usage": True}, "stream": True})
    assert (ex.model, ex.stream, ex.include_usage) == ("x", True, True)
    assert make_exchange("p", endpoint="completions", stream=False).json == {"model": "gpt-4o-mini", "prompt": "p"}
    assert make_exchange(client_ip="10.0.0.1").client_ip == "10.0.0.1"


def test_feed_chunks_releases_held_chunks_with_done():
    out = feed_chunks(HoldAll, ["a", "b"])
    assert out.texts == ["a", "b"] and out.text == "ab" and out.done and out.stopped is None
    assert feed_chunks(HoldAll, ["a", "b"], done=False) == []


def test_feed_chunks_runs_plugins_in_order_each_seeing_the_previous_output():
    out = feed_chunks([Upper, HoldAll], make_chunks(["ab", "c"]))
    assert out.texts == ["", "AB", "C", ""] and out.done
    assert out.exchange.chunks_sent == 5


def test_feed_chunks_keeps_the_stopstream_and_stops_feeding():
    out = feed_chunks(StopAtX, ["ok ", "then x", "never"])
    assert out.text == "ok " and not out.done
    assert out.stopped.finish_reason == "content_filter" and out.stopped.reason == "found x"


def test_a_pipeline_keeps_plugin_state_across_feeds():
    pipeline = build_pipeline(HoldAll)
    assert feed_chunks(pipeline, ["a"], done=False) == []
    assert feed_chunks(pipeline, ["b"]).text == "ab"


def test_plugins_are_checked_as_the_gateway_checks_them():
    with pytest.raises(ConfigError, match=r"pipeline\[0\]\..*Guard\.wrod"):
        build_pipeline((Guard, {"wrod": "x"}))

    class AsyncChunk:
        @hookimpl
        async def on_chunk(self, chunk):
            return None

    with pytest.raises(ConfigError, match="AsyncChunk: on_chunk must be synchronous"):
        feed_chunks(AsyncChunk(), ["a"])
    with pytest.raises(TypeError, match="already configured"):
        build_pipeline((Guard(GuardConfig()), {"word": "x"}))


async def test_run_check_request_and_friends():
    assert await run_check_request((Guard, {"word": "x"}), make_exchange("fine")) is None
    with pytest.raises(GatewayError) as info:
        await run_check_request(Guard, make_exchange("a secret"))
    assert info.value.status == 403

    class Answers:
        @hookimpl
        async def check_request(self):
            return Reply(body={"ok": True})

    assert (await run_check_request([Answers(), Guard])).body == {"ok": True}

    class Boom:
        @hookimpl
        def upstream_request(self, request):
            request.json["temperature"] = 0
            request.headers["x-tag"] = "t"

        @hookimpl
        def on_response(self, body):
            return {**body, "seen": True}

    request = await run_upstream_request(Boom, make_exchange("hi"))
    assert request.json["temperature"] == 0 and request.headers == {"x-tag": "t"}
    assert request.json["messages"] == [{"role": "user", "content": "hi"}]
    body = await run_on_response(Boom, "answer")
    assert body["seen"] and body["choices"][0]["message"]["content"] == "answer"

    class Bug:
        @hookimpl
        def check_request(self):
            raise KeyError("bug")

    with pytest.raises(PluginError):
        await run_check_request(Bug)


# -- the fixtures, in this suite (asyncio auto mode) -------------------------------------------------------------

async def test_ssegate_gateway_streams_through_the_pipeline(ssegate_gateway):
    gw = await ssegate_gateway(pipeline=[Upper, "router"], texts=["Hel", "lo"], delay=0.001)
    answer = await gw.chat("hi")
    assert isinstance(gw, RunningGateway) and isinstance(answer, Answer)
    assert answer == "HELLO" and answer.chunks == ["HEL", "LO"] and answer.finish_reason == "stop"
    assert answer.events[-1] == "[DONE]" and answer.status == 200 and answer.error is None
    assert gw.upstream.requests[0]["messages"] == [{"role": "user", "content": "hi"}]
    assert isinstance(gw.plugin(Upper), Upper)


async def test_ssegate_gateway_non_stream_errors_and_sdk(ssegate_gateway, ssegate_upstream):
    gw = await ssegate_gateway(pipeline=[(Guard, {"word": "nope"}), "router"], upstream=ssegate_upstream)
    assert gw.upstream is ssegate_upstream
    answer = await gw.chat("hi", stream=False)
    assert answer == "Hello, world!" and answer.body["object"] == "chat.completion"
    with pytest.raises(AnswerError) as info:
        await gw.chat("nope")
    assert (info.value.status, info.value.code) == (403, "guarded")
    completion = await gw.openai.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert completion.choices[0].message.content == "Hello, world!"


async def test_ssegate_gateway_scripts_upstream_failures(ssegate_gateway):
    gw = await ssegate_gateway(pipeline=["router"], texts=["a", "b", "c"], cut_after=2)
    answer = await gw.chat("hi")
    assert answer == "ab" and answer.error is not None
    gw2 = await ssegate_gateway(status=503, error="down")
    with pytest.raises(AnswerError) as info:
        await gw2.chat("hi")
    assert info.value.status >= 500


async def test_ssegate_gateway_refuses_a_config_typo(ssegate_gateway):
    with pytest.raises(ConfigError, match="wrod"):
        await ssegate_gateway(pipeline=[{"tests.test_testing_plugin:Guard": {"wrod": "x"}}, "router"])
    with pytest.raises(ConfigError, match="keepalive"):
        await ssegate_gateway(config={"streaming": {"keepalive": 1}})


# -- the pytest11 plugin in a fresh project ----------------------------------------------------------------------

PLUGIN_PROJECT_TESTS = '''
import pytest
from proxy import hookimpl
from proxy.testing import feed_chunks

class Shout:
    @hookimpl
    def on_chunk(self, chunk):
        if chunk.json and chunk.json.get("choices"):
            obj = chunk.json
            obj["choices"][0]["delta"]["content"] = (obj["choices"][0]["delta"].get("content") or "").upper()
            chunk.set_json(obj)

@pytest.mark.asyncio
async def test_gateway(ssegate_gateway):
    gw = await ssegate_gateway(pipeline=["router", Shout], texts=["a", "b"])
    assert await gw.chat("hi") == "AB"

@pytest.mark.asyncio
async def test_sdk_and_upstream(ssegate_gateway, ssegate_upstream):
    gw = await ssegate_gateway(pipeline=["router", Shout], upstream=ssegate_upstream)
    stream = await gw.openai.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                     stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "HELLO, WORLD!"
    assert len(ssegate_upstream.requests) == 1

def test_without_server():
    assert feed_chunks(Shout, ["a", "b"]).text == "AB"
'''


def test_the_fixtures_work_in_a_fresh_project_in_strict_mode(pytester):
    """No conftest, no -p: the plugin comes from ssegate's pytest11 entry point."""
    pytester.makeini("[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_plugin=PLUGIN_PROJECT_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_without_pytest_asyncio_the_fixtures_say_what_to_install(pytester):
    pytester.makepyfile(pytest_asyncio="raise ImportError('pytest-asyncio is not installed')")
    pytester.makepyfile(test_it="def test_it(ssegate_gateway):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:asyncio", "-p", "no:aiohttp", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.re_match_lines([r"the ssegate_gateway fixture needs pytest-asyncio: pip install 'ssegate\[testing\]'"])


def test_proxy_testing_imports_without_pytest(tmp_path):
    (tmp_path / "pytest.py").write_text("raise ImportError('no pytest here')\n")
    code = "import proxy.testing as t; assert t.make_chunks(['a']) and not hasattr(t, 'ssegate_gateway')"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(tmp_path)}, timeout=60)
    assert result.returncode == 0, result.stderr
