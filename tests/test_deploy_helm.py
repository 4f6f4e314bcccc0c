"""helm/ssegate: rendered and linted with Helm's own engine (helm-python-sdk, Helm's Go SDK through its C ABI;
no helm binary), every rendered manifest validated strictly against a pinned Kubernetes version, the probes
exercised on a gateway running the rendered config, values the schema rejects."""
from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import spawn, stop

helm = pytest.importorskip("helm_python", reason="pip install -e .[test] (helm-python-sdk)")
kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e .[test] (kubernetes-validate)")

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "ssegate"
KUBE_VERSION = "1.30.0"          # pinned: the oldest Kubernetes minor the chart is validated against
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}   # prometheus-operator CRDs: not in Kubernetes' own schemas

ALL_ON = {
    "replicaCount": 3,
    "image": {"repository": "registry.example.com/ssegate", "tag": "0.1.0"},
    "config": {
        "server": {"shutdown_grace_seconds": 60.0},
        "providers": [
            {"name": "openai", "type": "openai", "base_url": "https://api.openai.com/v1",
             "api_key_env": "OPENAI_API_KEY", "models": ["gpt-4o*"], "priority": 1},
            {"name": "simulated", "type": "simulated", "models": ["*"], "priority": 2},
        ],
        "pipeline": [
            {"auth": {"key_file": "/etc/ssegate-keys/api_keys.txt"}},
            {"ratelimit": {"backend": "redis", "default_tier": "tier-3"}},
            {"cache": {"backend": "redis"}},
            "router",
        ],
    },
    "ssegate": {"terminationGracePeriodSeconds": 75, "preStopSeconds": 10},
    "secrets": {"env": {"OPENAI_API_KEY": "sk-test-0000"},
                "apiKeys": "sk-test-alice-000000 name=alice tier=tier-3\n"},
    "redis": {"trial": {"enabled": True}},
    "autoscaling": {"enabled": True},
    "podDisruptionBudget": {"enabled": True},
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "prometheusRule": {"enabled": True},
    "ingress": {"enabled": True, "className": "nginx", "tls": [{"secretName": "ssegate-tls",
                                                              "hosts": ["ssegate.example.com"]}]},
    "networkPolicy": {"enabled": True},
}


def render(values: dict | None = None) -> dict[str, list[dict]]:
    """Kind -> rendered objects (NOTES.txt left out)."""
    chart = helm.Chart.load(str(CHART))
    rendered = chart.render(values, name="rel", namespace="llm", is_install=True)
    objects: dict[str, list[dict]] = {}
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.setdefault(doc["kind"], []).append(doc)
    return objects


def the(objects: dict[str, list[dict]], kind: str) -> dict:
    (obj,) = objects[kind]
    return obj


@pytest.fixture(scope="module")
def default_objects() -> dict[str, list[dict]]:
    return render()


@pytest.fixture(scope="module")
def all_on_objects() -> dict[str, list[dict]]:
    return render(ALL_ON)


@pytest.mark.parametrize("values", [None, ALL_ON], ids=["defaults", "all-features"])
def test_chart_lints_strictly(values: dict | None) -> None:
    report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert report["total_charts_linted"] == 1 and not problems, problems


def test_default_render(default_objects: dict[str, list[dict]]) -> None:
    assert set(default_objects) == {"Deployment", "Service", "ConfigMap"}


def test_all_features_render(all_on_objects: dict[str, list[dict]]) -> None:
    assert set(all_on_objects) == {"Deployment", "Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler",
                                   "PodDisruptionBudget", "ServiceMonitor", "PrometheusRule", "Ingress",
                                   "NetworkPolicy"}
    assert len(all_on_objects["Deployment"]) == 2 and len(all_on_objects["Service"]) == 2  # + trial Redis


@pytest.mark.parametrize("which", ["defaults", "all-features"])
def test_every_manifest_validates_strictly(which: str, default_objects, all_on_objects) -> None:
    objects = default_objects if which == "defaults" else all_on_objects
    for kind, items in objects.items():
        for obj in items:
            if kind in CRD_KINDS:
                continue  # checked structurally below
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
            labels = obj["metadata"]["labels"]
            for label in ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                          "app.kubernetes.io/managed-by", "helm.sh/chart"):
                assert label in labels, (kind, label)


def test_unknown_fields_are_caught_by_the_validator() -> None:
    """The strict validation above is not vacuous: a misspelt field fails it."""
    deployment = the(render(), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(Exception, match="livenesProbe"):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


def test_deployment_hardening_and_drain(all_on_objects) -> None:
    deployment = all_on_objects["Deployment"][0]
    assert deployment["metadata"]["name"] == "rel-ssegate"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert container["resources"]["requests"] and container["resources"]["limits"]
    config = yaml.safe_load(the(all_on_objects, "ConfigMap")["data"]["ssegate.yaml"])
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + config["server"]["shutdown_grace_seconds"]
    assert {c["topologyKey"] for c in pod["topologySpreadConstraints"]} >= {"kubernetes.io/hostname"}
    assert "--workers" in container["args"] and config["server"]["host"] == "0.0.0.0"
    # the image's entrypoint (`ssegate serve`) pins no port: the chart pins the one its ports and probes use
    args = container["args"]
    assert args[args.index("--port") + 1] == str(container["ports"][0]["containerPort"]) == "8000"
    assert args[args.index("--host") + 1] == "0.0.0.0" and config["server"]["port"] == 8000
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    env_from = container["envFrom"][0]["secretRef"]["name"]
    assert env_from == the(all_on_objects, "Secret")["metadata"]["name"]
    assert config["redis"]["url"] == "redis://rel-ssegate-redis:6379/0"
    assert {"rel-ssegate-redis", "rel-ssegate"} == {s["metadata"]["name"] for s in all_on_objects["Service"]}


def test_termination_grace_must_cover_the_drain() -> None:
    with pytest.raises(helm.HelmError, match="terminationGracePeriodSeconds .* must exceed"):
        render({"ssegate": {"terminationGracePeriodSeconds": 30}})


def test_config_change_rolls_the_pods_unless_reload_is_chosen() -> None:
    def annotations(values: dict | None) -> dict:
        return the(render(values), "Deployment")["spec"]["template"]["metadata"].get("annotations") or {}

    base = annotations(None)["checksum/config"]
    changed = annotations({"config": {"providers": [{"name": "sim2", "type": "simulated", "models": ["*"]}],
                                      "pipeline": ["router"]}})["checksum/config"]
    assert base != changed
    assert "checksum/config" not in annotations({"ssegate": {"configChange": "reload"}})


def test_reload_mode_has_the_gateway_watch_its_config() -> None:
    def server(values: dict | None) -> dict:
        configmap = the(render(values), "ConfigMap")
        return yaml.safe_load(configmap["data"]["ssegate.yaml"])["server"]

    assert "config_watch_interval" not in server(None)  # rollout: a change restarts the pods anyway
    assert server({"ssegate": {"configChange": "reload"}})["config_watch_interval"] == 5
    assert server({"ssegate": {"configChange": "reload"},
                   "config": {"server": {"config_watch_interval": 2}}})["config_watch_interval"] == 2


@pytest.mark.parametrize("which", ["defaults", "all-features"])
def test_rendered_config_passes_check_config(which: str, tmp_path: Path, default_objects, all_on_objects) -> None:
    objects = default_objects if which == "defaults" else all_on_objects
    text = the(objects, "ConfigMap")["data"]["ssegate.yaml"]
    secret = (objects.get("Secret") or [{}])[0].get("stringData", {})
    if "api_keys.txt" in secret:  # the Secret's key file, where the pod mounts it -> a temporary file
        (tmp_path / "api_keys.txt").write_text(secret["api_keys.txt"])
        text = text.replace("/etc/ssegate-keys/api_keys.txt", str(tmp_path / "api_keys.txt"))
    (tmp_path / "ssegate.yaml").write_text(text)
    import subprocess

    env = {**__import__("os").environ, **{k: v for k, v in secret.items() if k != "api_keys.txt"}}
    result = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(tmp_path / "ssegate.yaml")],
                            cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_probes_answer_on_a_gateway_running_the_rendered_config(tmp_path: Path, default_objects) -> None:
    """The probe paths are ssegate's real endpoints: serve the rendered ConfigMap's config (on 127.0.0.1 and a
    free port instead of the pod's 0.0.0.0:8000) and call each probe as the kubelet would."""
    (tmp_path / "ssegate.yaml").write_text(the(default_objects, "ConfigMap")["data"]["ssegate.yaml"])
    container = the(default_objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["ports"][0]["containerPort"] == 8000
    probes = {name: container[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["path"] == "/health/ready"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/health/live"
    proc, line = spawn([sys.executable, "-m", "proxy", "serve", "--config", str(tmp_path / "ssegate.yaml"),
                        "--host", "127.0.0.1", "--port", "0"], "ssegate listening on")
    try:
        base = line.rsplit(" ", 1)[-1]
        for name, probe in probes.items():
            assert probe["port"] == "http"
            with urllib.request.urlopen(base + probe["path"], timeout=5) as response:
                assert response.status == 200, name
    finally:
        stop(proc)


def test_prometheus_rule_is_the_docker_alert_rules(all_on_objects) -> None:
    docker_rules = (REPO / "docker" / "prometheus" / "alerts.yml").read_text()
    assert (CHART / "files" / "alerts.yml").read_text() == docker_rules, \
        "helm/ssegate/files/alerts.yml must be a copy of docker/prometheus/alerts.yml"
    rule = the(all_on_objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"] == yaml.safe_load(docker_rules)
    monitor = the(all_on_objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["endpoints"][0]["port"] == "http" and monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_ingress_disables_buffering_and_allows_long_streams(all_on_objects) -> None:
    annotations = the(all_on_objects, "Ingress")["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600


def _covered(path: str, prefixes: list[str]) -> bool:
    """Whether an Ingress Prefix path list routes ``path`` (Kubernetes matches Prefix element by element)."""
    return any(p == "/" or path == p.rstrip("/") or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def test_ingress_routes_the_api_only(all_on_objects) -> None:
    """By default the Ingress routes the /v1 API and nothing else: /metrics, /metrics/summary, /health (key-file
    path, provider names, errors) and /admin/reload stay inside the cluster; ingress.paths widens it."""
    from proxy.web_handlers import API_ENDPOINTS

    def prefixes(objects: dict[str, list[dict]]) -> list[str]:
        (rule,) = the(objects, "Ingress")["spec"]["rules"]
        paths = rule["http"]["paths"]
        assert {p["pathType"] for p in paths} == {"Prefix"}
        assert {p["backend"]["service"]["port"]["name"] for p in paths} == {"http"}
        return [p["path"] for p in paths]

    default = prefixes(all_on_objects)
    v1_api = [path for path, _, _ in API_ENDPOINTS if path.startswith("/v1/")]
    for path in v1_api + ["/v1/models", "/v1/models/gpt-4o", "/v1/messages/count_tokens"]:
        assert _covered(path, default), path
    for private in ("/metrics", "/metrics/summary", "/health", "/health/ready", "/health/live", "/admin/reload"):
        assert not _covered(private, default), private
    assert default == ["/v1"]
    wider = prefixes(render({**ALL_ON, "ingress": {**ALL_ON["ingress"], "paths": ["/v1", "/chat/completions"]}}))
    assert wider == ["/v1", "/chat/completions"] and not _covered("/metrics", wider)


def _policy_rules(objects: dict[str, list[dict]]) -> list[tuple[set[str], list[dict]]]:
    """The NetworkPolicy's ingress rules as (ports, peers); every rule must name its peers (a rule without
    `from` admits every source)."""
    policy = the(objects, "NetworkPolicy")
    kubernetes_validate.validate(policy, KUBE_VERSION, strict=True)
    rules = []
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), f"a rule without peers admits everyone: {rule}"
        rules.append(({str(p["port"]) for p in rule["ports"]}, rule["from"]))
    return rules


def _namespace(name: str) -> dict:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def test_network_policy_admits_the_namespace_the_ingress_controller_and_prometheus(all_on_objects) -> None:
    rules = _policy_rules(all_on_objects)
    api = [peer for ports, peers in rules if ports == {"http"} for peer in peers]
    assert {"podSelector": {}} in api and _namespace("ingress-nginx") in api
    assert _namespace("monitoring") in api  # Prometheus scrapes /metrics on the API port (no metrics_port)
    values = yaml.safe_load((CHART / "values.yaml").read_text())["networkPolicy"]
    assert (values["ingressControllerNamespace"], values["monitoringNamespace"]) == ("ingress-nginx", "monitoring")
    # other namespaces, extra peers, and none at all
    custom = render({**ALL_ON, "networkPolicy": {"enabled": True, "allowSameNamespace": False,
                                                 "ingressControllerNamespace": "traefik",
                                                 "monitoringNamespace": "observability",
                                                 "from": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]}})
    peers = [peer for _, rule_peers in _policy_rules(custom) for peer in rule_peers]
    assert peers == [_namespace("traefik"), {"ipBlock": {"cidr": "10.20.0.0/16"}}, _namespace("observability")]
    closed = render({**ALL_ON, "networkPolicy": {"enabled": True, "allowSameNamespace": False,
                                                 "ingressControllerNamespace": "", "monitoringNamespace": ""}})
    assert _policy_rules(closed) == [] and the(closed, "NetworkPolicy")["spec"]["ingress"] == []


def test_metrics_port_is_scraped_when_set(tmp_path: Path) -> None:
    """config.observability.metrics_port: the container, the Service, the ServiceMonitor and the NetworkPolicy's
    monitoring rule use it, and a gateway running the rendered config serves /metrics on it."""
    from tests.redis_server import free_port

    port = free_port()
    objects = render({**ALL_ON, "config": {**ALL_ON["config"], "observability": {"metrics_port": port}}})
    for kind in ("Deployment", "Service", "NetworkPolicy"):
        for obj in objects[kind]:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    container = objects["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "metrics", "containerPort": port, "protocol": "TCP"} in container["ports"]
    service = next(s for s in objects["Service"] if s["metadata"]["name"] == "rel-ssegate")
    assert {"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"} in service["spec"]["ports"]
    (endpoint,) = the(objects, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert ({"metrics"}, [_namespace("monitoring")]) in _policy_rules(objects)
    # without it, the ServiceMonitor scrapes the API port, which the Service has
    default = render(ALL_ON)
    assert the(default, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "http"
    assert [p["name"] for p in default["Service"][-1]["spec"]["ports"]] == ["http"]
    with pytest.raises(helm.HelmError, match="metrics_port must differ from 8000"):
        render({"config": {**ALL_ON["config"], "observability": {"metrics_port": 8000}}})
    # the rendered config really serves /metrics there
    config = yaml.safe_load(the(render({"config": {"providers": ALL_ON["config"]["providers"][1:],
                                                   "pipeline": ["router"], "observability": {"metrics_port": port}}}),
                                "ConfigMap")["data"]["ssegate.yaml"])
    config["server"].update(host="127.0.0.1", port=0)
    (tmp_path / "ssegate.yaml").write_text(yaml.safe_dump(config))
    proc, _ = spawn([sys.executable, "-m", "proxy", "serve", "--config", str(tmp_path / "ssegate.yaml")],
                    "ssegate listening on")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert b"ssegate_active_streams" in response.read()
    finally:
        stop(proc)


def test_hpa_scales_on_cpu_and_active_streams(all_on_objects) -> None:
    metrics = the(all_on_objects, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert {m["type"] for m in metrics} == {"Resource", "Pods"}
    assert any(m.get("pods", {}).get("metric", {}).get("name") == "ssegate_active_streams" for m in metrics)


@pytest.mark.parametrize("values, key", [
    ({"replicas": 3}, "replicas"),                          # unknown top-level key
    ({"ingress": {"enabled": True, "hots": "x"}}, "hots"),  # unknown nested key
    ({"replicaCount": "3"}, "replicaCount"),                # wrong type
    ({"service": {"port": 70000}}, "port"),                 # out of range
    ({"ssegate": {"configChange": "restart"}}, "configChange"),
    ({"redis": {"url": "localhost:6379"}}, "url"),
    ({"ingress": {"paths": ["v1"]}}, "paths"),
    ({"ingress": {"paths": []}}, "paths"),
    ({"networkPolicy": {"ingressControllerNamespace": "Ingress_Nginx"}}, "ingressControllerNamespace"),
    ({"config": {"providers": [{"name": "s", "type": "simulated"}], "pipeline": [],
                 "observability": {"metrics_port": 70000}}}, "metrics_port"),
])
def test_schema_rejects_bad_values_with_a_clear_error(values: dict, key: str) -> None:
    chart = helm.Chart.load(str(CHART))
    with pytest.raises(helm.HelmError) as info:
        chart.render(values, name="rel", namespace="llm")
    assert key in str(info.value), str(info.value)


def test_values_yaml_is_fully_commented() -> None:
    """Every key of values.yaml is commented: on the line above, or (for a section) on the lines just above
    or just inside it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- ") or line.startswith("    "):
            continue
        window = lines[max(0, i - 2):i + 2] if line.startswith(" ") else lines[max(0, i - 3):i + 3]
        assert any(w.strip().startswith("#") or " # " in w for w in window), f"values.yaml:{i + 1}: {line}"
