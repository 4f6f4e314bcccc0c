"""An OpenAI-compatible LLM simulator: the engine, without any HTTP.

Used in-process by the gateway's ``simulated`` provider and over HTTP by ``ssegate simulate``
(:mod:`proxy.simulator_server`). It answers chat completions (plain and streamed), legacy completions and
embeddings with realistic OpenAI-shaped objects, waits a configurable time to first token (TTFT) and
inter-token latency (ITL), and can inject errors.

The text comes from a fixed corpus of generated English sentences built once at import; a response is a run
of that corpus starting at a sentence boundary chosen at random (or from the seed), so producing a response
costs one random draw and no per-token text work. Every token's JSON encoding is precomputed too: a streamed
chunk is a concatenation of three byte strings.
"""
from __future__ import annotations

import array
import asyncio
import base64
import fnmatch
import functools
import hashlib
import math
import random
import sys
import time
from typing import Any, AsyncIterator

import orjson

from .config.schema import SimulationConfig
from .errors import GatewayError
from .simulated_features import chat_answer, chat_events, wants_features
from .sse import DONE

__all__ = ["Simulator", "estimate_message_tokens", "estimate_text_tokens"]

# --------------------------------------------------------------------------------------------------------------
# The corpus

_OPENERS = (
    "Today,", "Meanwhile,", "Later,", "Usually,", "Sometimes,", "Afterwards,", "In practice,", "Quietly,",
    "At first,", "By evening,", "In the end,", "Once again,",
)
_DETERMINERS = ("the", "a", "every", "each", "this", "our", "one", "that")
_ADJECTIVES = (
    "quick", "quiet", "small", "steady", "bright", "careful", "distant", "modern", "simple", "patient",
    "curious", "reliable", "gentle", "busy", "early", "hidden", "old", "clever", "silent", "friendly",
    "narrow", "warm", "remote", "useful", "ancient", "tiny",
)
_NOUNS = (
    "gateway", "stream", "token", "server", "request", "client", "river", "garden", "engineer", "network",
    "model", "message", "signal", "library", "village", "window", "answer", "pattern", "system", "bridge",
    "lantern", "teacher", "student", "machine", "journey", "harbor", "question", "story", "compass", "letter",
    "mountain", "record", "archive", "router", "traveler", "orchard",
)
_VERBS = (
    "sends", "reads", "builds", "follows", "carries", "watches", "answers", "shapes", "finds", "opens",
    "measures", "protects", "explores", "describes", "connects", "remembers", "prepares", "checks", "improves",
    "balances", "greets", "repairs", "studies", "gathers", "guides", "welcomes",
)
_PREPOSITIONS = ("with", "through", "across", "near", "beyond", "for", "under", "around", "behind", "toward")


def _build_corpus(n_sentences: int = 640) -> tuple[list[str], list[int]]:
    """Tokens (each with a leading space) of simple generated sentences, and the index of each sentence start."""
    rng = random.Random(0x55E6A7E)
    tokens: list[str] = []
    starts: list[int] = []

    def noun_phrase() -> list[str]:
        det = rng.choice(_DETERMINERS)
        words = [rng.choice(_ADJECTIVES)] if rng.random() < 0.6 else []
        words.append(rng.choice(_NOUNS))
        if det == "a" and words[0][0] in "aeiou":
            det = "an"
        return [det, *words]

    for _ in range(n_sentences):
        words: list[str] = []
        if rng.random() < 0.2:
            words.extend(rng.choice(_OPENERS).split(" "))
        words.extend(noun_phrase())
        words.append(rng.choice(_VERBS))
        words.extend(noun_phrase())
        if rng.random() < 0.5:
            words.append(rng.choice(_PREPOSITIONS))
            words.extend(noun_phrase())
        words[0] = words[0][:1].upper() + words[0][1:]
        words[-1] += "."
        starts.append(len(tokens))
        tokens.extend(" " + w for w in words)
    return tokens, starts


_TOKENS, _STARTS = _build_corpus()
_N_TOKENS = len(_TOKENS)
#: JSON encoding (a quoted string) of every corpus token.
_TOKENS_JSON = [orjson.dumps(t) for t in _TOKENS]

# --------------------------------------------------------------------------------------------------------------
# Token estimates


def estimate_text_tokens(text: str) -> int:
    """About four characters per token, at least one."""
    return max(1, (len(text) + 3) // 4)


_IMAGE_TOKENS = 85


def estimate_message_tokens(messages: list[Any]) -> int:
    """Prompt tokens of chat ``messages``: ~4 characters per token, at least one per message.

    ``content`` may be a string or a list of parts (text parts count their text, image parts a fixed 85);
    tool-call arguments count as text.
    """
    total = 0
    for message in messages:
        chars = 0
        extra = 0
        if isinstance(message, dict):
            content = message.get("content")
            if isinstance(content, str):
                chars = len(content)
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, str):
                        chars += len(part)
                    elif isinstance(part, dict):
                        text = part.get("text")
                        if isinstance(text, str):
                            chars += len(text)
                        elif part.get("type") in ("image_url", "input_image", "image"):
                            extra += _IMAGE_TOKENS
            tool_calls = message.get("tool_calls")
            if isinstance(tool_calls, list):
                for call in tool_calls:
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict):
                        args = function.get("arguments")
                        if isinstance(args, str):
                            chars += len(args)
        total += max(1, (chars + 3) // 4 + extra)
    return total


def _prompt_tokens(prompt: Any) -> int:
    """Tokens of a legacy completions ``prompt`` (string, list of strings, token array or list of arrays)."""
    if isinstance(prompt, str):
        return estimate_text_tokens(prompt)
    if isinstance(prompt, list):
        total = 0
        for item in prompt:
            if isinstance(item, str):
                total += estimate_text_tokens(item)
            elif isinstance(item, list):
                total += max(1, len(item))
            else:
                total += 1  # one token of a token array
        return max(1, total)
    return 1


# --------------------------------------------------------------------------------------------------------------
# Embeddings

_MAX_DIMENSIONS = 8192
_MAX_EMBEDDING_INPUTS = 2048


@functools.lru_cache(maxsize=4096)
def _unit_vector(key: bytes, dimensions: int) -> array.array:
    """A deterministic unit-length float32 vector derived from a hash of ``key`` (never mutate the result)."""
    ints = array.array("h", hashlib.shake_256(key).digest(2 * dimensions))
    if sys.byteorder == "big":
        ints.byteswap()
    norm = math.hypot(*ints) or 1.0
    inv = 1.0 / norm
    return array.array("f", [x * inv for x in ints])


def _float32_le_b64(vec: array.array) -> str:
    if sys.byteorder == "big":
        vec = array.array("f", vec)
        vec.byteswap()
    return base64.b64encode(vec.tobytes()).decode("ascii")


def _embedding_inputs(value: Any) -> tuple[list[bytes], int]:
    """Hash keys of the inputs and their total token estimate; raise 400 on anything OpenAI would reject."""
    if isinstance(value, str):
        items: list[Any] = [value]
    elif isinstance(value, list) and value:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            items = [value]  # a single token array
        else:
            items = value
    else:
        raise GatewayError(400, "'input' must be a non-empty string or array.", param="input")
    if len(items) > _MAX_EMBEDDING_INPUTS:
        raise GatewayError(
            400, f"'input' must have at most {_MAX_EMBEDDING_INPUTS} items.", param="input"
        )
    keys: list[bytes] = []
    tokens = 0
    for item in items:
        if isinstance(item, str):
            if not item:
                raise GatewayError(400, "'input' cannot contain an empty string.", param="input")
            keys.append(item.encode("utf-8", "surrogatepass"))
            tokens += estimate_text_tokens(item)
        elif (
            isinstance(item, list)
            and item
            and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
        ):
            keys.append(b"\x00tokens:" + ",".join(map(str, item)).encode())
            tokens += len(item)
        else:
            raise GatewayError(
                400, "'input' items must be non-empty strings or non-empty arrays of integers.", param="input"
            )
    return keys, tokens


# --------------------------------------------------------------------------------------------------------------
# Request parsing helpers


def _int_param(body: dict[str, Any], name: str, minimum: int = 1) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise GatewayError(400, f"'{name}' must be an integer >= {minimum}.", param=name)
    return value


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


_ENDPOINT_ALIASES = {
    "chat": "chat",
    "chat.completions": "chat",
    "chat_completions": "chat",
    "chat/completions": "chat",
    "completions": "completions",
    "completion": "completions",
    "text_completion": "completions",
    "embeddings": "embeddings",
    "embedding": "embeddings",
}


def _endpoint_kind(endpoint: str) -> str | None:
    name = endpoint.strip().strip("/").lower()
    kind = _ENDPOINT_ALIASES.get(name)
    if kind is None:
        if name.endswith("chat/completions"):
            kind = "chat"
        elif name.endswith("completions"):
            kind = "completions"
        elif name.endswith("embeddings"):
            kind = "embeddings"
    return kind


class _Plan:
    """What one completion will contain: the model, the tokens, the finish reason and the usage."""

    __slots__ = ("model", "model_json", "start", "n", "finish_reason", "prompt_tokens")

    def __init__(self, model: str, start: int, n: int, finish_reason: str, prompt_tokens: int) -> None:
        self.model = model
        self.model_json = orjson.dumps(model)
        self.start = start
        self.n = n
        self.finish_reason = finish_reason
        self.prompt_tokens = prompt_tokens

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.n,
            "total_tokens": self.prompt_tokens + self.n,
        }

    def _last_needs_period(self) -> bool:
        # A natural ("stop") answer ends a sentence; a truncated ("length") one may stop mid-sentence.
        return self.finish_reason == "stop" and not _TOKENS[(self.start + self.n - 1) % _N_TOKENS].endswith(".")

    def token_strings(self) -> list[str]:
        n, start = self.n, self.start
        if n <= 0:
            return []
        if start + n <= _N_TOKENS:
            out = _TOKENS[start : start + n]
        else:
            out = [_TOKENS[(start + i) % _N_TOKENS] for i in range(n)]
        out[0] = out[0].lstrip()
        if self._last_needs_period():
            out[-1] += "."
        return out

    def token_json(self) -> list[bytes]:
        n, start = self.n, self.start
        if n <= 0:
            return []
        if start + n <= _N_TOKENS:
            out = _TOKENS_JSON[start : start + n]
        else:
            out = [_TOKENS_JSON[(start + i) % _N_TOKENS] for i in range(n)]
        first = _TOKENS[start].lstrip()
        if n == 1 and self._last_needs_period():
            first += "."
        out[0] = orjson.dumps(first)
        if n > 1 and self._last_needs_period():
            out[-1] = orjson.dumps(_TOKENS[(start + n - 1) % _N_TOKENS] + ".")
        return out

    def text(self) -> str:
        return "".join(self.token_strings())


# --------------------------------------------------------------------------------------------------------------
# The simulator


class Simulator:
    """Simulated OpenAI-compatible answers, with configurable latency and error injection.

    Typical use::

        sim = Simulator(SimulationConfig(ttft_ms=50, itl_ms=10))
        sim.check(body, "chat")                   # GatewayError: unknown model, injected error, bad body
        if body.get("stream"):
            async for event in sim.chat_stream(body):   # raw SSE events, without the blank-line terminator
                ...
        else:
            completion = await sim.chat_completion(body)

    The number of content tokens is ``max_completion_tokens`` or ``max_tokens`` when the request sets one
    (the answer is then cut: ``finish_reason`` is ``"length"``), else ``config.response_tokens``
    (``finish_reason`` ``"stop"``). The text is deterministic when the request has a ``seed`` or, failing
    that, when ``config.seed`` is set.
    """

    def __init__(self, config: SimulationConfig | None = None) -> None:
        self.config = config = config or SimulationConfig()
        self._rng = random.Random(config.seed)
        self._ttft = max(0.0, config.ttft_ms) / 1000.0
        self._ttft_spread = max(0.0, config.ttft_variance_percent) / 100.0
        self._itl = max(0.0, config.itl_ms) / 1000.0
        self._itl_spread = max(0.0, config.itl_variance_percent) / 100.0
        self._error_rate = config.error_rate
        self._response_tokens = max(0, config.response_tokens)
        self._any_model = "*" in config.models
        self._exact_models = frozenset(m for m in config.models if not _is_pattern(m))
        self._model_patterns = tuple(m for m in config.models if _is_pattern(m) and m != "*")
        self._fingerprint = "fp_" + hashlib.sha256(repr(config.seed).encode()).hexdigest()[:10]
        self._fingerprint_b = self._fingerprint.encode()
        created = 1_700_000_000
        self._models = [
            {"id": m, "object": "model", "created": created, "owned_by": "ssegate-simulator"}
            for m in dict.fromkeys(config.models)
            if not _is_pattern(m)
        ]

    # ---------------------------------------------------------------------------------------------- models

    def models(self) -> list[dict[str, Any]]:
        """The ``data`` of ``GET /v1/models`` (wildcard entries are not listed)."""
        return [dict(m) for m in self._models]

    def model(self, model_id: str) -> dict[str, Any]:
        """One model object (``GET /v1/models/{id}``); 404 when not served."""
        for m in self._models:
            if m["id"] == model_id:
                return dict(m)
        if self.serves(model_id):
            return {"id": model_id, "object": "model", "created": 1_700_000_000, "owned_by": "ssegate-simulator"}
        raise _model_not_found(model_id)

    def serves(self, model: str) -> bool:
        """True when ``model`` is listed, matches a wildcard entry, or the list contains ``"*"``."""
        if self._any_model or model in self._exact_models:
            return True
        return any(fnmatch.fnmatchcase(model, p) for p in self._model_patterns)

    # ----------------------------------------------------------------------------------------------- check

    def check(self, body: dict[str, Any], endpoint: str) -> None:
        """Reject a request the way OpenAI would, before any answer starts.

        ``endpoint`` is ``"chat"``, ``"completions"`` or ``"embeddings"`` (paths such as
        ``"/v1/chat/completions"`` work too). Raises :class:`GatewayError` for a missing or unknown model
        (404 ``model_not_found``), a missing ``messages``/``prompt``/``input``, and, with probability
        ``error_rate``, an injected ``error_status`` error (429 carries ``Retry-After: 1``).
        """
        if not isinstance(body, dict):
            raise GatewayError(400, "The request body must be a JSON object.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(400, "You must provide a model parameter.", param="model")
        if not self.serves(model):
            raise _model_not_found(model)
        kind = _endpoint_kind(endpoint)
        if kind == "chat":
            _messages(body)
        elif kind == "completions":
            _prompt(body)
        elif kind == "embeddings" and body.get("input") is None:
            raise GatewayError(400, "You must provide an 'input' parameter.", param="input")
        if self._error_rate > 0 and self._rng.random() < self._error_rate:
            status = self.config.error_status
            if status == 429:
                raise GatewayError(
                    429,
                    "Simulated upstream error",
                    type="rate_limit_error",
                    code="simulated_error",
                    headers={"Retry-After": "1"},
                )
            raise GatewayError(status, "Simulated upstream error", code="simulated_error")

    # ----------------------------------------------------------------------------------------------- plans

    def _plan(self, body: dict[str, Any], prompt_tokens: int) -> _Plan:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(400, "You must provide a model parameter.", param="model")
        limit = _int_param(body, "max_completion_tokens")
        if limit is None:
            limit = _int_param(body, "max_tokens")
        if limit is None:
            n, finish = self._response_tokens, "stop"
        else:
            n, finish = limit, "length"
        seed = body.get("seed")
        if seed is None:
            seed = self.config.seed
        elif not isinstance(seed, int) or isinstance(seed, bool):
            raise GatewayError(400, "'seed' must be an integer.", param="seed")
        if seed is None:
            start = _STARTS[self._rng.randrange(len(_STARTS))]
        else:
            start = _STARTS[_seeded_index(seed)]
        return _Plan(model, start, n, finish, prompt_tokens)

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}{self._rng.getrandbits(96):024x}"

    def _jitter(self, mean: float, spread: float) -> float:
        if mean <= 0.0:
            return 0.0
        if spread <= 0.0:
            return mean
        return max(0.0, mean * (1.0 + spread * (2.0 * self._rng.random() - 1.0)))

    async def _wait_whole(self, n: int) -> None:
        """The time a whole non-streamed answer of ``n`` tokens takes: TTFT + (n-1) ITL, each jittered."""
        delay = self._jitter(self._ttft, self._ttft_spread)
        if n > 1:
            delay += (n - 1) * self._jitter(self._itl, self._itl_spread)
        if delay > 0.0:
            await asyncio.sleep(delay)

    def _first_deadline(self, loop: asyncio.AbstractEventLoop) -> float:
        return loop.time() + self._jitter(self._ttft, self._ttft_spread)

    # ------------------------------------------------------------------------------------------------ chat

    async def chat_completion(self, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streamed ``chat.completion`` object, returned after the simulated generation time."""
        plan = self._plan(body, estimate_message_tokens(_messages(body)))
        completion_id = self._new_id("chatcmpl-")
        created = int(time.time())
        if wants_features(body):  # tool calls, n, logprobs
            answer = chat_answer(self, body, plan, completion_id, created)
            await self._wait_whole(max(len(c["message"]["content"] or "") // 4 for c in answer["choices"]))
            return answer
        await self._wait_whole(plan.n)
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": plan.model,
            "system_fingerprint": self._fingerprint,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": plan.text(), "refusal": None},
                    "logprobs": None,
                    "finish_reason": plan.finish_reason,
                }
            ],
            "usage": plan.usage(),
        }

    async def chat_stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """Raw SSE events (``b'data: {...}'``, no blank-line terminator) of a streamed chat completion.

        A role chunk, one chunk per token, a chunk with ``finish_reason``, a usage chunk when
        ``stream_options.include_usage`` is true (every other chunk then has ``"usage": null``), and
        ``data: [DONE]``. Validation errors are raised at the first iteration, before any event.
        """
        plan = self._plan(body, estimate_message_tokens(_messages(body)))
        include_usage = _include_usage(body)
        if wants_features(body):  # tool calls, n, logprobs
            async for event in chat_events(self, body, plan, self._new_id("chatcmpl-"), int(time.time()),
                                           include_usage):
                yield event
            return
        tail = b',"usage":null}' if include_usage else b"}"
        head = b"".join(
            (
                b'data: {"id":"',
                self._new_id("chatcmpl-").encode(),
                b'","object":"chat.completion.chunk","created":',
                str(int(time.time())).encode(),
                b',"model":',
                plan.model_json,
                b',"system_fingerprint":"',
                self._fingerprint_b,
                b'","choices":[',
            )
        )
        yield head + b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]' + tail
        pre = head + b'{"index":0,"delta":{"content":'
        post = b'},"logprobs":null,"finish_reason":null}]' + tail
        tokens = plan.token_json()
        if not tokens:
            await self._wait_whole(0)
        elif self._ttft <= 0.0 and self._itl <= 0.0:
            for token in tokens:
                yield pre + token + post
        else:
            # Paced on a schedule (TTFT, then ITL per token), so timer overhead does not accumulate; a slow
            # consumer gets late tokens at once, as from a real server's buffer. One sleep per token at most.
            loop = asyncio.get_running_loop()
            deadline = self._first_deadline(loop)
            itl, spread, jitter, sleep = self._itl, self._itl_spread, self._jitter, asyncio.sleep
            for i, token in enumerate(tokens):
                if i and itl > 0.0:
                    deadline += jitter(itl, spread)
                delay = deadline - loop.time()
                if delay > 0.0:
                    await sleep(delay)
                yield pre + token + post
        yield (
            head
            + b'{"index":0,"delta":{},"logprobs":null,"finish_reason":"'
            + plan.finish_reason.encode()
            + b'"}]'
            + tail
        )
        if include_usage:
            yield head + b'],"usage":' + orjson.dumps(plan.usage()) + b"}"
        yield DONE

    # ---------------------------------------------------------------------------------- legacy completions

    async def completion(self, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streamed legacy ``text_completion`` object (``/v1/completions``)."""
        plan = self._plan(body, _prompt_tokens(_prompt(body)))
        completion_id = self._new_id("cmpl-")
        created = int(time.time())
        await self._wait_whole(plan.n)
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": plan.model,
            "system_fingerprint": self._fingerprint,
            "choices": [
                {"text": plan.text(), "index": 0, "logprobs": None, "finish_reason": plan.finish_reason}
            ],
            "usage": plan.usage(),
        }

    async def completion_stream(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        """Raw SSE events of a streamed legacy completion: one chunk per token (``choices[0].text``), a final
        chunk with empty text and ``finish_reason``, an optional usage chunk, then ``data: [DONE]``."""
        plan = self._plan(body, _prompt_tokens(_prompt(body)))
        include_usage = _include_usage(body)
        tail = b',"usage":null}' if include_usage else b"}"
        head = b"".join(
            (
                b'data: {"id":"',
                self._new_id("cmpl-").encode(),
                b'","object":"text_completion","created":',
                str(int(time.time())).encode(),
                b',"model":',
                plan.model_json,
                b',"system_fingerprint":"',
                self._fingerprint_b,
                b'","choices":[',
            )
        )
        pre = head + b'{"text":'
        post = b',"index":0,"logprobs":null,"finish_reason":null}]' + tail
        tokens = plan.token_json()
        if not tokens:
            await self._wait_whole(0)
        elif self._ttft <= 0.0 and self._itl <= 0.0:
            for token in tokens:
                yield pre + token + post
        else:
            # Paced on a schedule (TTFT, then ITL per token), so timer overhead does not accumulate; a slow
            # consumer gets late tokens at once, as from a real server's buffer. One sleep per token at most.
            loop = asyncio.get_running_loop()
            deadline = self._first_deadline(loop)
            itl, spread, jitter, sleep = self._itl, self._itl_spread, self._jitter, asyncio.sleep
            for i, token in enumerate(tokens):
                if i and itl > 0.0:
                    deadline += jitter(itl, spread)
                delay = deadline - loop.time()
                if delay > 0.0:
                    await sleep(delay)
                yield pre + token + post
        yield (
            head
            + b'{"text":"","index":0,"logprobs":null,"finish_reason":"'
            + plan.finish_reason.encode()
            + b'"}]'
            + tail
        )
        if include_usage:
            yield head + b'],"usage":' + orjson.dumps(plan.usage()) + b"}"
        yield DONE

    # ------------------------------------------------------------------------------------------ embeddings

    def embeddings(self, body: dict[str, Any]) -> dict[str, Any]:
        """An embeddings ``list``: deterministic unit vectors derived from a hash of each input.

        ``input``: a string, a list of strings, a token array or a list of token arrays. ``dimensions``
        defaults to 1536. ``encoding_format`` ``"float"`` (default) or ``"base64"`` (little-endian float32).
        """
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise GatewayError(400, "You must provide a model parameter.", param="model")
        if body.get("input") is None:
            raise GatewayError(400, "You must provide an 'input' parameter.", param="input")
        keys, tokens = _embedding_inputs(body["input"])
        dimensions = _int_param(body, "dimensions")
        if dimensions is None:
            dimensions = 1536
        elif dimensions > _MAX_DIMENSIONS:
            raise GatewayError(400, f"'dimensions' must be at most {_MAX_DIMENSIONS}.", param="dimensions")
        encoding = body.get("encoding_format")
        if encoding is None or encoding == "float":
            data = [
                {"object": "embedding", "index": i, "embedding": _unit_vector(k, dimensions).tolist()}
                for i, k in enumerate(keys)
            ]
        elif encoding == "base64":
            data = [
                {"object": "embedding", "index": i, "embedding": _float32_le_b64(_unit_vector(k, dimensions))}
                for i, k in enumerate(keys)
            ]
        else:
            raise GatewayError(
                400, "'encoding_format' must be 'float' or 'base64'.", param="encoding_format"
            )
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }


# --------------------------------------------------------------------------------------------------------------


def _is_pattern(model: str) -> bool:
    return "*" in model or "?" in model or "[" in model


def _model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        type="invalid_request_error",
        param="model",
        code="model_not_found",
    )


def _messages(body: dict[str, Any]) -> list[Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise GatewayError(400, "'messages' must be a non-empty array.", param="messages")
    return messages


def _prompt(body: dict[str, Any]) -> Any:
    prompt = body.get("prompt")
    if prompt is None:
        raise GatewayError(400, "You must provide a 'prompt' parameter.", param="prompt")
    if not isinstance(prompt, (str, list)):
        raise GatewayError(400, "'prompt' must be a string or an array.", param="prompt")
    return prompt


@functools.lru_cache(maxsize=1024)
def _seeded_index(seed: int) -> int:
    return random.Random(seed).randrange(len(_STARTS))
