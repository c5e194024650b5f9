"""A full disk: the activation cache, the results or the results store filling up during a run ends it with one
line naming the folder and the space needed (exit status 2), the cache removed and nothing that looks complete;
an estimate that will not fit is refused before the passes.

The disk fills by a write hook (``faults_kit.disk_quota``: past a quota every write under a folder raises
ENOSPC, after a short write, as the kernel does) so that these tests run anywhere; where this machine lets a
test mount a small tmpfs, the kernel's own ENOSPC is tried too."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections import namedtuple
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from netdissection.core.cache import format_size
from netdissection.core.space import results_bytes
from netdissection.plugins.datasets.generated import generate_concept_set

from .cli_checks import assert_one_line_error
from .faults_kit import disk_quota, leftovers, result_files

RunCli = Callable[..., tuple[int, str, str]]
IMAGES = 24
MODEL = ("resnet18", "--layer", "layer1", "--layer", "layer2", "--batch-size", "8", "--workers", "0")
#: resnet18 at 32 px: layer1 is 64 units of 8×8, layer2 128 units of 4×4; the cache holds at most all of them as
#: float32, with a mask of the units kept per image and layer (a bit a unit, in 4-byte words).
SHAPES = [(64, 8, 8), (128, 4, 4)]
CACHE = IMAGES * sum(4 * u * h * w + 4 * -(-u // 32) for u, h, w in SHAPES)


@pytest.fixture(scope="module")
def concept_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_concept_set(tmp_path_factory.mktemp("set") / "gen", images=IMAGES, image_size=32, seed=0)


@pytest.fixture(scope="module")
def results_estimate(concept_set: Path) -> int:
    import netdissection

    vocabulary = netdissection.open_dataset(str(concept_set)).vocabulary
    return results_bytes(SHAPES, vocabulary.size, len(vocabulary.categories), 10)


def assert_nothing_complete(*folders: Path) -> None:
    for folder in folders:
        assert not list(folder.rglob("summary.json")), f"{folder} holds a summary.json"
    assert leftovers(*folders) == []


def test_the_cache_filling_the_disk(run_cli: RunCli, concept_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with disk_quota(out, 100_000) as quota:
        code, _, err = run_cli(*MODEL, "--dataset", concept_set, "--out", out, "--no-store", "--cache", "disk")
    assert quota.refused
    assert_one_line_error(code, err, f"no space left in {out} for the activation cache",
                          f"it needs about {format_size(CACHE)}", "--cache recompute")
    assert_nothing_complete(out)


@pytest.mark.parametrize("room", [60_000, 250_000, 400_000])
def test_the_results_filling_the_disk(run_cli: RunCli, concept_set: Path, tmp_path: Path, room: int,
                                      results_estimate: int) -> None:
    """Wherever the disk fills — the counts, the tables, the plots, the HTML report — the run ends in one
    line, and the folder holds no summary.json: not even that of the complete run it held before."""
    out = tmp_path / "out"
    code, _, err = run_cli("resnet18", "--layer", "layer3", "--dataset", concept_set, "--out", out, "--no-store",
                           "--workers", "0", "--report", "tally")
    assert code == 0 and (out / "summary.json").is_file(), err
    with disk_quota(out, room) as quota:
        code, _, err = run_cli(*MODEL, "--dataset", concept_set, "--out", out, "--no-store", "--cache", "recompute")
    assert quota.refused
    assert_one_line_error(code, err, f"no space left in {out} for the results",
                          f"it needs about {format_size(results_estimate)}")
    assert_nothing_complete(out)


def test_the_store_filling_up(run_cli: RunCli, concept_set: Path, tmp_path: Path) -> None:
    out, store = tmp_path / "out", tmp_path / "store"
    with disk_quota(store, 100_000) as quota:
        code, _, err = run_cli(*MODEL, "--dataset", concept_set, "--out", out, "--store", store)
    assert quota.refused
    assert_one_line_error(code, err, f"no space left in {store / 'staging'}", "activation cache")
    assert list((store / "staging").iterdir()) == [] and not (store / "jobs").exists()
    assert not out.exists() or not list(out.iterdir())


def test_the_output_folder_filling_while_the_store_copies_into_it(run_cli: RunCli, concept_set: Path,
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """--out on another disk than the store: the finished run is copied, not linked, and that disk fills up.
    The store keeps its complete entry; --out holds no summary.json; once there is room the run is read from
    the store."""
    out, store = tmp_path / "out", tmp_path / "store"

    def other_disk(source: object, target: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    with monkeypatch.context() as patch:
        patch.setattr(os, "link", other_disk)
        with disk_quota(out, 50_000) as quota:
            code, _, err = run_cli(*MODEL, "--dataset", concept_set, "--out", out, "--store", store)
    assert quota.refused
    assert_one_line_error(code, err, f"no space left in {out} for the results")
    assert_nothing_complete(out)
    assert len(list((store / "jobs").iterdir())) == 1
    code, stdout, err = run_cli(*MODEL, "--dataset", concept_set, "--out", out, "--store", store)
    assert code == 0, err
    assert "from the results store" in stdout
    assert result_files(out)["summary.json"]


Usage = namedtuple("Usage", "total used free")


@pytest.fixture
def free_space(monkeypatch: pytest.MonkeyPatch) -> Callable[[Path, int], None]:
    """``free_space(folder, bytes)``: the disk of ``folder`` says it has that much free."""
    real = shutil.disk_usage
    limits: dict[str, int] = {}

    def usage(path: str | os.PathLike[str]) -> Usage:
        here = os.path.abspath(path)
        for folder, free in limits.items():
            if here == folder or here.startswith(folder + os.sep):
                return Usage(10 * free + (1 << 30), 0, free)
        return Usage(*real(path))

    monkeypatch.setattr(shutil, "disk_usage", usage)
    return lambda folder, free: limits.__setitem__(os.path.abspath(folder), free)


def test_estimates_that_will_not_fit(run_cli: RunCli, concept_set: Path, tmp_path: Path,
                                     free_space: Callable[[Path, int], None], results_estimate: int) -> None:
    out = tmp_path / "out"
    out.mkdir()
    # Room for the results but not for the cache beside them: --cache disk is refused, saying both sizes ...
    room = results_estimate + CACHE // 2
    free_space(out, room)
    code, _, err = run_cli(*MODEL, "--dataset", concept_set, "--out", out, "--no-store", "--cache", "disk")
    assert_one_line_error(code, err, f"--cache disk: the activation cache would take {format_size(CACHE)} "
                                     f"(and the results about {format_size(results_estimate)}), but {out} has "
                                     f"{format_size(room)} free", "--cache recompute")
    assert_nothing_complete(out)
    # ... and --cache auto says so, recomputes the maps instead, and finishes.
    code, _, err = run_cli(*MODEL, "--dataset", concept_set, "--out", out, "--no-store")
    assert code == 0, err
    said = " ".join(err.split())
    assert f"the activation cache would take {format_size(CACHE)} (and the results about " in said
    assert "the maps are recomputed" in said
    # No room for the results themselves: refused on the first batch, before the passes.
    free_space(out, 1 << 20)
    code, _, err = run_cli(*MODEL, "--dataset", concept_set, "--out", tmp_path / "out" / "again", "--no-store")
    assert_one_line_error(code, err, f"no space left in {out / 'again'} for the results",
                          f"it needs about {format_size(results_estimate)} and 1.0 MB is free")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 256 kB tmpfs mounted for the test, where this machine allows it (root with CAP_SYS_ADMIN)."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root; the ENOSPC hook tests cover the same paths")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"this machine does not let a test mount a tmpfs ({mounted.stderr.strip()}); the ENOSPC hook "
                    "tests cover the same paths")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_real_small_disk(run_cli: RunCli, concept_set: Path, small_tmpfs: Path,
                           free_space: Callable[[Path, int], None]) -> None:
    """A 256 kB tmpfs. Told the truth about its free space, the run is refused before the passes; told it has
    room (as when another process frees space, then takes it again), the kernel's ENOSPC — short writes
    included — ends the run in one line, with the cache removed and no summary.json."""
    out = small_tmpfs / "out"
    code, _, err = run_cli(*MODEL, "--dataset", concept_set, "--out", out, "--no-store", "--cache", "disk")
    assert_one_line_error(code, err, f"no space left in {out} for the results", "KB is free")
    free_space(small_tmpfs, 1 << 40)
    code, _, err = run_cli(*MODEL, "--dataset", concept_set, "--out", out, "--no-store", "--cache", "disk")
    assert_one_line_error(code, err, f"no space left in {out} for the activation cache")
    assert_nothing_complete(out)
    code, _, err = run_cli(*MODEL, "--dataset", concept_set, "--out", out, "--no-store", "--cache", "recompute")
    assert_one_line_error(code, err, f"no space left in {out} for the results")
    assert_nothing_complete(out)
