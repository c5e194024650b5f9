"""``dissect data download`` against a local HTTP server started here (127.0.0.1, Range support, a byte
counter, and a switch that cuts a response half way): complete, resumed without fetching a byte twice,
restarted when the server ignores Range, and refused when the archive is corrupt or incomplete."""

from __future__ import annotations

import io
import re
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from netdissection.plugins.datasets.download import download_broden
from netdissection.plugins.datasets.generated import generate_concept_set

NAME = "broden1_224"
#: The server stops by itself after this long, whatever the test does.
SERVER_LIFETIME = 60.0


@dataclass
class Archive:
    """What the server serves and what it saw."""

    payload: bytes = b""
    ranges: bool = True  # honour Range requests
    cut_after: int | None = None  # cut the next response after this many body bytes
    served: int = 0  # body bytes written, over all requests
    requests: list[str | None] = field(default_factory=list)  # the Range header of each request


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: object) -> None:  # keep pytest's output clean
        pass

    def do_GET(self) -> None:
        archive: Archive = self.server.archive  # type: ignore[attr-defined]
        wanted = self.headers.get("Range")
        archive.requests.append(wanted)
        if self.path != f"/data/{NAME}.zip":
            self.send_error(404)
            return
        data, start = archive.payload, 0
        match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
        if match and archive.ranges:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Content-Type", "application/zip")
        self.end_headers()
        body = data[start:]
        if archive.cut_after is not None:
            body, archive.cut_after = body[: archive.cut_after], None
        self.wfile.write(body)
        archive.served += len(body)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Archive]]:
    """A server on a free port, handling requests in a thread until the test ends or its lifetime runs out."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")  # never route the test's requests through a proxy
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.archive = Archive()  # type: ignore[attr-defined]
    httpd.timeout = 0.05
    stop = threading.Event()
    deadline = time.monotonic() + SERVER_LIFETIME

    def serve() -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            httpd.handle_request()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/data/", httpd.archive  # type: ignore[attr-defined]
    finally:
        stop.set()
        thread.join(timeout=5)
        httpd.server_close()


@pytest.fixture(scope="module")
def broden_zip(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, int]:
    """A Broden-format archive as published (one top folder) and the number of files in it."""
    root = generate_concept_set(tmp_path_factory.mktemp("src") / NAME, images=6, image_size=32, seed=0)
    out = io.BytesIO()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:  # stored: bytes we can corrupt
        for path in files:
            zf.write(path, f"{NAME}/{path.relative_to(root)}")
    return out.getvalue(), len(files)


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


def test_complete_download(run_cli, server, broden_zip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, archive = server
    archive.payload, files = broden_zip
    code, out, err = run_cli("data", "download", NAME, "--mirror", url, "--dest", tmp_path)
    assert code == 0, err
    assert "6 images" in out and "verified" in out
    target = tmp_path / NAME
    assert (target / "index.csv").is_file()
    assert sum(1 for p in target.rglob("*") if p.is_file()) == files
    assert _leftovers(tmp_path) == [NAME]  # no archive, no .part, no temporary folder
    assert archive.served == len(archive.payload) and archive.requests == [None]
    code, out, _ = run_cli("data", "download", NAME, "--mirror", url, "--dest", tmp_path)
    assert code == 0 and len(archive.requests) == 1  # already there: nothing fetched


def test_cut_download_resumes_without_fetching_twice(run_cli, server, broden_zip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, archive = server
    archive.payload = broden_zip[0]
    half = len(archive.payload) // 2
    archive.cut_after = half
    code, _, err = run_cli("data", "download", NAME, "--mirror", url, "--dest", tmp_path, "--retries", "0")
    assert code == 2
    assert "run the same command again to resume" in err and "Traceback" not in err
    assert _leftovers(tmp_path) == [f"{NAME}.zip.part"]  # nothing that looks complete
    assert (tmp_path / f"{NAME}.zip.part").stat().st_size == half

    code, _, err = run_cli("data", "download", NAME, "--mirror", url, "--dest", tmp_path)
    assert code == 0, err
    assert archive.requests == [None, f"bytes={half}-"]
    assert archive.served == len(archive.payload)  # every byte fetched exactly once
    assert _leftovers(tmp_path) == [NAME]


def test_resumes_by_itself_within_one_call(server, broden_zip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, archive = server
    archive.payload = broden_zip[0]
    archive.cut_after = len(archive.payload) // 3
    seen: list[tuple[int, int | None]] = []
    target, layout = download_broden(NAME, tmp_path, mirror=url, retries=1, retry_delay=0,
                                     progress=lambda done, total: seen.append((done, total)))
    assert layout.images == 6 and (target / "index.csv").is_file()
    assert archive.served == len(archive.payload) and len(archive.requests) == 2
    assert seen[-1] == (len(archive.payload), len(archive.payload))


def test_a_server_without_range_support_restarts_the_file(server, broden_zip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, archive = server
    archive.payload, archive.ranges = broden_zip[0], False
    (tmp_path / f"{NAME}.zip.part").write_bytes(archive.payload[:1000])
    target, _ = download_broden(NAME, tmp_path, mirror=f"{url}{NAME}.zip", retries=0)
    assert archive.requests == ["bytes=1000-"] and archive.served == len(archive.payload)
    assert (target / "index.csv").is_file()


def test_corrupt_archive_is_refused_and_removed(run_cli, server, broden_zip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, archive = server
    payload = bytearray(broden_zip[0])
    at = payload.index(b"image,split,ih,iw,sh,sw")  # index.csv's content, stored as is
    payload[at + 2] ^= 0xFF
    archive.payload = bytes(payload)
    code, _, err = run_cli("data", "download", NAME, "--mirror", url, "--dest", tmp_path)
    assert code == 2
    assert f"{NAME}/index.csv fails its CRC check" in err and "deleted" in err
    assert _leftovers(tmp_path) == []


def test_not_a_zip_is_refused(run_cli, server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, archive = server
    archive.payload = b"<html>the mirror moved</html>"
    code, _, err = run_cli("data", "download", NAME, "--mirror", url, "--dest", tmp_path)
    assert code == 2 and "is corrupt" in err
    assert _leftovers(tmp_path) == []


def test_incomplete_archive_is_refused(run_cli, server, broden_zip, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, archive = server
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(broden_zip[0])) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            if not info.filename.endswith("000002_color.png"):
                dst.writestr(info, src.read(info))
    archive.payload = out.getvalue()
    code, _, err = run_cli("data", "download", NAME, "--mirror", url, "--dest", tmp_path)
    assert code == 2 and "incomplete" in err and "images/gen/000002_color.png" in err
    assert _leftovers(tmp_path) == []


def test_unknown_variant_and_missing_file(run_cli, server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url, _ = server
    code, _, err = run_cli("data", "download", "broden1_225", "--dest", tmp_path)
    assert code == 2 and "'broden1_224'" in err
    code, _, err = run_cli("data", "download", "broden1_384", "--mirror", url, "--dest", tmp_path)
    assert code == 2 and "HTTP 404" in err
    assert _leftovers(tmp_path) == []
