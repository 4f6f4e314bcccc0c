"""The example plugin package (examples/ssegate-redact), installed for real: pip builds and installs it into a
directory of its own, ``ssegate serve`` finds it by its entry-point name, and its own tests pass against it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.testing import Script
from tests.conftest import REPO, openai_client, spawn, stop

EXAMPLE = REPO / "examples" / "ssegate-redact"


def _builds_without_index() -> bool:
    """Whether this environment can build a setuptools wheel by itself (else pip fetches the build backend)."""
    try:
        import wheel  # noqa: F401
        return True
    except ImportError:
        import setuptools

        major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
        return (major, minor) >= (70, 1)  # bdist_wheel moved into setuptools


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """The example copied out of the tree (a build writes build/ and *.egg-info next to the sources) and
    pip-installed with --target: a site directory holding only ssegate_redact and its dist-info."""
    root = tmp_path_factory.mktemp("redact")
    source = root / "ssegate-redact"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".*"))
    site = root / "site"
    args = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
            "--target", str(site), str(source)]
    if _builds_without_index():
        args.insert(4, "--no-build-isolation")
    result = subprocess.run(args, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (site / "ssegate_redact" / "py.typed").exists()
    entry_points = next(site.glob("ssegate_redact-*.dist-info")) / "entry_points.txt"
    assert "[ssegate]\nredact = ssegate_redact:Redact" in entry_points.read_text()
    return {"site": site, "source": source}


def _env(site: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


CONFIG = """\
providers:
  - name: scripted
    type: openai
    base_url: {base_url}
pipeline:
  - redact:
      mask: "<redacted>"
  - router
"""


async def test_ssegate_serve_loads_the_installed_plugin_by_name(installed, upstream, tmp_path):
    config = tmp_path / "ssegate.yaml"
    config.write_text(CONFIG.format(base_url=upstream.base_url))
    upstream.script = Script(texts=["Reach me at bob.smith@", "exam", "ple.com or 4111 1111", " 1111 1111."])
    proc, line = spawn([sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", "0"],
                       "ssegate listening on", env=_env(installed["site"]))
    try:
        client = openai_client(line.rsplit(" ", 1)[-1] + "/v1")
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", stream=True,
            messages=[{"role": "user", "content": "I am alice@example.com, card 5500 0000 0000 0004"}])
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(pieces) == "Reach me at <redacted> or <redacted>."
        assert not any("@" in p or "4111" in p for p in pieces)  # no piece of a match leaked on its own
        assert upstream.requests[-1]["messages"][0]["content"] == "I am <redacted>, card <redacted>"
        whole = await client.chat.completions.create(model="gpt-4o-mini", messages=[
            {"role": "user", "content": "hi"}])
        assert whole.choices[0].message.content == "Reach me at <redacted> or <redacted>."
        await client.close()
    finally:
        stop(proc)


def test_a_typo_in_its_settings_is_refused_with_file_line_and_key(installed, tmp_path):
    config = tmp_path / "ssegate.yaml"
    config.write_text(CONFIG.format(base_url="http://127.0.0.1:9/v1").replace("mask:", "mask_:"))
    result = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(config)], capture_output=True,
                            text=True, timeout=60, cwd=REPO, env={**os.environ, **_env(installed["site"])})
    assert result.returncode == 1
    assert f"{config}:7: pipeline[0].redact.mask_" in result.stdout + result.stderr


def test_the_example_tests_pass_against_the_installed_package(installed):
    site, source = installed["site"], installed["source"]
    env = {**os.environ, **_env(site)}
    where = subprocess.run([sys.executable, "-c", "import ssegate_redact; print(ssegate_redact.__file__)"],
                           capture_output=True, text=True, cwd=source, env=env, timeout=60)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                            capture_output=True, text=True, cwd=source, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"^13 passed", result.stdout, re.M), result.stdout[-2000:]
