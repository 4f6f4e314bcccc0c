"""The layered, line-aware config loader (proxy.config.load)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import attrs
import pytest

from proxy.config import (
    Config,
    ConfigError,
    ConfigProblem,
    Origins,
    PipelineEntry,
    ProviderConfig,
    converter,
    load_config,
    load_layers,
    structure,
)
from proxy.config.load import PROVIDER_TYPES

REPO_ROOT = Path(__file__).resolve().parent.parent

BRIEF_SHAPE = """\
server: {host: 127.0.0.1, port: 8000}
providers:
  - name: local
    type: openai            # any OpenAI-compatible server; also: simulated (in-process)
    base_url: http://127.0.0.1:9100/v1
    api_key_env: LOCAL_API_KEY
    models: ["*"]
    priority: 1
pipeline:
  - router
  - mypkg.plugins:Audit: {level: info}
"""

SEED_PROVIDERS = """\
providers:
  - name: primary
    type: openai
    base_url: https://api.example.com/v1
    api_key_env: OPENAI_API_KEY
    models: [gpt-4o, "gpt-4*"]
    enabled: true
    priority: 1
    timeout: 30
    retry_attempts: 2
    rate_limit: 2000
    max_connections: 50
    max_keepalive_connections: 20
    keepalive_expiry: 15.5
  - name: backup
    type: openai
    base_url: http://10.0.0.7:8000/v1
    enabled: false
    priority: 2
    timeout: 120.0
    retry_attempts: 0
    max_connections: 10
    max_keepalive_connections: 10
    keepalive_expiry: 5
"""


def write(directory: Path, name: str, text: str) -> str:
    path = directory / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def line_of(path: str, needle: str) -> int:
    """1-based line of the first line of the file containing needle."""
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


def problems(path: str | None, **kwargs) -> list[ConfigProblem]:
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load_config(path, **kwargs)
    return info.value.problems


def only_problem(path: str | None, **kwargs) -> ConfigProblem:
    found = problems(path, **kwargs)
    assert len(found) == 1, found
    return found[0]


# --- loading what should load ------------------------------------------------------------------------------


def test_brief_shape_loads(tmp_path):
    config = load_config(write(tmp_path, "ssegate.yaml", BRIEF_SHAPE), env={})
    assert isinstance(config, Config)
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8000)
    (provider,) = config.providers
    assert provider == ProviderConfig(
        name="local", type="openai", base_url="http://127.0.0.1:9100/v1", api_key_env="LOCAL_API_KEY",
        models=("*",), priority=1,
    )
    assert config.pipeline == (
        PipelineEntry("router"),
        PipelineEntry("mypkg.plugins:Audit", config={"level": "info"}),
    )
    assert type(config.pipeline[1].config) is dict
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.server = None  # type: ignore[misc]


def test_seed_style_provider_blocks_load(tmp_path):
    config = load_config(write(tmp_path, "c.yaml", SEED_PROVIDERS), env={})
    primary, backup = config.providers
    assert primary.models == ("gpt-4o", "gpt-4*")
    assert primary.enabled is True and backup.enabled is False
    assert primary.timeout == 30.0 and type(primary.timeout) is float  # an int is accepted for a float
    assert (primary.retry_attempts, primary.max_connections, primary.max_keepalive_connections) == (2, 50, 20)
    assert primary.keepalive_expiry == 15.5 and primary.rate_limit == 2000 and backup.rate_limit is None
    assert (backup.priority, backup.timeout, backup.keepalive_expiry) == (2, 120.0, 5.0)
    assert config.pipeline == (PipelineEntry("router"),)  # the schema default


def test_optional_fields_accept_null_and_empty_sections_mean_defaults(tmp_path):
    path = write(tmp_path, "c.yaml", """\
        server:
        streaming:
        providers:
          - name: a
            type: simulated
            api_key: null
            first_token_timeout: ~
            headers:
            simulation: {seed: null}
        """)
    config = load_config(path, env={})
    assert config.server == Config().server
    assert config.providers[0].api_key is None and config.providers[0].first_token_timeout is None
    assert config.providers[0].headers == {}


def test_empty_file_is_an_empty_mapping(tmp_path):
    assert load_config(write(tmp_path, "c.yaml", "# nothing yet\n"), env={}) == Config()
    assert load_layers(write(tmp_path, "d.yaml", ""), env={})[0] == {}


def test_embedded_default():
    config = load_config(env={})
    assert config == Config(providers=(ProviderConfig(name="simulated", type="simulated", models=("*",)),))


def test_embedded_default_still_applies_env_overrides():
    config = load_config(env={"SSEGATE_SERVER__PORT": "9001", "SSEGATE_PROVIDERS__0__PRIORITY": "3"})
    assert config.server.port == 9001
    assert config.providers[0].priority == 3
    problem = only_problem(None, env={"SSEGATE_SERVER__PORT": "99999"})
    assert (problem.file, problem.line, problem.key) == ("environment SSEGATE_SERVER__PORT", None, "server.port")


# --- type and key problems ---------------------------------------------------------------------------------


def test_unknown_key_has_file_line_key_and_suggestion(tmp_path):
    path = write(tmp_path, "c.yaml", SEED_PROVIDERS.replace("    timeout: 120.0", "    timout: 120.0"))
    problem = only_problem(path)
    assert problem.file == path
    assert problem.line == line_of(path, "timout")
    assert problem.key == "providers[1].timout"
    assert problem.message == "unknown key 'timout' (did you mean 'timeout'?)"
    assert str(problem) == f"{path}:{problem.line}: providers[1].timout: unknown key 'timout' (did you mean 'timeout'?)"


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    path = write(tmp_path, "c.yaml", "streaming: {zzz: 1}\n")
    problem = only_problem(path)
    assert (problem.line, problem.key) == (1, "streaming.zzz")
    assert "valid keys: keepalive, keepalive_interval" in problem.message


def test_unknown_top_level_section(tmp_path):
    path = write(tmp_path, "c.yaml", "server: {}\nlogs: {level: debug}\n")
    problem = only_problem(path)
    assert (problem.line, problem.key) == (2, "logs")
    assert "did you mean 'logging'?" in problem.message


@pytest.mark.parametrize(
    ("line_text", "key", "message"),
    [
        ("  port: abc", "server.port", "expected an integer, got 'abc'"),
        ("  port: 80.5", "server.port", "expected an integer, got 80.5"),
        ("  port: true", "server.port", "expected an integer, got true"),
        ('    timeout: "30"', "providers[0].timeout", "expected a number, got '30' (remove the quotes)"),
        ("    timeout: false", "providers[0].timeout", "expected a number, got false"),
        ('    enabled: "yes"', "providers[0].enabled", "expected a boolean (true or false), got 'yes'"),
        ("    enabled: 1", "providers[0].enabled", "expected a boolean (true or false), got 1"),
        ("    models: gpt-4", "providers[0].models", "expected a list, got 'gpt-4' (write [gpt-4] for a list of one)"),
        ("    models: {a: 1}", "providers[0].models", "expected a list, got a mapping"),
        ("    name: 5", "providers[0].name", "expected a string, got 5 (strings only: put the value in quotes)"),
        ("    headers: {X-Retries: 3}", "providers[0].headers.X-Retries", "expected a string, got 3 (strings only"),
        ("    simulation: fast", "providers[0].simulation", "expected a mapping, got 'fast'"),
    ],
)
def test_wrong_types_are_problems_with_line_and_key(tmp_path, line_text, key, message):
    field = line_text.split(":")[0].strip()
    provider = {
        "name": "    name: local",
        "timeout": "    timeout: 10",
        "enabled": "    enabled: true",
        "models": '    models: ["*"]',
        "headers": "    headers: {}",
        "simulation": "    simulation: {}",
    }
    lines = ["server:", "  host: 127.0.0.1", "  port: 8000", "providers:", "  - type: simulated"]
    lines += [line_text if name == field else text for name, text in provider.items()]
    if field == "port":
        lines[2] = line_text
    path = write(tmp_path, "c.yaml", "\n".join(lines) + "\n")
    problem = only_problem(path)
    assert problem.key == key
    assert problem.line == lines.index(line_text) + 1
    assert problem.message.startswith(message)


def test_strict_converter_is_exported():
    assert converter.structure(3, float) == 3.0
    for value, cls in [("3", int), (5, str), ("no", bool), (True, int), (True, float), ("ab", tuple[str, ...])]:
        with pytest.raises(Exception):
            converter.structure(value, cls)


def test_missing_required_key_points_at_the_mapping(tmp_path):
    path = write(tmp_path, "c.yaml", """\
        providers:
          - type: simulated
            models: ["*"]
        """)
    problem = only_problem(path)
    assert (problem.line, problem.key, problem.message) == (2, "providers[0].name", "missing required key 'name'")


def test_several_problems_are_reported_together(tmp_path):
    path = write(tmp_path, "c.yaml", """\
        server:
          port: abc
          hots: 0.0.0.0
        providers:
          - name: a
            type: simulated
            timeout: "30"
            enabled: "yes"
        pipeline:
          - {}
        """)
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    found = [(p.line, p.key) for p in info.value.problems]
    assert found == [
        (2, "server.port"),
        (3, "server.hots"),
        (7, "providers[0].timeout"),
        (8, "providers[0].enabled"),
        (10, "pipeline[0]"),
    ]
    text = str(info.value)
    assert text.splitlines() == [str(p) for p in info.value.problems]
    assert "did you mean 'host'?" in text


# --- pipeline entries and plugin configuration -------------------------------------------------------------


def test_pipeline_entry_forms(tmp_path):
    path = write(tmp_path, "c.yaml", """\
        pipeline:
          - router
          - pkg.mod:Plugin:
          - other:
              a: 1
              b: [x]
        """)
    assert load_config(path, env={}).pipeline == (
        PipelineEntry("router"),
        PipelineEntry("pkg.mod:Plugin", None),
        PipelineEntry("other", {"a": 1, "b": ["x"]}),
    )


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("- 5", "expected a plugin name or a one-key mapping"),
        ("- [router]", "expected a plugin name or a one-key mapping"),
        ("- {a: {}, b: {}}", "with 2 keys"),
        ("- audit: 3", "the configuration of plugin 'audit' must be a mapping, got 3"),
        ("- ''", "the plugin name is empty"),
    ],
)
def test_bad_pipeline_entries(tmp_path, entry, message):
    path = write(tmp_path, "c.yaml", f"pipeline:\n  - router\n  {entry}\n")
    problem = only_problem(path)
    assert (problem.line, problem.key) == (3, "pipeline[1]")
    assert message in problem.message


def test_plugin_config_structured_with_base_path_locates_its_keys(tmp_path):
    @attrs.frozen
    class Audit:
        level: str = "info"
        sample: float = 1.0

    path = write(tmp_path, "c.yaml", """\
        pipeline:
          - router
          - mypkg.plugins:Audit:
              level: 3
              sampel: 0.5
        """)
    data, origins = load_layers(path, env={})
    base = ("pipeline", 1, "mypkg.plugins:Audit")
    with pytest.raises(ConfigError) as info:
        structure(data["pipeline"][1]["mypkg.plugins:Audit"], Audit, origins, base_path=base)
    assert [(p.file, p.line, p.key) for p in info.value.problems] == [
        (path, 4, "pipeline[1].mypkg.plugins:Audit.level"),
        (path, 5, "pipeline[1].mypkg.plugins:Audit.sampel"),
    ]
    assert info.value.problems[1].message == "unknown key 'sampel' (did you mean 'sample'?)"
    assert structure({"level": "debug"}, Audit, origins, base_path=base) == Audit(level="debug")


# --- semantic checks ---------------------------------------------------------------------------------------


def test_duplicate_provider_names(tmp_path):
    path = write(tmp_path, "c.yaml", """\
        providers:
          - name: a
            type: simulated
          - name: b
            type: simulated
          - name: a
            type: simulated
        """)
    problem = only_problem(path)
    assert (problem.line, problem.key) == (6, "providers[2].name")
    assert problem.message == "duplicate provider name 'a' (also used by providers[0])"


def test_provider_type_and_base_url_checks(tmp_path, monkeypatch):
    path = write(tmp_path, "c.yaml", """\
        providers:
          - name: a
            type: opnai
          - name: b
          - name: c
            base_url: ftp://example.com
          - name: d
            type: simulated
        """)
    found = {p.key: (p.line, p.message) for p in problems(path)}
    assert found == {
        "providers[0].type": (3, "unknown provider type 'opnai' (did you mean 'openai'?)"),
        "providers[1].base_url": (4, "required for providers of type 'openai'"),
        "providers[2].base_url": (6, "must start with http:// or https://, got 'ftp://example.com'"),
    }
    monkeypatch.setattr("proxy.config.load.PROVIDER_TYPES", PROVIDER_TYPES | {"opnai"})
    assert {p.key for p in problems(path)} == {"providers[0].base_url", "providers[1].base_url",
                                                "providers[2].base_url"}


def test_range_checks(tmp_path):
    path = write(tmp_path, "c.yaml", """\
        server: {port: 70000, workers: 0}
        logging: {format: xml, level: loud, levels: {aiohttp: chatty}}
        streaming: {keepalive_interval: 0}
        providers:
          - name: a
            type: simulated
            priority: 0
            timeout: -1
            idle_timeout: 0
            retry_attempts: -1
            simulation: {error_rate: 2}
        """)
    found = {p.key: p.message for p in problems(path)}
    assert found["server.port"] == "must be between 0 and 65535, got 70000"
    assert found["logging.format"] == "must be one of auto, json, console, got 'xml'"
    assert set(found) == {
        "server.port", "server.workers", "logging.format", "logging.level", "logging.levels.aiohttp",
        "streaming.keepalive_interval", "providers[0].priority", "providers[0].timeout",
        "providers[0].idle_timeout", "providers[0].retry_attempts", "providers[0].simulation.error_rate",
    }


# --- layers ------------------------------------------------------------------------------------------------


def test_environment_layer_merges_and_locates_its_problems(tmp_path):
    base = write(tmp_path, "gw.yaml", BRIEF_SHAPE)
    overlay = write(tmp_path, "gw.production.yaml", """\
        server:
          port: 9000
        logging: {format: json}
        pipeline: [router]
        """)
    config = load_config(base, env={"SSEGATE_ENVIRONMENT": "production"})
    assert (config.server.host, config.server.port) == ("127.0.0.1", 9000)  # mappings merge key by key
    assert config.logging.format == "json"
    assert config.pipeline == (PipelineEntry("router"),)  # lists replace
    assert config.providers[0].name == "local"
    assert load_config(base, env={}).server.port == 8000  # no environment, no layer
    assert load_config(base, environment="production", env={}).server.port == 9000

    Path(overlay).write_text("server:\n  port: 9000\nproviders:\n  - name: local\n    timeout: abc\n")
    problem = only_problem(base, environment="production")
    assert (problem.file, problem.line, problem.key) == (overlay, 5, "providers[0].timeout")
    assert str(problem).startswith(f"{overlay}:5: providers[0].timeout: expected a number")


def test_environment_layer_origins_replace_the_base_subtree(tmp_path):
    base = write(tmp_path, "gw.yaml", BRIEF_SHAPE)
    overlay = write(tmp_path, "gw.staging.yaml", "\n\nproviders:\n  - name: other\n")
    data, origins = load_layers(base, environment="staging", env={})
    assert origins.get(("server", "port")) == (base, 1)
    assert origins.get(("providers", 0)) == (overlay, 4)
    assert origins.get(("providers", 0, "base_url")) is None  # the base's provider is gone
    assert origins.locate(("providers", 0, "base_url")) == (overlay, 4)


def test_missing_environment_layer_is_ignored(tmp_path):
    base = write(tmp_path, "gw.yaml", BRIEF_SHAPE)
    assert load_config(base, environment="nowhere", env={}).server.port == 8000


def test_env_var_override(tmp_path):
    base = write(tmp_path, "gw.yaml", BRIEF_SHAPE)
    env = {
        "SSEGATE_SERVER__PORT": "9001",
        "SSEGATE_STREAMING__KEEPALIVE": "false",
        "SSEGATE_providers__0__Models": "[gpt-4o, o1]",
        "SSEGATE_LOGGING": "{format: json, levels: {aiohttp: debug}}",
        "SSEGATE_LOGGING__LEVEL": "warning",
        "SSEGATE_ENVIRONMENT": "",
        "SSEGATE_CONFIG": "/elsewhere.yaml",
        "SSEGATE_UNRELATED": "x",
    }
    config = load_config(base, env=env)
    assert config.server.port == 9001 and config.server.host == "127.0.0.1"
    assert config.streaming.keepalive is False
    assert config.providers[0].models == ("gpt-4o", "o1")
    assert (config.logging.format, config.logging.level, config.logging.levels) == ("json", "warning",
                                                                                    {"aiohttp": "debug"})


def test_env_var_problems_name_the_variable(tmp_path):
    base = write(tmp_path, "gw.yaml", BRIEF_SHAPE)
    problem = only_problem(base, env={"SSEGATE_SERVER__PORT": "abc"})
    assert (problem.file, problem.line, problem.key) == ("environment SSEGATE_SERVER__PORT", None, "server.port")
    assert str(problem) == "environment SSEGATE_SERVER__PORT: server.port: expected an integer, got 'abc'"
    problem = only_problem(base, env={"SSEGATE_PROVIDERS__3__TIMEOUT": "1"})
    assert (problem.file, problem.key) == ("environment SSEGATE_PROVIDERS__3__TIMEOUT", "providers[3].timeout")
    assert "'3' is not one of its indexes" in problem.message
    problem = only_problem(base, env={"SSEGATE_PROVIDERS__0__MODELS": "[a, b"})  # a YAML list, unclosed
    assert problem.message == ("expected a list, got '[a, b' (it starts like a list but is not a valid one: check "
                               "its brackets and quotes)")


def test_load_layers_is_generic_about_sections(tmp_path):
    base = write(tmp_path, "any.yaml", "a: {b: 1}\n")
    env = {"SSEGATE_A__B": "2", "SSEGATE_C": "on"}
    assert load_layers(base, env=env)[0] == {"a": {"b": 2}, "c": "on"}
    assert load_layers(base, env=env, sections=["a"])[0] == {"a": {"b": 2}}
    assert load_layers(base, env=env, sections=[])[0] == {"a": {"b": 1}}


# --- interpolation -----------------------------------------------------------------------------------------


def test_interpolation(tmp_path):
    path = write(tmp_path, "c.yaml", """\
        server:
          host: ${BIND:-0.0.0.0}
        providers:
          - name: ${NAME}
            base_url: http://${UPSTREAM_HOST:-localhost}:${UPSTREAM_PORT:-9100}/v1
            headers:
              X-Template: $${literal}
              X-Empty: "${EMPTY:-fallback}"
        """)
    config = load_config(path, env={"NAME": "up", "UPSTREAM_PORT": "7000", "EMPTY": ""})
    assert config.server.host == "0.0.0.0"
    assert config.providers[0].name == "up"
    assert config.providers[0].base_url == "http://localhost:7000/v1"
    assert config.providers[0].headers == {"X-Template": "${literal}", "X-Empty": "fallback"}
    assert load_config(path, env={"NAME": "up", "BIND": "10.1.1.1"}).server.host == "10.1.1.1"


def test_missing_interpolation_variable_is_a_problem_with_line(tmp_path):
    path = write(tmp_path, "c.yaml", """\
        providers:
          - name: openai
            base_url: https://api.openai.com/v1
            api_key: ${OPENAI_KEY}
            headers: {X-Bad: "${not valid}"}
        """)
    found = problems(path)
    assert [(p.file, p.line, p.key) for p in found] == [
        (path, 4, "providers[0].api_key"),
        (path, 5, "providers[0].headers.X-Bad"),
    ]
    assert found[0].message == "environment variable OPENAI_KEY is not set"
    assert "malformed" in found[1].message
    with pytest.raises(ConfigError, match="OPENAI_KEY is not set"):
        load_layers(path, env={})
    fixed = path.replace("c.yaml", "d.yaml")
    Path(fixed).write_text(Path(path).read_text().replace("${not valid}", "$${not valid}"))
    config = load_config(fixed, env={"OPENAI_KEY": "sk-1"})
    assert (config.providers[0].api_key, config.providers[0].headers) == ("sk-1", {"X-Bad": "${not valid}"})


# --- file problems -----------------------------------------------------------------------------------------


def test_yaml_syntax_error_has_line(tmp_path):
    path = write(tmp_path, "c.yaml", "server:\n  host: a\n  port: [1,\n")
    problem = only_problem(path)
    assert (problem.file, problem.line, problem.key) == (path, 3, "")
    assert problem.message.startswith("YAML syntax error")
    path = write(tmp_path, "d.yaml", "server:\n  host: a\n port: 1\nlogging: {}\n")
    problem = only_problem(path)
    assert (problem.file, problem.line) == (path, 3)
    assert str(problem).startswith(f"{path}:3: YAML syntax error: ")


def test_duplicate_yaml_key_is_an_error(tmp_path):
    path = write(tmp_path, "c.yaml", "server:\n  port: 1\n  port: 2\n")
    problem = only_problem(path)
    assert (problem.file, problem.line) == (path, 3)
    assert "duplicate key" in problem.message


def test_missing_file(tmp_path):
    path = str(tmp_path / "absent.yaml")
    problem = only_problem(path)
    assert (problem.file, problem.line, problem.key, problem.message) == (path, None, "", "file not found")
    assert str(problem) == f"{path}: file not found"


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path, "c.yaml", "- router\n")
    problem = only_problem(path)
    assert problem.file == path and "top level must be a mapping" in problem.message


# --- the pieces --------------------------------------------------------------------------------------------


def test_problem_and_error_text():
    assert str(ConfigProblem("a.yaml", 3, "server.port", "bad")) == "a.yaml:3: server.port: bad"
    assert str(ConfigProblem("a.yaml", None, "", "file not found")) == "a.yaml: file not found"
    assert str(ConfigProblem(None, None, "server", "bad")) == "server: bad"
    error = ConfigError([ConfigProblem("a", 1, "x", "one"), ConfigProblem("a", 2, "y", "two")])
    assert str(error) == "a:1: x: one\na:2: y: two"


def test_origins_locate_longest_prefix():
    origins = Origins({(): ("f", None), ("providers",): ("f", 4), ("providers", 0): ("f", 5)})
    assert origins.locate(("providers", 0, "timeout")) == ("f", 5)
    assert origins.locate(("providers", 1)) == ("f", 4)
    assert origins.locate(("server", "port")) == ("f", None)
    assert Origins().locate(("x",)) == (None, None)


# --- the shipped configuration files -----------------------------------------------------------------------


def _conf_files() -> tuple[list[Path], dict[Path, list[str]]]:
    files = sorted((REPO_ROOT / "conf").glob("*.yaml"))
    bases = [f for f in files if "." not in f.stem]
    layers = {base: [f.name[len(base.stem) + 1:-len(".yaml")] for f in files
                     if f.name.startswith(base.stem + ".") and f != base] for base in bases}
    return files, layers


def test_every_conf_file_loads_with_each_layer():
    files, layers = _conf_files()
    assert layers, "no base config in conf/"
    covered = set()
    for base, names in layers.items():
        assert isinstance(load_config(str(base), env={}), Config)
        covered.add(base)
        for name in names:
            config = load_config(str(base), env={"SSEGATE_ENVIRONMENT": name})
            assert config != load_config(str(base), env={}), f"layer {name} changes nothing"
            covered.add(base.with_name(f"{base.stem}.{name}.yaml"))
    assert covered == set(files), "every conf/*.yaml is a base or a layer of one"


def test_shipped_base_config_content():
    config = load_config(str(REPO_ROOT / "conf" / "ssegate.yaml"), env={})
    by_name = {p.name: p for p in config.providers}
    assert {p.type for p in config.providers} == {"simulated", "openai"}
    (local,) = [p for p in config.providers if p.type == "openai"]
    assert (local.base_url, local.api_key_env, local.models, local.priority) == (
        "http://127.0.0.1:9100/v1", "LOCAL_API_KEY", ("*",), 2)
    assert [e.name for e in config.pipeline] == ["router"]
    assert config.pipeline[0].config["strategy"] == "priority"
    assert len(by_name) == 2
    production = load_config(str(REPO_ROOT / "conf" / "ssegate.yaml"), environment="production", env={})
    assert (production.logging.format, production.server.host) == ("json", "0.0.0.0")
    development = load_config(str(REPO_ROOT / "conf" / "ssegate.yaml"), environment="development", env={})
    assert (development.logging.format, development.logging.level) == ("console", "debug")


def test_interpolated_values_take_the_type_of_their_key(tmp_path):
    path = write(tmp_path, "c.yaml", """\
        server:
          port: ${PORT:-8000}
          max_request_size: ${MAX_BODY}
        streaming:
          keepalive: ${KEEPALIVE:-true}
          keepalive_interval: ${KA_INTERVAL:-2.5}
        """)
    config = load_config(path, env={"MAX_BODY": "1024"})
    assert (config.server.port, config.server.max_request_size) == (8000, 1024)
    assert config.streaming.keepalive is True and config.streaming.keepalive_interval == 2.5
    assert load_config(path, env={"MAX_BODY": "1", "KEEPALIVE": "false"}).streaming.keepalive is False
    found = problems(path, env={"MAX_BODY": "lots"})
    assert [(p.line, p.key) for p in found] == [(3, "server.max_request_size")]
    assert "expected an integer" in found[0].message
