"""Plugin discovery: entry points and built-ins load the same way; a broken plugin is recorded, not fatal."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import netdissection
from netdissection.core.errors import UnknownNameError
from netdissection.registry import build_host


@pytest.fixture
def installed_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A distribution on sys.path declaring two entry points: one that works and one that cannot import."""
    (tmp_path / "netdissection_goodplugin.py").write_text(
        "import netdissection\n"
        "class Echo:\n"
        "    def write(self, result, out_dir):\n"
        "        return []\n"
        "@netdissection.hookimpl\n"
        "def dissect_register_reporters(register):\n"
        "    register('echo', Echo, description='writes nothing')\n"
        "@netdissection.hookimpl\n"
        "def dissect_register_commands(cli):\n"
        "    @cli.command('hello')\n"
        "    def hello():\n"
        "        print('hello from a plugin')\n"
    )
    dist = tmp_path / "netdissection_goodplugin-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: netdissection-goodplugin\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text(
        "[netdissection]\ngood = netdissection_goodplugin\nbroken = netdissection_no_such_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_entry_points_load_each_on_its_own(installed_plugins: Path) -> None:
    host = build_host()
    records = {r.name: r for r in host.plugins}
    assert records["good"].source == "netdissection-goodplugin"
    assert records["good"].version == "1.2.3"
    assert records["good"].error is None
    assert records["good"].provides == ["reporter:echo"]
    assert "ModuleNotFoundError" in (records["broken"].error or "")
    # The built-ins are there, registered through the same hooks.
    assert records["torchvision_backend"].provides == ["backend:torchvision"]
    assert "echo" in host.catalog("reporter")


def test_dissect_plugins_lists_versions_commands_and_errors(installed_plugins: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    code, out, err = run_cli("plugins")
    assert code == 0, err
    assert "1.2.3" in out and "reporter:echo" in out and "command:hello" in out
    assert "broken" in out and "ModuleNotFoundError" in out
    code, out, _ = run_cli("hello")
    assert code == 0 and "hello from a plugin" in out


def test_a_plugin_whose_registration_raises_is_recorded() -> None:
    class Faulty:
        __name__ = "faulty"

        @netdissection.hookimpl
        def dissect_register_backends(self, register):  # type: ignore[no-untyped-def]
            raise RuntimeError("boom")

    host = build_host(entry_points=False, extra_plugins=(Faulty(),))
    record = next(r for r in host.plugins if r.name == "faulty")
    assert "boom" in (record.error or "")
    assert "torchvision" in host.catalog("backend")


def test_duplicate_names_are_refused_with_both_plugins_named() -> None:
    class Copycat:
        __name__ = "copycat"

        @netdissection.hookimpl
        def dissect_register_thresholds(self, register):  # type: ignore[no-untyped-def]
            register("quantile", object)

    host = build_host(entry_points=False, extra_plugins=(Copycat(),))
    record = next(r for r in host.plugins if r.name == "copycat")
    assert "quantile" in (record.error or "") and "'quantile'" in (record.error or "")
    assert host.catalog("threshold").get("quantile").plugin == "quantile"


def test_unknown_names_suggest_close_matches() -> None:
    host = build_host(entry_points=False)
    with pytest.raises(UnknownNameError, match="did you mean 'quantile'"):
        host.catalog("threshold").get("quantil")


def test_listing_plugins_does_not_import_frameworks() -> None:
    """Heavy frameworks load inside factories, so `dissect plugins` stays instant."""
    import subprocess

    code = ("import sys; from netdissection.registry import build_host; build_host(); "
            "print(sorted(m for m in ('torch', 'timm', 'onnxruntime', 'datasets', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
