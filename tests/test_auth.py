"""The auth plugin: keys from config, environment and a watched key file; every refusal in OpenAI's format."""
from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import time

import aiohttp
import attrs
import openai
import pytest
from structlog.testing import capture_logs

from plugins._keys import KeyFileError, hash_key, mask_key, parse_line
from plugins.auth import AuthPlugin
from proxy import hookimpl
from proxy.config.load import ConfigError
from proxy.config.schema import PipelineEntry
from proxy.gateway import Gateway
from proxy.plugin_manager import PluginLoadError, load_plugins, new_plugin_manager
from proxy.testing import config_for
from tests.conftest import REPO, spawn, stop
from tests.helpers import CHAT

ALICE = "sk-test-alice-4f9a1c0e7b2d"
BOB = "sk-test-bob-93c1d0a8e5f7"
CAROL = "sk-test-carol-1b8e2f4a6c3d"


def auth_entry(**config) -> PipelineEntry:
    return PipelineEntry("auth", {"keys_env": None, **config})


async def start(upstream, gateway_factory, plugins=None, extra=(), **auth_config):
    config = config_for(upstream, pipeline=[auth_entry(**auth_config), *extra, "router"])
    return await gateway_factory(config, plugins=plugins)


def plugin_of(server, name="auth"):
    return next(p.obj for p in server.gateway.plugins if p.name == name)


async def post(url: str, headers: dict[str, str] | None = None, body=None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/chat/completions", json=body or CHAT, headers=headers or {}) as resp:
            return resp.status, await resp.json()


class Recorder:
    def __init__(self) -> None:
        self.principals: list = []

    @hookimpl
    def exchange_done(self, exchange):
        self.principals.append(exchange.principal)


# --- accepting keys ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("header", [
    {"Authorization": f"Bearer {ALICE}"},
    {"authorization": f"bearer  {ALICE} "},
    {"x-api-key": ALICE},
    {"api-key": ALICE},
    {"Authorization": "Basic " + base64.b64encode(f":{ALICE}".encode()).decode()},
], ids=["bearer", "bearer-lowercase", "anthropic", "azure", "basic-password"])
async def test_each_header_style_is_accepted_and_never_forwarded(upstream, gateway_factory, header):
    rec = Recorder()
    gw = await start(upstream, gateway_factory, plugins={"rec": rec}, extra=["rec"],
                     keys=[f"{ALICE} name=alice tier=tier-2"])
    status, body = await post(gw.base_url, header)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == "Hello, world!"
    (principal,) = rec.principals
    assert (principal.name, principal.tier) == ("alice", "tier-2")
    assert principal.metadata["key_id"] == hash_key(ALICE)[:15]
    # the gateway's key is the gateway's business: the upstream never sees it
    assert not any(ALICE in v for v in upstream.headers[0].values())


async def test_openai_sdk_streams_with_a_valid_key_and_gets_401_with_a_wrong_one(upstream, gateway_factory):
    gw = await start(upstream, gateway_factory, keys=[ALICE])
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=ALICE, max_retries=0) as client:
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"], stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "Hello, world!"
        listed = await client.models.with_raw_response.list()  # /v1/models with the key
        assert listed.http_response.status_code == 200
    wrong = "sk-wrong-key-0123456789xyz"
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=wrong, max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as info:
            await client.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"])
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    err = info.value
    assert err.status_code == 401 and err.code == "invalid_api_key"
    assert err.body["type"] == "invalid_request_error" and err.body["param"] is None
    assert err.body["message"].startswith("Incorrect API key provided: sk-wr***xyz.")
    assert wrong not in err.body["message"]
    assert len(upstream.requests) == 1


async def test_anthropic_sdk_authenticates_with_x_api_key(upstream, gateway_factory):
    import anthropic

    gw = await gateway_factory(config_for(upstream, pipeline=[
        auth_entry(keys=[f"{ALICE} name=alice"]), PipelineEntry("ratelimit", {"default_tier": "tier-1"}), "router"]))
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=ALICE, max_retries=0) as client:
        raw = await client.messages.with_raw_response.create(model="claude-3-haiku", max_tokens=20,
                                                             messages=[{"role": "user", "content": "Hi"}])
        assert (await raw.parse()).content[0].text == "Hello, world!"
        assert raw.headers["x-ratelimit-limit-requests"] == "20"  # tier-1
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key="sk-ant-wrong-000000000000", max_retries=0) as c:
        with pytest.raises(anthropic.AuthenticationError) as info:
            await c.messages.create(model="claude-3-haiku", max_tokens=20, messages=[{"role": "user", "content": "Hi"}])
    assert info.value.status_code == 401 and "sk-ant-wrong-000000000000" not in str(info.value.body)
    assert len(upstream.requests) == 1


async def test_missing_key_is_401_with_openai_message(upstream, gateway_factory):
    gw = await start(upstream, gateway_factory, keys=[ALICE])
    status, body = await post(gw.base_url)
    assert status == 401
    assert body["error"]["code"] == "missing_api_key"
    assert body["error"]["message"].startswith("You didn't provide an API key.")
    assert body["error"]["type"] == "invalid_request_error"
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.base_url + "/models") as resp:  # the models list needs a key too
            assert resp.status == 401
    assert upstream.requests == []


@pytest.mark.parametrize("value", ["Token abc", "Bearer", "Basic !!notbase64", "Basic " + base64.b64encode(b"u:").decode()])
async def test_malformed_authorization_is_401(upstream, gateway_factory, value):
    gw = await start(upstream, gateway_factory, keys=[ALICE])
    status, body = await post(gw.base_url, {"Authorization": value, "x-api-key": ALICE})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


async def test_refusals_and_acceptances_never_log_the_key(upstream, gateway_factory):
    gw = await start(upstream, gateway_factory, keys=[f"{ALICE} name=alice models=gpt-4o-mini"])
    wrong = "sk-wrong-key-0123456789xyz"
    with capture_logs() as logs:
        assert (await post(gw.base_url, {"Authorization": f"Bearer {wrong}"}))[0] == 401
        assert (await post(gw.base_url, {"Authorization": f"Bearer {ALICE}"}))[0] == 200
        assert (await post(gw.base_url, {"Authorization": f"Bearer {ALICE}"}, {**CHAT, "model": "gpt-4o"}))[0] == 403
    text = repr(logs)
    assert wrong not in text and ALICE not in text and wrong[5:-3] not in text
    rejected = [e for e in logs if e["event"] == "auth_rejected"]
    assert rejected and rejected[0]["key_id"] == hash_key(wrong)[:15]
    refused = [e for e in logs if e["event"] == "auth_model_refused"]
    assert refused and refused[0]["key"] == "alice"


def test_mask_key_never_shows_a_key_whole():
    assert mask_key("sk-abcdefghijklmnopqrstuvwxyz") == "sk-ab***xyz"
    assert mask_key("short-key-123") == "***"
    assert mask_key("sk-abc\x00defghijklmnopqrstuvwxyz") == "***"


# --- where keys come from ----------------------------------------------------------------------------------

async def test_keys_from_config_environment_and_file(upstream, gateway_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_GATEWAY_KEYS", f" {BOB} , {hash_key('sk-env-hashed-key-1')} ,")
    key_file = tmp_path / "api_keys.txt"
    key_file.write_text(
        "# production keys\n"
        "\n"
        f"{CAROL}   name=carol tier=tier-1   # the first customer\n"
        f"{hash_key('sk-file-hashed-key-2')} name=dave\n"
        f"# {'sk-commented-out-key-3'}\n"
        "\t\n")
    rec = Recorder()
    gw = await start(upstream, gateway_factory, plugins={"rec": rec}, extra=["rec"], keys=[ALICE],
                     keys_env="TEST_GATEWAY_KEYS", key_file=str(key_file))
    for key in (ALICE, BOB, "sk-env-hashed-key-1", CAROL, "sk-file-hashed-key-2"):
        assert (await post(gw.base_url, {"Authorization": f"Bearer {key}"}))[0] == 200, key
    assert (await post(gw.base_url, {"Authorization": "Bearer sk-commented-out-key-3"}))[0] == 401
    names = [p.name for p in rec.principals if p is not None]
    assert names[3:] == ["carol", "dave"]
    assert names[0] == "key-" + hash_key(ALICE)[7:15]  # a key without a name is named by its hash prefix
    assert rec.principals[3].tier == "tier-1"
    assert plugin_of(gw).key_count == 5


@pytest.mark.parametrize("value", ["{file}", "sk-env-key-12345678,{file}", "./api_keys.txt"])
def test_a_key_file_path_in_the_keys_variable_is_refused_not_taken_as_a_key(upstream, tmp_path, monkeypatch, value):
    """Some gateways take a key file's path in their keys variable. Taken as a key, the path would let in whoever
    guesses it, and the keys inside would not work: it is a configuration error naming ``auth.key_file``."""
    key_file = tmp_path / "api_keys.txt"
    key_file.write_text(f"{CAROL} name=carol\n")
    monkeypatch.setenv("TEST_GATEWAY_KEYS", value.format(file=key_file))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        Gateway(config_for(upstream, pipeline=[auth_entry(keys_env="TEST_GATEWAY_KEYS"), "router"]))
    message = str(info.value)
    assert "TEST_GATEWAY_KEYS" in message and "is a file path, not a key" in message and "auth.key_file" in message


def _strings(obj, seen=None):
    """Every string reachable from an object (attributes, slots, containers)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, (str, bytes)):
        yield obj
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _strings(k, seen)
            yield from _strings(v, seen)
        return
    if isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            yield from _strings(v, seen)
        return
    if attrs.has(type(obj)):
        for f in attrs.fields(type(obj)):
            yield from _strings(getattr(obj, f.name, None), seen)
    for name in getattr(type(obj), "__slots__", ()):
        yield from _strings(getattr(obj, name, None), seen)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        yield from _strings(vars(obj), seen)


@pytest.mark.parametrize("hashed", [True, False])
def test_keys_from_a_file_are_held_only_as_hashes(tmp_path, hashed):
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"{ALICE}\n{BOB} name=bob\n")
    plugin = AuthPlugin(AuthPlugin.Config(key_file=str(key_file), hash_api_keys=hashed, keys_env=None))
    held = list(_strings(plugin))
    raw_present = any(ALICE in (s if isinstance(s, str) else s.decode("latin-1")) for s in held)
    assert raw_present is (not hashed)  # the walk finds raw keys when they are held, so it can fail
    assert plugin._store.lookup(ALICE) is not None and plugin._store.lookup(BOB).name == "bob"
    assert plugin._store.lookup(ALICE[:-1]) is None and plugin._store.lookup("") is None


# --- what a key may do -------------------------------------------------------------------------------------

async def test_model_not_allowed_is_403(upstream, gateway_factory):
    gw = await start(upstream, gateway_factory, keys=[f"{ALICE} name=alice models=gpt-4o-mini,gpt-3.5-*"])
    auth = {"Authorization": f"Bearer {ALICE}"}
    assert (await post(gw.base_url, auth, {**CHAT, "model": "gpt-4o-mini"}))[0] == 200
    assert (await post(gw.base_url, auth, {**CHAT, "model": "gpt-3.5-turbo"}))[0] == 200  # wildcard
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key=ALICE, max_retries=0) as client:
        with pytest.raises(openai.PermissionDeniedError) as info:
            await client.chat.completions.create(model="gpt-4o", messages=CHAT["messages"], stream=True)
    err = info.value
    assert err.status_code == 403 and err.code == "model_not_allowed" and err.body["param"] == "model"
    assert "alice" in err.body["message"] and "gpt-4o" in err.body["message"]
    assert [r["model"] for r in upstream.requests] == ["gpt-4o-mini", "gpt-3.5-turbo"]


async def test_expired_key_is_refused(upstream, gateway_factory):
    gw = await start(upstream, gateway_factory, keys=[f"{ALICE} name=old expires=2020-01-01",
                                                      f"{BOB} name=new expires=2999-12-31T23:59:59Z"])
    status, body = await post(gw.base_url, {"Authorization": f"Bearer {ALICE}"})
    assert status == 401 and body["error"]["code"] == "expired_api_key"
    assert ALICE not in body["error"]["message"]
    assert (await post(gw.base_url, {"Authorization": f"Bearer {BOB}"}))[0] == 200


async def test_optional_key_lets_anonymous_requests_through_but_not_wrong_keys(upstream, gateway_factory):
    rec = Recorder()
    gw = await start(upstream, gateway_factory, plugins={"rec": rec}, extra=["rec"], keys=[ALICE],
                     require_api_key=False)
    assert (await post(gw.base_url))[0] == 200
    assert (await post(gw.base_url, {"x-api-key": "sk-not-a-known-key-000"}))[0] == 401
    assert (await post(gw.base_url, {"x-api-key": ALICE}))[0] == 200
    assert rec.principals[0] is None and rec.principals[2].name.startswith("key-")


# --- the key file: problems and reloads --------------------------------------------------------------------

@pytest.mark.parametrize("line, message", [
    (f"{ALICE} teir=tier-1", "unknown attribute 'teir'"),
    (f"{ALICE} rpm=fast", "rpm='fast' is not an integer"),
    (f"{ALICE} rpm=0", "rpm=0 must be between 1"),
    (f"{ALICE} expires=tomorrow", "expires='tomorrow' is not an ISO date"),
    (f"{ALICE} name", "expected name=value, got 'name'"),
    ("sha256:abc name=x", "64 hex digits"),
    ("short", "shorter than 8 characters"),
    (f"{ALICE}\n{ALICE} name=again", "the same key is also listed at"),
])
def test_a_bad_key_file_is_a_config_error_naming_file_and_line(tmp_path, line, message):
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"# header\n{line}\n")
    entry = auth_entry(key_file=str(key_file))
    with pytest.raises(PluginLoadError) as info:
        load_plugins((PipelineEntry(entry.name, entry.config),), new_plugin_manager())
    text = str(info.value)
    assert message in text and f"{key_file}:2" in text
    assert ALICE not in text


def test_parse_line_reads_every_attribute():
    record = parse_line(f"  {ALICE}\tname=alice tier=tier-3 models=a,b* expires=2027-01-01 rpm=200 tpm=20_000 "
                        "rpm_burst=10 tpm_burst=5000  # note")
    assert record is not None
    assert (record.name, record.tier, record.models) == ("alice", "tier-3", ("a", "b*"))
    assert record.limits == {"rpm": 200, "tpm": 20000, "rpm_burst": 10, "tpm_burst": 5000}
    assert record.expires == 1798761600.0  # 2027-01-01T00:00:00Z
    assert parse_line("   # only a comment") is None and parse_line("") is None
    with pytest.raises(KeyFileError):
        parse_line("name=alice sk-key-after-attribute")


def _replace(path, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


async def test_key_file_reloads_while_requests_flow(upstream, gateway_factory, tmp_path):
    """Keys removed from the file stop working, added ones start, with no other status in between;
    a broken file keeps the previous keys."""
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"{ALICE} name=alice\n")
    gw = await start(upstream, gateway_factory, key_file=str(key_file), watch_interval=0.05)
    plugin = plugin_of(gw)
    results: list[tuple[str, float, float, int]] = []  # (key name, sent at, answered at, status)
    changed_at: list[float] = []
    stop_flag = asyncio.Event()

    async def client(key: str, name: str) -> None:
        async with aiohttp.ClientSession() as s:
            for _ in range(400):  # bounded in count ...
                if stop_flag.is_set():
                    return
                sent = time.monotonic()
                async with s.post(gw.base_url + "/chat/completions", json=CHAT,
                                  headers={"Authorization": f"Bearer {key}"}) as resp:
                    await resp.read()
                    results.append((name, sent, time.monotonic(), resp.status))
                await asyncio.sleep(0.005)

    async def editor() -> None:
        await asyncio.sleep(0.2)
        changed_at.append(time.monotonic())
        _replace(key_file, f"# alice revoked\n{BOB} name=bob\n")
        deadline = time.monotonic() + 10  # ... and in time
        while time.monotonic() < deadline:
            if any(n == "bob" and s == 200 for n, _, _, s in results) and \
                    any(n == "alice" and s == 401 for n, _, _, s in results):
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        stop_flag.set()

    await asyncio.gather(client(ALICE, "alice"), client(BOB, "bob"), editor())
    assert {s for *_, s in results} <= {200, 401}
    before = [(n, s) for n, _, answered, s in results if answered < changed_at[0]]
    assert ("alice", 200) in before and all(s == (200 if n == "alice" else 401) for n, s in before)
    # once a refusal of alice's key was seen, every later request with it is refused (no flapping back)
    first_refusal = min(answered for n, _, answered, s in results if n == "alice" and s == 401)
    assert all(s == 401 for n, sent, _, s in results if n == "alice" and sent > first_refusal)
    first_bob = min(answered for n, _, answered, s in results if n == "bob" and s == 200)
    assert all(s == 200 for n, sent, _, s in results if n == "bob" and sent > first_bob)
    assert plugin.reloads >= 1

    # a broken file (invalid line) keeps the previous keys and logs why
    with capture_logs() as logs:
        _replace(key_file, f"{ALICE} name=alice\n{CAROL} tier tier-1\n")
        for _ in range(200):
            if plugin.reload_errors:
                break
            await asyncio.sleep(0.02)
    assert plugin.reload_errors == 1 and "keys.txt:2" in plugin.last_error
    assert (await post(gw.base_url, {"Authorization": f"Bearer {BOB}"}))[0] == 200
    assert (await post(gw.base_url, {"Authorization": f"Bearer {ALICE}"}))[0] == 401
    failed = [e for e in logs if e["event"] == "auth_keys_reload_failed"]
    assert failed and failed[0]["log_level"] == "error" and ALICE not in repr(failed) and CAROL not in repr(failed)

    # an in-place rewrite (truncate, then write) is picked up too
    with open(key_file, "w") as f:
        f.write(f"{CAROL} name=carol\n")
    for _ in range(200):
        if (await post(gw.base_url, {"Authorization": f"Bearer {CAROL}"}))[0] == 200:
            break
        await asyncio.sleep(0.02)
    assert (await post(gw.base_url, {"Authorization": f"Bearer {CAROL}"}))[0] == 200
    assert (await post(gw.base_url, {"Authorization": f"Bearer {BOB}"}))[0] == 401


def test_sighup_reloads_the_key_file_of_a_running_gateway(tmp_path):
    """With polling off, the key file is re-read on SIGHUP (the config reload), and only then."""
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"{ALICE} name=alice\n")
    config = tmp_path / "gw.yaml"
    config.write_text(f"""\
logging: {{level: warning}}
providers:
  - {{name: sim, type: simulated, simulation: {{ttft_ms: 1, itl_ms: 0}}}}
pipeline:
  - auth: {{key_file: "{key_file}", watch_interval: 0, keys_env: null}}
  - router
""")
    proc, line = spawn([sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", "0"],
                       "ssegate listening on")
    url = line.rsplit(" ", 1)[-1] + "/v1"
    try:
        def status(key: str) -> int:
            client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
            try:
                client.chat.completions.create(model="gpt-4o-mini", messages=CHAT["messages"], max_tokens=2)
                return 200
            except openai.APIStatusError as exc:
                return exc.status_code
            finally:
                client.close()

        assert status(ALICE) == 200 and status(BOB) == 401
        _replace(key_file, f"{BOB} name=bob\n")
        time.sleep(0.5)
        assert status(ALICE) == 200 and status(BOB) == 401  # no polling: nothing changed yet
        proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            if status(BOB) == 200:
                break
            time.sleep(0.05)
        assert status(BOB) == 200 and status(ALICE) == 401
        assert proc.poll() is None
    finally:
        stop(proc)


# --- ssegate keys ------------------------------------------------------------------------------------------

def _keys_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "keys", *args], capture_output=True, text=True,
                          cwd=REPO, input=stdin, timeout=60)


async def test_keys_cli_generates_hashes_and_checks_keys_the_gateway_accepts(upstream, gateway_factory, tmp_path):
    generated = _keys_cli("generate", "--prefix", "sk-prod-", "--count", "3")
    assert generated.returncode == 0, generated.stderr
    keys = generated.stdout.split()
    assert len(keys) == 3 and len(set(keys)) == 3 and all(k.startswith("sk-prod-") and len(k) > 40 for k in keys)

    hashed = _keys_cli("hash", keys[0], keys[1])
    assert hashed.stdout.split() == [hash_key(keys[0]), hash_key(keys[1])]

    plain = f"# team keys\n{keys[0]} name=alice tier=tier-1\n\n{keys[1]}  # no name\n{hash_key(keys[2])} name=c\n"
    converted = _keys_cli("hash", stdin=plain)
    assert converted.returncode == 0, converted.stderr
    assert not any(k in converted.stdout for k in keys)
    assert converted.stdout.splitlines() == [
        "# team keys", f"{hash_key(keys[0])} name=alice tier=tier-1", "", f"{hash_key(keys[1])}  # no name",
        f"{hash_key(keys[2])} name=c"]
    key_file = tmp_path / "hashed.txt"
    key_file.write_text(converted.stdout)
    checked = _keys_cli("check", str(key_file))
    assert checked.returncode == 0 and "3 keys" in checked.stdout

    gw = await start(upstream, gateway_factory, key_file=str(key_file))
    for key in keys:
        assert (await post(gw.base_url, {"Authorization": f"Bearer {key}"}))[0] == 200
    assert (await post(gw.base_url, {"Authorization": f"Bearer {keys[0]}x"}))[0] == 401

    key_file.write_text(f"{keys[0]} colour=blue\n")
    bad = _keys_cli("check", str(key_file))
    assert bad.returncode == 1 and f"{key_file}:1: unknown attribute 'colour'" in bad.stderr
    assert keys[0] not in bad.stderr


async def test_models_list_only_what_the_key_may_use(gateway_factory):
    from proxy.config.schema import Config, ProviderConfig, SimulationConfig

    config = Config(providers=(ProviderConfig(name="sim", type="simulated", simulation=SimulationConfig(
        models=("gpt-4o", "gpt-4o-mini", "claude-3-haiku"))),),
        pipeline=(auth_entry(keys=[f"{ALICE} models=gpt-4o*", BOB], keys_env=None), PipelineEntry("router")))
    gw = await gateway_factory(config)
    for key, expected in ((ALICE, ["gpt-4o", "gpt-4o-mini"]), (BOB, ["gpt-4o", "gpt-4o-mini", "claude-3-haiku"])):
        client = openai.AsyncOpenAI(base_url=gw.base_url, api_key=key, max_retries=0)
        assert [m.id async for m in client.models.list()] == expected
        await client.close()
