"""The pytest fixtures of ``netdissection.testing`` (enabled by ``pytest_plugins = ["netdissection.testing"]``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .data import tiny_model as make_tiny_model
from .data import write_tiny_broden, write_tiny_folder

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from ..core.types import RunResult
    from ..registry import Host


@dataclass(frozen=True)
class CliResult:
    """What a ``dissect`` command did: its exit status and what it printed."""

    exit_code: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        """The lines on stderr that are not progress bars."""
        return [line for line in self.stderr.strip().splitlines() if line.strip() and "images/s" not in line]


@pytest.fixture(name="tiny_model")
def tiny_model_fixture() -> nn.Module:
    """A small seeded convolutional model (``netdissection.testing.tiny_model``): layers conv1, relu1,
    conv2, relu2 (spatial), pool, flatten, fc."""
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_broden_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated concept set of 12 images of 32 px, six categories, in the Broden format (shared by the
    session: do not change it)."""
    return write_tiny_broden(tmp_path_factory.mktemp("tiny-broden") / "broden")


@pytest.fixture(scope="session")
def tiny_folder_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same concept set in the ``folder`` format (shared by the session: do not change it)."""
    return write_tiny_folder(tmp_path_factory.mktemp("tiny-folder") / "folder")


@pytest.fixture(scope="session")
def tiny_run(tiny_broden_set: Path) -> RunResult:
    """A real dissection of the tiny model's ``conv2`` on the tiny Broden set (its dataset attached), to
    hand to report writers. Shared by the session: do not change it."""
    import netdissection

    return netdissection.dissect(make_tiny_model(), dataset=str(tiny_broden_set), layers=["conv2"], workers=0,
                                 host=netdissection.build_host(entry_points=False))


@pytest.fixture
def plugin_host() -> Callable[..., Host]:
    """``plugin_host(*plugins, entry_points=False)``: a fresh host with the built-in plugins and the given
    plugin objects (modules or objects with hook implementations), registered after them. Installed
    entry points are left out unless ``entry_points=True``."""
    from ..registry import build_host

    def make(*plugins: Any, entry_points: bool = False) -> Host:
        return build_host(entry_points=entry_points, extra_plugins=plugins)

    return make


@pytest.fixture
def dissect_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """``dissect_cli(*args, plugins=())``: run ``dissect ARGS`` in this process, with the installed plugins
    plus the given plugin objects; returns a :class:`CliResult`."""
    from ..cli import main

    def run(*args: Any, plugins: Sequence[Any] = ()) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args], plugins=plugins)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private netdissection cache folder for the test (``$NETDISSECTION_CACHE``): the record of plugin
    failures that ``dissect plugins`` shows is kept there."""
    cache = tmp_path / "netdissection-cache"
    monkeypatch.setenv("NETDISSECTION_CACHE", str(cache))
    return cache
