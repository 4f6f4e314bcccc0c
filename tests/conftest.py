"""Shared fixtures: real servers on 127.0.0.1 (scripted upstream, gateway, simulator process), SDK clients."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import openai
import pytest

from proxy.config.schema import Config
from proxy.testing import GatewayServer, ScriptedUpstream

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    up = await ScriptedUpstream.start()
    yield up
    await up.close()


@pytest.fixture
async def upstream2() -> AsyncIterator[ScriptedUpstream]:
    up = await ScriptedUpstream.start()
    yield up
    await up.close()


@pytest.fixture
async def gateway_factory() -> AsyncIterator[Callable[..., Any]]:
    started: list[GatewayServer] = []

    async def start(config: Config, plugins: dict[str, Any] | None = None) -> GatewayServer:
        server = await GatewayServer.start(config, plugins)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.close()


def openai_client(base_url: str, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key="test-key", max_retries=0, **kw)


def spawn(args: list[str], ready_prefix: str, env: dict[str, str] | None = None,
          timeout: float = 20.0) -> tuple[subprocess.Popen[str], str]:
    """Start a process and wait for its ready line (the one starting with ready_prefix)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, **(env or {})})
    import selectors
    import time

    sel = selectors.DefaultSelector()
    assert proc.stdout is not None
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{args} exited {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        if sel.select(timeout=0.2):
            line = proc.stdout.readline()
            if line.startswith(ready_prefix):
                return proc, line.strip()
    proc.kill()
    raise RuntimeError(f"{args} did not become ready")


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def simulator_process() -> Iterator[str]:
    """``ssegate simulate`` as a real process; yields its base URL."""
    proc, line = spawn([sys.executable, "-m", "proxy", "simulate", "--port", "0", "--ttft-ms", "2", "--itl-ms", "1"],
                       "ssegate simulator listening on")
    try:
        yield line.rsplit(" ", 1)[-1] + "/v1"
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def redis_server_session():
    from tests.redis_server import RedisServer

    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server_session) -> str:
    """URL of a real, empty Redis (shared by the session, flushed for each test)."""
    redis_server_session.flush()
    return redis_server_session.url


@pytest.fixture
def redis_server():
    """A Redis of this test's own, which the test may stop and start again (outage tests)."""
    from tests.redis_server import RedisServer

    server = RedisServer().start()
    yield server
    server.stop()
