"""The OpenAI <-> Anthropic translation against the shapes real OpenAI-format upstreams send: an Azure OpenAI
server (its prompt-filter chunk first, with empty ``choices``, ``id`` and ``model``) behind ``/v1/messages``, with
the official anthropic SDK as the client; and the egress and error mapping on their own."""
from __future__ import annotations

from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
from aiohttp import web

from proxy.anthropic_format import OpenAIStreamToAnthropic, anthropic_error, to_anthropic_message
from proxy.config.schema import Config, PipelineEntry, ProviderConfig
from proxy.errors import GatewayError
from proxy.upstream import UpstreamError
from proxy.web_app import start_server

AZURE_ID = "chatcmpl-AZ123"
AZURE_MODEL = "gpt-4o-2024-08-06"
PROMPT_FILTER = [{"prompt_index": 0, "content_filter_results": {
    "hate": {"filtered": False, "severity": "safe"}, "self_harm": {"filtered": False, "severity": "safe"}}}]
CONTENT_FILTER = {"hate": {"filtered": False, "severity": "safe"}}
TEXTS = ["Bonjour", " le", " monde"]


class AzureUpstream:
    """Azure OpenAI's chat completions as it answers them: a stream opens with the prompt-filter chunk (empty
    ``choices``, ``id``, ``model`` and ``object``), then OpenAI's role chunk (``refusal: null``), the content with
    its ``content_filter_results``, the finish chunk and, when asked for, the usage chunk."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    @classmethod
    async def start(cls) -> "AzureUpstream":
        self = cls()
        app = web.Application()
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._chat)
        self._runner, self.port = await start_server(app, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        usage = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
        if not body.get("stream"):
            return web.json_response({
                "id": AZURE_ID, "object": "chat.completion", "created": 1733000000, "model": AZURE_MODEL,
                "prompt_filter_results": PROMPT_FILTER, "system_fingerprint": "fp_az",
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "content_filter_results": CONTENT_FILTER,
                             "message": {"role": "assistant", "content": "".join(TEXTS), "refusal": None}}],
                "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(obj: Any) -> None:
            await resp.write(b"data: " + (obj if isinstance(obj, bytes) else orjson.dumps(obj)) + b"\n\n")

        await send({"choices": [], "created": 0, "id": "", "model": "", "object": "",
                    "prompt_filter_results": PROMPT_FILTER})
        base = {"id": AZURE_ID, "object": "chat.completion.chunk", "created": 1733000000, "model": AZURE_MODEL,
                "system_fingerprint": "fp_az"}
        await send({**base, "choices": [{"index": 0, "content_filter_results": {}, "logprobs": None,
                                         "finish_reason": None,
                                         "delta": {"role": "assistant", "content": "", "refusal": None}}]})
        for text in TEXTS:
            await send({**base, "choices": [{"index": 0, "content_filter_results": CONTENT_FILTER, "logprobs": None,
                                             "finish_reason": None, "delta": {"content": text}}]})
        await send({**base, "choices": [{"index": 0, "content_filter_results": {}, "logprobs": None,
                                         "finish_reason": "stop", "delta": {}}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            await send({**base, "choices": [], "usage": usage})
        await send(b"[DONE]")
        await resp.write_eof()
        return resp


@pytest.fixture
async def azure():
    up = await AzureUpstream.start()
    yield up
    await up.close()


def azure_config(azure: AzureUpstream) -> Config:
    provider = ProviderConfig(name="azure", type="azure_openai", base_url=f"http://127.0.0.1:{azure.port}",
                              api_key="az-key", models=("gpt-4o",), deployments={"gpt-4o": "my-gpt4o"})
    return Config(providers=(provider,), pipeline=(PipelineEntry("router"),))


def anthropic_client(gw) -> anthropic.AsyncAnthropic:  # type: ignore[no-untyped-def]
    return anthropic.AsyncAnthropic(base_url=gw.url, api_key="unused", max_retries=0)


async def test_messages_stream_through_azure_takes_id_and_model_past_the_prompt_filter_chunk(azure, gateway_factory):
    """The stream's message_start names the answer as the non-stream answer does (Azure's id and model), not the
    empty ones of its opening prompt-filter chunk, and still comes first."""
    gw = await gateway_factory(azure_config(azure))
    client = anthropic_client(gw)
    kwargs: dict[str, Any] = dict(model="gpt-4o", max_tokens=50, messages=[{"role": "user", "content": "Hi"}])
    message = await client.messages.create(**kwargs)
    async with client.messages.stream(**kwargs) as stream:
        final = await stream.get_final_message()
    await client.close()
    assert (message.id, message.model) == ("msg_" + AZURE_ID, AZURE_MODEL)
    assert (final.id, final.model) == (message.id, message.model)
    assert final.content[0].text == message.content[0].text == "Bonjour le monde"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (9, 3)

    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/messages", data=orjson.dumps({**kwargs, "stream": True})) as resp:
            text = await resp.text()
    events = [line[len("event: "):] for line in text.splitlines() if line.startswith("event: ")]
    assert events[:2] == ["message_start", "content_block_start"] and events[-1] == "message_stop"
    start = orjson.loads(text.split("data: ", 1)[1].split("\n", 1)[0])
    assert (start["message"]["id"], start["message"]["model"]) == ("msg_" + AZURE_ID, AZURE_MODEL)
    assert [r["model"] for r in azure.requests] == ["gpt-4o"] * 3


# -- the egress on its own: when message_start goes out, and with what --------------------------------------------

def _feed(chunks: list[Any]) -> list[tuple[str, dict[str, Any]]]:
    egress = OpenAIStreamToAnthropic()
    out: list[bytes] = []
    for chunk in chunks:
        out += egress.feed(b"data: " + (chunk if isinstance(chunk, bytes) else orjson.dumps(chunk)))
    return [(ev.split(b"\n", 1)[0][len(b"event: "):].decode(), orjson.loads(ev.split(b"data: ", 1)[1]))
            for ev in out]


def test_a_stream_of_filter_chunks_only_still_opens_its_message_before_ending_it():
    events = _feed([{"choices": [], "id": "", "model": "", "prompt_filter_results": PROMPT_FILTER}, b"[DONE]"])
    assert [name for name, _ in events] == ["message_start", "message_delta", "message_stop"]
    assert events[0][1]["message"]["id"].startswith("msg_")


def test_a_stream_without_ids_opens_its_message_with_its_first_choice():
    """llama.cpp sends no ``id``: message_start is not held back for one (a made-up id, the chunk's model)."""
    chunk = {"object": "chat.completion.chunk", "model": "llama", "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": "x"}, "finish_reason": None}]}
    events = _feed([chunk])
    assert [name for name, _ in events] == ["message_start", "content_block_start", "content_block_delta"]
    message = events[0][1]["message"]
    assert message["id"].startswith("msg_") and len(message["id"]) > len("msg_") and message["model"] == "llama"


def test_the_matched_stop_sequence_is_read_from_vllms_stop_reason_only_when_it_is_a_string():
    """vLLM's ``stop_reason``: the matched stop string (a stop sequence), or an integer (a stop token id, which
    Anthropic has no word for: ``end_turn``)."""
    for stop_reason, expected in (("END", ("stop_sequence", "END")), (128009, ("end_turn", None)),
                                  (None, ("end_turn", None))):
        answer = {"id": "x", "model": "m", "choices": [{"index": 0, "finish_reason": "stop",
                                                         "stop_reason": stop_reason,
                                                         "message": {"role": "assistant", "content": "a"}}]}
        message = to_anthropic_message(answer)
        assert (message["stop_reason"], message["stop_sequence"]) == expected
        events = _feed([{"id": "x", "model": "m", "choices": [{"index": 0, "delta": {"content": "a"},
                                                                "finish_reason": "stop", "stop_reason": stop_reason}]},
                        b"[DONE]"])
        delta = events[-2][1]["delta"]
        assert (delta["stop_reason"], delta["stop_sequence"]) == expected


# -- errors for Anthropic clients ----------------------------------------------------------------------------

@pytest.mark.parametrize("error, expected", [
    (UpstreamError(503, "Overloaded", kind="status", retryable=True, code="overloaded_error",
                   body={"error": {"message": "Overloaded", "type": "overloaded_error", "code": "overloaded_error"}}),
     (529, "overloaded_error")),
    (UpstreamError(502, "Overloaded", kind="stream_error", retryable=True,
                   body={"error": {"message": "Overloaded", "type": "overloaded_error", "code": "overloaded_error"}}),
     (529, "overloaded_error")),
    (UpstreamError(503, "the gateway is shutting down; retry the request", kind="shutdown", retryable=False,
                   code="server_shutting_down"), (529, "overloaded_error")),
    (UpstreamError(503, "provider 'x' is unavailable (circuit open)", kind="circuit_open", retryable=True,
                   code="provider_unavailable"), (503, "api_error")),
    (GatewayError(429, "slow down", code="rate_limit_exceeded"), (429, "rate_limit_error")),
    (GatewayError(404, "no such model", code="model_not_found"), (404, "not_found_error")),
], ids=["anthropic-529", "overloaded-event-before-content", "shutting-down", "circuit-open", "429", "404"])
def test_anthropic_error_gives_overloaded_errors_anthropics_529(error, expected):
    status, body = anthropic_error(error)
    assert (status, body["error"]["type"]) == expected
    assert body == {"type": "error", "error": {"type": expected[1], "message": error.message}}
