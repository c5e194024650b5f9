from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .random_broden import write_random_broden

if TYPE_CHECKING:  # pragma: no cover
    from .report_data import SmallRun

# pytester runs the testing kit's pytest plugin in a session of its own (tests/test_testing_kit.py).
pytest_plugins = ["pytester"]

# The tests run offline: never let a library wait on a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def _own_cache_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Runs of the tests go to a results store of their own, never to the user's cache folder."""
    os.environ["NETDISSECTION_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def random_broden(tmp_path: Path) -> Callable[..., Path]:
    """Write a random-label Broden folder under the test's tmp dir: ``random_broden(images=..)``."""

    def make(name: str = "broden", **kwargs: object) -> Path:
        return write_random_broden(tmp_path / name, **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run ``dissect ARGS`` in-process (``plugins=``: plugin objects to add); return (exit status, stdout,
    stderr)."""
    from netdissection.cli import main

    def run(*args: str, plugins: tuple[object, ...] = ()) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            main([str(a) for a in args], plugins=plugins)
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> SmallRun:
    """One real dissection (resnet18 layer2+layer3, seeded weights, 12 generated 64 px images) shared by the
    report tests; its output folder is read-only by convention: copy it before changing anything."""
    from .report_data import dissect_small

    return dissect_small(tmp_path_factory.mktemp("small-run"))
