"""Job keys and the results store: what changes a key and what does not, atomic commits, corrupt entries."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from netdissection.core.jobkey import Job, dataset_fingerprint, key_material, key_of
from netdissection.core.store import RECORD, RUN, STAGING, ResultsStore, materialise
from netdissection.plugins.datasets.generated import generate_concept_set
from netdissection.registry import build_host


@pytest.fixture(scope="module")
def host():  # type: ignore[no-untyped-def]
    return build_host()


@pytest.fixture
def concept_set(tmp_path: Path) -> Path:
    return generate_concept_set(tmp_path / "set", images=4, image_size=16, seed=0)


def key(job: Job, host) -> str:  # type: ignore[no-untyped-def]
    return key_of(key_material(job, host, {"name": "quantile", "params": {"q": job.quantile or 0.005}}))


def test_key_covers_what_the_numbers_depend_on(host, concept_set: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"weights one")
    base = Job(model="resnet18", weights=str(weights), dataset=str(concept_set), layers=("layer4",))
    reference = key(base, host)
    assert key(base, host) == reference  # stable
    # Not in the key: how the job runs and how it is shown.
    for same in (replace(base, batch_size=3), replace(base, workers=0), replace(base, reporters=("tally",)),
                 replace(base, name="shown", x=3.0, labels={"a": "b"}), replace(base, lenient_layers=True)):
        assert key(same, host) == reference
    # In the key: each thing the numbers depend on.
    changed = [replace(base, model="resnet34"), replace(base, backend="timm"), replace(base, layers=("layer3",)),
               replace(base, layers=("layer4", "layer3")), replace(base, quantile=0.01), replace(base, compat="lite"),
               replace(base, top_k=5), replace(base, skip_bad=True), replace(base, categories=("object",)),
               replace(base, backend_options={"input_size": (64, 64)}), replace(base, device="cuda"),
               replace(base, pretrained=True, weights=None)]
    keys = {key(job, host) for job in changed}
    assert reference not in keys and len(keys) == len(changed)
    # The weights by their bytes, not their path.
    copy = tmp_path / "copy.pt"
    copy.write_bytes(weights.read_bytes())
    assert key(replace(base, weights=str(copy)), host) == reference
    weights.write_bytes(b"weights two")
    assert key(base, host) != reference


def test_protocol_version_is_in_the_key(host, concept_set: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from netdissection.core import jobkey

    job = Job(model="resnet18", dataset=str(concept_set))
    before = key(job, host)
    monkeypatch.setattr(jobkey, "PROTOCOL_VERSION", jobkey.PROTOCOL_VERSION + 1)
    assert key(job, host) != before


def test_dataset_fingerprint_reads_tables_not_images(concept_set: Path) -> None:
    first = dataset_fingerprint(concept_set)
    assert first == dataset_fingerprint(concept_set)
    image = sorted((concept_set / "images").rglob("*.jpg"))[0]
    # An image's bytes are never read: the same size and time with other bytes give the same fingerprint ...
    stat = image.stat()
    data = image.read_bytes()
    image.write_bytes(bytes(255 - b for b in data))
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert dataset_fingerprint(concept_set) == first
    # ... its size or time count,
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = dataset_fingerprint(concept_set)
    assert second != first
    # the index by its bytes (touching it changes nothing; editing it does),
    index = concept_set / "index.csv"
    stat = index.stat()
    os.utime(index, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert dataset_fingerprint(concept_set) == second
    index.write_text(index.read_text() + "\n")
    third = dataset_fingerprint(concept_set)
    assert third != second
    # and an added file too; hidden files (a writer's temporaries) do not.
    (concept_set / ".index.csv.tmp-1").write_text("x")
    assert dataset_fingerprint(concept_set) == third
    (concept_set / "extra.png").write_bytes(b"png")
    assert dataset_fingerprint(concept_set) != third


def _fake_run(folder: Path, layers: int = 1) -> None:
    folder.mkdir(parents=True)
    (folder / "layer").mkdir()
    (folder / "layer" / "tally.csv").write_text("unit,category,label,score\n")
    (folder / "summary.json").write_text(json.dumps({"layers": [{"layer": "layer"}] * layers}))


def test_commit_is_atomic_and_verified(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ResultsStore(tmp_path / "store")
    k = "0" * 32
    assert store.lookup(k) is None
    staging = store.begin(k)
    _fake_run(staging / RUN)
    assert store.lookup(k) is None  # nothing under the key while it is being computed
    entry = store.commit(k, staging, {"model": {"name": "m"}}, {"job": {"model": "m"}})
    assert not staging.exists()
    assert store.lookup(k) is not None
    assert entry.summary()["layers"]
    # A second process that computed the same job keeps the first one's entry.
    other = store.begin(k)
    _fake_run(other / RUN, layers=2)
    kept = store.commit(k, other, {"model": {"name": "m"}})
    assert len(kept.summary()["layers"]) == 1 and not other.exists()
    # A changed file: reported, removed, and computed again (lookup says it is not there).
    (entry.run_dir / "layer" / "tally.csv").write_text("unit,category,label,score\n1,object,sky,0.5\n")
    with caplog.at_level(logging.WARNING):
        assert store.lookup(k) is None
    assert "corrupt" in caplog.text and "tally.csv has changed" in caplog.text
    assert not store.entry_path(k).exists()


def test_materialise_links_and_writers_do_not_touch_the_store(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "store")
    k = "1" * 32
    staging = store.begin(k)
    _fake_run(staging / RUN)
    entry = store.commit(k, staging, {})
    out = tmp_path / "out"
    written = materialise(entry.run_dir, out)
    assert written[-1] == "summary.json"
    assert (out / "layer" / "tally.csv").read_text() == (entry.run_dir / "layer" / "tally.csv").read_text()
    # Report writers replace files (atomic writes): the store's copy stays as it was.
    from netdissection.core.files import atomic_write_text

    atomic_write_text(out / "layer" / "tally.csv", "rewritten\n")
    assert store.lookup(k) is not None


def test_gc_removes_what_killed_jobs_left(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "store")
    k = "2" * 32
    # A job whose process was killed: its staging folder stays behind, named with its (dead) pid.
    code = ("import sys; from netdissection.core.store import ResultsStore; "
            f"s = ResultsStore(sys.argv[1]); p = s.begin('{k}'); (p / 'run').mkdir(); print(p)")
    left = Path(subprocess.run([sys.executable, "-c", code, str(store.root)], check=True, capture_output=True,
                               text=True).stdout.strip())
    assert left.is_dir() and left.parent == store.root / STAGING
    assert store.lookup(k) is None
    broken = store.root / "jobs" / ("3" * 32)
    broken.mkdir(parents=True)
    (broken / RECORD).write_text("{")
    report = store.gc()
    assert report.staging == [left] and not left.exists()
    assert report.corrupt == ["3" * 32] and not broken.exists()
    mine = store.begin(k)  # a live job of this process is left alone
    assert store.gc().staging == [] and mine.exists()


def test_gc_prunes_least_recently_used(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "store")
    keys = ["4" * 32, "5" * 32, "6" * 32]
    for i, k in enumerate(keys):
        staging = store.begin(k)
        _fake_run(staging / RUN)
        entry = store.commit(k, staging, {})
        os.utime(entry.path, (1_000_000 + i, 1_000_000 + i))
    size = store.listing()[0].bytes
    report = store.gc(max_bytes=2 * size)
    assert report.evicted == [keys[0]]
    report = store.gc(older_than_days=1)
    assert sorted(report.evicted) == sorted(keys[1:])
