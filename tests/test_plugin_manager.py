"""Finding, configuring and refusing plugins."""
from __future__ import annotations

import sys
import textwrap

import pytest

from proxy.config.load import ConfigError, load_layers, structure
from proxy.config.schema import Config, PipelineEntry
from proxy.plugin_manager import PluginLoadError, load_plugins, new_plugin_manager


def load(*entries):
    pm = new_plugin_manager()
    return pm, load_plugins(tuple(e if isinstance(e, PipelineEntry) else PipelineEntry(e) for e in entries), pm)


def test_builtin_module_and_class_plugins_register_in_order():
    pm, loaded = load("router", "tests.sample_plugins.audit", PipelineEntry("tests.sample_plugins.audit:Audit",
                                                                             {"tag": "x"}))
    assert [p.name for p in loaded] == ["router", "tests.sample_plugins.audit", "tests.sample_plugins.audit:Audit"]
    assert loaded[2].config.tag == "x" and loaded[2].config.level == "info"
    assert pm.get_plugin("router") is loaded[0].obj


@pytest.mark.parametrize("entry,message", [
    ("tests.sample_plugins.audit:UnknownHook", "implements 'on_chunks', which is not a ssegate hook"),
    ("tests.sample_plugins.audit:UnknownArgument", "invalid hook implementation"),
    ("tests.sample_plugins.audit:Wrapper", "hook wrappers are not supported"),
    ("tests.sample_plugins.audit:TryFirst", "check_request: tryfirst/trylast have no effect here; the order of the "
                                            "config's pipeline: list is the call order"),
    ("tests.sample_plugins.audit:AsyncChunk", "on_chunk must be synchronous"),
    ("tests.sample_plugins.audit:Missing", "has no attribute 'Missing'"),
    ("tests.no_such_module:X", "cannot import plugin module 'tests.no_such_module'"),
    ("nothing_by_that_name", "no plugin named 'nothing_by_that_name'"),
    ("tests.sample_plugins.audit:NeedsNewerHookApi",
     "needs hook API 1.99, but this ssegate provides hook API 1.1: upgrade ssegate"),
    ("tests.sample_plugins.audit:NeedsOtherMajorHookApi", "use a release of the plugin made for hook API 1.x"),
    ("tests.sample_plugins.audit:MalformedHookApi", "requires_hook_api = 'one' is not a version"),
])
def test_bad_plugins_are_refused_with_a_clear_message(entry, message):
    with pytest.raises(PluginLoadError) as info:
        load(entry)
    assert message in str(info.value)
    assert f"pipeline[0].{entry}" in str(info.value)


def test_a_plugin_stating_this_hook_api_loads():
    pm, loaded = load("tests.sample_plugins.audit:NeedsThisHookApi")
    assert loaded[0].obj.requires_hook_api == "1.0"


def test_settings_for_a_plugin_without_config_class_are_refused():
    with pytest.raises(PluginLoadError, match="takes no settings"):
        load(PipelineEntry("tests.sample_plugins.audit", {"x": 1}))


def test_listed_twice_is_refused():
    with pytest.raises(PluginLoadError, match="listed twice"):
        load("router", "router")


def test_plugin_config_errors_carry_file_line_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent("""\
        pipeline:
          - router
          - tests.sample_plugins.audit:Audit:
              level: 3
              colour: red
        """))
    data, origins = load_layers(str(path), env={})
    config = structure(data, Config, origins)
    with pytest.raises(ConfigError) as info:
        load_plugins(config.pipeline, new_plugin_manager(), origins)
    found = {(p.line, p.key) for p in info.value.problems}
    assert (4, "pipeline[1].tests.sample_plugins.audit:Audit.level") in found
    assert (5, "pipeline[1].tests.sample_plugins.audit:Audit.colour") in found


def test_entry_point_plugins_are_found_by_name(tmp_path, monkeypatch):
    """A real installed distribution (a dist-info on sys.path) registering a plugin in the `ssegate` group."""
    pkg = tmp_path / "acme_plugin.py"
    pkg.write_text("from proxy import hookimpl\n\nclass Acme:\n    @hookimpl\n    def check_request(self, exchange):\n"
                   "        exchange.state['acme'] = True\n")
    dist = tmp_path / "acme_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ssegate]\nacme = acme_plugin:Acme\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    pm, loaded = load("acme", "router")
    assert type(loaded[0].obj).__name__ == "Acme"
    assert "acme_plugin" in sys.modules


@pytest.mark.parametrize("target,error", [("acme_missing_module:Acme", "ModuleNotFoundError: No module named "
                                                                      "'acme_missing_module'"),
                                          ("acme_broken:Nope", "AttributeError")])
def test_a_broken_entry_point_is_a_config_problem_with_file_line_and_key(tmp_path, monkeypatch, target, error):
    (tmp_path / "acme_broken.py").write_text("class Acme:\n    pass\n")
    dist = tmp_path / "acme_broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[ssegate]\nbroken = {target}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "ssegate.yaml"
    path.write_text("providers:\n  - {name: a, base_url: 'http://127.0.0.1:9/v1'}\npipeline:\n  - broken\n  - router\n")
    data, origins = load_layers(str(path), env={})
    config = structure(data, Config, origins)
    with pytest.raises(ConfigError) as info:
        load_plugins(config.pipeline, new_plugin_manager(), origins)
    [problem] = info.value.problems
    assert (problem.file, problem.line, problem.key) == (str(path), 4, "pipeline[0].broken")
    assert f"cannot load plugin 'broken' of the 'ssegate' entry-point group ({target}): {error}" in problem.message
