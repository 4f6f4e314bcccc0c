"""HTTPS on the gateway's own listener (``server.tls_cert_file``, ``server.tls_key_file``): the official
``openai`` SDK over TLS, a certificate renewed without a restart, and the config errors. Certificates made with
the ``openssl`` command; everything on 127.0.0.1."""
from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import openai
import pytest

from proxy.app_keys import RELOADER
from proxy.config import load_config
from proxy.testing import GatewayServer
from tests.helpers import CHAT, make_certificate


def write_config(path: Path, upstream_url: str, cert: Path, key: Path) -> None:
    path.write_text(textwrap.dedent(f"""\
        server: {{admin_key: adm, tls_cert_file: "{cert}", tls_key_file: "{key}"}}
        providers:
          - {{name: up, type: openai, base_url: "{upstream_url}"}}
        """))


async def served_certificate(port: int) -> bytes:
    """The certificate a new TLS connection to ``port`` is shown (DER)."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        return writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        writer.close()


@pytest.fixture
async def https_gateway(tmp_path, upstream):
    cert, key = make_certificate(tmp_path, "first")
    path = tmp_path / "ssegate.yaml"
    write_config(path, upstream.base_url, cert, key)
    gw = await GatewayServer.start(load_config(str(path)), config_path=str(path))
    yield gw, path, cert, key
    await gw.close()


async def test_the_openai_sdk_streams_over_https(https_gateway):
    gw, _, cert, _ = https_gateway
    trusting = ssl.create_default_context(cafile=str(cert))
    client = openai.AsyncOpenAI(base_url=f"https://127.0.0.1:{gw.port}/v1", api_key="k", max_retries=0,
                                http_client=openai.DefaultAsyncHttpxClient(verify=trusting))
    stream = await client.chat.completions.create(model="m", messages=CHAT["messages"], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    whole = await client.chat.completions.create(model="m", messages=CHAT["messages"])
    await client.close()
    assert text == whole.choices[0].message.content == "Hello, world!"
    async with aiohttp.ClientSession() as session:  # no plain HTTP on the TLS port
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"http://127.0.0.1:{gw.port}/health/live") as response:
                await response.read()


async def test_a_renewed_certificate_is_served_after_a_reload_without_a_restart(https_gateway, tmp_path):
    gw, path, cert, key = https_gateway
    first = await served_certificate(gw.port)
    assert first == ssl.PEM_cert_to_DER_cert(cert.read_text())
    new_cert, new_key = make_certificate(tmp_path, "second")
    cert.write_bytes(new_cert.read_bytes())  # renewed in place, as cert-manager and certbot do
    key.write_bytes(new_key.read_bytes())
    reloader = gw.app[RELOADER]
    assert reloader.fingerprint() != reloader.seen  # the config watcher sees the renewal (the config is unchanged)
    applied, problems = await reloader.reload()
    assert applied, problems
    assert await served_certificate(gw.port) == ssl.PEM_cert_to_DER_cert(new_cert.read_text())


@pytest.mark.parametrize("case, key, says", [
    ("key only", "server.tls_key_file", "without tls_cert_file"),
    ("missing file", "server.tls_cert_file", "no such file"),
    ("key of another certificate", "server.tls_cert_file", "do not load"),
])
def test_check_config_names_a_bad_tls_setting(tmp_path, case, key, says):
    cert, _ = make_certificate(tmp_path, "a")
    _, other_key = make_certificate(tmp_path, "b")
    server = {"key only": f'tls_key_file: "{other_key}"',
              "missing file": f'tls_cert_file: "{tmp_path / "gone.crt"}", tls_key_file: "{other_key}"',
              "key of another certificate": f'tls_cert_file: "{cert}", tls_key_file: "{other_key}"'}[case]
    path = tmp_path / "ssegate.yaml"
    path.write_text(f"providers: [{{name: s, type: simulated}}]\nserver: {{{server}}}\n")
    done = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(path)], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{path}:2: {key}" in done.stderr and says in done.stderr
