"""The ssegate command, run as real processes."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import openai
import pytest

from proxy import __version__
from tests.conftest import REPO, spawn, stop


def run(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60, **kw)


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"ssegate {__version__}"


def test_check_config_accepts_the_shipped_config():
    result = run("check-config", "conf/ssegate.yaml")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_check_config_names_file_line_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent("""\
        server:
          port: eighty
        providers:
          - name: local
            type: openai
            base_url: http://127.0.0.1:9100/v1
            timout: 30
        pipeline:
          - router
          - tests.sample_plugins.audit:Audit: {levle: debug}
          - no_such_plugin
        """))
    result = run("check-config", str(path))
    assert result.returncode == 1
    err = result.stderr
    assert f"{path}:2: server.port: expected an integer" in err
    assert f"{path}:7: providers[0].timout: unknown key 'timout' (did you mean 'timeout'?)" in err
    assert f"{path}:10: pipeline[1].tests.sample_plugins.audit:Audit.levle: unknown key 'levle'" in err
    assert f"{path}:11: pipeline[2].no_such_plugin: no plugin named 'no_such_plugin'" in err


def test_check_config_reports_bad_values_beside_unknown_keys(tmp_path):
    """A misspelt key does not hide the other problems of the file: all are reported in one run."""
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent("""\
        server:
          prot: 8000
        providers:
          - name: local
            type: nonsense
            base_url: http://127.0.0.1:9100/v1
            retry_attempts: -3
            weight: -1
        """))
    result = run("check-config", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}:2: server.prot: unknown key 'prot' (did you mean 'port'?)",
        f"{path}:5: providers[0].type: unknown provider type 'nonsense' (known types: anthropic, azure_openai, "
        "openai, simulated)",
        f"{path}:7: providers[0].retry_attempts: must not be negative, got -3",
        f"{path}:8: providers[0].weight: must not be negative, got -1.0",
    ]


@pytest.mark.parametrize(("text", "env", "expected"), [
    ("server:\n  port: 80\n   host: x\n", {}, ":3: YAML syntax error: mapping values are not allowed here"),
    ("server: {port: 80}\nserver: {port: 81}\n", {}, ':2: YAML syntax error: found duplicate key "server"'),
    ("providers:\n  - name: a\n    type: openai\n    base_url: http://127.0.0.1:9/v1\n"
     "    api_key: ${SSEGATE_TEST_UNSET_VARIABLE}\n", {},
     ":5: providers[0].api_key: environment variable SSEGATE_TEST_UNSET_VARIABLE is not set"),
    ("- a\n- b\n", {}, ":1: the top level must be a mapping of sections, got a list"),
    ("providers:\n  - name: a\n    type: openai\n    base_url: http://127.0.0.1:9/v1\n",
     {"SSEGATE_PROVIDERS__5__TIMEOUT": "3"},
     "environment SSEGATE_PROVIDERS__5__TIMEOUT: providers[5].timeout: providers is a list of 1 items"),
], ids=["yaml-syntax", "duplicate-key", "missing-variable", "not-a-mapping", "env-index"])
def test_check_config_reports_files_that_do_not_load(tmp_path, text, env, expected):
    """Errors of the layers themselves (YAML, interpolation, the environment) are reported like the others:
    exit 1, file and line, no traceback."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = run("check-config", str(path), env={**os.environ, **env})
    assert result.returncode == 1, result.stdout
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_of_a_missing_file():
    result = run("check-config", "no/such/file.yaml")
    assert result.returncode == 1
    assert "no/such/file.yaml: file not found" in result.stderr and "Traceback" not in result.stderr


def test_serve_fails_fast_on_a_bad_config(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("providers: 5\n")
    result = run("serve", "--config", str(path))
    assert result.returncode == 2
    assert f"{path}:1: providers:" in result.stderr


@pytest.fixture
def embedded_gateway():
    proc, line = spawn([sys.executable, "-m", "proxy", "serve", "--port", "0"], "ssegate listening on",
                       env={"SSEGATE_PROVIDERS__0__SIMULATION__TTFT_MS": "1",
                            "SSEGATE_PROVIDERS__0__SIMULATION__ITL_MS": "1"})
    try:
        yield line.rsplit(" ", 1)[-1]
    finally:
        stop(proc)


def test_serve_embedded_default_streams_with_the_openai_sdk(embedded_gateway):
    client = openai.OpenAI(base_url=embedded_gateway + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}],
                                            stream=True, max_tokens=12, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text) > 0
    assert chunks[-1].usage.completion_tokens == 12
    assert [m.id for m in client.models.list()][:2] == ["gpt-4o-mini", "gpt-4o"]
    answer = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=5)
    assert answer.usage.completion_tokens == 5 and answer.choices[0].finish_reason == "length"
    emb = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"], dimensions=16)
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 16
    legacy = client.completions.create(model="gpt-4o-mini", prompt="Once", max_tokens=4)
    assert legacy.usage.completion_tokens == 4


def test_check_config_names_the_environment_layer_it_merged(tmp_path):
    path = tmp_path / "ssegate.yaml"
    path.write_text("providers:\n  - {name: a, type: simulated}\n")
    (tmp_path / "ssegate.production.yaml").write_text("server: {port: 9001}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSEGATE_")}
    result = run("check-config", str(path), env={**env, "SSEGATE_ENVIRONMENT": "production"})
    assert result.returncode == 0
    assert result.stdout.strip() == f"{path}: OK (1 providers, 1 plugins; merged with {tmp_path}/ssegate.production.yaml)"
    alone = run("check-config", str(path), env=env)
    assert alone.stdout.strip() == f"{path}: OK (1 providers, 1 plugins)"


def test_check_config_warns_of_what_the_environment_leaves_aside(tmp_path):
    """A layer name with no file and a variable with ``_`` for ``__`` would run the base config silently."""
    path = tmp_path / "ssegate.yaml"
    path.write_text("providers:\n  - {name: a, type: simulated}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SSEGATE_")}
    result = run("check-config", str(path), env={**env, "SSEGATE_ENVIRONMENT": "prodution",
                                                 "SSEGATE_SERVER_PORT": "9001", "SSEGATE_WORKER_RESTART_DELAY": "1"})
    assert result.returncode == 0 and "OK" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warnings == [
        f"warning: SSEGATE_ENVIRONMENT=prodution: no layer file {tmp_path}/ssegate.prodution.yaml; the base config "
        "applies alone",
        "warning: SSEGATE_SERVER_PORT is not a setting (settings are SSEGATE_<SECTION>__<KEY>): did you mean "
        "SSEGATE_SERVER__PORT? (Not if the config uses it as ${SSEGATE_SERVER_PORT}.)"]


def test_simulate_takes_its_error_status_models_and_jitter_from_the_command_line():
    """The simulator's injected errors (a 429 or 503 to test a client's retries), its model list and its latency
    jitter, as the in-process simulated provider takes them from its config."""
    import json
    import urllib.error
    import urllib.request

    from tests.conftest import spawn, stop

    proc, line = spawn([sys.executable, "-m", "proxy", "simulate", "--port", "0", "--error-rate", "1",
                        "--error-status", "503", "--models", "tiny-a, tiny-b", "--ttft-variance", "0",
                        "--itl-variance", "0"], "ssegate simulator listening on")
    base = line.rsplit(" ", 1)[-1] + "/v1"
    try:
        with urllib.request.urlopen(base + "/models", timeout=5) as resp:
            assert [m["id"] for m in json.load(resp)["data"]] == ["tiny-a", "tiny-b"]
        request = urllib.request.Request(base + "/chat/completions", method="POST",
                                         headers={"Content-Type": "application/json"},
                                         data=json.dumps({"model": "tiny-a", "messages": [
                                             {"role": "user", "content": "hi"}]}).encode())
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=5)
        assert info.value.code == 503 and "error" in json.load(info.value)
    finally:
        stop(proc)
    refused = run("simulate", "--error-status", "200")
    assert refused.returncode == 2 and "must be an HTTP error status" in refused.stderr
