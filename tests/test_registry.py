"""Plugin discovery: entry points and built-ins load the same way; a broken plugin is recorded, not fatal."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import netdissection
from netdissection.core.errors import UnknownNameError
from netdissection.registry import build_host

from .cli_checks import assert_one_line_error


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
        "def dissect_register_commands(cli, context):\n"
        "    @cli.command('hello')\n"
        "    @context.verbose_option\n"
        "    def hello(verbose):\n"
        "        context.setup_logging(verbose)\n"
        "        writers = ', '.join(context.host.catalog('reporter').names())\n"
        "        context.out.print('hello from a plugin; writers: ' + writers)\n"
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
    code, out, _ = run_cli("hello", "-v")
    assert code == 0 and "hello from a plugin; writers: tally, thresholds, plots, html, echo" in out
    code, out, _ = run_cli("plugins", "--json")
    listing = json.loads(out)
    good = next(p for p in listing["plugins"] if p["name"] == "good")
    assert good["provides"] == ["reporter:echo", "command:hello"] and good["status"] == "ok"
    assert next(p for p in listing["plugins"] if p["name"] == "broken")["status"] == "error"
    assert {"name": "echo", "plugin": "good", "description": "writes nothing", "default": False} in \
        listing["components"]["reporter"]


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
            register("median", object, description="a rule of its own")

        @netdissection.hookimpl
        def dissect_register_reporters(self, register):  # type: ignore[no-untyped-def]
            register("tally", object)
            register("html", object)

    host = build_host(entry_points=False, extra_plugins=(Copycat(),))
    record = next(r for r in host.plugins if r.name == "copycat")
    # Every clash is kept, each naming both plugins; the plugin's other registrations went on.
    assert len(record.failures) == 3, record.errors
    assert [f.where for f in record.failures] == ["dissect_register_thresholds", "dissect_register_reporters",
                                                  "dissect_register_reporters"]
    assert "threshold rule 'quantile' is registered by both 'quantile' and 'copycat'" in record.errors[0]
    assert "'tally'" in record.errors[1] and "'html'" in record.errors[2]
    assert host.catalog("threshold").get("quantile").plugin == "quantile"
    assert host.catalog("threshold").get("median").plugin == "copycat"
    assert record.provides == ["threshold:median"]


def test_a_name_whose_plugin_failed_to_register_says_so(run_cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The error about a missing component names the plugin that failed to register it, and its error."""

    class Jit:
        __name__ = "jitplugin"

        @netdissection.hookimpl
        def dissect_register_backends(self, register):  # type: ignore[no-untyped-def]
            raise RuntimeError("cannot import torch.jit extras")

        @netdissection.hookimpl
        def dissect_register_thresholds(self, register):  # type: ignore[no-untyped-def]
            raise RuntimeError("no rules today")

        @netdissection.hookimpl
        def dissect_detect_backend(self, model_ref):  # type: ignore[no-untyped-def]
            return "jit" if str(model_ref).endswith(".jit") else None

    def error_line(code: int, err: str) -> str:
        """The run stops with one error line (after one warning line per registration failure)."""
        assert code == 2 and "Traceback" not in err, err
        lines = err.strip().splitlines()
        assert [line for line in lines if not line.startswith("warning: plugin 'jitplugin'")] == lines[-1:], err
        assert len(lines) == 3 and lines[-1].startswith("error:"), err
        return lines[-1]

    model = tmp_path / "model.jit"
    model.write_bytes(b"")
    line = error_line(*run_cli(model, plugins=(Jit(),))[::2])
    assert "the plugin 'jitplugin' claims" in line and "model.jit" in line and "backend 'jit'" in line
    assert "failed in dissect_register_backends (RuntimeError: cannot import torch.jit extras)" in line
    line = error_line(*run_cli("resnet18", "--backend", "jit", plugins=(Jit(),))[::2])
    assert "unknown backend 'jit'" in line
    assert "plugin 'jitplugin' failed in dissect_register_backends (RuntimeError: cannot import torch.jit" in line
    line = error_line(*run_cli("resnet18", "--threshold", "median", plugins=(Jit(),))[::2])
    assert "unknown threshold rule 'median'" in line and "no rules today" in line
    code, _, err = run_cli(model, "--strict-plugins", plugins=(Jit(),))
    assert_one_line_error(code, err, "'jitplugin'", "cannot import torch.jit extras", "and 1 more")


def test_a_dataset_format_plugin(run_cli, random_broden) -> None:  # type: ignore[no-untyped-def]
    """A plugin's dataset format is detected and opened like the built-in ones, by every command."""
    from netdissection.plugins.datasets.broden import BrodenDataset

    class Mirror(BrodenDataset):
        format = "mirror"

    class MirrorPlugin:
        __name__ = "mirror"

        @netdissection.hookimpl
        def dissect_register_datasets(self, register):  # type: ignore[no-untyped-def]
            register("mirror", Mirror, description="Broden read back to front",
                     detect=lambda path: str(path).endswith(".mirror"))

    data = random_broden("set.mirror", images=6, image_size=32, label_size=16)
    code, out, err = run_cli("data", "info", data, "--workers", "0", plugins=(MirrorPlugin(),))
    assert code == 0, err
    assert "mirror format, 6 images" in " ".join(out.split())
    host = build_host(entry_points=False, extra_plugins=(MirrorPlugin(),))
    assert isinstance(netdissection.open_dataset(data, host=host), Mirror)


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


class RunOptionsCommand:
    """A plugin command made of the command context's decorators: the run options ``dissect MODEL`` has."""

    __name__ = "run_options_command"

    def __init__(self) -> None:
        self.seen: dict[str, object] = {}

    @netdissection.hookimpl
    def dissect_register_commands(self, cli, context):  # type: ignore[no-untyped-def]
        @cli.command("options")
        @context.input_options
        @context.runtime_option
        @context.explain_options
        def options(input_size, mean, std, bgr, runtime, explain, explain_params, formula_length, beam,  # type: ignore[no-untyped-def]
                    units):
            self.seen = {"backend_options": context.backend_options(input_size, mean, std, bgr, runtime),
                         **context.explain_arguments(explain, explain_params, formula_length, beam, units)}


def test_a_plugin_command_takes_the_run_options_from_the_context(run_cli) -> None:  # type: ignore[no-untyped-def]
    """--runtime and the explainer's options come to a plugin's command as they come to `dissect MODEL`
    (and to `dissect compare`, built the same way), parsed, checked and in `dissect()`'s terms."""
    command = RunOptionsCommand()
    code, _, err = run_cli("options", "--runtime", "auto", "--bgr", "--explain", "compositional", "--beam", "4",
                           "--explain-param", "formula_length=2", "--units", "1-3,7", plugins=(command,))
    assert code == 0, err
    assert command.seen == {"backend_options": {"runtime": "auto", "bgr": True}, "explain": "compositional",
                            "explain_params": {"formula_length": 2, "beam": 4}, "explain_units": (1, 2, 3, 7)}
    code, _, err = run_cli("options", plugins=(command,))
    assert code == 0, err
    assert command.seen == {"backend_options": {}, "explain": None, "explain_params": {}, "explain_units": None}
    code, _, err = run_cli("options", "--formula-length", "3", "--explain-param", "formula_length=2",
                           plugins=(command,))
    assert_one_line_error(code, err, "--formula-length 3", "--explain-param formula_length=2", "disagree")
    code, _, err = run_cli("options", "--runtime", "fastest", plugins=(command,))
    assert code == 2 and "'fastest' is not one of 'torch', 'onnxruntime', 'auto'" in err
