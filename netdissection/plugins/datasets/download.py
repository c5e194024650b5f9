"""Download, unpack and verify the published Broden datasets (``dissect data download broden1_224``).

The archives are large (about 1 GB for broden1_224) and served over plain HTTP, so:

- the download goes into ``NAME.zip.part`` and resumes with an HTTP Range request after an interruption
  (a server that ignores Range is detected by its 200 answer, and the file starts over);
- the archive is checked before anything is unpacked (member paths that stay inside, no member inflating
  more than ``core.limits.MAX_INFLATION``-fold, room on the disk for what it declares, zip CRCs), unpacked
  into a hidden temporary folder, its layout verified against its own index.csv (every file it names
  exists), and only then renamed to ``DEST/NAME``: a failure at any step leaves nothing that looks
  complete (a corrupt or hostile archive is deleted, not kept for a resume).
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ... import __version__
from ...core.errors import DissectionError, UnknownNameError
from ...core.limits import check_free_space, check_inflation
from .paths import relative_problem

log = logging.getLogger(__name__)

#: Where the MIT release lives; ``--mirror`` replaces it.
BRODEN_BASE_URL = "http://netdissect.csail.mit.edu/data/"
#: Published variants and their label resolution (labels are half the image size, rounded up).
BRODEN_VARIANTS = {"broden1_224": 112, "broden1_227": 113, "broden1_384": 192}
CHUNK = 1 << 16

#: ``progress(bytes_done, bytes_total_or_None)``, called as the download advances.
ByteProgress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class BrodenLayout:
    """What verification counted in an unpacked Broden folder."""

    images: int
    label_files: int
    categories: tuple[str, ...]


class _Interrupted(Exception):
    """The transfer stopped early; what arrived is kept in the .part file for the next attempt."""


def archive_url(name: str, mirror: str | None = None) -> str:
    """The URL of ``NAME.zip``: ``mirror`` is a base URL, or the full URL of the archive."""
    if mirror and mirror.lower().endswith(".zip"):
        return mirror
    return (mirror or BRODEN_BASE_URL).rstrip("/") + f"/{name}.zip"


def _total_from(content_range: str | None) -> int | None:
    match = re.search(r"/(\d+)\s*$", content_range or "")
    return int(match.group(1)) if match else None


def _start_from(content_range: str | None) -> int | None:
    match = re.match(r"\s*bytes\s+(\d+)-", content_range or "")
    return int(match.group(1)) if match else None


def _attempt(url: str, part: Path, progress: ByteProgress | None, timeout: float) -> None:
    """One request: append to ``part`` from where it ends. Raises _Interrupted when the transfer stops early."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"netdissection/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # nothing left to send: the part may already be whole
            if _total_from(exc.headers.get("Content-Range")) == have:
                return
            part.unlink()
            raise _Interrupted("the partial file does not match the server's; starting over") from None
        raise DissectionError(f"{url}: HTTP {exc.code} {exc.reason}; check the name or the --mirror URL") from None
    with response:
        status = response.status
        length = response.headers.get("Content-Length")
        if status == 206 and _start_from(response.headers.get("Content-Range")) == have:
            total = _total_from(response.headers.get("Content-Range"))
            mode = "ab"
        else:
            if have:
                log.info("the server does not resume downloads (HTTP %s); starting over", status)
            have, mode = 0, "wb"
            total = int(length) if length and length.isdigit() else None
        with part.open(mode) as f:
            done = have
            try:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
            except (http.client.IncompleteRead, OSError) as exc:  # a cut connection; keep what arrived
                raise _Interrupted(f"the connection broke after {done} bytes ({exc})") from None
    if total is not None and done < total:
        raise _Interrupted(f"the server sent {done} of {total} bytes")


def fetch(url: str, part: Path, *, retries: int = 3, progress: ByteProgress | None = None,
          timeout: float = 60.0, retry_delay: float = 2.0) -> None:
    """Download ``url`` into ``part``, resuming what is there; retry ``retries`` times after interruptions.

    When the retries run out the partial file stays, and running again resumes from it.
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        try:
            _attempt(url, part, progress, timeout)
            return
        except (_Interrupted, urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            size = part.stat().st_size if part.exists() else 0
            if attempt == retries:
                raise DissectionError(
                    f"download of {url} stopped ({reason}); {size} bytes are kept in {part}: run the same "
                    "command again to resume") from None
            log.warning("download interrupted (%s); resuming from byte %d", reason, size)
            time.sleep(retry_delay * (attempt + 1))


def _safe_members(archive: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    members = archive.infolist()
    for info in members:
        if relative_problem(info.filename) is not None:
            raise DissectionError(f"the archive holds the unsafe path {info.filename!r}; refusing to unpack it")
    return members


def check_archive(path: Path, target_folder: Path | None = None) -> int:
    """Check an archive before a byte is unpacked: safe member paths, room on the disk of ``target_folder``
    for what it declares, the inflation limit, then every member's CRC; return the unpacked size in bytes.

    Raises DissectionError; ``_Unfit`` when the archive does not fit on the disk.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = _safe_members(archive)
            size = sum(m.file_size for m in members)
            if target_folder is not None:
                try:
                    check_free_space(size, target_folder, f"unpacking {path.name}")
                except DissectionError as exc:
                    raise _Unfit(str(exc)) from None
            check_inflation(archive, path, f"the downloaded archive {path.name}")
            bad = archive.testzip()  # reads every member, held to its declared size
    except DissectionError:
        raise
    except Exception as exc:  # zipfile raises many types on a damaged archive (BadZipFile, zlib.error, ...)
        raise DissectionError(f"the downloaded archive {path.name} is corrupt ({exc})") from None
    if bad is not None:
        raise DissectionError(f"the downloaded archive {path.name} is corrupt: {bad} fails its CRC check")
    return size


class _Unfit(DissectionError):
    """An archive that does not fit where it should be unpacked: kept, for another --dest."""


def _dataset_root(folder: Path) -> Path:
    """The folder holding index.csv: the archive's root, or its single top-level folder."""
    if (folder / "index.csv").is_file():
        return folder
    entries = [p for p in folder.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    if len(entries) == 1 and (entries[0] / "index.csv").is_file():
        return entries[0]
    raise DissectionError("the archive holds no index.csv: it is not a Broden dataset")


def verify_broden(root: Path) -> BrodenLayout:
    """Check the layout of an unpacked Broden folder: its tables exist and read as the dataset reader reads
    them, and every file index.csv names exists."""
    from .broden import BrodenDataset, read_categories

    for name in ("index.csv", "label.csv", "category.csv"):
        if not (root / name).is_file():
            raise DissectionError(f"the archive lacks {name}")
    categories = tuple(read_categories(root))
    missing = [f"c_{c}.csv" for c in categories if not (root / f"c_{c}.csv").is_file()]
    count = len(missing)
    images = labels = 0
    if not missing:
        dataset = BrodenDataset(root)
        for index in range(len(dataset)):
            row = dataset.row(index)
            images += 1
            labels += len(row.pixel_files)
            for name in (row.image, *row.pixel_files):
                if not (root / "images" / name).is_file():
                    count += 1
                    if len(missing) < 5:
                        missing.append(f"images/{name}")
    if count:
        raise DissectionError(f"the archive is incomplete: {count} file(s) named in its tables are missing "
                              f"({', '.join(missing)}{', ...' if count > 5 else ''})")
    return BrodenLayout(images=images, label_files=labels, categories=categories)


def _discard(archive: Path, exc: DissectionError) -> DissectionError:
    """A complete archive that fails its checks will not get better by resuming: delete it."""
    with contextlib.suppress(OSError):
        archive.unlink()
    return DissectionError(f"{exc}; it was deleted: run the command again to download it anew")


def unpack_broden(archive: Path, target: Path) -> BrodenLayout:
    """Unpack ``archive`` into ``target`` through a hidden temporary folder; verify before the final rename.

    A corrupt, incomplete or hostile archive is deleted; one that merely does not fit on the disk is kept.
    """
    try:
        check_archive(archive, target.parent)
    except _Unfit:
        raise
    except DissectionError as exc:
        raise _discard(archive, exc) from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.unpack-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        try:
            root = _dataset_root(tmp)
            layout = verify_broden(root)
        except DissectionError as exc:
            raise _discard(archive, exc) from None
        os.rename(root, target)
    except OSError as exc:
        raise DissectionError(f"cannot unpack {archive.name} into {target.parent}: {exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return layout


def download_broden(name: str, dest: str | Path, *, mirror: str | None = None, keep_zip: bool = False,
                    retries: int = 3, progress: ByteProgress | None = None, timeout: float = 60.0,
                    retry_delay: float = 2.0) -> tuple[Path, BrodenLayout]:
    """Download Broden ``name`` into ``dest/name``; returns the folder and what verification counted.

    An archive already downloaded (``dest/name.zip``) is reused; a partial one (``.zip.part``) is resumed.
    """
    if name not in BRODEN_VARIANTS:
        raise UnknownNameError("Broden variant", name, list(BRODEN_VARIANTS))
    dest = Path(dest).expanduser()
    target = dest / name
    if (target / "index.csv").is_file():
        log.info("%s is already there", target)
        return target, verify_broden(target)
    if target.exists():
        raise DissectionError(f"{target} exists but holds no Broden dataset; remove it or pick another --dest")
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / f"{name}.zip"
    part = dest / f"{name}.zip.part"
    if not archive.is_file():
        url = archive_url(name, mirror)
        log.info("downloading %s into %s", url, part)
        fetch(url, part, retries=retries, progress=progress, timeout=timeout, retry_delay=retry_delay)
        os.replace(part, archive)
    layout = unpack_broden(archive, target)
    if not keep_zip:
        archive.unlink()
    return target, layout


def default_dest() -> Path:
    """The folder downloads go to by default: the cache folder of the built-in concept set."""
    from .generated import _cache_root

    return _cache_root()
