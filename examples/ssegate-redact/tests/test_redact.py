"""The plugin's tests: only ssegate's pytest plugin (proxy.testing) and its fixtures are needed."""
import pytest

from proxy.testing import ConfigError, build_pipeline, feed_chunks, make_exchange, run_on_response, \
    run_upstream_request
from ssegate_redact import Redact


async def test_an_email_split_across_chunks_is_redacted(ssegate_gateway):
    gw = await ssegate_gateway(pipeline=["router", Redact], texts=["Write to bob.smith@", "exam", "ple.com today"])
    answer = await gw.chat("Who do I write to?")
    assert answer == "Write to [redacted] today"


async def test_a_card_number_is_redacted_through_the_openai_sdk(ssegate_gateway):
    gw = await ssegate_gateway(pipeline=["router", Redact], texts=["Card: 4111 1111 ", "1111 1111, ok"])
    stream = await gw.openai.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                     stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Card: [redacted], ok"


def test_numbers_that_fail_the_luhn_check_are_kept():
    out = feed_chunks(Redact, ["Order 4111 1111 1111 1112", " shipped"])
    assert out.text == "Order 4111 1111 1111 1112 shipped" and out.done


def test_the_held_tail_is_flushed_at_the_end_of_the_stream():
    out = feed_chunks((Redact, {"mask": "***"}), ["mail me: bob@", "example.org"])
    assert out.texts == ["mail me: ", "***"]


async def test_the_prompt_is_redacted_before_it_reaches_the_model(ssegate_gateway):
    gw = await ssegate_gateway(pipeline=["router", Redact])
    await gw.chat("I am alice@example.com, card 5500-0000-0000-0004")
    assert gw.upstream.requests[0]["messages"][0]["content"] == "I am [redacted], card [redacted]"


async def test_prompt_redaction_without_a_server():
    request = await run_upstream_request((Redact, {"cards": False}), make_exchange("a@b.io 4111111111111111"))
    assert request.json["messages"][0]["content"] == "[redacted] 4111111111111111"


async def test_a_non_stream_answer_is_redacted(ssegate_gateway):
    gw = await ssegate_gateway(pipeline=["router", {"redact": {"mask": "<gone>"}}], texts=["mail bob@example.com"])
    assert await gw.chat("hi", stream=False) == "mail <gone>"
    assert (await run_on_response(Redact, "x@y.com"))["choices"][0]["message"]["content"] == "[redacted]"


def test_a_typo_in_the_config_is_refused():
    with pytest.raises(ConfigError, match="emials"):
        build_pipeline((Redact, {"emials": False}))


def test_every_split_point_gives_the_same_answer():
    text = "Reach bob.smith@example.com or 4111-1111-1111-1111."
    for i in range(1, len(text)):
        assert feed_chunks(Redact, [text[:i], text[i:]]).text == "Reach [redacted] or [redacted]."


def _completion_chunk(text, finish_reason=None):
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}]}


def test_a_completions_stream_is_redacted_across_chunks():
    out = feed_chunks(Redact, [_completion_chunk("mail bob@exa"), _completion_chunk("mple.com now"),
                               _completion_chunk("", "stop")])
    assert out.text == "mail [redacted] now" and out.done
    assert all(c.json["object"] == "text_completion" for c in out if not c.is_done)


def test_the_held_tail_of_a_completions_stream_is_flushed_as_a_completions_chunk():
    out = feed_chunks(Redact, [_completion_chunk("card 4111 1111 1111 1111")])
    assert out.texts == ["card ", "[redacted]"]
    assert out[-2].json["choices"][0]["text"] == "[redacted]"


async def test_completions_and_embeddings_inputs_are_redacted():
    request = await run_upstream_request(Redact, make_exchange("to a@b.io", endpoint="completions"))
    assert request.json["prompt"] == "to [redacted]"
    request = await run_upstream_request(Redact, make_exchange(["x@y.com", "plain", [1, 2]],
                                                               endpoint="embeddings"))
    assert request.json["input"] == ["[redacted]", "plain", [1, 2]]


async def test_a_non_stream_completion_is_redacted():
    body = {"object": "text_completion", "choices": [{"index": 0, "text": "write to x@y.com"}]}
    assert (await run_on_response(Redact, body))["choices"][0]["text"] == "write to [redacted]"
